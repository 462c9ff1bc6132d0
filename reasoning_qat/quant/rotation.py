"""QuaRot-style rotations for W4A4KV4 (Hadamard transforms that spread outliers before quantizing).

Offline (fused into the weights, the function unchanged):
- RMSNorm weights folded into the Linears that read the norm's output (then set to 1), the
  embedding untied from the output head (the head absorbs the final norm, the embedding cannot);
- the residual stream rotated by a randomised Hadamard Q (d x d): embedding and every Linear
  writing the stream (o_proj, down_proj) map into the rotated basis, every Linear reading it
  (q/k/v, gate/up, lm_head) maps back; an RMSNorm with unit weight commutes with Q;
- per head, V's output rows and o_proj's input columns rotated by a Hadamard of head_dim.
Online (applied at every forward, `install_online_rotations`):
- a Hadamard on down_proj's input (its weight's columns carry the transpose offline);
- a Hadamard on queries and keys after RoPE, before the KV cache is quantized (q.k unchanged).

Sizes: powers of two, and 12 * 2^k (Qwen3's MLP widths 3072 = 12 * 256, 6144 = 12 * 512) through
a Paley Hadamard of order 12; anything else is refused with a one-line error.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import architecture
from .fake_quant import untie_head
from .hadamard import hadamard_factors


@functools.lru_cache(maxsize=8)
def _paley12() -> torch.Tensor:
    """A Hadamard matrix of order 12 (Paley construction I, q = 11), entries +-1, float64."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    h = torch.eye(q + 1, dtype=torch.float64) + s
    assert torch.equal(h @ h.T, 12 * torch.eye(12, dtype=torch.float64))
    return h


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Hadamard matrix H (H H^T = I) that `fwht` applies: x @ H."""
    factor, m = hadamard_factors(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:  # Sylvester
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if factor == 12:
        h = torch.kron(_paley12(), h)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard_matrix(x.shape[-1]) in O(n log n): butterflies over the power-of-two part, a
    12 x 12 product for the rest."""
    n = x.shape[-1]
    factor, m = hadamard_factors(n)
    shape = x.shape
    y = x.reshape(-1, factor, m)
    h = 1
    while h < m:  # butterfly: pairs (i, i+h) -> (a+b, a-b)
        y = y.view(-1, factor, m // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    y = y.reshape(-1, factor, m)
    if factor == 12:
        y = torch.einsum("ij,bjm->bim", _paley12().to(dtype=y.dtype, device=y.device).T, y)
    return (y / math.sqrt(n)).reshape(shape)


def random_hadamard(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """diag(+-1) H: an orthogonal matrix whose columns are Hadamard-flat, one per seed."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(n, torch.float64)


# ---- offline fusion --------------------------------------------------------------------------------

def _layers(model):
    return model.get_decoder().layers


@torch.no_grad()
def fold_norms(model) -> None:
    """RMSNorm(x) * g feeding W equals RMSNorm(x) feeding W diag(g): fold, then g = 1."""
    def fold(norm, linears):
        for lin in linears:
            lin.weight.mul_(norm.weight.to(lin.weight.dtype)[None, :])
        norm.weight.fill_(1.0)

    for layer in _layers(model):
        a, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.get_decoder().norm, [model.get_output_embeddings()])


@torch.no_grad()
def rotate(model, seed: int = 0) -> None:
    """Fold norms, rotate the residual stream, V/O per head and down_proj's input (offline half),
    in float64, leaving each weight in its dtype. The model's function is unchanged once
    `install_online_rotations` has added the online halves."""
    untie_head(model)
    fold_norms(model)
    cfg = model.config
    d, head_dim = cfg.hidden_size, architecture.head_dim(cfg)
    device = model.get_input_embeddings().weight.device
    q = random_hadamard(d, seed).to(device)  # drawn on the CPU: the same rotation on any device
    h_head = hadamard_matrix(head_dim, torch.float64, device)
    h_mlp = hadamard_matrix(cfg.intermediate_size, torch.float64, device)

    def apply(lin, fn):
        lin.weight.copy_(fn(lin.weight.double()).to(lin.weight.dtype))

    emb = model.get_input_embeddings()
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))  # rows are stream vectors
    for layer in _layers(model):
        a, mlp = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, mlp.gate_proj, mlp.up_proj):
            apply(lin, lambda w: w @ q)  # reads the rotated stream
        # v: rotated stream in, and each head's output rotated by h_head (rows of its block)
        apply(a.v_proj, lambda w: _per_head_rows(w @ q, h_head, head_dim))
        # o: each head's input columns un-rotate h_head; its output goes into the rotated stream
        apply(a.o_proj, lambda w: q.T @ _per_head_cols(w, h_head, head_dim))
        # down: input columns carry h_mlp (the online fwht supplies the other half); output rotated
        apply(mlp.down_proj, lambda w: q.T @ (w @ h_mlp))
        for lin in (a.o_proj, mlp.down_proj):
            if lin.bias is not None:
                lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))
    apply(model.get_output_embeddings(), lambda w: w @ q)
    cfg.rqat_rotation = {"kind": "hadamard", "seed": seed}


def _per_head_rows(w, h, hd):
    out, d_in = w.shape
    return (h.T @ w.view(out // hd, hd, d_in)).reshape(out, d_in)


def _per_head_cols(w, h, hd):
    d_out, d_in = w.shape
    return (w.view(d_out, d_in // hd, hd) @ h).reshape(d_out, d_in)


# ---- online halves -----------------------------------------------------------------------------------

def install_online_rotations(model) -> list:
    """The online Hadamard on down_proj's input (a forward pre-hook, so it runs before any
    activation quantizer registered after it) and on q/k after RoPE (attention.py's function reads
    `module.rotate_qk`). Returns the hook handles."""
    handles = []
    for layer in _layers(model):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: (fwht(args[0]), *args[1:])))
        layer.self_attn.rotate_qk = True
    return handles
