"""Template base class of the corruptions: random parameters are drawn apart from the deterministic transform."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from adaptkit.data.corruptions._ops import GeneratorLike, resolve_generator
from adaptkit.data.corruptions._params import TABLES, resolve_preset, severity_params

Params = dict[str, Any]
Shape = tuple[int, int, int, int]

#: default bytes of (float32) images per chunk in :meth:`Corruption.apply` on the CPU (three 224 px RGB images)
CHUNK_BYTES = 1 << 21


def _check_input(x: Any, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor (B, C, H, W) or (C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{who}: expected a floating-point image in [0, 1], got dtype {x.dtype}; convert first, e.g. "
            "torchvision.transforms.v2.functional.to_dtype(x, torch.float32, scale=True)"
        )
    if x.dim() not in (3, 4):
        raise ValueError(f"{who}: expected a (B, C, H, W) batch or a (C, H, W) image, got shape {tuple(x.shape)}")
    if x.shape[-3] not in (1, 3):
        raise ValueError(
            f"{who}: expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[-3]} (shape {tuple(x.shape)})"
        )


class Corruption(nn.Module):
    """Base class of the corruptions: ``forward(x) = apply(x, make_params(x, severity, generator))``.

    Subclasses fill the class attributes and override :meth:`sample` (random draws) and :meth:`transform`
    (the deterministic image operation). ``forward`` is fixed: it resolves the constants (published table for
    the preset, then the keyword overrides), draws the random parameters, keeps them in :attr:`last_params`
    and applies them. :meth:`replay` re-applies the last parameters to a (possibly different) batch of the same
    shape, e.g. the same noise on the clean and an adapted copy.

    Inputs are float tensors ``(B, C, H, W)`` (or a single ``(C, H, W)`` image) in ``[0, 1]``, ``C`` = 1 or 3,
    on any device. The output has the same shape, dtype and device and is clamped to ``[0, 1]``; half
    precision inputs are processed in float32.

    Args:
        severity: 1 (mild) to 5 (strong).
        preset: ``"auto"`` (CIFAR constants when ``min(H, W) <= 64``, else ImageNet), ``"cifar"`` or
            ``"imagenet"``.
        generator: a ``torch.Generator``, an int seed (a fresh generator per call: every call gives the same
            output) or ``None`` (the global RNG). A call-time ``generator`` takes precedence.
        **params: explicit constants overriding the table (names in :attr:`param_names`).

    Attributes:
        last_params: the parameters of the last ``forward`` (constants and random draws), or ``None``.
    """

    #: registry name, e.g. ``"gaussian_noise"``
    name: ClassVar[str] = ""
    #: whether the corruption draws random numbers
    stochastic: ClassVar[bool] = True
    #: ``None``: :meth:`transform` needs the whole batch at once; otherwise it treats images independently and
    #: this maps each per-image random parameter (a tensor) to its batch dimension, so :meth:`apply` can split
    #: the batch into cache-sized chunks on the CPU
    batch_dims: ClassVar[dict[str, int] | None] = None
    #: bytes of images per chunk (see :meth:`apply`)
    chunk_bytes: ClassVar[int] = CHUNK_BYTES

    def __init__(
        self, severity: int = 1, preset: str = "auto", generator: GeneratorLike = None, **params: Any
    ) -> None:
        super().__init__()
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise ValueError(f"{type(self).__name__}: severity must be an int in 1..5, got {severity!r}")
        resolve_preset(preset, 1, 1)  # validates the name
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown parameter(s) {unknown}; valid overrides are {self.param_names()}"
            )
        self.severity = severity
        self.preset = preset
        self.generator = generator
        self.overrides = dict(params)
        self.last_params: Params | None = None

    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the constants that can be overridden by keyword."""
        return list(TABLES[cls.name]["cifar"][0])

    # ------------------------------------------------------------------------------------------ template
    def forward(self, x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        """Corrupt ``x`` with freshly drawn random parameters (kept in :attr:`last_params`)."""
        params = self.make_params(x, self.severity, generator if generator is not None else self.generator)
        self.last_params = params
        return self.apply(x, params)

    def make_params(self, x: torch.Tensor, severity: int, generator: GeneratorLike = None) -> Params:
        """Constants for ``x``'s size (table + overrides) and the random draws; uses only x's shape and device."""
        _check_input(x, type(self).__name__)
        h, w = x.shape[-2:]
        preset = resolve_preset(self.preset, h, w)
        if not 1 <= severity <= 5:
            raise ValueError(f"{type(self).__name__}: severity must be in 1..5, got {severity!r}")
        params: Params = severity_params(self.name, preset, severity)
        params.update(self.overrides)
        params = self.derive(params, h, w, preset)
        b = x.shape[0] if x.dim() == 4 else 1
        shape = (b, x.shape[-3], h, w)
        gen = resolve_generator(generator, x.device)
        params.update(self.sample(shape, params, gen, x.device, _work_dtype(x.dtype)))
        params["preset"] = preset
        params["severity"] = severity
        return params

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Deterministically corrupt ``x`` with ``params`` (from :meth:`make_params`); clamps to ``[0, 1]``.

        On the CPU, corruptions that declare :attr:`batch_dims` are applied to chunks of about
        :attr:`chunk_bytes` of images written into one output tensor: the temporaries of a transform then stay
        in the cache and are recycled by the allocator instead of being fresh page-faulted buffers of the size
        of the whole batch (which costs more than the arithmetic). The result is the same as one batched call.
        """
        _check_input(x, type(self).__name__)
        squeeze = x.dim() == 3
        y = x.unsqueeze(0) if squeeze else x
        chunk = self._chunk_size(y)
        if chunk < y.shape[0]:
            out = torch.empty_like(y)
            for i in range(0, y.shape[0], chunk):
                sl = slice(i, i + chunk)
                xin = y[sl].to(_work_dtype(x.dtype))
                yc = self.transform(xin, self._slice_params(params, sl))
                torch.clamp(yc, 0, 1, out=out[sl])
            return out.squeeze(0) if squeeze else out
        xin = y.to(_work_dtype(x.dtype))
        y = self.transform(xin, params)
        # clamp in place when the transform returned a fresh tensor (one memory pass less)
        fresh = not _shares_memory(y, x) and not _shares_memory(y, xin)
        y = (y.clamp_(0, 1) if fresh else y.clamp(0, 1)).to(x.dtype)
        return y.squeeze(0) if squeeze else y

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        """Apply :attr:`last_params` again (same random draws) to ``x``."""
        if self.last_params is None:
            raise RuntimeError(f"{type(self).__name__}.replay: call the corruption once before replaying it")
        return self.apply(x, self.last_params)

    def _chunk_size(self, x: torch.Tensor) -> int:
        """Images per chunk for :meth:`apply` (the whole batch when chunking does not apply)."""
        b = x.shape[0]
        if self.batch_dims is None or x.device.type != "cpu" or b < 2:
            return b
        per_image = x[0].numel() * max(x.element_size(), 4)
        return max(1, min(b, self.chunk_bytes // max(per_image, 1)))

    def _slice_params(self, params: Params, sl: slice) -> Params:
        """``params`` restricted to the images ``sl`` (tensors listed in :attr:`batch_dims` are sliced)."""
        out = dict(params)
        for key, dim in (self.batch_dims or {}).items():
            v = params.get(key)
            if isinstance(v, torch.Tensor):
                out[key] = v[(slice(None),) * dim + (sl,)]
        return out

    # ---------------------------------------------------------------------------------------- overridables
    def derive(self, params: Params, height: int, width: int, preset: str) -> Params:
        """Turn table constants into the values used for an image of this size (default: unchanged)."""
        return params

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        """Random draws for a batch of ``shape`` (default: none)."""
        return {}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The image operation on a ``(B, C, H, W)`` float batch; the result is clamped by :meth:`apply`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.overrides.items())
        return f"severity={self.severity}, preset={self.preset!r}{extra}"


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CorruptionOp(Protocol):
    """Signature of the functional form of a corruption."""

    def __call__(
        self, x: torch.Tensor, severity: int = 1, generator: Any = None, preset: str = "auto", **params: Any
    ) -> torch.Tensor: ...


def functional(cls: type[Corruption], name: str) -> CorruptionOp:
    """The functional form ``name(x, severity=1, generator=None, preset="auto", **params)`` of ``cls``."""

    def op(
        x: torch.Tensor, severity: int = 1, generator: Any = None, preset: str = "auto", **params: Any
    ) -> torch.Tensor:
        return cls(severity, preset, **params)(x, generator)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"Functional :class:`{cls.__name__}`: ``{name}(x, severity, generator, preset, **params)``."
    return op
