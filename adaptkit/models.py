"""Models by name: torchvision and timm architectures with random weights (nothing is downloaded).

The one name -> model resolver of adaptkit: the ``adaptkit layers`` command and ``adaptkit bench`` (through
:func:`adaptkit.bench.models.load_model`) both call :func:`build_model`. It sits at the bottom of the package
(torch, torchvision and, lazily, timm only), so the library never depends on the command line.

Example:
    >>> from adaptkit.models import build_model
    >>> model, source = build_model("resnet18", num_classes=10)
    >>> source, model.fc.out_features, model.training
    ('torchvision', 10, False)
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch.nn as nn

__all__ = ["ModelLookupError", "build_model"]


class ModelLookupError(ValueError):
    """A model name that cannot be built: unknown to torchvision and timm (the message lists close matches), or
    a timm name while timm is not installed."""


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def _unknown_model(name: str, source: str) -> ModelLookupError:
    candidates: list[str] = []
    if source in ("torchvision", "auto"):
        candidates += _torchvision_names()
    if source in ("timm", "auto"):
        candidates += _timm_names()
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = {
        "torchvision": "torchvision.models.list_models()",
        "timm": "timm.list_models('*pattern*')",
        "auto": "torchvision.models.list_models() or timm.list_models('*pattern*')",
    }[source]
    return ModelLookupError(f"unknown {'' if source == 'auto' else source + ' '}model {name!r}.{hint} See {where}.")


def build_model(name: str, source: str = "auto", num_classes: int | None = None) -> tuple[nn.Module, str]:
    """Build ``name`` with random weights (no download) from torchvision or timm.

    timm is imported only when the name is not a torchvision model (or with ``source="timm"``).

    Args:
        name: a torchvision model name (``torchvision.models.list_models()``) or a timm one
            (``timm.list_models()``).
        source: ``"torchvision"``, ``"timm"`` or ``"auto"`` (torchvision first, then timm).
        num_classes: classifier width; ``None`` keeps the library default.

    Returns:
        ``(model in eval mode, source it came from)``.

    Raises:
        ModelLookupError: unknown name (with close matches) or timm not installed.
    """
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source in ("torchvision", "auto") and name in _torchvision_names():
        import torchvision

        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # segmentation / detection builders default to ImageNet backbones
        return torchvision.models.get_model(name, weights=None, **kwargs).eval(), "torchvision"
    if source in ("timm", "auto"):
        try:
            import timm
        except ImportError as e:
            if source == "timm":
                raise ModelLookupError("timm is not installed: pip install timm") from e
            raise _unknown_model(name, "torchvision") from e
        if timm.is_model(name):
            return timm.create_model(name, pretrained=False, **kwargs).eval(), "timm"
    raise _unknown_model(name, source)
