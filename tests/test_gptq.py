"""GPTQ against a plain column-by-column reference (no lazy blocks, no Cholesky tricks)."""

import pytest
import torch

from reasoning_qat.quant import QuantizedWeight, QuantScheme
from reasoning_qat.quant.gptq import HessianAccumulator, gptq_quantize, weighted_error
from reasoning_qat.quant.quantizer import find_params


def reference_gptq(W, H, scheme, damp=0.01):
    """The GPTQ recursion as in the paper: quantize column i, then update the remaining columns with
    the error scaled by the inverse Hessian of the remaining columns (recomputed explicitly)."""
    W = W.clone().double()
    H = H.clone().double()
    n = W.shape[1]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=torch.float64)
    gs = scheme.effective_group_size(n)
    out = torch.zeros_like(W)
    scale = zero = None
    for i in range(n):
        if i % gs == 0:
            scale, zero = find_params(W[:, i : i + gs].float(), scheme)
            scale, zero = scale.double(), zero.double()
        Hinv = torch.linalg.inv(H[i:, i:])  # inverse Hessian of the not-yet-quantized columns
        q = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, scheme.maxq)
        out[:, i] = (q - zero) * scale
        err = (W[:, i] - out[:, i]) / Hinv[0, 0]
        W[:, i:] -= err[:, None] * Hinv[0, :][None, :]
    return out.float()


def correlated_inputs(n_features=64, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_features, n_features, generator=g) / n_features**0.5
    return torch.randn(n, n_features, generator=g) @ (torch.eye(n_features) + 2 * mix)


@pytest.mark.parametrize("bits,gs", [(4, 16), (3, 32), (2, -1)])
def test_gptq_matches_reference(bits, gs):
    torch.manual_seed(1)
    X = correlated_inputs()
    acc = HessianAccumulator(64, "cpu")
    acc.add(X[:1000])
    acc.add(X[1000:])  # two batches: the running average must equal one pass
    assert torch.allclose(acc.H, 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-4)
    W = torch.randn(24, 64)
    scheme = QuantScheme(bits, gs)
    ours = gptq_quantize(W, acc.H, scheme, block_size=32).dequantize()
    ref = reference_gptq(W, acc.H, scheme)
    mismatch = (ours != ref).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.2%} of weights differ from the reference"
    assert weighted_error(W, ours, acc.H) == pytest.approx(weighted_error(W, ref, acc.H), rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    torch.manual_seed(2)
    X = correlated_inputs(128, 4096)
    acc = HessianAccumulator(128, "cpu")
    acc.add(X)
    W = torch.randn(64, 128)
    scheme = QuantScheme(bits, 32)
    gptq_err = weighted_error(W, gptq_quantize(W, acc.H, scheme).dequantize(), acc.H)
    rtn_err = weighted_error(W, QuantizedWeight.rtn(W, scheme).dequantize(), acc.H)
    assert gptq_err < 0.8 * rtn_err


def test_act_order_records_groups_in_g_idx():
    torch.manual_seed(3)
    X = correlated_inputs(64, 1024) * torch.linspace(0.1, 3, 64)  # distinct Hessian diagonal
    acc = HessianAccumulator(64, "cpu")
    acc.add(X)
    W = torch.randn(8, 64)
    qw = gptq_quantize(W, acc.H, QuantScheme(4, 16), act_order=True)
    perm = torch.argsort(torch.diag(acc.H), descending=True)
    assert torch.equal(qw.g_idx[perm], torch.arange(64, dtype=torch.int32) // 16)
    assert weighted_error(W, qw.dequantize(), acc.H) < weighted_error(W, QuantizedWeight.rtn(W, QuantScheme(4, 16)).dequantize(), acc.H)


def test_gptq_driver_builds_no_autograd_graph(tiny_model):
    """The layer forwards must run without autograd: a graph kept alive across layers held every
    calibration batch's activations and ran a 1.7B model out of GPU memory."""
    from reasoning_qat.quant import QuantScheme, QuantTargets
    from reasoning_qat.quant.ptq import gptq_quantize_model

    seen = []
    tiny_model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(torch.is_grad_enabled()))
    plan = QuantTargets(QuantScheme(4, 32)).resolve(tiny_model)
    gptq_quantize_model(tiny_model, plan, torch.randint(0, 100, (4, 16)), batch_size=2, progress=False)
    assert seen and not any(seen)


def test_participation_ratio_counts_the_input_directions_used():
    """Inputs confined to k directions give a ratio of at most k (exactly k when the k carry equal
    variance); isotropic inputs give nearly the full width."""
    from reasoning_qat.quant.gptq import HessianAccumulator, participation_ratio

    torch.manual_seed(0)
    d, k = 64, 5
    basis = torch.linalg.qr(torch.randn(d, k))[0]  # k orthonormal directions
    low, full = HessianAccumulator(d, "cpu"), HessianAccumulator(d, "cpu")
    for _ in range(4):
        low.add(torch.randn(512, k) @ basis.T)
        full.add(torch.randn(512, d))
    assert abs(participation_ratio(low.H) - k) < 0.5
    assert participation_ratio(full.H) > 0.85 * d
    skewed = HessianAccumulator(d, "cpu")
    skewed.add(torch.randn(2048, k) * torch.tensor([10.0, 1, 1, 1, 1]) @ basis.T)
    assert participation_ratio(skewed.H) < 1.2  # one direction dominates the energy
