"""Method registry: ``register_method`` / ``get_method`` / ``list_methods`` / ``adapt``."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch.nn as nn

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_method(cls: T) -> T:
    """Class decorator registering a :class:`~adaptkit.core.TTAMethod` under its ``name``.

    Raises:
        ValueError: the name is empty, not lower_snake_case, or already taken by another class.
    """
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be a non-empty lower_snake_case string, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type:
    """The method class registered as ``name``: case-insensitive, ``-``/``_``/spaces optional, and the class
    name works too (``"bn_adapt"``, ``"BNAdapt"``, ``"bn-adapt"``).

    Example:
        >>> from adaptkit import get_method
        >>> get_method("BNAdapt").__name__, get_method("bn-adapt").__name__
        ('BNAdapt', 'BNAdapt')
    """
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        squashed = key.replace("_", "").replace(" ", "")
        for reg, cls in _REGISTRY.items():
            if squashed in (reg.replace("_", ""), cls.__name__.lower()):
                return cls
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(list_methods())}")
    return _REGISTRY[key]


def list_methods() -> list[str]:
    """Sorted registry names.

    Example:
        >>> import adaptkit
        >>> adaptkit.list_methods()[:4], len(adaptkit.list_methods()) >= 16
        (['bn_adapt', 'clust3', 'cotta', 'eata'], True)
    """
    return sorted(_REGISTRY)


def adapt(model: nn.Module, method: str, **overrides: Any) -> nn.Module:
    """Wrap ``model`` with the method registered as ``method``, passing ``overrides`` to its constructor.

    Example:
        >>> import torchvision, adaptkit
        >>> m = adaptkit.adapt(torchvision.models.resnet18(), "bn_adapt", N=8)
        >>> type(m).__name__, m.N
        ('BNAdapt', 8.0)
        >>> _ = m.restore()
    """
    cls: Callable[..., nn.Module] = get_method(method)
    return cls(model, **overrides)
