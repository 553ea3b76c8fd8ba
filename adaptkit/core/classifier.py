"""The model's final classifier: find it (or resolve ``classifier="name"``) and capture its input features.

Output-space methods (LAME, T3A) work on the *penultimate* features ``z`` (the input of the final ``nn.Linear``)
and the model's class scores. :func:`find_classifier` picks the layer once, at wrap time; :class:`ClassifierTap`
captures its input through an owned forward pre-hook; :class:`ClassifierMethod` is the base those methods share
(selection, snapshot, the checked forward, putting new logits back into the model's output structure).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.hooks import HookManager
from adaptkit.core.layers import _unknown, norm_kind
from adaptkit.core.unwrap import strip_prefix

__all__ = ["ClassifierMethod", "ClassifierTap", "find_classifier", "replace_logits"]


def _linear_layers(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Linear]]:
    return [
        (f"{prefix}.{n}" if prefix and n else (prefix or n), m)
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear)
    ]


def find_classifier(model: nn.Module, name: str | None = None, who: str = "adaptkit") -> tuple[str, nn.Linear]:
    """The model's final classifier layer: ``(qualified_name, module)``.

    Without ``name``: the last ``nn.Linear`` registered in the model (torchvision ResNet ``fc``, EfficientNet /
    MobileNet ``classifier.N``, DenseNet ``classifier``; timm ``fc``, ``head``, ``head.fc``, ``classifier``). A
    method using it checks on every forward that this layer ran once, on ``(B, d)`` features, and that its
    ``out_features`` equals the class count of the model's output (see :meth:`ClassifierMethod.forward_features`).
    With ``name``: that module if it is an ``nn.Linear``, else the last ``nn.Linear`` inside it
    (``classifier="head"`` on a timm ConvNeXt gives ``head.fc``).

    Args:
        model: the unwrapped model.
        name: a qualified module name (``module.`` / ``_orig_mod.`` prefixes are stripped), or ``None``.
        who: the caller, for messages.

    Raises:
        ValueError: unknown name (with close matches), a named module without an ``nn.Linear``, or a model
            without any ``nn.Linear`` (segmentation models with convolutional classifiers); every message points
            to ``adaptkit.list_layers(model)`` and ``classifier=``.

    Example:
        >>> import torchvision
        >>> from adaptkit.core.classifier import find_classifier
        >>> find_classifier(torchvision.models.resnet18())[0], find_classifier(torchvision.models.densenet121())[0]
        ('fc', 'classifier')
        >>> find_classifier(torchvision.models.efficientnet_b0(), "classifier")[0]
        'classifier.1'
    """
    if name is None:
        linears = _linear_layers(model)
        if not linears:
            raise ValueError(
                f"{who}: the model has no nn.Linear layer to use as its final classifier (segmentation models "
                "with convolutional classifiers are not supported: this method needs class scores (B, C) from a "
                "final nn.Linear on penultimate features). If the classifier is another module type, this method "
                "cannot use it; run adaptkit.list_layers(model) to see the layers, and name the final nn.Linear "
                "with classifier='...'"
            )
        return linears[-1]
    if not isinstance(name, str):
        raise TypeError(f"{who}: classifier must be a qualified module name (str) or None, got {type(name).__name__}")
    key = strip_prefix(name)
    modules = dict(model.named_modules())
    if key not in modules or key == "":
        raise _unknown(name, [n for n in modules if n], f"classifier layer in {who}(classifier=...)")
    module = modules[key]
    if isinstance(module, nn.Linear):
        return key, module
    inside = _linear_layers(module, key)
    if not inside:
        raise ValueError(
            f"{who}: classifier={name!r} is a {type(module).__name__} with no nn.Linear inside; this method needs "
            "the final nn.Linear (its input is the penultimate feature vector). Run adaptkit.list_layers(model) "
            "to see the layers and pass classifier='...'"
        )
    return inside[-1]


class ClassifierTap:
    """An owned forward pre-hook that keeps the classifier's input (the penultimate features) of each call.

    Captures are kept per device (DataParallel runs the hook once per replica thread) under a lock, cleared by
    :meth:`clear` and handed over (and forgotten) by :meth:`pop`.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import HookManager
        >>> from adaptkit.core.classifier import ClassifierTap
        >>> net, hooks = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), HookManager()
        >>> tap = ClassifierTap(net[2], hooks)
        >>> _ = net(torch.zeros(5, 3))
        >>> [tuple(z.shape) for z in tap.pop()[torch.device("cpu")]]
        [(5, 4)]
        >>> hooks.remove_all(); len(net[2]._forward_pre_hooks)
        0
    """

    def __init__(self, module: nn.Module, hooks: HookManager) -> None:
        self._lock = threading.Lock()
        self._store: dict[torch.device, list[torch.Tensor]] = {}
        hooks.forward_pre(module, self._hook)
        hooks.on_remove(self.clear)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        z = inputs[0] if inputs else None
        if isinstance(z, torch.Tensor):
            with self._lock:
                self._store.setdefault(z.device, []).append(z.detach())

    def pop(self) -> dict[torch.device, list[torch.Tensor]]:
        """Return and forget every capture since the last :meth:`clear`: ``{device: [inputs of each call]}``."""
        with self._lock:
            store, self._store = self._store, {}
        return store

    def clear(self) -> None:
        """Drop every capture."""
        with self._lock:
            self._store = {}


def replace_logits(output: Any, logits: torch.Tensor) -> Any:
    """``output`` with its logits (as :func:`~adaptkit.core.get_logits` finds them) replaced by ``logits``.

    A tensor becomes ``logits``; a dict (or ``ModelOutput``-style mapping) is shallow-copied with its ``"out"`` or
    ``"logits"`` entry replaced; a tuple / list / named tuple gets a new first item. The input is not modified.

    Example:
        >>> import torch
        >>> from adaptkit.core.classifier import replace_logits
        >>> out = replace_logits({"logits": torch.zeros(2, 3), "feats": torch.ones(2, 4)}, torch.ones(2, 3))
        >>> out["logits"].sum().item(), sorted(out)
        (6.0, ['feats', 'logits'])
    """
    if isinstance(output, torch.Tensor):
        return logits
    if isinstance(output, dict):
        for key in ("out", "logits"):
            if key in output:
                new = copy.copy(output)
                new[key] = logits
                return new
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(logits, *output[1:])
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([logits, *output[1:]])
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        new = copy.copy(output)
        new.logits = logits
        return new
    raise TypeError(f"cannot put logits back into a model output of type {type(output).__name__}")


class ClassifierMethod(TTAMethod):
    """Base of the output-space methods that read the final classifier's input features (LAME, T3A).

    Nothing in the model is adapted: every module runs in eval mode (BatchNorm with its source statistics) and
    no gradient is taken. :meth:`select` targets the classifier layer and the BatchNorm layers that hold running
    statistics, so their buffers and the classifier's ``weight`` / ``bias`` are part of the snapshot (bitwise
    :meth:`reset` and :meth:`restore`) and of :meth:`adaptation_state_dict`, which also carries the method's state.
    :meth:`forward_features` runs the model once and returns its output, logits ``(B, C)`` and the classifier's
    input ``z`` ``(B, d)``, after checking that the layer is the final classifier.

    Args:
        model: a classifier whose output logits ``(B, C)`` come from a final ``nn.Linear``.
        classifier: qualified name of the final classifier (``None``: found automatically, see
            :func:`find_classifier`).
        include: the layer-selection keyword every adaptkit method takes; here the same as ``classifier``
            (a name, or a list holding one name).
        episodic / check_inputs: as in :class:`~adaptkit.TTAMethod`.
    """

    uses_grad = False

    def __init__(
        self,
        model: nn.Module,
        *,
        classifier: str | None = None,
        include: str | Sequence[str] | None = None,
        episodic: bool | None = None,
        check_inputs: bool = True,
    ) -> None:
        if include is not None:
            names = [include] if isinstance(include, str) else list(include)
            if len(names) != 1 or not isinstance(names[0], str):
                raise ValueError(
                    f"{self._who()}: include= names the classifier layer (one name, the same as classifier=), got "
                    f"{include!r}; run adaptkit.list_layers(model) to see the layer names"
                )
            if classifier is not None and strip_prefix(classifier) != strip_prefix(names[0]):
                raise ValueError(f"{self._who()}: classifier={classifier!r} and include={include!r} disagree")
            classifier = names[0]
        self._classifier_arg = classifier
        self.classifier_name = ""
        self._tap: ClassifierTap | None = None
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ selection and snapshot
    @property
    def classifier(self) -> nn.Linear:
        """The final classifier layer (an ``nn.Linear`` of the wrapped model)."""
        return self._classifier

    def select(self) -> dict[str, nn.Module]:
        name, layer = find_classifier(self.inner, self._classifier_arg, self._who())
        self.classifier_name = name
        object.__setattr__(self, "_classifier", layer)  # not a registered child: a module of self.model
        targets: dict[str, nn.Module] = {name: layer}
        for n, m in self.inner.named_modules():
            if norm_kind(m) == "batch" and getattr(m, "running_mean", None) is not None:
                targets[n] = m  # eval-mode BatchNorm with source statistics: guarded by the snapshot
        return targets

    def _snapshot_names(self) -> list[str]:
        names = super()._snapshot_names()
        prefix = f"{self.classifier_name}." if self.classifier_name else ""
        names += [prefix + n for n, p in self._classifier.named_parameters(recurse=False) if p is not None]
        return list(dict.fromkeys(names))

    def configure(self) -> None:
        self._tap = ClassifierTap(self._classifier, self.hooks)

    # ------------------------------------------------------------------ the checked forward
    def _device_order(self) -> list[torch.device]:
        ids = getattr(self.model, "device_ids", None)
        if isinstance(self.model, nn.DataParallel) and ids:
            return [torch.device("cuda", i) if isinstance(i, int) else torch.device(i) for i in ids]
        return []

    def forward_features(self, x: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Run the model on ``x``; return ``(output, logits, z)``, ``z`` the classifier's input ``(B, d)``.

        Raises:
            ValueError: the output holds no ``(B, C)`` logits, the classifier did not run (or ran more than once
                per device), its input is not ``(B, d)``, or its ``out_features`` is not the output's class count.
        """
        assert self._tap is not None
        self._tap.clear()  # a capture left by a forward that raised
        out = self.model(x)
        caps = self._tap.pop()
        who, name = self._who(), self.classifier_name
        hint = "name the final classifier with classifier='...' (adaptkit.list_layers(model) lists the layers)"
        try:
            logits = get_logits(out)
        except TypeError as e:
            raise ValueError(f"{who}: {e}") from None
        if logits.dim() != 2:
            raise ValueError(
                f"{who}: the model returned logits of shape {tuple(logits.shape)}; this method works on class "
                "scores (B, C) from a final nn.Linear (dense or segmentation outputs are not supported)"
            )
        if not caps:
            raise ValueError(f"{who}: the classifier layer {name!r} did not run in the model's forward; {hint}")
        if any(len(v) > 1 for v in caps.values()):
            raise ValueError(
                f"{who}: the classifier layer {name!r} ran {max(len(v) for v in caps.values())} times in one "
                f"forward; it is not (only) the final classifier; {hint}"
            )
        order = self._device_order()
        devices = sorted(caps, key=lambda d: (order.index(d) if d in order else len(order), str(d)))
        zs = [caps[d][0] for d in devices]
        z = zs[0] if len(zs) == 1 else torch.cat([t.to(logits.device) for t in zs])
        out_features = self._classifier.out_features
        if z.dim() != 2 or z.shape[0] != logits.shape[0] or out_features != logits.shape[1]:
            raise ValueError(
                f"{who}: layer {name!r} (out_features={out_features}) got an input of shape {tuple(z.shape)}, "
                f"while the model returned logits of shape {tuple(logits.shape)}: it is not the final classifier "
                f"applied to (B, d) features; {hint}"
            )
        return out, logits, z.to(logits.device)

    def extra_repr(self) -> str:
        return f"classifier={self.classifier_name!r}, " + super().extra_repr()
