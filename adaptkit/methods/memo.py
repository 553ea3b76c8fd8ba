"""MEMO: test-time robustness via adaptation and augmentation (Zhang, Levine & Finn, NeurIPS 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.bn import BNStatsOverride
from adaptkit.core.layers import filter_by_name, norm_kind, unique_parameters
from adaptkit.core.optim import OptimizerSpec, build_optimizer, check_lr
from adaptkit.core.teacher import SeededGenerators
from adaptkit.functional.augmix import _PRE_AUGMENT, augmix
from adaptkit.functional.entropy import marginal_entropy
from adaptkit.functional.moments import Moments, bn_prior_mix
from adaptkit.registry import register_method

Normalization = tuple[Sequence[float], Sequence[float]]


def _cat_outputs(outs: list[Any]) -> Any:
    """Concatenate per-image model outputs along the batch dimension (tensors, dicts, (named) tuples, lists)."""
    first = outs[0]
    if len(outs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=0) if first.dim() > 0 else first
    if isinstance(first, dict):
        return type(first)((k, _cat_outputs([o[k] for o in outs])) for k in first)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_cat_outputs(list(v)) for v in zip(*outs)))
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_outputs(list(v)) for v in zip(*outs))
    if first is None or isinstance(first, (bool, int, float, str)):
        return first
    raise TypeError(
        f"adaptkit.MEMO: cannot join per-image outputs of type {type(first).__name__} into a batch; return a "
        "tensor, a dict or a tuple of tensors, or call the wrapper with one image at a time"
    )


@register_method
class MEMO(TTAMethod):
    """Marginal entropy over AugMix copies of each single test image, one SGD step on every parameter.

    For each image of the batch, separately: make ``n_augmentations`` AugMix copies
    (:func:`adaptkit.functional.augmix.augmix`, seeded), take the entropy of the *average* softmax prediction over
    the copies (:func:`adaptkit.functional.marginal_entropy`), take ``steps`` SGD steps on every parameter that
    requires grad (the whole network, all layers in eval mode), then predict the **clean** image with the adapted
    model. With ``episodic=True`` (default, as the official code) every image starts from the source weights, a
    fresh optimizer and a freshly seeded generator, so a batch of ``n`` images gives exactly the outputs of ``n``
    calls with one image each (``episodic=False``: the images adapt one after another without reset).

    BatchNorm layers use the BN prior of MEMO's ImageNet code (BNAdapt's rule with ``n = 1`` image): they normalise
    with ``w * source + (1 - w) * test`` statistics, ``w = N / (N + 1)``, where the test statistics are those of the
    ``n_augmentations`` copies while adapting and of the single clean image at prediction (unbiased variance; a
    channel with a single value, e.g. a 1x1 map, keeps the source variance). No gradient flows through the test
    statistics (as in the official code, which writes them as running buffers), and the running buffers are never
    written. ``N=float("inf")`` gives plain eval-mode BatchNorm. LayerNorm / GroupNorm models need no prior.

    AugMix works on ``[0, 1]`` pixels. Pass the model's input normalisation as ``normalization=(mean, std)`` so that
    the copies are made from ``x * std + mean`` and normalised back. Without it, images already in ``[0, 1]`` are
    used as they are and others are rescaled per image from their ``[min, max]`` to ``[0, 1]`` and back (an
    approximation, with a one-time warning).

    Args:
        model: a classifier (logits ``(B, C)``); dense outputs (``(B, C, H, W)``, a dict with ``"out"``) use the
            marginal over copies *and* pixels, as the segmentation variant of mariodoebler/test-time-adaptation.
        lr: SGD learning rate (official CIFAR-10, ResNet-26 GN: 5e-3; ImageNet ResNet-50 BN: 2.5e-4).
        n_augmentations: AugMix copies per image (official CIFAR-10: 32; ImageNet: 64).
        steps: SGD steps per image (official ``niter``: 1). The base template's ``self.steps`` stays 1: every
            image's steps run inside one adaptation call; this value is ``steps_per_image``.
        N: BN prior strength in pseudo-images (official ImageNet: 16, ``w = 16/17``; ``0``: test statistics only;
            ``inf``: source statistics only).
        episodic: reset to the source before every image (default ``True``, official).
        optimizer: ``None`` (SGD as official) or ``"adam"``, ``"sgd"`` or a callable ``params -> Optimizer``.
        momentum: SGD momentum (official: 0; mariodoebler/test-time-adaptation: 0.9).
        weight_decay: weight decay (official: 0).
        severity: AugMix level ``~ U(0.1, severity)`` (MEMO's code: 1; AugMix's own training default: 3).
        pre_augment: ``"auto"`` (random crop with 4 px padding + flip below 64 px, random resized crop + flip from
            64 px), ``"crop"``, ``"resized_crop"`` or ``"none"``.
        normalization: ``(mean, std)`` per channel of the model's input, or ``None`` (see above).
        seed: seed of the augmentation generator (one per device; re-seeded on :meth:`reset`, so with
            ``episodic=True`` every image sees the same sequence of random draws); ``None`` draws from torch's
            global generator (official behaviour: not reproducible across resets).
        include / exclude: restrict the adapted parameters by the name of the module owning them (full-match regex
            or a list of names / dotted suffixes). The BN prior applies to every BatchNorm layer.
        check_inputs: validate each batch before adapting.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.MEMO(model, n_augmentations=4) as memo:
        ...     preds = memo(torch.rand(2, 3, 32, 32)).argmax(1)  # two images, two independent episodes
        >>> preds.shape
        torch.Size([2])
    """

    name = "memo"
    uses_grad = True
    default_episodic = True
    transforms_input = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 5e-3,
        n_augmentations: int = 32,
        steps: int = 1,
        N: float = 16,
        episodic: bool | None = None,
        optimizer: OptimizerSpec = None,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        severity: float = 1.0,
        pre_augment: str = "auto",
        normalization: Normalization | None = None,
        seed: int | None = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        check_inputs: bool = True,
    ) -> None:
        check_lr(lr, "MEMO")
        if isinstance(n_augmentations, bool) or int(n_augmentations) != n_augmentations or n_augmentations < 1:
            raise ValueError(f"MEMO: n_augmentations must be a positive integer, got {n_augmentations}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"MEMO: steps must be a positive integer, got {steps}")
        N = float(N)
        if math.isnan(N) or N < 0:
            raise ValueError(f"MEMO: N must be >= 0 (0 = test statistics only, inf = source statistics), got {N}")
        if not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"MEMO: momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}")
        if not severity >= 0.1:
            raise ValueError(f"MEMO: severity must be >= 0.1 (AugMix level ~ U(0.1, severity)), got {severity}")
        if pre_augment not in _PRE_AUGMENT:
            raise ValueError(f"MEMO: pre_augment must be one of {list(_PRE_AUGMENT)}, got {pre_augment!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed):
            raise ValueError(f"MEMO: seed must be an integer or None, got {seed!r}")
        self._norm_stats = self._check_normalization(normalization)
        self.lr, self.n_augmentations, self.steps_per_image, self.N = float(lr), int(n_augmentations), int(steps), N
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.severity, self.pre_augment, self.normalization = float(severity), pre_augment, normalization
        self.seed = None if seed is None else int(seed)
        self._gens = SeededGenerators(self.seed) if self.seed is not None else None
        self._opt_spec, self._include, self._exclude = optimizer, include, exclude
        self._params: list[nn.Parameter] = []
        self._bn: dict[str, nn.Module] = {}
        #: the loss of each image's last step in the last call (detached, ``(B,)``), or ``None``
        self.last_loss: torch.Tensor | None = None
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    @staticmethod
    def _check_normalization(normalization: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if normalization is None:
            return None
        try:
            mean, std = normalization
            mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float64)
            std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"MEMO: normalization must be (mean, std), two sequences of per-channel floats, got {normalization!r}"
            ) from None
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0 or not bool((std_t > 0).all()):
            raise ValueError(f"MEMO: normalization needs mean and std of the same length and std > 0, got "
                             f"{normalization!r}")  # fmt: skip
        return mean_t, std_t

    # ------------------------------------------------------------------ selection
    def select(self) -> dict[str, nn.Module]:
        inner = self.inner
        owners = {
            name: m
            for name, m in inner.named_modules()
            if any(p is not None and p.requires_grad for p in m._parameters.values())
        }
        include, exclude = self._include, self._exclude
        sel = filter_by_name(owners, include, exclude, "module with trainable parameters in MEMO(include=...)")
        params = unique_parameters(sel.values(), names=None, requires_grad=True)
        if not params:
            raise ValueError(
                "MEMO updates the parameters that require grad at wrap time, and the selection has none "
                f"(include={include!r}, exclude={exclude!r}); set requires_grad=True on what should adapt, or run "
                "adaptkit.list_layers(model) to see the valid names"
            )
        self._params = params
        self._bn = {}
        if not math.isinf(self.N):
            self._bn = {
                n: m
                for n, m in inner.named_modules()
                if norm_kind(m) == "batch" and m.track_running_stats and getattr(m, "running_mean", None) is not None
            }
        return {n: m for n, m in inner.named_modules() if n in sel or n in self._bn}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._params)

    def configure(self) -> None:
        if self._bn:
            BNStatsOverride(self._bn, self._policy, self.hooks)
        self.optimizer = build_optimizer(
            self._opt_spec or "sgd", self.trainable_parameters(), self.lr, self.momentum, self.weight_decay, "MEMO"
        )

    # ------------------------------------------------------------------ BN prior
    def _policy(self, name: str, module: nn.Module, mom: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        """``N/(N+1) * source + 1/(N+1) * test`` statistics: the copies of one image (or the image) count as one."""
        if self.N == 0 and mom.count < 2:
            raise ValueError(
                f"adaptkit.MEMO(N=0): BatchNorm layer {name!r} sees a single value per channel (one image with a "
                "1x1 map), which has no variance; use N > 0 (e.g. N=16)"
            )
        return bn_prior_mix(
            module.running_mean.to(mom.mean.dtype), module.running_var.to(mom.var.dtype), mom.mean, mom.var, self.N, 1
        )

    # ------------------------------------------------------------------ adaptation
    def loss(self, output: Any) -> torch.Tensor:
        """Marginal entropy of the copies' outputs: ``H(mean_i softmax(z_i))`` (dense outputs: over copies and
        pixels)."""
        logits = get_logits(output)
        if logits.dim() > 2:
            logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        return marginal_entropy(logits, dim=1)

    def _pixels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pix, a, b)`` with ``pix = a * x + b`` in ``[0, 1]`` per image; the copies go back as ``(p - b) / a``."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if self._norm_stats is not None:
            mean, std = self._norm_stats
            if mean.numel() not in (1, x.shape[1]):
                raise ValueError(
                    f"{self._who()}: normalization has {mean.numel()} channel values, the batch has {x.shape[1]} "
                    "channels"
                )
            view = (1, -1) + (1,) * (x.dim() - 2)
            a = std.to(device=x.device, dtype=x.dtype).view(view)
            b = mean.to(device=x.device, dtype=x.dtype).view(view)
            a, b = a.expand(x.shape[0], *a.shape[1:]), b.expand(x.shape[0], *b.shape[1:])
            return (x * a + b).clamp(0.0, 1.0), a, b
        flat = x.reshape(x.shape[0], -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        inside = (lo >= 0) & (hi <= 1)
        if not bool(inside.all()):
            self.warn_once(
                "range",
                "inputs outside [0, 1]: each image is rescaled from its [min, max] to [0, 1] for AugMix and back. "
                "Pass normalization=(mean, std) (the model's input normalisation) to augment the true pixels.",
            )
        span = hi - lo
        a = torch.where(inside | (span <= 0), torch.ones_like(span), 1.0 / span.clamp_min(torch.finfo(x.dtype).tiny))
        b = torch.where(inside, torch.zeros_like(lo), -lo * a)
        a, b = a.view(shape), b.view(shape)
        return (x * a + b).clamp(0.0, 1.0), a, b

    def _copies(self, pix: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``n_augmentations`` AugMix copies of one image ``pix`` ``(1, C, H, W)``, in the model's input space."""
        gen = self._gens.get(pix.device) if self._gens is not None else None
        copies = augmix(
            pix.expand(self.n_augmentations, -1, -1, -1), gen, severity=self.severity, pre_augment=self.pre_augment
        )
        return (copies - b) / a

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self._who()} needs an image batch tensor (B, C, H, W) to augment, got {got}")
        with torch.no_grad():
            pix, a, b = self._pixels(x.detach())
        rng = self._gens.state() if self._gens is not None else None
        outs, losses, updated = [], [], False
        try:
            for i in range(x.shape[0]):
                if i and self.episodic:
                    self.reset()  # each image is its own episode: source weights, fresh optimizer and generator
                for _ in range(self.steps_per_image):
                    with torch.no_grad():
                        copies = self._copies(pix[i : i + 1], a[i : i + 1], b[i : i + 1])
                    loss = self.loss(self.model(copies))
                    loss.backward()
                    self.optimizer.step()
                    updated = True
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                with torch.no_grad():
                    outs.append(self.model(x[i : i + 1]))  # the clean image, with the adapted model
        except BaseException:
            if not updated and rng is not None:  # nothing adapted yet: the failed call leaves no trace
                self._gens.load_state(rng)  # type: ignore[union-attr]
            raise
        self.last_loss = torch.stack(losses)
        return _cat_outputs(outs)

    def predict(self, x: Any, last: Any) -> Any:
        return last

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        if getattr(self, "_gens", None) is not None:
            self._gens.clear()  # type: ignore[union-attr]
        self.last_loss = None

    def method_state(self) -> dict[str, Any]:
        return self._gens.state() if self._gens is not None else {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if self._gens is not None:
            self._gens.load_state(state)

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, n_augmentations={self.n_augmentations}, steps={self.steps_per_image}, N={self.N}, "
            + super().extra_repr()
        )
