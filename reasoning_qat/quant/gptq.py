"""GPTQ (Frantar et al., 2022): quantize a Linear weight column by column, folding each column's
rounding error into the not-yet-quantized columns through the inverse Hessian of its inputs.

Written here rather than taken from GPTQModel because the project's quantizer grid (observers,
g_idx, symmetric/asymmetric, 2/3/4/8 bits) must be exactly the one the fake-quant modules and the
exporter use; tests check it against a plain column-by-column reference.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from .fake_quant import QuantizedWeight
from .quantizer import find_params, quantize_codes
from .scheme import QuantScheme


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over the inputs a Linear layer sees."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the Hessian 2 X^T X / n of a batch of layer inputs [..., in_features] (float32 running
        mean)."""
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.H += x.t() @ x


def participation_ratio(H: torch.Tensor) -> float:
    """Effective number of input directions a Linear uses: (sum of H's eigenvalues)^2 / sum of their
    squares = tr(H)^2 / ||H||_F^2, from 1 (one direction) to in_features (isotropic inputs). GPTQ can
    push rounding error into the directions its calibration inputs never visit, so a small ratio
    predicts little GPTQ damage on inputs like the calibration's."""
    H = H.double()
    return float(torch.trace(H) ** 2 / (H * H).sum().clamp_min(1e-300))


def dead_inputs(H: torch.Tensor) -> int:
    """Input columns that were exactly zero in every calibration sample (zero diagonal of H)."""
    return int((torch.diag(H) == 0).sum())


def weighted_error(weight: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ||(W - W_hat) X||^2 / ||W X||^2 on the calibration inputs, from H."""
    d = (weight.float() - w_hat.float())
    num = torch.einsum("ij,jk,ik->", d, H, d)
    den = torch.einsum("ij,jk,ik->", weight.float(), H, weight.float()).clamp_min(1e-12)
    return float(num / den)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2023) of one weight [out, in] with Hessian H [in, in]: columns quantized in blocks
    of `block_size` (in act-order when asked), the error propagated through the Cholesky factor of the damped
    inverse Hessian. Returns the QuantizedWeight."""
    W = weight.detach().clone().float()
    H = H.clone().float()
    out_f, in_f = W.shape
    maxq = scheme.maxq
    gs = scheme.effective_group_size(in_f)
    per_channel = scheme.group_size == -1
    if not per_channel:
        # Groups never straddle a lazy-update block, so a group's parameters are always computed
        # from columns that already carry every earlier column's error update.
        block_size = max(block_size // gs, 1) * gs

    # Inputs that were exactly zero in every calibration sample ("dead": ReLU-type layers, rarely
    # routed experts, a norm weight of 0) leave their weight columns unconstrained by the data. The
    # reference GPTQ zeroes those columns; here they keep their value and are rounded to their group's
    # grid like RTN (H's dead rows and columns are zero, so no error flows into or out of them): inputs
    # the calibration never saw still get the weights the model had. An all-zero H gives exactly RTN.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, device=W.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise SpecError("damp", f"GPTQ's Hessian is not positive definite even after damping by {damp} of its mean "
                                "diagonal; raise damp (e.g. 0.1)") from None

    codes = torch.zeros_like(W, dtype=torch.uint8)
    n_groups = in_f // gs
    scale = torch.zeros(out_f, n_groups, device=W.device)
    zero = torch.zeros(out_f, n_groups, device=W.device)
    if per_channel:
        scale[:, 0], zero[:, 0] = find_params(W, scheme)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % gs == 0:
                g = col // gs
                scale[:, g], zero[:, g] = find_params(W1[:, i : i + gs], scheme)
            s, z = scale[:, col // gs], zero[:, col // gs]
            w = W1[:, i]
            q = quantize_codes(w, s, z, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    # Back to the original column order; under act-order g_idx records each column's group.
    inv = torch.argsort(perm)
    g_idx = (torch.arange(in_f, device=W.device, dtype=torch.int32) // gs)[inv]
    return QuantizedWeight(codes[:, inv].contiguous(), scale, zero, g_idx, scheme)
