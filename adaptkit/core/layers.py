"""Norm-layer discovery, stage/layer resolution and the ``list_layers`` inspection table."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from adaptkit.core.alerts import AdaptationWarning
from adaptkit.core.unwrap import strip_prefix, unwrap_model

T = TypeVar("T")

NORM_KINDS = ("batch", "group", "layer")


def norm_kind(module: nn.Module) -> str | None:
    """Classify a module: ``"batch"`` (any ``_BatchNorm``: 1d/2d/3d, SyncBatchNorm, timm BatchNormAct2d),
    ``"group"``, ``"layer"`` (incl. timm LayerNorm2d), ``"frozen_batch"`` (torchvision/timm FrozenBatchNorm*,
    which cannot adapt) or ``None``.

    Example:
        >>> import torch.nn as nn
        >>> from adaptkit.core.layers import norm_kind
        >>> norm_kind(nn.BatchNorm2d(3)), norm_kind(nn.LayerNorm(3)), norm_kind(nn.Conv2d(1, 1, 1))
        ('batch', 'layer', None)
    """
    if isinstance(module, _BatchNorm):
        return "batch"
    if isinstance(module, nn.GroupNorm):
        return "group"
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if "FrozenBatchNorm" in type(module).__name__:
        return "frozen_batch"
    return None


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`.

    Attributes:
        name: qualified module name (no ``module.`` / ``_orig_mod.`` prefix).
        type: class name.
        norm: norm kind (see :func:`norm_kind`) or ``None``.
        frozen: a norm layer that cannot adapt (FrozenBatchNorm or BN without running statistics).
        stage: the integer accepted by ``layer=`` for this module, or ``None``.
        params: number of parameters directly owned by the module.
    """

    name: str
    type: str
    norm: str | None
    frozen: bool
    stage: int | None
    params: int

    def __str__(self) -> str:
        stage = "" if self.stage is None else str(self.stage)
        norm = (self.norm or "") + (" (frozen)" if self.frozen else "")
        return f"{stage:>5}  {self.name:<48} {self.type:<24} {norm:<20} {self.params}"


def _feature_info_modules(model: nn.Module) -> list[str] | None:
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    try:
        names = [d["module"] for d in info] if isinstance(info, (list, tuple)) else list(info.module_name())
    except (TypeError, KeyError, AttributeError):
        return None
    modules = dict(model.named_modules())
    names = [n for n in names if n in modules]
    return names or None


_OP_PREFIXES = {"conv", "norm", "bn", "relu", "act", "pool", "fc", "drop", "dropout", "linear", "head", "classifier"}


def _numbered_blocks(container: nn.Module, prefix: str = "") -> list[str]:
    """Stage names from numbered block children (``layer1..4``, ``denseblock1..4``), preceded by the last
    child before the first block (the stem output), or ``[]`` when there are no such children."""
    names = [k for k, _ in container.named_children()]
    groups: dict[str, list[tuple[int, str]]] = {}
    for k in names:
        m = re.fullmatch(r"([A-Za-z_]+?)_?(\d+)", k)
        if m and m.group(1).lower() not in _OP_PREFIXES:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), k))
    if not groups:
        return []
    best = max(groups.values(), key=len)
    if len(best) < 2:
        return []
    blocks = [k for _, k in sorted(best)]
    first = names.index(blocks[0])
    stem = [names[first - 1]] if first > 0 else []
    return [prefix + k for k in stem + blocks]


def stage_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's feature stages, in forward order; ``layer=i`` selects entry ``i``.

    Resolution order: timm ``feature_info``; a ``backbone`` child (torchvision FCN / DeepLabV3 / LR-ASPP and
    other encoder-decoder nets): the backbone's stages, found by these same rules and prefixed ``backbone.``, so
    ``layer=1`` on ``fcn_resnet50`` is ``backbone.layer1`` as on ``resnet50`` and the decoder heads are never
    stages; likewise a ``body`` child (torchvision detection backbones with an FPN: ``backbone.body.layer1``);
    ``layer1..layerK`` children (torchvision ResNet family; entry 0 is the stem, so ``layer=1`` is
    ``layer1``); a ``features`` (or ``layers``) sequence (torchvision MobileNet, EfficientNet, DenseNet, VGG,
    ConvNeXt, MNASNet, ...); ``trunk_output`` blocks (RegNet, entry 0 the stem); ``encoder.layers`` (torchvision
    ViT); otherwise the model's top-level children that hold parameters, minus a final classifier.

    Example:
        >>> import torchvision
        >>> from adaptkit.core import stage_names
        >>> stage_names(torchvision.models.resnet18())
        ['maxpool', 'layer1', 'layer2', 'layer3', 'layer4']
        >>> seg = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None)
        >>> stage_names(seg)
        ['backbone.maxpool', 'backbone.layer1', 'backbone.layer2', 'backbone.layer3', 'backbone.layer4']
    """
    model = unwrap_model(model)
    fi = _feature_info_modules(model)
    if fi is not None:
        return fi
    children = dict(model.named_children())
    for wrapper in ("backbone", "body"):  # encoder-decoder (a decoder head is no stage); FPN backbones' body
        sub = children.get(wrapper)
        if isinstance(sub, nn.Module):
            inner = stage_names(sub)
            if inner:
                return [f"{wrapper}.{n}" for n in inner]
    blocks = _numbered_blocks(model)
    if blocks:
        return blocks
    for seq_name in ("features", "layers"):  # torchvision MobileNet/EfficientNet/DenseNet/VGG/ConvNeXt; MNASNet
        feats = children.get(seq_name)
        if isinstance(feats, nn.Sequential) and len(feats) > 1:
            blocks = _numbered_blocks(feats, f"{seq_name}.")
            return blocks or [f"{seq_name}.{k}" for k, _ in feats.named_children()]
    trunk = children.get("trunk_output")
    if isinstance(trunk, nn.Sequential):
        stem = ["stem"] if "stem" in children else []
        return stem + [f"trunk_output.{k}" for k, _ in trunk.named_children()]
    enc = getattr(model, "encoder", None)
    if isinstance(enc, nn.Module) and isinstance(getattr(enc, "layers", None), nn.Sequential):
        return [f"encoder.layers.{k}" for k, _ in enc.layers.named_children()]
    items = [(k, m) for k, m in children.items() if any(True for _ in m.parameters())]
    if len(items) > 1 and isinstance(items[-1][1], nn.Linear):
        items = items[:-1]
    return [k for k, _ in items]


def _unknown(name: str, candidates: Sequence[str], what: str) -> ValueError:
    close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"unknown {what} {name!r}.{hint} Run adaptkit.list_layers(model) to see the valid names and stage indices."
    )


def resolve_layer(model: nn.Module, layer: int | str) -> str:
    """Turn ``layer=`` (stage index or qualified name) into a qualified module name of the unwrapped model.

    Raises:
        ValueError: unknown name (with close matches) or out-of-range stage index.

    Example:
        >>> import torchvision
        >>> from adaptkit.core import resolve_layer
        >>> m = torchvision.models.resnet18()
        >>> resolve_layer(m, 1), resolve_layer(m, "layer2.0.conv1"), resolve_layer(m, "module.layer3")
        ('layer1', 'layer2.0.conv1', 'layer3')
    """
    model = unwrap_model(model)
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f"layer must be an int stage index or a qualified module name, got {type(layer).__name__}")
    if isinstance(layer, int):
        stages = stage_names(model)
        if not -len(stages) <= layer < len(stages):
            raise ValueError(
                f"layer={layer} is out of range: this model has {len(stages)} stages (0..{len(stages) - 1}: "
                f"{stages}). Run adaptkit.list_layers(model) to see them."
            )
        return stages[layer]
    name = strip_prefix(layer)
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        raise _unknown(layer, names, "layer")
    return name


def _has_running_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


def list_layers(model: nn.Module, norm_only: bool = False) -> list[LayerInfo]:
    """Inspect a model: every module with its qualified name, type, norm kind, frozen flag and stage index.

    Args:
        model: any module (DP/DDP/compile wrappers are unwrapped).
        norm_only: list only normalisation layers.

    Example:
        >>> import torchvision
        >>> from adaptkit import list_layers
        >>> rows = list_layers(torchvision.models.resnet18(), norm_only=True)
        >>> rows[0].name, rows[0].norm, len(rows)
        ('bn1', 'batch', 20)
    """
    model = unwrap_model(model)
    stages = {n: i for i, n in enumerate(stage_names(model))}
    rows = []
    for name, m in model.named_modules():
        if not name:
            continue
        kind = norm_kind(m)
        if norm_only and kind is None:
            continue
        frozen = kind == "frozen_batch" or (kind == "batch" and not _has_running_stats(m))
        rows.append(
            LayerInfo(
                name=name,
                type=type(m).__name__,
                norm=kind,
                frozen=frozen,
                stage=stages.get(name),
                params=sum(p.numel() for p in m.parameters(recurse=False)),
            )
        )
    return rows


def format_layers(rows: Iterable[LayerInfo]) -> str:
    """Render :func:`list_layers` rows as a fixed-width table."""
    head = f"{'stage':>5}  {'name':<48} {'type':<24} {'norm':<20} params"
    return "\n".join([head, *(str(r) for r in rows)])


def matches(name: str, patterns: str | Sequence[str]) -> bool:
    r"""Whether a qualified module name is selected: ``patterns`` is a regex that must match the **full** name, or
    a list of exact names / dotted suffixes.

    Example:
        >>> from adaptkit.core.layers import matches
        >>> matches("layer1.0.bn1", r"layer1\..*"), matches("layer1.0.bn1", ["0.bn1"]), matches("layer1.0.bn1", ["bn"])
        (True, True, False)
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


_matches = matches  # the historical private name


def filter_by_name(
    candidates: dict[str, T],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    what: str,
) -> dict[str, T]:
    """The candidates that ``include`` selects (all when ``None``) and ``exclude`` does not (exclusions win).

    A listed ``include`` name that matches no candidate raises a ``ValueError`` with close matches and a pointer to
    :func:`list_layers`; ``what`` describes the candidates in that message (``"norm layer in Tent(include=...)"``).
    Wrapper prefixes (``module.``, ``_orig_mod.``) are stripped from listed names.

    Example:
        >>> from adaptkit.core.layers import filter_by_name
        >>> sorted(filter_by_name({"a.bn": 1, "b.bn": 2, "c.ln": 3}, r".*bn", ["b.bn"], "layer"))
        ['a.bn']
    """
    if include is not None and not isinstance(include, str):
        include = [strip_prefix(p) for p in include]
        for p in include:
            if not any(matches(n, [p]) for n in candidates):
                raise _unknown(p, list(candidates), what)
    return {
        n: m
        for n, m in candidates.items()
        if (include is None or matches(n, include)) and (exclude is None or not matches(n, exclude))
    }


def unique_parameters(
    modules: Iterable[nn.Module], names: Sequence[str] | None = None, requires_grad: bool = False
) -> list[nn.Parameter]:
    """The modules' own parameters (not their children's), each once, in order; only those called ``names`` when
    given, only those with ``requires_grad`` set when asked.

    Example:
        >>> import torch.nn as nn
        >>> from adaptkit.core.layers import unique_parameters
        >>> lin = nn.Linear(2, 2)
        >>> [tuple(p.shape) for p in unique_parameters([lin, lin], names=["bias"])]
        [(2,)]
    """
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in modules:
        for k, p in m._parameters.items():
            if not isinstance(p, nn.Parameter) or id(p) in seen or (names is not None and k not in names):
                continue
            if requires_grad and not p.requires_grad:
                continue
            seen.add(id(p))
            out.append(p)
    return out


def select_norm_layers(
    model: nn.Module,
    kinds: Sequence[str],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    who: str = "adaptkit",
    require_running_stats: bool = False,
) -> dict[str, nn.Module]:
    """Select norm layers of the given kinds, by name.

    Args:
        model: the unwrapped model.
        kinds: norm kinds to select (``"batch"``, ``"group"``, ``"layer"``).
        include: a regex that must match the **full** name, or a list of exact names / dotted suffixes;
            ``None`` selects all layers of ``kinds``.
        exclude: same syntax; exclusions win.
        who: the caller, for messages.
        require_running_stats: skip (with a warning) BN layers without running statistics.

    Returns:
        ``{qualified_name: module}`` in forward-registration order.

    Raises:
        ValueError: a name in ``include`` is not a norm layer of ``kinds``, or the selection is empty.

    Example:
        >>> import torchvision
        >>> from adaptkit.core import select_norm_layers
        >>> sel = select_norm_layers(torchvision.models.resnet18(), ["batch"], include=r"layer1\\..*")
        >>> list(sel)[:2]
        ['layer1.0.bn1', 'layer1.0.bn2']
    """
    unknown_kinds = set(kinds) - set(NORM_KINDS)
    if unknown_kinds:
        raise ValueError(f"{who}: unknown norm kinds {sorted(unknown_kinds)}; use any of {list(NORM_KINDS)}")
    model = unwrap_model(model)
    all_norms = {n: m for n, m in model.named_modules() if n and norm_kind(m) is not None}
    frozen = [n for n, m in all_norms.items() if norm_kind(m) == "frozen_batch"]
    if frozen:
        warnings.warn(
            f"{who}: {len(frozen)} frozen BatchNorm layer(s) cannot adapt and are left as they are "
            f"(e.g. {frozen[0]!r}); convert them to nn.BatchNorm2d to adapt them.",
            AdaptationWarning,
            stacklevel=3,
        )
    cands = {n: m for n, m in all_norms.items() if norm_kind(m) in kinds}
    sel = filter_by_name(cands, include, exclude, f"{'/'.join(kinds)} norm layer in {who}(include=...)")
    if require_running_stats:
        missing = [n for n, m in sel.items() if norm_kind(m) == "batch" and not _has_running_stats(m)]
        if missing:
            warnings.warn(
                f"{who}: {len(missing)} BatchNorm layer(s) track no running statistics and are skipped "
                f"(e.g. {missing[0]!r}).",
                AdaptationWarning,
                stacklevel=3,
            )
            sel = {n: m for n, m in sel.items() if n not in missing}
    if not sel:
        found = sorted({type(m).__name__ for m in all_norms.values()}) or ["none"]
        raise ValueError(
            f"{who}: the model has no adaptable {'/'.join(kinds)} normalisation layers"
            + ("" if include is None and exclude is None else " matching include/exclude")
            + f" (norm layers found: {', '.join(found)}). Run adaptkit.list_layers(model) to inspect it."
        )
    return sel
