"""A quantized model's runtime is a property of the model: its `QuantSpec` (quant/scheme.py) is saved beside
its weights (`quant_spec.json`) and `install_quant_spec` is the one function that makes a loaded model
compute it: the online Hadamards (QuaRot), the per-token quantizer of each quantized Linear's input (held by
the Linear itself: FakeQuantLinear, or ActQuantLinear for a dequantized export), the K/V quantizers and the
q/k rotation in attention. Every loader calls it (models.load_model, formats.load_quantized_checkpoint);
the ptq and qat stages call it on the models they build.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .scheme import QuantScheme, QuantSpec, QuantTargets

SPEC_FILE = "quant_spec.json"
_LEGACY_KEY = "rqat_runtime"  # config.json key of checkpoints written before QuantSpec


def prepare(model, spec: QuantSpec, init: dict | None = None, keep_latent: bool = False) -> dict[str, QuantScheme]:
    """Turn `model` (its weights already rotated where `spec` rotates) into the fake-quant form of `spec`, in
    place: every Linear `spec.weights` targets becomes a FakeQuantLinear (latents from `init`, {module name:
    QuantizedWeight} as PTQ wrote them; round-to-nearest of the current weight where `init` has none;
    `keep_latent`: the BF16 weight itself as the latent), then `spec`'s online parts are installed
    (`install_quant_spec`). The one way the stages build a quantized model, as torchao's `quantize_(model,
    config)`. Returns {module name: scheme}. Raises UserError where `init` holds another scheme than `spec`."""
    from .fake_quant import swap_in_fake_quant

    plan = swap_in_fake_quant(model, spec.weights, init, keep_latent)
    install_quant_spec(model, spec)
    return plan


def install_quant_spec(model, spec: QuantSpec | None) -> bool:
    """Make `model` (whose weights hold the offline parts: rotated, quantized) compute `spec`'s online
    parts, once per model, and record the spec on it (`model.quant_spec`, which the writers save).
    Returns whether anything was installed (False for a weight-only spec or one already installed)."""
    from .act_quant import ActQuantizer, KVQuantizer, install_quant_attention
    from .fake_quant import ActQuantLinear, FakeQuantLinear
    from .rotation import install_online_rotations

    if spec is None:
        return False
    if getattr(model, "_quant_spec_installed", False):
        return False
    model.quant_spec = spec
    if not spec.online:
        return False
    if spec.rotation is not None:
        install_online_rotations(model)
    if spec.activations is not None:
        quantizer = ActQuantizer(**asdict(spec.activations))
        for module in activation_targets(model, spec).values():
            if not isinstance(module, FakeQuantLinear):
                module.__class__ = ActQuantLinear  # same parameters and keys; forward quantizes its input
            module.input_quantizer = quantizer
    if spec.rotation is not None or spec.kv_cache is not None:
        install_quant_attention(model, KVQuantizer(**asdict(spec.kv_cache)) if spec.kv_cache else None)
    model._quant_spec_installed = True
    return True


def activation_targets(model, spec: QuantSpec) -> dict:
    """The Linears whose inputs `spec.activations` quantizes: the quantized ones (FakeQuantLinear where the
    model has them, else the nn.Linears the weight targets select)."""
    from torch import nn

    from .fake_quant import FakeQuantLinear

    if spec.act_modules is not None:
        names = set(spec.act_modules)
        return {n: m for n, m in model.named_modules() if n in names}
    if fq := {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}:
        return fq
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and spec.weights.scheme_for(n, "Linear") is not None}


def write_quant_spec(model, out_dir: str | Path) -> None:
    """Save the spec `model` carries beside its weights (nothing for a model without one)."""
    spec = getattr(model, "quant_spec", None)
    if spec is not None:
        (Path(out_dir) / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1))


def read_quant_spec(path: str | Path) -> QuantSpec | None:
    """The spec saved beside a checkpoint's weights, or None (a plain model, or a hub id). A checkpoint
    written before QuantSpec named its runtime in config.json (`rqat_runtime`): read as the same spec."""
    path = Path(path)
    if (path / SPEC_FILE).is_file():
        return QuantSpec.from_dict(json.loads((path / SPEC_FILE).read_text()))
    cfg = path / "config.json"
    legacy = json.loads(cfg.read_text()).get(_LEGACY_KEY) if cfg.is_file() else None
    if not legacy:
        return None
    from .scheme import ActivationScheme, KVCacheScheme, RotationScheme

    rot = legacy.get("rotation")
    return QuantSpec(QuantTargets(QuantScheme(bits=4)),
                     ActivationScheme(**legacy["activations"]) if legacy.get("activations") else None,
                     KVCacheScheme(**legacy["kv_cache"]) if legacy.get("kv_cache") else None,
                     RotationScheme(rot["kind"], rot["seed"]) if rot else None,
                     act_modules=tuple(legacy.get("act_modules") or ()))


def needs_runtime(path: str | Path) -> bool:
    """True for a checkpoint directory whose spec has online parts (W4A4KV4, rotations): no serving
    engine runs it, only transformers with this runtime installed."""
    spec = read_quant_spec(path) if Path(path).is_dir() else None
    return spec is not None and spec.online
