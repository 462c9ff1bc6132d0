"""Quantization schemes as small declarative objects (after llm-compressor's `QuantizationScheme`): one per
target (weights, activations, KV cache, rotation), gathered in a `QuantSpec`, which a checkpoint carries
beside its weights (quant/runtime.py) so that every loader computes the same function. Torch-free: the
recipe preflight builds and checks them from config.json widths alone."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import SpecError

if TYPE_CHECKING:  # torch-free at import: the recipe preflight resolves plans from config.json shapes
    from torch import nn

    from ..architecture import LinearShape


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantization of a Linear layer's [out, in] weight."""

    bits: int
    group_size: int = 128  # -1: one group spanning the whole input dimension (per-channel)
    symmetric: bool = False
    observer: str = "minmax"  # minmax | mse | percentile
    percentile: float = 0.999

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise SpecError("bits", f"{self.bits} is not supported (allowed: 2, 3, 4, 8)")
        if self.group_size != -1 and self.group_size <= 0:
            raise SpecError("group_size", f"{self.group_size} must be positive or -1 (per-channel)")
        if self.observer not in ("minmax", "mse", "percentile"):
            raise SpecError("observer", f"{self.observer!r} (allowed: minmax, mse, percentile)")

    @property
    def maxq(self) -> int:
        """The largest code: 2^bits - 1."""
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Groups along an input width of `in_features` columns."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group (the whole width for per-channel, -1)."""
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int, field: str = "group_size") -> None:
        """Raises SpecError (naming `field`) when the group size does not divide the layer's input width."""
        if self.group_size != -1 and in_features % self.group_size:
            raise SpecError(field, f"{self.group_size} does not divide the input width {in_features} of "
                                   f"{name}; use a divisor of {in_features} or -1 (per-channel), or add an override")

    def to_dict(self) -> dict:
        """The spec as plain JSON-able values (what quant_spec.json holds)."""
        return asdict(self)


@dataclass(frozen=True)
class QuantTargets:
    """Which Linear layers are quantized, and with which scheme (overrides win, last match first)."""

    default: QuantScheme
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[tuple[str, dict], ...] = ()

    def _matches(self, name: str, type_name: str, patterns) -> bool:
        return any(p == type_name or fnmatch.fnmatchcase(name, p) for p in patterns)

    def scheme_for(self, name: str, type_name: str = "Linear") -> QuantScheme | None:
        """The scheme of the Linear layer `name` (type_name: its class name, which targets may list),
        or None when it is not targeted or ignored."""
        if not self._matches(name, type_name, self.targets) or self._matches(name, type_name, self.ignore):
            return None
        scheme = self.default
        for pattern, changes in reversed(self.overrides):
            if fnmatch.fnmatchcase(name, pattern):
                scheme = QuantScheme(**{**scheme.to_dict(), **{k: v for k, v in changes.items() if v is not None}})
                break
        return scheme

    def resolve(self, model: nn.Module) -> dict[str, QuantScheme]:
        """Name -> scheme for every quantized nn.Linear of `model`; fails before any work on a bad layer width."""
        from torch import nn

        from ..architecture import LinearShape

        return self.resolve_shapes([LinearShape(name, m.in_features, m.out_features, None, type(m).__name__)
                                    for name, m in model.named_modules() if isinstance(m, nn.Linear)])

    def resolve_shapes(self, linears: list[LinearShape]) -> dict[str, QuantScheme]:
        """`resolve` from the Linear layers' shapes alone, e.g. those `architecture.linear_shapes` reads from
        config.json. Raises SpecError (`group_size`, `overrides`, `targets`) on an input width the scheme's
        group size does not divide, or when no layer is targeted."""
        plan = {}
        for linear in linears:
            scheme = self.scheme_for(linear.name, linear.type_name)
            if scheme is not None:
                overridden = scheme.group_size != self.default.group_size
                scheme.check_layer(linear.name, linear.in_features, "overrides" if overridden else "group_size")
                plan[linear.name] = scheme
        if not plan:
            raise SpecError("targets", f"no Linear layer matched {list(self.targets)} (less ignore {list(self.ignore)})")
        for pattern, _ in self.overrides:  # a pattern that matches nothing is a typo, not a no-op
            if not any(fnmatch.fnmatchcase(name, pattern) for name in plan):
                raise SpecError("overrides", f"pattern {pattern!r} matches no quantized layer (they are named like "
                                             f"{next(iter(plan))!r}); fix the glob or drop the override")
        return plan

    def to_dict(self) -> dict:
        """The spec as plain JSON-able values (what quant_spec.json holds)."""
        return {"default": self.default.to_dict(), "targets": list(self.targets), "ignore": list(self.ignore),
                "overrides": [[pattern, dict(changes)] for pattern, changes in self.overrides]}

    @classmethod
    def from_dict(cls, d: dict) -> QuantTargets:
        """The targets `to_dict` wrote."""
        return cls(QuantScheme(**d["default"]), tuple(d["targets"]), tuple(d["ignore"]),
                   tuple((pattern, dict(changes)) for pattern, changes in d["overrides"]))


@dataclass(frozen=True)
class ActivationScheme:
    """Per-token dynamic fake quantization of a quantized Linear's input: one scale (and zero point,
    asymmetric) per token over the features, the token's range clipped at `clip_ratio` (QuaRot's A4)."""

    bits: int = 4
    symmetric: bool = False
    clip_ratio: float = 1.0


@dataclass(frozen=True)
class KVCacheScheme:
    """Fake quantization of keys and values per head, in groups of `group_size` along head_dim (-1: the
    whole head), asymmetric by default (QuaRot's KV4)."""

    bits: int = 4
    group_size: int = -1
    symmetric: bool = False
    clip_ratio: float = 1.0


@dataclass(frozen=True)
class RotationScheme:
    """QuaRot's randomised Hadamard rotation: fused into the weights offline, online on down_proj's input
    and on q/k (quant/rotation.py)."""

    kind: str = "hadamard"
    seed: int = 0


@dataclass(frozen=True)
class QuantSpec:
    """Everything a quantized model computes beyond BF16, one declarative object per target: the weights
    (which Linears, which scheme), the activations of those Linears, the KV cache, the rotation. A model
    whose spec has no online part (`online` False) is weight-only: any engine runs its export."""

    weights: QuantTargets
    activations: ActivationScheme | None = None
    kv_cache: KVCacheScheme | None = None
    rotation: RotationScheme | None = None
    # a checkpoint written before QuantSpec named the Linears whose inputs are quantized instead
    act_modules: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def online(self) -> bool:
        """True when the model computes more than its weights (online Hadamards, activation or KV
        quantizers): only reasoning_qat's runtime on transformers runs it."""
        return any(x is not None for x in (self.activations, self.kv_cache, self.rotation))

    def to_dict(self) -> dict:
        """The spec as plain JSON-able values (what quant_spec.json holds)."""
        return {"weights": self.weights.to_dict(),
                **{k: asdict(getattr(self, k)) if getattr(self, k) is not None else None
                   for k in ("activations", "kv_cache", "rotation")}}

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        """Raises SpecError on keys this version does not know (a checkpoint from a newer version)."""
        try:
            return cls(QuantTargets.from_dict(d["weights"]),
                       ActivationScheme(**d["activations"]) if d.get("activations") else None,
                       KVCacheScheme(**d["kv_cache"]) if d.get("kv_cache") else None,
                       RotationScheme(**d["rotation"]) if d.get("rotation") else None)
        except (KeyError, TypeError) as err:
            raise SpecError("quant_spec", f"not a quantization spec this version reads ({err})") from None
