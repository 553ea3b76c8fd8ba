"""``AuxHead``: the base of every auxiliary (self-supervised) head, with its layer binding and save/load."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

from adaptkit._version import __version__
from adaptkit.core.serialization import check_plain, load_weights_only, save_atomic

_FORMAT = "adaptkit.aux_head/1"
H = TypeVar("H", bound="AuxHead")


def as_feature_map(feats: torch.Tensor) -> torch.Tensor:
    """View any layer output as a ``(B, C, H, W)`` map: CNN maps as they are, transformer tokens ``(B, N, C)`` as
    ``(B, C, N, 1)``, vectors ``(B, C)`` as ``(B, C, 1, 1)``.

    Example:
        >>> import torch
        >>> from adaptkit.heads.base import as_feature_map
        >>> as_feature_map(torch.zeros(2, 5, 64)).shape, as_feature_map(torch.zeros(2, 7)).shape
        (torch.Size([2, 64, 5, 1]), torch.Size([2, 7, 1, 1]))
    """
    if feats.dim() == 4:
        return feats
    if feats.dim() == 3:
        return feats.transpose(1, 2).unsqueeze(-1)
    if feats.dim() == 2:
        return feats[:, :, None, None]
    raise ValueError(
        f"cannot use layer features of shape {tuple(feats.shape)}: expected (B, C, H, W) maps, (B, N, C) tokens "
        "or (B, C) vectors; tap another layer (adaptkit.list_layers(model))"
    )


def feature_shape(feats: torch.Tensor) -> tuple[int, ...]:
    """Per-sample ``(C, H, W)`` of :func:`as_feature_map` of ``feats``."""
    return tuple(as_feature_map(feats).shape[1:])


class AuxHead(nn.Module):
    """An auxiliary head on the features of one or more layers of a model (test-time training).

    Subclasses store their constructor arguments with :meth:`_remember` (they become the saved config) and
    implement :meth:`train_loss`; :meth:`test_loss` defaults to it and :meth:`prepare` to the identity.

    A head is **bound** to the layers and feature shapes it was trained on (:attr:`binding`, set by the
    training helper or :meth:`bind`): wrapping a model whose tapped features differ raises a clear error
    instead of adapting on garbage.

    The save format (:meth:`save` / :meth:`load`) is a plain ``dict`` of tensors and a JSON string, loadable
    with ``torch.load(..., weights_only=True)``.
    """

    #: how many tapped layers the head takes (``None``: any number >= 1)
    num_layers: ClassVar[int | None] = 1

    def __init__(self) -> None:
        super().__init__()
        self._config: dict[str, Any] = {}
        self.binding: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []

    def _remember(self, **config: Any) -> None:
        json.dumps(config)  # must be JSON-serialisable to be saved
        self._config = dict(config)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (``type(head)(**head.config)`` rebuilds an untrained head)."""
        return dict(self._config)

    # ------------------------------------------------------------------ the training/test interface
    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        """Turn a batch into the encoder input of the auxiliary task and its targets (default: ``(x, None)``)."""
        return x, None

    def train_loss(
        self, feats: Sequence[torch.Tensor], targets: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Auxiliary loss when training the head on features of the bound layers."""
        raise NotImplementedError

    def test_loss(
        self, feats: Sequence[torch.Tensor], targets: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Auxiliary loss minimised at test time (default: :meth:`train_loss`)."""
        return self.train_loss(feats, targets, generator)

    def fit_end(self, feats_iter: Any) -> None:
        """Hook called after training with an iterator over source features (e.g. to store statistics)."""

    # ------------------------------------------------------------------ binding
    def bind(
        self,
        layers: Sequence[str],
        feature_shapes: Sequence[Sequence[int]],
        model: nn.Module | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        """Record the layers and per-sample feature shapes ``(C, H, W)`` (see :func:`feature_shape`)."""
        self.binding = {
            "layers": list(layers),
            "feature_shapes": [list(map(int, s)) for s in feature_shapes],
            "input_shape": None if input_shape is None else list(map(int, input_shape)),
            "model": None if model is None else type(model).__name__,
        }

    def check_layers(self, layers: Sequence[str], model: nn.Module, who: str) -> None:
        """Raise if the head was trained for other layers (or another model class) than ``layers``."""
        if self.binding is None:
            return
        bound = self.binding["layers"]
        if list(layers) != list(bound):
            hint = bound[0] if len(bound) == 1 else list(bound)  # a multi-layer head needs the whole list
            raise ValueError(
                f"{who}: this {type(self).__name__} was trained on layer(s) {bound} of a "
                f"{self.binding.get('model') or 'model'}, not {list(layers)}; pass layer={hint!r} or train a "
                f"head for this layer with {who}.train_head(model, layer=...)"
            )
        cls = self.binding.get("model")
        if cls is not None and cls != type(model).__name__:
            raise ValueError(
                f"{who}: this {type(self).__name__} was trained on a {cls}, not a {type(model).__name__}; train a "
                f"head for this model with {who}.train_head(model, layer=...)"
            )

    def check_features(self, feats: Sequence[torch.Tensor], who: str) -> None:
        """Raise if the tapped features do not have the shapes the head expects."""
        if self.binding is None:
            return
        for name, f, shape in zip(self.binding["layers"], feats, self.binding["feature_shapes"]):
            got = list(feature_shape(f))
            if got[:1] != shape[:1] or (self._needs_spatial() and got != shape):
                raise ValueError(
                    f"{who}: layer {name!r} gives features of shape {tuple(got)} per sample but the head was trained "
                    f"on {tuple(shape)}; use the input size and layer the head was trained with, or train a new head"
                )

    def _needs_spatial(self) -> bool:
        """Whether the head needs the exact spatial size it was trained on (flattening heads do)."""
        return False

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write weights, config, layer binding and training history to ``path`` (``torch.save`` format).

        The file holds tensors and a JSON string only (the head's class by name, never pickled), so
        ``torch.load(path, weights_only=True)`` reads it; it is written through a temporary file, so an
        interrupted save never leaves a truncated file at ``path``.

        Raises:
            TypeError: the config, binding or history is not JSON, or the state dict holds a non-tensor value.
        """
        who = f"{type(self).__name__}.save"
        meta = {
            "class": type(self).__name__,
            "module": type(self).__module__,
            "config": self._config,
            "binding": self.binding,
            "history": self.history,
            "version": __version__,
        }
        try:
            text = json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{who}: the config, binding and history must be JSON values (numbers, strings, lists, dicts): {e}"
            ) from e
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in self.state_dict().items()}
        blob = {"format": _FORMAT, "meta": text, "state_dict": state}
        check_plain(blob, who, "a head file")
        save_atomic(blob, path)

    @classmethod
    def load(cls: type[H], path: str | os.PathLike[str], map_location: Any = "cpu") -> H:
        """Load a head written by :meth:`save` (with ``weights_only=True``: no code is unpickled).

        The head's class is looked up by the name the file records: ``AuxHead.load`` finds any imported head
        class, ``NCTTTHead.load`` accepts NC-TTT heads only.

        Raises:
            ValueError: the file is truncated or damaged, is not an adaptkit head, holds another head class, or
                its weights do not fit the head its config builds.
            FileNotFoundError: there is no file at ``path``.
        """
        name = os.fspath(path)
        who = f"{cls.__name__}.load"
        hint = "pass a file written by head.save(path) (train a head with <Method>.train_head(model, layer=...))"
        blob = load_weights_only(name, who, "an adaptkit head file", hint, map_location)
        fmt = blob.get("format") if isinstance(blob, dict) else None
        if isinstance(fmt, str) and fmt.startswith(_FORMAT.split("/")[0] + "/") and fmt != _FORMAT:
            raise ValueError(
                f"{who}: {name!r} is a head file of format {fmt!r}, this adaptkit ({__version__}) reads {_FORMAT!r}; "
                "load it with the adaptkit version that wrote it, or save the head again"
            )
        if isinstance(fmt, str) and fmt.startswith("adaptkit-train-checkpoint"):
            raise ValueError(
                f"{who}: {name!r} is a train_head checkpoint (the state of a training run), not a head file; "
                "finish the run with train_head(..., checkpoint=path) and save the head it returns with head.save"
            )
        if fmt != _FORMAT:
            what = f"a {type(blob).__name__}" if not isinstance(blob, dict) else f"a dict with keys {sorted(blob)[:5]}"
            raise ValueError(f"{who}: {name!r} is not an adaptkit head file ({_FORMAT}) but {what}; {hint}")
        meta = _head_meta(blob, name, who)
        if cls is not AuxHead and meta["class"] != cls.__name__:
            raise ValueError(
                f"{who}: {name!r} holds a {meta['class']}; load it with adaptkit.heads.{meta['class']}.load"
            )
        target: type[AuxHead] = cls if cls is not AuxHead else _head_class(meta["class"], meta.get("module"))
        try:
            head = target(**meta["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{who}: {name!r} holds a {meta['class']} config that {target.__name__} does not accept ({e}); was "
                "it written by another adaptkit version? Save the head again with this version"
            ) from e
        try:
            head.load_state_dict(blob["state_dict"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            detail = " ".join(str(e).split())
            raise ValueError(
                f"{who}: the weights in {name!r} do not fit the {meta['class']} its config builds ({detail[:300]}); "
                "the file is damaged or was edited: save or train the head again"
            ) from e
        head.binding = meta["binding"]
        head.history = meta.get("history") or []
        return head  # type: ignore[return-value]

    def extra_repr(self) -> str:
        layers = None if self.binding is None else self.binding["layers"]
        return f"layers={layers}"


def _head_meta(blob: dict[str, Any], name: str, who: str) -> dict[str, Any]:
    """The checked JSON metadata of a head file."""
    damaged = f"{who}: {name!r} is a damaged adaptkit head file"
    try:
        meta = json.loads(blob.get("meta"))  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{damaged} (its metadata is not JSON: {e}); save the head again") from e
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("class"), str)
        and isinstance(meta.get("config"), dict)
        and (meta.get("binding") is None or isinstance(meta.get("binding"), dict))
        and isinstance(meta.get("history", []), list)
        and isinstance(blob.get("state_dict"), dict)
    )
    if not ok:
        raise ValueError(f"{damaged} (class, config, binding or weights missing); save the head again")
    return meta


def _head_class(name: str, module: str | None = None) -> type[AuxHead]:
    """The imported :class:`AuxHead` subclass called ``name`` (the one from ``module`` first): heads are recorded
    by name in a file, never pickled."""

    def walk(c: type[AuxHead]) -> list[type[AuxHead]]:
        return [c] + [s for sub in c.__subclasses__() for s in walk(sub)]

    found = [c for c in walk(AuxHead) if c.__name__ == name]
    for c in found:
        if c.__module__ == module:
            return c
    if found:
        return found[0]
    raise ValueError(f"AuxHead.load: unknown head class {name!r} (import the module that defines it first)")


class batch_stats_mode:
    """Context manager: the norm layers of ``module`` normalise with batch statistics and write nothing
    (``training=True``, ``track_running_stats=False``); flags are put back on exit.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.heads.base import batch_stats_mode
        >>> bn = nn.BatchNorm1d(1).eval()
        >>> with batch_stats_mode(bn):
        ...     y = bn(torch.tensor([[1.0], [3.0]]))
        >>> [round(v, 3) for v in y.flatten().tolist()], bn.training, bn.running_mean.tolist()
        ([-1.0, 1.0], False, [0.0])
    """

    def __init__(self, module: nn.Module) -> None:
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[tuple[bool, bool]] = []

    def __enter__(self) -> batch_stats_mode:
        self.saved = [(m.training, m.track_running_stats) for m in self.bns]
        for m in self.bns:
            m.training, m.track_running_stats = True, False
        return self

    def __exit__(self, *exc: object) -> None:
        for m, (tr, track) in zip(self.bns, self.saved):
            m.training, m.track_running_stats = tr, track
