"""``TTAMethod``: the base class every adaptation method subclasses (fixed ``forward`` template)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from adaptkit._version import __version__
from adaptkit.core.alerts import AdaptationWarning
from adaptkit.core.check import InputGuard
from adaptkit.core.hooks import HookManager
from adaptkit.core.snapshot import Snapshot
from adaptkit.core.unwrap import is_compiled, unwrap_model

_TAG = "_adaptkit_wrapped_by"
_RESERVED = "_adaptkit."


def get_logits(output: Any) -> torch.Tensor:
    """The logits inside a model output: a tensor, a dict's ``"out"`` (torchvision segmentation), the first
    tensor of a tuple/list, or an object with ``.logits`` (HF-style).

    Example:
        >>> import torch
        >>> from adaptkit.core import get_logits
        >>> get_logits({"out": torch.zeros(1, 3), "aux": torch.ones(1, 3)}).sum().item()
        0.0
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if "out" in output:
            return output["out"]
        if "logits" in output:
            return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; return a tensor, a dict with "
        "'out', or a tuple whose first item is the logits"
    )


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` without rebuilding it (``BaseException.add_note`` on Python 3.11+; on older
    versions the note is stored in ``__notes__``, where 3.11+ tracebacks and ``exceptiongroup`` show it). The
    exception keeps its type, arguments and identity, so callers still catch exactly what their code raised.

    Example:
        >>> from adaptkit.core.base import add_note
        >>> e = KeyError("k")
        >>> add_note(e, "while adapting"); e.__notes__, type(e).__name__
        (['while adapting'], 'KeyError')
    """
    if hasattr(exc, "add_note"):
        with contextlib.suppress(TypeError):  # __notes__ made a non-list by the exception's class: leave it
            exc.add_note(note)
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # an exception class with __slots__: leave it as it is
            return
    notes.append(note)


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, dict):
        return type(output)((k, _detach(v)) for k, v in output.items())
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_detach(v) for v in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(v) for v in output)
    return output


class TTAMethod(nn.Module):
    """Base class of every adaptkit method: wraps a model, adapts it in ``forward``, undoes everything on exit.

    Subclasses declare ``name``, ``uses_grad`` and ``default_episodic`` and implement:

    * :meth:`select` - the targeted modules (may raise; the model is still untouched);
    * :meth:`trainable_parameters` - what the optimizer updates (default: none);
    * :meth:`train_modules` - names of modules that run in training mode (default: none);
    * :meth:`configure` - hooks (via ``self.hooks``), optimizer, norm hyper-parameters;
    * :meth:`adapt_step` and :meth:`predict`; optionally :meth:`reset_state`, :meth:`method_state`,
      :meth:`load_method_state`.

    ``forward`` is a fixed template and is never overridden.

    Args:
        model: any ``nn.Module`` (DataParallel / DDP / ``torch.compile`` results are unwrapped for selection
            and still called as given).
        episodic: reset before every batch; ``None`` takes the method's default.
        check_inputs: validate each batch before adapting: non-empty, finite, floating point, on the model's device,
            and of the rank and channel count of the model's convolutional stem (see
            :class:`~adaptkit.core.check.InputGuard`). Every check raises before the model runs on the batch.
    """

    name: ClassVar[str] = ""
    uses_grad: ClassVar[bool] = False
    default_episodic: ClassVar[bool] = False
    #: the method feeds the model transformed copies of the batch (rotations, flips, augmentations): rank and
    #: channels are then checked against the model's stem up front, before any transform runs
    transforms_input: ClassVar[bool] = False
    #: the keyword argument of ``__init__`` that takes unlabeled in-distribution (source) batches, when the method
    #: can use them (EATA's Fisher regulariser); ``adaptkit bench`` passes source training images there
    source_data_arg: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, *, episodic: bool | None = None, check_inputs: bool = True) -> None:
        super().__init__()
        if isinstance(model, TTAMethod):
            raise TypeError(
                f"{self._who()}: the model is already an adaptkit wrapper ({type(model).__name__}); wrap the "
                "original model instead (wrapper.restore() returns it)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self._who()}: expected an nn.Module, got {type(model).__name__}")
        inner = unwrap_model(model)
        if getattr(inner, _TAG, None) is not None:
            raise RuntimeError(
                f"{self._who()}: this model is already wrapped by adaptkit.{getattr(inner, _TAG)}; call .restore() "
                "on that wrapper (or leave its `with` block) before wrapping it again"
            )
        if is_compiled(model):
            warnings.warn(
                f"{self._who()}: got a torch.compile'd model; hooks added after compiling cause recompiles. "
                "Wrap the eager model, then compile it in place: wrapper.model.compile().",
                AdaptationWarning,
                stacklevel=2,
            )
        self.model = model
        object.__setattr__(self, "inner", inner)  # not a registered child: same module as self.model
        self.episodic = self.default_episodic if episodic is None else bool(episodic)
        self.check_inputs = check_inputs
        self.steps = int(getattr(self, "steps", 1))
        self.hooks = HookManager()
        self._guard_hooks = HookManager()  # the input guard's stem check (kept apart from the method's hooks)
        self.optimizer: torch.optim.Optimizer | None = None
        self._restored = False
        self._warned: set[str] = set()
        targets = self.select()  # validation: raises with the model untouched
        self._targets: dict[str, nn.Module] = dict(targets)
        self.targeted_modules: list[str] = list(self._targets)
        self._configure()

    # ------------------------------------------------------------------ subclass surface
    def select(self) -> dict[str, nn.Module]:
        """Return ``{qualified_name: module}`` of the modules this method adapts (may raise)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (none for statistics-only methods)."""
        return []

    def train_modules(self) -> list[str]:
        """Names of the modules that run in training mode while wrapped (all others run in eval mode)."""
        return []

    def configure(self) -> None:
        """Method-specific set-up: hooks (``self.hooks``), optimizer, norm hyper-parameters."""

    def adapt_step(self, x: Any) -> Any:
        """One adaptation step on ``x``; returns the model output it computed (or ``None``)."""
        raise NotImplementedError

    def predict(self, x: Any, last: Any) -> Any:
        """Predictions for ``x`` after the adaptation steps; ``last`` is the final step's output."""
        return last if last is not None else self.model(x)

    def reset_state(self) -> None:
        """Clear method state (accumulators, memories) on :meth:`reset`."""

    def method_state(self) -> dict[str, Any]:
        """Method state for :meth:`adaptation_state_dict` (tensors or plain values)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`method_state`."""

    # ------------------------------------------------------------------ configuration
    def _who(self) -> str:
        return f"adaptkit.{type(self).__name__}"

    def _named_trainable(self) -> dict[str, nn.Parameter]:
        ids = {id(p) for p in self.trainable_parameters()}
        return {n: p for n, p in self.inner.named_parameters() if id(p) in ids}

    def _snapshot_names(self) -> list[str]:
        names = list(self._named_trainable())
        for mname, m in self._targets.items():
            for bname, b in m.named_buffers(recurse=False):
                if b is not None:
                    names.append(f"{mname}.{bname}")
        return list(dict.fromkeys(names))

    def _configure(self) -> None:
        inner = self.inner
        self._snapshot = Snapshot(inner, self._snapshot_names(), self.targeted_modules)
        # the user's .grad tensors are put aside (never written) and handed back by restore(): a backward while
        # wrapped would otherwise accumulate into them, and the first update would use old + new gradients
        self._grads = {n: p.grad for n, p in self._named_trainable().items()}
        try:
            for p in self._named_trainable().values():
                p.grad = None
            trainable = {id(p) for p in self.trainable_parameters()}
            for p in inner.parameters():
                p.requires_grad_(id(p) in trainable)
            training = set(self.train_modules())
            self._modes = [(m, n in training) for n, m in inner.named_modules()]
            self._assert_modes()
            self.configure()
            self._volatile = self._volatile_names()
            self._guard = InputGuard(inner, self._who(), data_parallel=isinstance(self.model, nn.DataParallel))
            if self.check_inputs:
                self._guard.watch(self._guard_hooks)
            setattr(inner, _TAG, self.name or type(self).__name__)
        except BaseException:
            self.hooks.remove_all()
            self._guard_hooks.remove_all()
            self._snapshot.restore()
            self._give_back_grads()
            if hasattr(inner, _TAG):
                delattr(inner, _TAG)
            raise

    def _assert_modes(self) -> None:
        for m, flag in self._modes:
            if m.training != flag:
                m.training = flag

    def train(self, mode: bool = True) -> TTAMethod:
        """Set the wrapper's own flag; the model keeps its configured modes (only selected norm layers train)."""
        self.training = mode
        if not self._restored and hasattr(self, "_modes"):
            self._assert_modes()
        return self

    # ------------------------------------------------------------------ forward template
    def forward(self, x: Any) -> Any:
        """Adapt on ``x`` as the method defines and return predictions (same type as the model's output)."""
        self._check_alive()
        if self.check_inputs:
            self._guard.check(x)  # dtype and device, then non-empty and finite (rank and channels: at the stem)
            if self.transforms_input and isinstance(x, torch.Tensor):
                self._guard.check_shape(x)
        if self.uses_grad and torch.is_inference_mode_enabled():
            if not isinstance(x, torch.Tensor):
                raise RuntimeError(
                    f"{self._who()} needs gradients, which torch.inference_mode() forbids; call it under "
                    "torch.no_grad() instead"
                )
            with torch.inference_mode(False):
                x = x.clone()
                return self._guarded_run(x)
        return self._guarded_run(x)

    def _guarded_run(self, x: Any) -> Any:
        # the batch may carry the user's autograd history (an upstream module, x.requires_grad): adaptation must
        # neither write .grad upstream nor free the user's graph by backpropagating through it
        x = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t, x)
        self._guard.active = self.check_inputs
        try:
            return self._run(x)
        finally:
            self._guard.deactivate()

    def _run(self, x: Any) -> Any:
        if self.episodic:
            self.reset()
        self._assert_modes()
        saved = self._save_volatile()
        last, done = None, 0
        try:
            with torch.enable_grad() if self.uses_grad else torch.no_grad():
                for _ in range(self.steps):
                    last = self.adapt_step(x)
                    done += 1
            with torch.no_grad():
                out = self.predict(x, last)
        except Exception as e:
            if saved is not None and done == 0:  # failed in the first step: undo what its forward wrote
                self._restore_volatile(saved)
            add_note(e, self._explain(e, x))
            raise  # the very exception the model raised: same type, same object, same traceback
        finally:
            self._zero_grad()
        return _detach(out)

    def _volatile_names(self) -> list[str]:
        """Buffers a forward itself writes: those of targeted modules that run in training mode (norm layers only
        when they track running statistics: Tent's batch-statistic BatchNorm writes nothing). Called once, after
        :meth:`configure` set the norm hyper-parameters."""
        modules = dict(self.inner.named_modules())
        training = {
            n
            for n in self.train_modules()
            if n in modules and getattr(modules[n], "track_running_stats", True) is not False
        }
        params = set(self._named_trainable())
        return [n for n in self._snapshot.tensors if n.rpartition(".")[0] in training and n not in params]

    def _save_volatile(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self._volatile:
            return None
        live = Snapshot._live(self.inner)
        return [(live[n], live[n].detach().clone()) for n in self._volatile]

    @staticmethod
    def _restore_volatile(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)

    def _explain(self, e: BaseException, x: Any) -> str:
        """A note for an exception raised while adapting (attached to it, never replacing it)."""
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        msg = f"{self._who()}: raised while adapting on an input of shape {shape}"
        if "more than 1 value per channel" in str(e):
            msg += " (batch statistics need more than one value per channel: use a larger batch"
            msg += ", or BNAdapt with N > 0 for batch size 1)"
        elif isinstance(x, torch.Tensor) and x.dim() == 3:
            msg += " (a single image? add the batch dimension with x.unsqueeze(0))"
        return msg

    def _give_back_grads(self) -> None:
        for n, p in self._named_trainable().items():
            p.grad = self._grads.get(n)

    def _zero_grad(self) -> None:
        for p in self.trainable_parameters():
            p.grad = None

    def _check_alive(self) -> None:
        if self._restored:
            raise RuntimeError(f"{self._who()} was restored; wrap the model again to keep adapting")

    def warn_once(self, key: str, msg: str) -> None:
        """Emit ``msg`` as an :class:`AdaptationWarning` once per wrapper."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{self._who()}: {msg}", AdaptationWarning, stacklevel=3)

    # ------------------------------------------------------------------ reset / restore
    def reset(self) -> None:
        """Back to the wrap-time state, in place and bitwise; optimizer and method state cleared."""
        self._check_alive()
        self._snapshot.restore_tensors()
        self._zero_grad()
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.reset_state()

    def restore(self) -> nn.Module:
        """Undo everything (hooks, values, flags, ``requires_grad``, norm hyper-parameters); return the model.

        Idempotent; later forwards raise.
        """
        if self._restored:
            return self.model
        self._restored = True
        try:
            self.hooks.remove_all()
            self._guard_hooks.remove_all()
        finally:
            self._snapshot.restore()
            self._give_back_grads()
            if self.optimizer is not None:
                self.optimizer.state.clear()
            self.optimizer = None
            self.reset_state()
            if hasattr(self.inner, _TAG):
                delattr(self.inner, _TAG)
        return self.model

    def __enter__(self) -> TTAMethod:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.restore()
        return False

    # ------------------------------------------------------------------ state
    def adaptation_state_dict(self) -> dict[str, Any]:
        """Adapted parameters, norm buffers (incl. ``num_batches_tracked``), optimizer and method state.

        Keys are relative to the unwrapped model; adaptkit's own entries live under ``_adaptkit.``.
        """
        live = Snapshot._live(self.inner)
        sd: dict[str, Any] = {n: live[n].detach().clone() for n in self._snapshot.tensors}
        sd[_RESERVED + "method"] = self.name
        sd[_RESERVED + "version"] = __version__
        if self.optimizer is not None:
            # a copy: torch's state_dict() holds the live moment tensors, which later steps update in place
            sd[_RESERVED + "optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        for k, v in self.method_state().items():
            sd[_RESERVED + "state." + k] = v
        return sd

    def load_adaptation_state_dict(self, state: dict[str, Any]) -> None:
        """Load the output of :meth:`adaptation_state_dict` (strict: same method, same keys)."""
        self._check_alive()
        got = state.get(_RESERVED + "method")
        if got != self.name:
            raise ValueError(f"{self._who()}: this adaptation state was saved by method {got!r}, not {self.name!r}")
        expected = set(self._snapshot.tensors)
        tensors = {k: v for k, v in state.items() if not k.startswith(_RESERVED)}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise KeyError(f"{self._who()}: adaptation state mismatch; missing {missing[:5]}, unexpected {extra[:5]}")
        live = Snapshot._live(self.inner)
        for k, v in tensors.items():  # every entry checked before anything is written
            if not isinstance(v, torch.Tensor) or v.shape != live[k].shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"{self._who()}: adaptation state entry {k!r} has shape {got}, the model's has "
                    f"{tuple(live[k].shape)}; this state was saved for another model"
                )
        with torch.no_grad():
            for k, v in tensors.items():
                live[k].copy_(v)
        if self.optimizer is not None and _RESERVED + "optimizer" in state:
            # a copy: torch keeps the given tensors as optimizer state (same dtype and device), so later in-place
            # steps would otherwise rewrite the caller's state dict (and a second load of it would differ)
            self.optimizer.load_state_dict(copy.deepcopy(state[_RESERVED + "optimizer"]))
        prefix = _RESERVED + "state."
        self.load_method_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def named_adapted_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs the optimizer updates, names relative to the unwrapped model."""
        yield from self._named_trainable().items()

    def extra_repr(self) -> str:
        return f"episodic={self.episodic}, targeted_modules={len(self.targeted_modules)}"
