"""Parsing of method specs such as ``"bn_adapt:N=16,accumulate=true"`` and sweep specs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

_LAYER_PART = re.compile(r"^(\d+|[A-Za-z_][\w.]*)$")


def parse_value(text: str) -> Any:
    """``"16"`` -> 16, ``"0.5"`` -> 0.5, ``"inf"`` -> inf, ``"true"`` -> True, ``"1+2"`` -> ``[1, 2]`` (several
    layers, e.g. ``clust3:layer=1+2``), otherwise the string.

    Example:
        >>> from adaptkit.bench.spec import parse_value
        >>> parse_value("16"), parse_value("1e-3"), parse_value("inf"), parse_value("true"), parse_value("sgd")
        (16, 0.001, inf, True, 'sgd')
        >>> parse_value("1+2"), parse_value("layer1+layer2.0"), parse_value("1e+3")
        ([1, 2], ['layer1', 'layer2.0'], 1000.0)
    """
    parts = [t.strip() for t in text.split("+")]
    if len(parts) > 1 and all(_LAYER_PART.match(t) for t in parts):
        return [parse_value(t) for t in parts]
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


@dataclass(frozen=True)
class MethodSpec:
    """A method name with constructor overrides; ``source`` means no adaptation."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Display name, e.g. ``bn_adapt(N=16)``."""
        if not self.overrides:
            return self.name
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.overrides.items())
        return f"{self.name}({args})"

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """Parse ``name`` or ``name:key=value,key=value``.

        Example:
            >>> from adaptkit.bench.spec import MethodSpec
            >>> MethodSpec.parse("bn_adapt:N=16").label
            'bn_adapt(N=16)'
        """
        name, _, rest = text.partition(":")
        overrides = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq:
                raise ValueError(f"method override {item!r} in {text!r} must look like key=value")
            overrides[key.strip()] = parse_value(val)
        return cls(name.strip().lower().replace("-", "_"), overrides)


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(_fmt(x) for x in v)
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"bn_adapt.N=0,4,16,inf"`` -> ``("bn_adapt.N", [0, 4, 16, inf])``; ``"batch_size=1,8"`` likewise."""
    key, eq, vals = text.partition("=")
    if not eq or not vals:
        raise ValueError(f"sweep {text!r} must look like key=v1,v2,... (e.g. bn_adapt.N=0,16 or batch_size=8,32)")
    return key.strip(), [parse_value(v) for v in vals.split(",") if v.strip()]
