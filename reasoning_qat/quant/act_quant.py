"""Activation and KV-cache fake quantization (the A4 and KV4 of W4A4KV4), straight-through.

- `ActQuantizer`: per-token dynamic quantization of a Linear's input: one scale (and zero point,
  asymmetric) per token over the last dimension, clipped at `clip_ratio` of the token's range.
- `KVQuantizer`: keys and values per head, in groups of `group_size` along head_dim (-1: the
  whole head), asymmetric by default.
- `install_quant_attention`: an attention function (registered with transformers'
  AttentionInterface as "rqat_quant") that rotates q/k by a Hadamard where the rotation asks for it
  and fake-quantizes K and V, then runs SDPA. It sees every key and value in the cache at every
  step; the quantization is per token, so quantizing a cached entry again gives the same value as
  storing it quantized: cached generation computes exactly the full-recompute function
  (tests/quant/test_rotation.py).

Which model computes which of these is its `QuantSpec` (quant/scheme.py), installed by quant/runtime.py;
the activation quantizer is held by each quantized Linear (`input_quantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _fake_quant_last_dim(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float) -> torch.Tensor:
    """Quantize-dequantize along the last dimension (one scale per row), in float32."""
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(-1, keepdim=True) * clip_ratio).clamp(min=1e-8) / qmax
        q = (xf / scale).round().clamp(-qmax - 1, qmax)
        return (q * scale).to(x.dtype)
    qmax = 2**bits - 1
    lo, hi = xf.amin(-1, keepdim=True) * clip_ratio, xf.amax(-1, keepdim=True) * clip_ratio
    scale = (hi - lo).clamp(min=1e-8) / qmax
    zero = (-lo / scale).round()
    q = ((xf / scale).round() + zero).clamp(0, qmax)
    return ((q - zero) * scale).to(x.dtype)


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q forward, identity gradient (straight-through)."""
    return x + (q - x).detach()


@dataclass(frozen=True)
class ActQuantizer:
    """Per-token dynamic fake quantization of activations [..., features], straight-through gradient (QuaRot's
    A4/A8)."""
    bits: int = 4
    symmetric: bool = False
    clip_ratio: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _ste(x, _fake_quant_last_dim(x, self.bits, self.symmetric, self.clip_ratio))


@dataclass(frozen=True)
class KVQuantizer:
    """Fake quantization of keys or values [batch, heads, tokens, head_dim] in groups along head_dim,
    straight-through (QuaRot's KV4)."""
    bits: int = 4
    group_size: int = -1  # along head_dim; -1: one group per head
    symmetric: bool = False
    clip_ratio: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, heads, tokens, head_dim]."""
        hd = x.shape[-1]
        g = hd if self.group_size in (-1, None) else self.group_size
        if hd % g:
            raise ValueError(f"kv quantization: group_size {g} does not divide head_dim {hd}")
        grouped = x.reshape(*x.shape[:-1], hd // g, g)
        q = _fake_quant_last_dim(grouped, self.bits, self.symmetric, self.clip_ratio).reshape(x.shape)
        return _ste(x, q)


ATTENTION_NAME = "rqat_quant"


def _quant_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .rotation import fwht

    if getattr(module, "rotate_qk", False):
        query, key = fwht(query), fwht(key)
    kv = getattr(module, "kv_quantizer", None)
    if kv is not None:
        key, value = kv(key), kv(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install_quant_attention(model, kv: KVQuantizer | None) -> None:
    """Route every attention layer of `model` through `_quant_attention` (rotation of q/k where
    `rotate_qk` is set, K/V fake-quant where `kv` is given)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _quant_attention)
    for layer in model.get_decoder().layers:
        layer.self_attn.kv_quantizer = kv
    model.config._attn_implementation = ATTENTION_NAME
    for m in model.modules():  # sub-configs that carry their own copy
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION_NAME
