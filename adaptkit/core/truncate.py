"""Run a model only up to a chosen layer (no compute above it), on any architecture, through hooks.

A forward hook on the deepest tapped module raises a private exception carrying that module's output; the
caller catches it, so the rest of the model's ``forward`` never runs. Nothing depends on how the model is
written (no architecture tables, no ``nn.Sequential`` slicing), which is what lets the test-time-training
methods truncate a torchvision, timm or home-made CNN alike. The same machinery finds which modules run
*before* a layer (the "encoder up to and including the tapped layer" those methods adapt).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.hooks import HookManager


class _StopForward(Exception):
    """Raised by the stop hook; carries the tapped outputs up to :meth:`ForwardStopper.run`."""

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        super().__init__("adaptkit truncated forward")
        self.outputs = outputs


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def channels_last_output(module: nn.Module, output: torch.Tensor) -> bool:
    """Whether a 4-D layer output is laid out ``(B, H, W, C)`` (Swin-style transformer stages in torchvision and
    timm) rather than ``(B, C, H, W)``: the module holds a ``LayerNorm`` over exactly the last dimension, which
    is then the channel axis. A shape that cannot tell (``H == C``) counts as channels-first. ``LayerNorm2d``
    variants (timm, ConvNeXt) normalise channels-first maps and do not count.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core.truncate import channels_last_output
        >>> stage = nn.Sequential(nn.Linear(96, 96), nn.LayerNorm(96))
        >>> nhwc, nchw = torch.zeros(2, 14, 14, 96), torch.zeros(2, 96, 7, 7)
        >>> channels_last_output(stage, nhwc), channels_last_output(stage, nchw)
        (True, False)
    """
    if output.dim() != 4 or output.shape[-1] == output.shape[1]:
        return False
    last = int(output.shape[-1])
    return any(
        isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (last,) and "2d" not in type(m).__name__.lower()
        for m in module.modules()
    )


class ForwardStopper:
    """Captures the outputs of ``layers`` and, when armed, stops the forward right after the last of them.

    "Last" is decided at run time: the forward stops as soon as every requested layer has produced an
    output, so the layer order in the model's ``forward`` does not have to match the order given. When not
    armed (:meth:`capture`) the hooks only capture during a full forward. Outside :meth:`run` / :meth:`capture`
    the hooks do nothing, so ordinary forwards of the model hold no features.

    Captures belong to the thread that called :meth:`run` / :meth:`capture`: a tapped layer that runs in another
    thread during the call (the replicas of a ``DataParallel`` on several GPUs, or any model that runs its
    submodules in worker threads) cannot be matched to the batch, and the call raises a ``RuntimeError`` that
    says so instead of returning partial features. (The aux-head methods adapt a ``nn.DataParallel`` through its
    module, on the calling thread.)

    Outputs come back channels-first: a channels-last ``(B, H, W, C)`` stage output (see
    :func:`channels_last_output`) is returned as a ``(B, C, H, W)`` view, so heads see channels on axis 1 on
    every architecture. The model's own forward is not affected.

    Args:
        modules: ``{qualified_name: module}`` to capture, in any order.
        hooks: the owning :class:`~adaptkit.core.HookManager`.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import HookManager
        >>> from adaptkit.core.truncate import ForwardStopper
        >>> calls = []
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = net[2].register_forward_pre_hook(lambda m, i: calls.append("head"))
        >>> stop = ForwardStopper({"0": net[0]}, HookManager())
        >>> stop.run(net, torch.zeros(5, 3))["0"].shape, calls
        (torch.Size([5, 4]), [])
    """

    def __init__(self, modules: dict[str, nn.Module], hooks: HookManager) -> None:
        if not modules:
            raise ValueError("ForwardStopper needs at least one module to stop at")
        self.names = list(modules)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions = 0  # run / capture calls in progress, over all threads
        self._foreign = 0  # tapped-layer calls from threads without a session, while some session was open
        #: per tapped layer, whether its output is channels-last (decided on its first output)
        self.channels_last: dict[str, bool] = {}
        for name, module in modules.items():
            hooks.forward(module, self._make_hook(name, module))

    def _state(self) -> dict[str, Any]:
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = {"armed": False, "outputs": {}, "open": False}
        return st

    def _open(self) -> dict[str, Any]:
        st = self._state()
        if st["open"]:
            raise RuntimeError("adaptkit: ForwardStopper.run / capture called re-entrantly from the tapped forward")
        with self._lock:
            if self._sessions == 0:
                self._foreign = 0
            self._sessions += 1
        st["open"], st["outputs"] = True, {}
        return st

    def _close(self, st: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
        got, st["outputs"], st["armed"], st["open"] = st["outputs"], {}, False, False
        with self._lock:
            self._sessions -= 1
            foreign = self._foreign
        return got, foreign

    def _missing(self, got: dict[str, torch.Tensor], foreign: int) -> RuntimeError:
        missing = [n for n in self.names if n not in got]
        if foreign:
            return RuntimeError(
                f"adaptkit: layer(s) {missing} ran in another thread than the caller (replicas of a multi-GPU "
                "DataParallel, or a model that runs submodules in worker threads), so their features cannot be "
                "matched to the batch; adapt the plain module (or wrap the nn.DataParallel itself, which adaptkit "
                "adapts through its module)"
            )
        return RuntimeError(
            f"adaptkit: the model's forward never ran layer(s) {missing}; choose a layer the forward uses "
            "(adaptkit.list_layers(model) lists them)"
        )

    def _make_hook(self, name: str, tapped: nn.Module) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            st = self._state()
            if not st["open"]:  # an ordinary forward, or a worker thread of someone else's call
                if self._sessions:
                    with self._lock:
                        self._foreign += 1
                return
            out = _first_tensor(output)
            if out is None:
                raise TypeError(
                    f"adaptkit: layer {name!r} returned {type(output).__name__}, not a tensor; tap a module whose "
                    "output is a feature map (see adaptkit.list_layers(model))"
                )
            last = self.channels_last.get(name)
            if last is None:
                last = self.channels_last[name] = channels_last_output(tapped, out)
            if last:
                out = out.permute(0, 3, 1, 2)
            if name not in st["outputs"]:  # a module called twice: keep its first output
                st["outputs"][name] = out
            if st["armed"] and len(st["outputs"]) == len(self.names):
                raise _StopForward(dict(st["outputs"]))

        return hook

    def run(self, model: nn.Module, x: Any) -> dict[str, torch.Tensor]:
        """Forward ``x`` through ``model`` until every tapped layer has run; return ``{name: output}``.

        Raises:
            RuntimeError: the forward finished without running some tapped layer (it is not used by
                ``model.forward`` for this input).
        """
        st = self._open()
        st["armed"] = True
        try:
            model(x)
        except _StopForward as stop:
            return stop.outputs
        finally:
            got, foreign = self._close(st)
        raise self._missing(got, foreign)

    def capture(self, model: nn.Module, x: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """A full forward that also returns the tapped outputs: ``(model_output, {name: output})``."""
        st = self._open()
        try:
            out = model(x)
        finally:
            got, foreign = self._close(st)
        if foreign and len(got) < len(self.names):
            raise self._missing(got, foreign)
        return out, got


def probe_upstream(model: nn.Module, layers: Sequence[str], example: Any) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Which modules run before the forward reaches all of ``layers`` (included), and the layers' outputs,
    found by a truncated probe forward on ``example`` under ``no_grad``. Run it with the model in eval mode so
    no BN buffer is written; nothing else is changed and every probe hook is removed.

    Returns:
        ``(names, outputs)``: qualified names in execution order (containers listed when entered) and
        ``{layer: output}``.

    Example:
        >>> import torch, torchvision
        >>> from adaptkit.core.truncate import probe_upstream
        >>> m = torchvision.models.resnet18().eval()
        >>> names, out = probe_upstream(m, ["layer1"], torch.zeros(1, 3, 32, 32))
        >>> names[:4], "layer2" in names, "fc" in names, tuple(out["layer1"].shape)
        (['conv1', 'bn1', 'relu', 'maxpool'], False, False, (1, 64, 8, 8))
    """
    hooks = HookManager()
    seen: list[str] = []
    named = dict(model.named_modules())
    try:
        for name, module in named.items():
            if name:
                hooks.forward_pre(module, lambda m, i, _n=name: seen.append(_n))
        stopper = ForwardStopper({n: named[n] for n in layers}, hooks)
        with torch.no_grad():
            outputs = stopper.run(model, example)
    finally:
        hooks.remove_all()
    return list(dict.fromkeys(seen)), outputs


def modules_registered_before(model: nn.Module, layer: str) -> list[str]:
    """Fallback of :func:`probe_upstream` without an example input: modules registered before ``layer``
    ends (``layer`` and its descendants included, its ancestors excluded), in ``named_modules`` order. Equal to
    the execution order for torchvision and timm models and for models that register layers in forward order.

    Example:
        >>> import torchvision
        >>> from adaptkit.core.truncate import modules_registered_before
        >>> names = modules_registered_before(torchvision.models.resnet18(), "layer1")
        >>> names[:4], names[-1], "layer2" in names
        (['conv1', 'bn1', 'relu', 'maxpool'], 'layer1.1.bn2', False)
    """
    out: list[str] = []
    inside = False
    for name, _ in model.named_modules():
        if not name:
            continue
        if layer.startswith(name + "."):
            continue  # an ancestor of the layer (holds later modules too)
        if name == layer or name.startswith(layer + "."):
            inside = True
            out.append(name)
            continue
        if inside:
            break
        out.append(name)
    return out
