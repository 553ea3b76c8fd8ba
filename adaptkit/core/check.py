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


class _Reached(Exception):
    """Raised by the stem probe's pre-hook: the stem was reached; carries whether it got the batch itself."""

    def __init__(self, same: bool) -> None:
        super().__init__("adaptkit stem probe")
        self.same = same


class InputGuard:
    """Checks a test batch against what the model can take, before the model runs on it, with messages that say
    what to do. Built once per wrapper from the unwrapped model:

    * **dtype**: integer / bool images are refused (``TypeError``), unless the model holds an embedding layer
      (token inputs);
    * **device**: a model whose parameters and buffers all live on one device refuses a batch on another
      (``ValueError``); skipped for ``nn.DataParallel``, which scatters its input itself;
    * **rank and channels** (``ValueError``): when the model's first parameterised module (in registration
      order) is a convolution, the first batch is sent through a probe forward that stops as soon as that
      convolution is reached (every module in eval mode, no gradients; nothing is computed past the stem's
      input). If the convolution receives the batch tensor itself it is the model's stem, and every batch is
      checked up front against its rank (``N + 2`` for ``ConvNd``) and ``in_channels``; otherwise (a model
      that transforms its input first) the shape is left to the model.

    Args:
        model: the unwrapped model.
        who: the wrapper's name, for the messages.
        data_parallel: the wrapped model is an ``nn.DataParallel`` (no device check, no stem probe).

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core.check import InputGuard
        >>> guard = InputGuard(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "demo")
        >>> guard.check(torch.zeros(2, 3, 8, 8))
        >>> try:
        ...     guard.check(torch.zeros(2, 1, 8, 8))
        ... except ValueError as e:
        ...     print(str(e)[:56])
        demo: the model's first Conv2d takes 3 channels, the bat
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
        #: ``None`` until the first batch's probe; then whether the first convolution is the model's stem
        self.confirmed: bool | None = None
        if not data_parallel:
            first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
            if isinstance(first, nn.modules.conv._ConvNd) and not isinstance(first, nn.modules.lazy.LazyModuleMixin):
                self.stem = first
                self.rank = len(first.kernel_size) + 2
                self.channels = int(first.in_channels)
        if self.stem is None:
            self.confirmed = False

    def check(self, x: Any) -> None:
        """Raise before the model runs if ``x`` cannot be a batch for this model: :meth:`check_type`, then
        :func:`check_batch` (non-empty, finite), then :meth:`check_shape`."""
        self.check_type(x)
        check_batch(x, self.who)
        self.check_shape(x)

    def check_type(self, x: Any) -> None:
        """dtype and device (cheap; run first, so that no value of a batch on another device is read)."""
        if not isinstance(x, torch.Tensor):
            return
        if not (x.is_floating_point() or x.is_complex()) and not self.allow_int:
            raise TypeError(f"{self.who}: got a batch of dtype {x.dtype} images; {_INT_HINT}")
        if self.device is not None and x.device != self.device:
            raise ValueError(
                f"{self.who}: the batch is on {x.device} but the model is on {self.device}; move it first "
                f"(x = x.to('{self.device}'))"
            )

    def check_shape(self, x: Any) -> None:
        """Rank and channels against the model's stem (probed on the first batch)."""
        if not isinstance(x, torch.Tensor) or self.stem is None:
            return
        if self.confirmed is None:
            self.confirmed = self._probe(x)
        if self.confirmed:
            self._check_shape(x)

    def _probe(self, x: torch.Tensor) -> bool:
        assert self.stem is not None

        def reached(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
            raise _Reached(bool(inputs) and inputs[0] is x)

        flags = {m: m.training for m in self.model.modules()}
        handle = self.stem.register_forward_pre_hook(reached)
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(x)
        except _Reached as stop:
            return stop.same
        except Exception:
            return False  # the model transforms or refuses the input before its first convolution: its business
        finally:
            handle.remove()
            for m, flag in flags.items():
                m.training = flag
        return False

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.dim() != self.rank:
            hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.dim() == self.rank - 1 else ""
            raise ValueError(
                f"{self.who}: expected a batch of rank {self.rank} (B, {self.channels}, ...) for the model's first "
                f"{type(self.stem).__name__}, got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{self.who}: the model's first {type(self.stem).__name__} takes {self.channels} channels, the batch "
                f"has {x.shape[1]} (shape {tuple(x.shape)}); channels go on axis 1 (e.g. x.permute(0, 3, 1, 2) for "
                "channels-last images, x.expand(-1, 3, -1, -1) for grey images on an RGB model)"
            )
