"""The one boundary between the recipe and the library. The stages are the recipe's script and read its
sections; what they hand to `quant`, `kd`, `data` and `evaluation` is built here, as those packages' own
typed specs (`QuantSpec`, `KDSpec`, `TraceSpec`, `GenerationSpec`, `EngineSettings`), which know nothing
of recipes. The library raises `SpecError` naming its spec's key (`group_size`, `generation.keep`);
`recipe_keys(prefix)` re-raises it naming the key the user wrote (`quant.group_size`,
`qat.data.generation.keep`), so an error read while building RL's data says `rl.data`, never `qat.data`.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import TYPE_CHECKING

from ..errors import SpecError
from ..quant.scheme import (
    ActivationScheme,
    KVCacheScheme,
    QuantScheme,
    QuantSpec,
    QuantTargets,
    RotationScheme,
)
from ..recipe import RecipeError

if TYPE_CHECKING:
    from ..data.qat_data import TraceSpec
    from ..data.teacher_responses import GenerationSpec
    from ..evaluation.backends import EngineSettings
    from ..kd import KDSpec
    from ..recipe import DataConfig, Recipe


@contextlib.contextmanager
def recipe_keys(prefix: str, rename: dict[str, str] | None = None, only: set[str] | None = None):
    """Within the block, a SpecError `field: message` becomes RecipeError `prefix.field: message`, where
    `rename` may give a spec key its recipe name (the engine's `backend` is `rl.use_vllm` in RL). `only`: the spec
    keys this block names (others pass through to an enclosing block: GPTQ's `damp` is `ptq.damp`, its group
    sizes are `quant.*`)."""
    try:
        yield
    except SpecError as err:
        if only is not None and err.field not in only:
            raise
        key = (rename or {}).get(err.field, err.field)
        raise RecipeError(f"{prefix}.{key}: {err.message}" if prefix else f"{key}: {err.message}") from None


def _copy(cls, section, **changes):
    """`cls` (a spec dataclass) from the recipe section's fields of the same names."""
    return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if f.name not in changes}, **changes)


def quant_spec(recipe: Recipe, bits: int) -> QuantSpec:
    """The QuantSpec of one bit width of the recipe: `quant` (weights, activations, KV cache) and
    `ptq.rotation`. Raises RecipeError naming the quant key at fault."""
    q, p = recipe.quant, recipe.ptq
    with recipe_keys("quant"):
        weights = QuantTargets(
            QuantScheme(bits=bits, group_size=q.group_size, symmetric=q.symmetric, observer=q.observer,
                        percentile=q.percentile),
            tuple(q.targets), tuple(q.ignore),
            tuple((o.pattern, {"bits": o.bits, "group_size": o.group_size}) for o in q.overrides))
    return QuantSpec(
        weights,
        _copy(ActivationScheme, q.activations) if q.activations else None,
        _copy(KVCacheScheme, q.kv_cache) if q.kv_cache else None,
        RotationScheme(p.rotation, p.rotation_seed) if p.rotation != "none" else None)


def kd_spec(recipe: Recipe) -> KDSpec:
    """The KDSpec of `qat.kd`."""
    from ..kd import KDSpec

    return _copy(KDSpec, recipe.qat.kd)


def generation_spec(data: DataConfig) -> GenerationSpec:
    """The GenerationSpec of a data section's `generation`."""
    from ..data.teacher_responses import GenerationSpec

    return _copy(GenerationSpec, data.generation)


def trace_spec(data: DataConfig) -> TraceSpec:
    """The library's spec of a recipe data section (`qat.data` or `rl.data`)."""
    from ..data.qat_data import TraceSpec

    return _copy(TraceSpec, data)


def engine_settings(recipe: Recipe) -> EngineSettings:
    """The inference engine's settings (eval, teacher-written data, colocated RL rollouts): `eval`'s."""
    from ..evaluation.backends import EngineSettings

    return _copy(EngineSettings, recipe.eval, attn_implementation=recipe.model.attn_implementation)


def data_prefix(recipe: Recipe, data: DataConfig) -> str:
    """`qat.data` or `rl.data`: the recipe key of a data section, for its errors."""
    return "rl.data" if data is recipe.rl.data else "qat.data"
