"""Quantization core: schemes, quantizer math, fake-quant modules, RTN/GPTQ, on-disk formats.

Names are imported on first use (PEP 562), so that the torch-free parts (`scheme`, `hadamard`) serve
the recipe preflight without importing torch.
"""

import importlib

_HOMES = {
    "FakeQuantLinear": "fake_quant",
    "QuantizedWeight": "fake_quant",
    "fake_quant_modules": "fake_quant",
    "swap_in_fake_quant": "fake_quant",
    "swap_out_fake_quant": "fake_quant",
    "QuantScheme": "scheme",
    "QuantTargets": "scheme",
    "QuantSpec": "scheme",
    "prepare": "runtime",
    "install_quant_spec": "runtime",
}

__all__ = [  # noqa: RUF022 (grouped by home module)
    "FakeQuantLinear", "QuantizedWeight", "fake_quant_modules", "swap_in_fake_quant", "swap_out_fake_quant",
    "QuantScheme", "QuantTargets", "QuantSpec", "prepare", "install_quant_spec",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
