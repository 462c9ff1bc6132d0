"""Quantization schemes as small declarative objects, and which modules get which scheme."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import UserError

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
            raise ValueError(f"quant.bits: {self.bits} is not supported (allowed: 2, 3, 4, 8)")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"quant.group_size: {self.group_size} must be positive or -1 (per-channel)")
        if self.observer not in ("minmax", "mse", "percentile"):
            raise ValueError(f"quant.observer: {self.observer!r} (allowed: minmax, mse, percentile)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int, field: str = "quant.group_size") -> None:
        """Raises UserError (naming `field`) when the group size does not divide the layer's input width."""
        if self.group_size != -1 and in_features % self.group_size:
            raise UserError(
                f"{field}: {self.group_size} does not divide the input width {in_features} of "
                f"{name}; use a divisor of {in_features} or -1 (per-channel), or add an override"
            )

    def to_dict(self) -> dict:
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
        config.json. Raises UserError on an input width the scheme's group size does not divide, or when
        no layer is targeted."""
        plan = {}
        for linear in linears:
            scheme = self.scheme_for(linear.name, linear.type_name)
            if scheme is not None:
                overridden = scheme.group_size != self.default.group_size
                scheme.check_layer(linear.name, linear.in_features, "quant.overrides" if overridden else "quant.group_size")
                plan[linear.name] = scheme
        if not plan:
            raise UserError(f"quant.targets: no Linear layer matched {list(self.targets)} (less ignore {list(self.ignore)})")
        return plan


def targets_from_recipe(quant, bits: int) -> QuantTargets:
    """Build the targets for one bit width of the recipe's `quant` section."""
    scheme = QuantScheme(
        bits=bits,
        group_size=quant.group_size,
        symmetric=quant.symmetric,
        observer=quant.observer,
        percentile=quant.percentile,
    )
    overrides = tuple((o.pattern, {"bits": o.bits, "group_size": o.group_size}) for o in quant.overrides)
    return QuantTargets(scheme, tuple(quant.targets), tuple(quant.ignore), overrides)
