"""Input checks with actionable messages."""

from __future__ import annotations

from typing import Any

import torch


def check(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(msg)`` unless ``cond``.

    Example:
        >>> from adaptkit.core.check import check
        >>> check(1 + 1 == 2, "arithmetic is broken")
    """
    if not cond:
        raise exc(msg)


def check_batch(x: Any, who: str, finite: bool = True) -> None:
    """Validate a test batch: a non-empty floating tensor with a batch dimension and finite values.

    Args:
        x: the input given to a wrapper's ``forward``.
        who: the wrapper's name, for the message.
        finite: also reject NaN / Inf (one sum over ``x``; the element-wise test only if that sum is not finite).
    """
    if not isinstance(x, torch.Tensor):
        return  # custom inputs (dicts, tuples) are the model's business
    check(x.dim() >= 1, f"{who}: expected a batch with a leading batch dimension, got a 0-d tensor")
    check(
        x.shape[0] > 0 and x.numel() > 0,
        f"{who}: got an empty batch (shape {tuple(x.shape)}, no values); skip empty batches before calling the "
        "wrapper",
    )
    # A finite sum implies finite elements (NaN / Inf propagate through any summation order); only a
    # non-finite sum (bad values, or a float overflow of the sum) needs the element-wise test, which is
    # ~40x slower on CPU.
    if finite and x.is_floating_point() and not bool(torch.isfinite(x.detach().sum())):
        check(
            bool(torch.isfinite(x).all()),
            f"{who}: the input batch contains NaN or Inf values; clean or drop those samples first "
            "(e.g. torch.nan_to_num) - adapting on them would corrupt the model",
        )


_INT_HINT = (
    "convert it to a floating tensor in the range the model was trained on first, e.g. x.float() / 255 followed "
    "by the model's normalisation (torchvision.transforms.v2.ToDtype(torch.float32, scale=True))"
)


class InputGuard:
    """Checks a test batch against what the model can take, with messages that say what to do. Built once per
    wrapper from the unwrapped model:

    * **dtype** (up front): integer / bool images are refused (``TypeError``), unless the model holds an embedding
      layer (token inputs); a model that converts integer images itself is used with ``check_inputs=False``;
    * **device** (up front): a model whose parameters and buffers all live on one device refuses a batch on
      another (``ValueError``); skipped for ``nn.DataParallel``, which scatters its input itself;
    * **rank and channels** (at the stem): when the model's first parameterised module (in registration order) is
      a convolution, a pre-hook on the model records the tensor each forward is called with and a pre-hook on
      that convolution checks it - only when the convolution receives that very tensor (it is then the model's
      stem) - against the convolution's rank (``N + 2`` for ``ConvNd``) and ``in_channels`` (``ValueError``). A
      model that transforms its input first (e.g. expands grey images to RGB, flattens clips) is never second-
      guessed, and no extra forward is run. For the usual stem-first model the error is raised before any layer
      has run on the batch.

    Args:
        model: the unwrapped model.
        who: the wrapper's name, for the messages.
        data_parallel: the wrapped model is an ``nn.DataParallel`` (no device check, no stem watch).

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import HookManager
        >>> from adaptkit.core.check import InputGuard
        >>> net, hooks = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), HookManager()
        >>> guard = InputGuard(net, "demo")
        >>> guard.watch(hooks); guard.active = True  # the wrapper sets it around its own forward
        >>> try:
        ...     net(torch.zeros(2, 1, 8, 8))
        ... except ValueError as e:
        ...     print(str(e)[:56])
        demo: the model's first Conv2d takes 3 channels, the bat
        >>> hooks.remove_all()
    """

    def __init__(self, model: torch.nn.Module, who: str, data_parallel: bool = False) -> None:
        import torch.nn as nn

        self.model = model
        self.who = who
        self.allow_int = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
        devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        self.device = next(iter(devices)) if len(devices) == 1 and not data_parallel else None
        self.stem: nn.Module | None = None
        self.rank = self.channels = 0
        self._entry: Any = None  # the tensor the current forward of the model was called with
        #: the stem check acts only while set (the wrapper's own forward): a forward of the bare model by the user,
        #: while it is wrapped, keeps torch's own errors
        self.active = False
        if not data_parallel:
            first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
            if isinstance(first, nn.modules.conv._ConvNd) and not isinstance(first, nn.modules.lazy.LazyModuleMixin):
                self.stem = first
                self.rank = len(first.kernel_size) + 2
                self.channels = int(first.in_channels)

    def check(self, x: Any) -> None:
        """Up-front checks of a batch before the model runs: dtype and device, then :func:`check_batch`
        (non-empty, finite). Rank and channels are checked at the stem (:meth:`watch`)."""
        if not isinstance(x, torch.Tensor):
            return
        if not (x.is_floating_point() or x.is_complex()) and not self.allow_int:
            raise TypeError(
                f"{self.who}: got a batch of dtype {x.dtype} images; {_INT_HINT} (a model that converts integer "
                "input itself: wrap it with check_inputs=False)"
            )
        if self.device is not None and x.device != self.device:
            raise ValueError(
                f"{self.who}: the batch is on {x.device} but the model is on {self.device}; move it first "
                f"(x = x.to('{self.device}'))"
            )
        check_batch(x, self.who)

    def watch(self, hooks: Any) -> None:
        """Register the stem check on ``hooks`` (a :class:`~adaptkit.core.HookManager`): two pre-hooks, no
        extra forward."""
        if self.stem is None or self.stem is self.model:
            return
        hooks.forward_pre(self.model, self._enter)
        hooks.forward_pre(self.stem, self._at_stem)

    def deactivate(self) -> None:
        """End of the wrapper's forward: the stem check stops acting and no batch reference is kept."""
        self.active = False
        self._entry = None

    def _enter(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        self._entry = inputs[0] if inputs and self.active else None

    def _at_stem(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        entry, self._entry = self._entry, None
        if entry is not None and inputs and inputs[0] is entry:
            self.check_shape(entry)

    def check_shape(self, x: torch.Tensor) -> None:
        """Raise if ``x`` cannot be the stem's input (rank, channels)."""
        if self.stem is None:
            return
        if x.dim() != self.rank:
            hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.dim() == self.rank - 1 else ""
            raise ValueError(
                f"{self.who}: expected a batch of rank {self.rank} (B, {self.channels}, ...) for the model's first "
                f"{type(self.stem).__name__}, got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.channels:
            hint = "channels go on axis 1"
            if self.rank == 4:
                hint += (
                    " (e.g. x.permute(0, 3, 1, 2) for channels-last images, x.expand(-1, 3, -1, -1) for grey images "
                    "on an RGB model)"
                )
            raise ValueError(
                f"{self.who}: the model's first {type(self.stem).__name__} takes {self.channels} channels, the batch "
                f"has {x.shape[1]} (shape {tuple(x.shape)}); {hint}"
            )
