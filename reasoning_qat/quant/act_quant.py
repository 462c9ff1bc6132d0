"""Activation and KV-cache fake quantization (the A4 and KV4 of W4A4KV4), straight-through.

- `ActQuantizer`: per-token dynamic quantization of a Linear's input: one scale (and zero point,
  asymmetric) per token over the last dimension, clipped at `clip_ratio` of the token's range.
- `KVQuantizer`: keys and values per head, in groups of `group_size` along head_dim (-1: the
  whole head), asymmetric by default.
- `install_quant_attention`: an attention function (registered with transformers'
  AttentionInterface as "rqat_quant") that rotates q/k by a Hadamard where the rotation asks for it
  and fake-quantizes K and V, then runs SDPA. The rotation and the quantization act per token, so a
  K/V entry can be transformed once, when it is written to the KV cache, instead of at every decode
  step: a forward pre-hook makes each fresh cache transform what it stores, and the
  attention function then transforms only the query. Without a cache (training, a full forward)
  the attention function transforms K and V itself. Either way cached generation computes exactly
  the full-recompute function (tests/quant/test_rotation.py); the cost of a decode step no longer
  grows with the cache (benchmarks/kv_quant_generation.py).

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


def _transform_kv(module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token part of the attention's online computation: rotate the keys (where the rotation asks for
    it), then fake-quantize keys and values. key/value: [batch, kv_heads, tokens, head_dim]."""
    from .rotation import fwht

    if getattr(module, "rotate_qk", False):
        key = fwht(key)
    kv = getattr(module, "kv_quantizer", None)
    if kv is not None:
        key, value = kv(key), kv(value)
    return key, value


def _quant_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .rotation import fwht

    if getattr(module, "rotate_qk", False):
        query = fwht(query)
    written = module.__dict__.pop("_rqat_written", None)
    if written is None or written[0] is not key or written[1] is not value:
        # no transforming cache handed these over (no cache, or one filled before it could transform)
        key, value = _transform_kv(module, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_TRANSFORMING: dict[type, type] = {}


class _AttentionModules(tuple):
    """The model's attention modules, as a cache holds them: a copy of the cache refers to the same modules."""
    def __deepcopy__(self, memo):
        return self


def _transforming_cache_class(cls: type) -> type:
    """A subclass of the cache class `cls` whose `update` stores transformed K/V and tells the layer's attention
    function which tensors it returned (by identity, so nothing else is skipped). A subclass rather than a patched
    method, so that a copy of the cache (beam search, prompt reuse) keeps transforming."""
    if cls not in _TRANSFORMING:
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            module = self._rqat_attention[layer_idx]
            key_states, value_states = _transform_kv(module, key_states, value_states)
            keys, values = cls.update(self, key_states, value_states, layer_idx, *args, **kwargs)
            module._rqat_written = (keys, values)
            return keys, values

        _TRANSFORMING[cls] = type(f"KVTransforming{cls.__name__}", (cls,), {"update": update})
    return _TRANSFORMING[cls]


def _transform_on_write(decoder, args, kwargs):
    """Forward pre-hook of the decoder: a cache that arrives empty transforms what it stores from then on. A cache
    that already holds untransformed entries is left alone (the attention function transforms it all). It reads
    the attention modules off the decoder it hooks, so a copy of the model uses its own."""
    # the decoder's cache argument: `cache` in newer transformers (5.25 here), `past_key_values` in 5.19 and before
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or hasattr(cache, "_rqat_attention") or not hasattr(cache, "get_seq_length"):
        return
    if cache.get_seq_length() == 0:
        cache.__class__ = _transforming_cache_class(type(cache))
        cache._rqat_attention = _AttentionModules(layer.self_attn for layer in decoder.layers)


def install_quant_attention(model, kv: KVQuantizer | None) -> None:
    """Route every attention layer of `model` through `_quant_attention` (rotation of q/k where
    `rotate_qk` is set, K/V fake-quant where `kv` is given), and make the KV caches of `model`'s forward
    calls store K/V transformed (`model.kv_write_hook`: removing it leaves the attention function to
    transform the whole cache at every step, the benchmark's baseline)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _quant_attention)
    # the mask SDPA takes: transformers builds no mask at all for an attention name it has no mask function for,
    # so without this a left-padded row would attend to its pad tokens
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    for layer in model.get_decoder().layers:
        layer.self_attn.kv_quantizer = kv
    model.kv_write_hook = model.get_decoder().register_forward_pre_hook(_transform_on_write, with_kwargs=True)
    model.config._attn_implementation = ATTENTION_NAME
    for m in model.modules():  # sub-configs that carry their own copy
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION_NAME
