"""The vocabulary projection and the distillation loss in chunks of positions, so that neither model's full
[tokens, vocab] logits exist (Qwen3's vocabulary is 151k):
- `fused_distill_loss`: projection + loss + gradient in one pass per chunk, in the training's compute dtype
  (bf16 GEMMs, float32 softmax math, compiled on GPUs); nothing is recomputed in the backward pass.
- `chunked_distill_loss`: autograd through each chunk under activation checkpointing; for top-k KD, heads
  with a bias or quantized heads, and the reference the fused path is tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .losses import cached_forward_kl, distill_loss


def chunked_distill_loss(h_s, h_t, head_s: nn.Module, head_t: nn.Module | None, targets, kd, chunk_size: int,
                         cached: tuple | None = None):
    """Mean per-token loss over n selected positions from hidden states [n, H].

    kd.loss == "ce" uses `targets` (next tokens) and ignores the teacher; `cached` (values, indices, tail of the
    n positions, data/teacher_cache.py) stands in for the teacher's hidden states and head (forward KL only).
    """
    n = h_s.shape[0]
    total = h_s.new_zeros((), dtype=torch.float32)

    def project(head, h):
        # Accelerate's mixed-precision wrapper returns float32 hidden states while a bf16 teacher's
        # head holds bf16 weights: feed each head its own dtype.
        return head(h.to(next(head.parameters()).dtype)).float()

    def piece(hs, ht, tg, *teacher_rows):
        s_logits = project(head_s, hs)
        if kd.loss == "ce":
            return F.cross_entropy(s_logits, tg, reduction="sum")
        if teacher_rows:
            return cached_forward_kl(s_logits, *teacher_rows, kd.temperature)
        with torch.no_grad():
            t_logits = project(head_t, ht)
        return distill_loss(s_logits, t_logits, kd)

    for i in range(0, n, chunk_size):
        ht = h_t[i : i + chunk_size] if h_t is not None else None
        rows = [c[i : i + chunk_size] for c in cached] if cached is not None else []
        # Checkpointing recomputes this chunk's logits in the backward pass instead of storing them.
        total = total + checkpoint(piece, h_s[i : i + chunk_size], ht, targets[i : i + chunk_size], *rows,
                                   use_reentrant=False)
    return total / max(n, 1)


def _loss_and_grad(s_logits, t_logits, targets, loss: str, temperature: float, beta: float, out_dtype):
    """Summed loss over a chunk and its gradient w.r.t. the student's logits (closed forms of the
    losses above, so no autograd graph over [chunk, vocab] is built)."""
    if loss == "ce":
        s_logp = s_logits.float().log_softmax(-1)
        rows = torch.arange(s_logp.shape[0], device=s_logp.device)
        value = -s_logp[rows, targets].sum()
        grad = s_logp.exp().index_put((rows, targets), torch.tensor(-1.0, device=s_logp.device), accumulate=True)
        return value, grad.to(out_dtype)
    T = temperature
    s_logp = (s_logits.float() / T).log_softmax(-1)
    t_logp = (t_logits.float() / T).log_softmax(-1)
    p_s = s_logp.exp()
    if loss == "forward_kl":
        p_t = t_logp.exp()
        value = (p_t * (t_logp - s_logp)).sum() * T**2
        return value, ((p_s - p_t) * T).to(out_dtype)
    if loss == "reverse_kl":
        r = s_logp - t_logp
        value = (p_s * r).sum() * T**2
        weight = 1.0
    else:  # generalised JSD; d/ds of beta*KL(t||m) + (1-beta)*KL(s||m) = (1-beta) * p_s * (r - E_s[r]), r = log p_s - log m
        m_logp = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log(1 - beta))
        value = (beta * (t_logp.exp() * (t_logp - m_logp)).sum() + (1 - beta) * (p_s * (s_logp - m_logp)).sum()) * T**2
        r = s_logp - m_logp
        weight = 1 - beta
    grad = p_s * (r - (p_s * r).sum(-1, keepdim=True)) * (weight * T)
    return value, grad.to(out_dtype)


_compiled_loss_and_grad = None


def _chunk_loss_fn(device: torch.device):
    """The per-chunk loss, compiled on GPUs: the softmax math then reads the logits a few times
    instead of once per elementwise op (the profile's ~35% of a step)."""
    global _compiled_loss_and_grad
    if device.type != "cuda":
        return _loss_and_grad
    if _compiled_loss_and_grad is None:
        _compiled_loss_and_grad = torch.compile(_loss_and_grad, dynamic=True)
    return _compiled_loss_and_grad


class _FusedLinearDistill(torch.autograd.Function):
    """loss = sum over chunks of the per-token loss of (h_s W_s^T, h_t W_t^T); gradients computed
    in the forward pass (the backward pass only scales them)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, loss, temperature, jsd_beta, chunk_size, dtype, want_grad):
        n = h_s.shape[0]
        fn = _chunk_loss_fn(h_s.device)
        w = w_s.to(dtype)
        wt = w_t.to(dtype) if w_t is not None else None
        grad_h = torch.empty_like(h_s) if want_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for i in range(0, n, chunk_size):
            hs = h_s[i : i + chunk_size].to(dtype)
            t_logits = h_t[i : i + chunk_size].to(dtype) @ wt.T if wt is not None else None
            value, g = fn(hs @ w.T, t_logits, targets[i : i + chunk_size], loss, temperature, jsd_beta, dtype)
            total += value
            if want_grad:
                grad_h[i : i + chunk_size] = g @ w
                grad_w += g.T @ hs
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.w_dtype), None, None, None, None, None, None, None, None, None


def can_fuse(head_s: nn.Module, head_t: nn.Module | None, kd) -> bool:
    """The fused path needs plain bias-free Linear heads (gathered, when sharded: see loss_through_head) and a
    loss it has a closed-form gradient for (not top-k)."""
    heads = [head_s] + ([head_t] if kd.loss != "ce" else [])
    # isinstance, not type(): FSDP2 swaps a sharded head's class for a subclass (FSDPLinear) with Linear's forward;
    # a subclass with a forward of its own (ActQuantLinear) computes something else.
    return kd.fused and not kd.top_k and all(
        isinstance(h, nn.Linear) and type(h).forward is nn.Linear.forward and h.bias is None for h in heads)


def fused_distill_loss(h_s, h_t, head_s: nn.Linear, head_t: nn.Linear | None, targets, kd, chunk_size: int,
                       dtype: torch.dtype | None = None):
    """Mean per-token loss over n positions, as chunked_distill_loss, with the projections in
    `dtype` (the training's compute dtype; default: the student head's)."""
    dtype = dtype or head_s.weight.dtype
    n = h_s.shape[0]
    with torch.autocast(h_s.device.type, enabled=False):
        total = _FusedLinearDistill.apply(h_s, head_s.weight, h_t if kd.loss != "ce" else None,
                                          head_t.weight if kd.loss != "ce" else None, targets, kd.loss, kd.temperature,
                                          kd.jsd_beta, chunk_size, dtype,
                                          torch.is_grad_enabled())
    return total / max(n, 1)
