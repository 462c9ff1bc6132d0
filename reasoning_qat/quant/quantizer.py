"""Quantizer math: scale/zero observers, quantize, dequantize, and the differentiable fake-quant.

Convention (shared with the GPTQ v1 on-disk format): integer codes q in [0, 2^b - 1],
w_hat = (q - zero) * scale, one (scale, zero) per output row and input group, zero an integer.
Symmetric schemes use the same form with zero fixed at 2^(b-1), as GPTQ does.
`g_idx[i]` is the group of input column i (a permutation of groups under act-order).
"""

from __future__ import annotations

import torch

from .scheme import QuantScheme

# Zero points use the full code range [0, 2^b - 1]. (GPTQ v1 stores zero - 1 and cannot write 0, but
# it is only written for symmetric schemes, whose zero is 2^(b-1); formats.gptq_tensors checks.)
ZERO_MIN = 0
MIN_SCALE = 2.0**-24  # smallest positive float16


def default_g_idx(in_features: int, scheme: QuantScheme, device=None) -> torch.Tensor:
    """Column -> group map [in] int32 of a scheme without act-order: column // group_size."""
    gs = scheme.effective_group_size(in_features)
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, scheme: QuantScheme):
    maxq = scheme.maxq
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))  # the grid always holds 0 exactly
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if scheme.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    # Scales live on the float16 grid: the GPTQ format stores them as float16, so exports are exact.
    scale = ((xmax - xmin) / maxq).half().float().clamp_min(MIN_SCALE)
    if scheme.symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), ZERO_MIN, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] of w [out, in] given per-group scale and zero [out, groups] and g_idx [in]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def find_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of `w` ([rows, cols] = one group per row), by the scheme's observer."""
    w = w.float()
    if scheme.observer == "percentile":
        q = torch.tensor([1 - scheme.percentile, scheme.percentile], device=w.device)
        bounds = torch.quantile(w, q, dim=1)
        return _params_from_range(bounds[0], bounds[1], scheme)
    xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    scale, zero = _params_from_range(xmin, xmax, scheme)
    if scheme.observer == "mse":
        # Grid search over shrunk clipping ranges, keeping the one with the least error (GPTQ's `mse`).
        best = torch.full_like(scale, float("inf"))
        for shrink in torch.linspace(1.0, 0.2, 41).tolist():
            s, z = _params_from_range(xmin * shrink, xmax * shrink, scheme)
            err = ((w - (quantize_codes(w, s[:, None], z[:, None], scheme.maxq) - z[:, None]) * s[:, None]).abs() ** 2.4).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def find_group_params(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero of a [out, in] weight: shapes [out, n_groups]."""
    out_f, in_f = weight.shape
    gs = scheme.effective_group_size(in_f)
    scale, zero = find_params(weight.reshape(out_f * (in_f // gs), gs), scheme)
    return scale.reshape(out_f, -1), zero.reshape(out_f, -1)


def export_params(scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero a fake-quant forward actually uses (float16 grid, integer zero)."""
    return scale.float().clamp_min(MIN_SCALE).half().float(), torch.clamp(torch.round(zero.float()), ZERO_MIN, maxq)


def quantize_weight(weight: torch.Tensor, scale, zero, g_idx, maxq: int) -> torch.Tensor:
    """Integer codes (uint8) [out, in] of `weight` [out, in] given per-group scale/zero [out, groups] and the
    column->group map g_idx [in]."""
    w, s, z = _by_group(weight.float(), g_idx, scale, zero)
    return quantize_codes(w, s, z, maxq).reshape(weight.shape).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """w_hat = (q - zero) * scale in float32 [out, in]; the one definition every consumer shares. codes
    [out, in], scale and zero [out, groups], g_idx [in] (column -> group)."""
    q, s, z = _by_group(codes.float(), g_idx, scale.float(), zero.float())
    return ((q - z) * s).reshape(codes.shape)


def _by_group(w: torch.Tensor, g_idx: torch.Tensor, *params: torch.Tensor, contiguous: bool | None = None):
    """`w` [out, in] and `params` ([out, groups] each) lined up to combine elementwise: for contiguous groups
    (no act-order; `contiguous`, or read from g_idx) w as [out, groups, in / groups] and each param as
    [out, groups, 1], broadcast; otherwise w as it is and each param gathered to [out, in]. The broadcast
    moves a third of the memory the gather does (it dominated the QAT step's overhead on GPU and the export
    stage's dequantize time). Reshape a result to [out, in] afterwards."""
    out_f, in_f = w.shape
    groups = params[0].shape[1]
    if contiguous if contiguous is not None else is_contiguous_groups(g_idx, groups):
        return w.reshape(out_f, groups, in_f // groups), *(p[:, :, None] for p in params)
    g = g_idx.long()
    return w, *(p[:, g] for p in params)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, maxq: int,
                  contiguous: bool | None = None, step: torch.Tensor | None = None):
    """Differentiable quantize-dequantize with LSQ-style gradients.

    The weight gets a straight-through gradient inside the clipping range and none outside; the
    scale gets round(w/s) - w/s inside and the clip level outside (LSQ); the zero point is rounded
    with a straight-through estimator so the forward always uses the integer zero that export
    writes. With the same (scale, zero, g_idx) and a weight on the grid, the result equals
    `dequantize(quantize_weight(...))` exactly.

    With `step` ([out, groups]), `weight` and `scale` are given in units of it: the weight is
    weight * step (per group) and the scale is scale * step. That is how QAT trains (grid units),
    and the multiplication happens here so that it fuses with the rest under torch.compile.
    """
    s = scale if step is None else scale * step
    s = s.clamp_min(MIN_SCALE)
    s = s + (s.half().float() - s).detach()  # float16 grid, straight-through
    z = torch.clamp(round_ste(zero), ZERO_MIN, maxq)
    w, s, z, *per_group_step = _by_group(weight.float(), g_idx, s, z, *([] if step is None else [step]),
                                         contiguous=contiguous)
    if per_group_step:
        w = w * per_group_step[0]
    q = torch.clamp(round_ste(w / s) + z, 0, maxq)
    return ((q - z) * s).reshape(weight.shape)


_COMPILED = None


def compiled_fake_quantize():
    """fake_quantize through torch.compile: its forward and backward become a few fused kernels
    instead of a dozen elementwise passes over every weight (the QAT step's overhead on GPU)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(fake_quantize, dynamic=False)
    return _COMPILED


def is_contiguous_groups(g_idx: torch.Tensor, n_groups: int) -> bool:
    """True when column i belongs to group i // group_size (no act-order permutation)."""
    n = g_idx.numel()
    if n % n_groups:
        return False
    return bool(torch.equal(g_idx, torch.arange(n, device=g_idx.device, dtype=g_idx.dtype) // (n // n_groups)))
