"""Quantization core: schemes, quantizer math, fake-quant modules, RTN/GPTQ, on-disk formats."""

from .fake_quant import (
    FakeQuantLinear,
    QuantizedWeight,
    fake_quant_modules,
    swap_in_fake_quant,
    swap_out_fake_quant,
)
from .scheme import QuantScheme, QuantTargets, targets_from_recipe

__all__ = [
    "FakeQuantLinear",
    "QuantScheme",
    "QuantTargets",
    "QuantizedWeight",
    "fake_quant_modules",
    "swap_in_fake_quant",
    "swap_out_fake_quant",
    "targets_from_recipe",
]
