"""Fake-quant Linear with learnable scales and zero points, and swap-in/swap-out over a model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .quantizer import (
    compiled_fake_quantize,
    default_g_idx,
    dequantize,
    export_params,
    fake_quantize,
    find_group_params,
    is_contiguous_groups,
    quantize_weight,
)
from .scheme import QuantScheme, QuantTargets


@dataclass
class QuantizedWeight:
    """A quantized Linear weight: integer codes plus per-group scale, zero and the column->group map."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups], integer-valued
    g_idx: torch.Tensor  # int32 [in]
    scheme: QuantScheme

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for, [out, in] float32: (codes - zero) * scale per group."""
        return dequantize(self.codes, self.scale, self.zero, self.g_idx)

    def to(self, device) -> QuantizedWeight:
        """The same weight with every tensor on `device`."""
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device),
                               self.g_idx.to(device), self.scheme)

    @classmethod
    def rtn(cls, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
        """Round-to-nearest with the scheme's observer."""
        scale, zero = find_group_params(weight, scheme)
        g_idx = default_g_idx(weight.shape[1], scheme, weight.device)
        return cls(quantize_weight(weight, scale, zero, g_idx, scheme.maxq), scale, zero, g_idx, scheme)


class FakeQuantLinear(nn.Module):
    """Linear whose forward uses the fake-quantized latent weight; scale and zero are parameters.

    Its parameters live in units of the quantization grid, so one learning rate means the same at
    2 bits as at 8 (where a grid step is ~16x finer than at 4 bits): an Adam update of lr moves
    every code's boundary by about lr grid steps, whatever the bit width.
    - `weight`: the latent weight divided by its group's initial step size `step` (a buffer);
    - `scale`: the step-size change, counted in grid steps at the edge of the grid: the step size is
      step * (1 + scale / half), half = 2^(b-1) codes from the middle to the edge; it starts at 0
      (a relative change of the step size moves the outermost codes 2^(b-1) times as far);
    - `zero`: in grid steps already.
    `latent_weight()` and `step_size()` give the absolute values.
    """

    def __init__(self, linear: nn.Linear, qw: QuantizedWeight, keep_latent: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = qw.scheme
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone())
        self.register_buffer("step", export_params(qw.scale, qw.zero, qw.scheme.maxq)[0].clone())
        self.contiguous_groups = is_contiguous_groups(self.g_idx, self.step.shape[1])  # decided once, not per step
        # The latent weight starts on the quantization grid, so the forward equals the PTQ model's. It is
        # kept in float32 whatever the model's dtype: it is the master copy QAT updates, and a
        # bfloat16 copy could round an 8-bit code to its neighbour.
        # keep_latent=True keeps the full-precision weight as the latent instead (QAT from BF16).
        latent = linear.weight.data.float().clone() if keep_latent else qw.dequantize()
        self.weight = nn.Parameter(latent / self._per_column(self.step), requires_grad=linear.weight.requires_grad)
        self.bias = linear.bias
        self.scale = nn.Parameter(torch.zeros_like(self.step))
        self.zero = nn.Parameter(qw.zero.float().clone(), requires_grad=not qw.scheme.symmetric)

    def _per_column(self, t: torch.Tensor) -> torch.Tensor:
        """[out, groups] -> [out, in]: each column gets its group's value."""
        return t[:, self.g_idx.long()]

    def latent_weight(self) -> torch.Tensor:
        """The latent weight in absolute units [out, in] (weight x initial step size)."""
        return self.weight * self._per_column(self.step)

    def step_size(self) -> torch.Tensor:
        """The step size in absolute units [out, groups]: step x (1 + scale / half)."""
        return self.step * (1 + self.scale / self.half)

    @property
    def half(self) -> float:
        """2^(b-1): codes from the grid's middle to its edge."""
        return (self.scheme.maxq + 1) / 2

    STATE = ("weight", "scale", "zero", "g_idx", "step")  # its state-dict entries, which formats.py replaces by codes

    compiled = False  # set by use_compiled_fake_quant
    frozen = False  # set by frozen_fake_quant: reuse one quantized weight for many forwards
    _cache: torch.Tensor | None = None
    # per-token quantizer of the input (W4A4: quant/runtime.py installs it), applied after any
    # forward pre-hook (the online Hadamard of down_proj), as torchao's FakeQuantizedLinear does
    input_quantizer = None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight [out, in] the forward uses (round-to-grid with a straight-through
        gradient, LSQ-style learnable step and zero)."""
        fn = compiled_fake_quantize() if self.compiled else fake_quantize
        return fn(self.weight, 1 + self.scale / self.half, self.zero, self.g_idx, self.scheme.maxq, self.contiguous_groups,
                  self.step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.frozen:
            if self._cache is None or self._cache.dtype != x.dtype:
                self._cache = self.quantized_weight().detach().to(x.dtype)
            return F.linear(x, self._cache, self.bias)
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The integer codes, scales and zeros this module's forward uses."""
        scale, zero = export_params(self.step_size(), self.zero, self.scheme.maxq)
        codes = quantize_weight(self.latent_weight(), scale, zero, self.g_idx, self.scheme.maxq)
        return QuantizedWeight(codes, scale.clone(), zero.clone(), self.g_idx.clone(), self.scheme)

    def extra_repr(self) -> str:
        """in, out and the scheme (e.g. w4g128asym) in the module's repr."""
        s = self.scheme
        return f"{self.in_features}, {self.out_features}, w{s.bits}g{s.group_size}{'sym' if s.symmetric else 'asym'}"


class ActQuantLinear(nn.Linear):
    """A plain Linear (a dequantized export's) whose input is fake-quantized per token first: the A of
    W4A4 on a model without FakeQuantLinear modules. quant/runtime.py turns a loaded nn.Linear into one in
    place (same parameters, same state-dict keys)."""

    input_quantizer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x) if self.input_quantizer is not None else x)


def layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `module` computes with when called on `x`: x after its input quantizer, if it has one (GPTQ's
    Hessian and the diagnostics' statistics are of this, not of the raw input)."""
    q = getattr(module, "input_quantizer", None)
    return q(x) if q is not None else x


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def untie_head(model: nn.Module) -> bool:
    """Give the output head its own copy of a weight it shares with the input embedding (Qwen3-0.6B,
    1.7B and 4B, SmolLM2 tie them), and say so in the config, so no later `tie_weights()` (every
    transformers load runs one) copies the embedding back over the head. The embedding keeps its
    weight. Returns whether the model was tied."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and emb is not None and getattr(head, "weight", None) is emb.weight
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    return tied


def swap_in_fake_quant(
    model: nn.Module, targets: QuantTargets, init: dict[str, QuantizedWeight] | None = None, keep_latent: bool = False
) -> dict[str, QuantScheme]:
    """Replace every targeted nn.Linear by a FakeQuantLinear, in place.

    `init` maps module names to quantized weights (e.g. a GPTQ result); modules it lacks are
    initialised by round-to-nearest of their current weight. A quantized output head that is tied
    to the input embedding is untied first (`untie_head`): the embedding stays in full precision,
    and the head's fake-quant latent is never overwritten by it.
    """
    plan = targets.resolve(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and any(model.get_submodule(n) is head for n in plan):
        untie_head(model)
    for name, scheme in plan.items():
        linear = model.get_submodule(name)
        qw = (init or {}).get(name)
        if qw is None:
            qw = QuantizedWeight.rtn(linear.weight.data, scheme)
        elif qw.scheme != scheme:
            raise UserError(f"{name}: the checkpoint holds {qw.scheme}, the recipe asks for {scheme}")
        _set_module(model, name, FakeQuantLinear(linear, qw, keep_latent))
    return plan


@contextlib.contextmanager
def frozen_fake_quant(model: nn.Module):
    """Within the block, each FakeQuantLinear quantizes its weight once and reuses it (no gradient):
    generation (eval of a student, RL rollouts) then runs at dense speed instead of re-quantizing
    every weight at every decoding step. Leaving the block drops the cached weights."""
    mods = list(fake_quant_modules(model).values())
    for m in mods:
        m.frozen, m._cache = True, None
    try:
        yield model
    finally:
        for m in mods:
            m.frozen, m._cache = False, None


def use_compiled_fake_quant(model: nn.Module, on: bool = True) -> int:
    """Switch every FakeQuantLinear to the torch.compile'd quantize-dequantize; returns how many."""
    mods = fake_quant_modules(model)
    for m in mods.values():
        m.compiled = on
    return len(mods)


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every FakeQuantLinear of `model` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def weight_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: its integer codes} (uint8 [out, in], on the CPU) of every FakeQuantLinear."""
    return {name: m.export().codes.cpu() for name, m in fake_quant_modules(model).items()}


def moved_fraction(before: dict[str, torch.Tensor], model: nn.Module) -> float:
    """The share of quantized weights whose integer code differs from `before` (`weight_codes` of the
    same model earlier): how many weights training moved to another grid point. Raises KeyError when
    the model's quantized layers are not those of `before`."""
    moved = total = 0
    for name, codes in weight_codes(model).items():
        moved += int((codes != before[name]).sum())
        total += codes.numel()
    return moved / max(total, 1)


def train_quantizers(model: nn.Module, on: bool) -> None:
    """Whether the step sizes and zero points of every FakeQuantLinear train (a symmetric scheme's zero
    point never does: it is fixed at the grid's middle)."""
    for m in fake_quant_modules(model).values():
        m.scale.requires_grad_(on)
        m.zero.requires_grad_(on and not m.scheme.symmetric)


def quant_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(latent weights, quantizer scales and zeros) of every FakeQuantLinear: the parameters that
    live in grid units and get their own learning rates (`lr` for everything else)."""
    mods = fake_quant_modules(model).values()
    return [m.weight for m in mods], [p for m in mods for p in (m.scale, m.zero)]


@torch.no_grad()
def swap_out_fake_quant(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Replace FakeQuantLinear modules by plain Linear layers holding the dequantized weights.

    Returns the quantized weights, so a caller can also write the packed format.
    """
    exported = {}
    for name, fq in fake_quant_modules(model).items():
        qw = fq.export()
        # skip_init: every weight is overwritten below (a random init of a 0.6B model's Linears took 1.8 s)
        linear = torch.nn.utils.skip_init(nn.Linear, fq.in_features, fq.out_features, bias=fq.bias is not None,
                                          device=fq.weight.device, dtype=fq.weight.dtype)
        linear.weight.data.copy_(qw.dequantize().to(fq.weight.dtype))
        if fq.bias is not None:
            linear.bias.data.copy_(fq.bias.data)
        _set_module(model, name, linear)
        exported[name] = qw
    return exported
