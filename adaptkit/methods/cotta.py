"""CoTTA: continual test-time adaptation with a mean teacher, augmentation averaging and stochastic restoration
(Wang et al., CVPR 2022)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.layers import filter_by_name, norm_kind, unique_parameters
from adaptkit.core.optim import OptimizerSpec, build_optimizer, check_lr
from adaptkit.core.teacher import SeededGenerators, ema_update_, model_copy, stochastic_restore_
from adaptkit.functional.augment import cotta_augment
from adaptkit.registry import register_method

_LOSSES = ("ce", "symmetric")
#: geometric parts of the augmentation switched off for dense outputs (per-pixel averages need aligned pixels)
_NO_GEOMETRY: dict[str, Any] = {"degrees": (0.0, 0.0), "translate": 0.0, "scale": (1.0, 1.0), "flip_p": 0.0}
_TEACHER = "teacher."


def _mean_outputs(total: Any, n: int) -> Any:
    """``total / n`` for every floating-point tensor inside a model output (tensor, dict, tuple, list)."""
    if isinstance(total, torch.Tensor):
        return total / n if total.is_floating_point() else total
    if isinstance(total, dict):
        return type(total)((k, _mean_outputs(v, n)) for k, v in total.items())
    if isinstance(total, tuple) and hasattr(total, "_fields"):
        return type(total)(*(_mean_outputs(v, n) for v in total))
    if isinstance(total, (tuple, list)):
        return type(total)(_mean_outputs(v, n) for v in total)
    return total


def _add_outputs(total: Any, out: Any) -> Any:
    """Element-wise sum of two model outputs of the same structure (non-tensor leaves: the first one's)."""
    if total is None:
        return out
    if isinstance(total, torch.Tensor):
        return total + out if total.is_floating_point() else total
    if isinstance(total, dict):
        return type(total)((k, _add_outputs(v, out[k])) for k, v in total.items())
    if isinstance(total, tuple) and hasattr(total, "_fields"):
        return type(total)(*(_add_outputs(a, b) for a, b in zip(total, out)))
    if isinstance(total, (tuple, list)):
        return type(total)(_add_outputs(a, b) for a, b in zip(total, out))
    return total


@register_method
class CoTTA(TTAMethod):
    """Mean-teacher self-training on every weight and bias, with augmentation-averaged pseudo-labels and
    stochastic restoration to the source weights.

    Three models take part: the **student** (the wrapped model itself: every parameter named ``weight`` or
    ``bias`` is trained, as the official ``collect_params``), an EMA **teacher** and a frozen **anchor**; the last
    two are private copies of the *configured* model, so all three normalise with the current batch's statistics
    in every BatchNorm layer (the running buffers are kept and never written). Per batch ``x``:

    1. student logits ``s = f(x)``; anchor confidence ``c = mean_i max softmax(anchor(x))_i`` (per pixel for
       dense outputs);
    2. if ``c < aug_threshold``: ``t = mean_k teacher(aug_k(x))`` over ``n_augmentations`` copies
       (:func:`~adaptkit.functional.augment.cotta_augment`, one random draw per copy shared by the batch), else
       ``t = teacher(x)``;
    3. loss ``mean CE(softmax t -> log_softmax s)`` (``loss="ce"``, CIFAR) or
       ``1/2 CE(t -> s) + 1/2 CE(s -> t)`` (``loss="symmetric"``, ImageNet); one optimizer step;
    4. teacher ``<- alpha * teacher + (1 - alpha) * student`` (the adapted parameters; buffers are not averaged);
    5. stochastic restoration: each adapted element goes back to its source value with probability
       ``restore_prob`` (masks from a seeded generator, re-seeded on :meth:`reset`).

    The prediction is ``t``, the teacher's output computed *before* the step (official behaviour: the
    augmentation average when ``c < aug_threshold``).

    Inputs: image batches ``(B, C, H, W)`` with pixel values in ``[0, 1]`` (the augmentation clips to that
    range); models should normalise internally, as the official RobustBench models do. Other linear ranges:
    ``augment_kwargs={"value_range": (lo, hi)}``. For dense outputs (segmentation logits ``(B, K, H, W)`` or a dict
    with ``"out"``) the loss and confidence are per pixel and the augmentation is photometric only (no rotation,
    translation, zoom or flip), so that the teacher's per-pixel average stays aligned with the image.

    Args:
        model: a classifier (logits ``(B, K)``) or a dense predictor; pixel inputs in ``[0, 1]``.
        lr: learning rate (official CIFAR-10/100: Adam 1e-3; ImageNet-C: SGD 0.01, momentum 0.9, Nesterov).
        steps: update steps per batch (each one: teacher forwards, step, EMA, restoration).
        episodic: reset before every batch (default ``False``: CoTTA is continual).
        optimizer: ``"adam"`` (default, betas 0.9 / 0.999), ``"sgd"`` (``momentum``, no Nesterov) or a callable
            ``params -> torch.optim.Optimizer`` (e.g. the official ImageNet SGD with ``nesterov=True``).
        alpha: teacher EMA momentum (0.999 in every official setting).
        restore_prob: per-element, per-step probability of restoring a source value (CIFAR 0.01, ImageNet 0.001).
        aug_threshold: ``p_th``; the teacher averages augmented copies when the anchor's mean confidence is below
            it (CIFAR-10 0.92, CIFAR-100 0.72, ImageNet-C 0.1; ``0`` never augments, above 1 always).
        n_augmentations: number of augmented teacher forwards ``N`` (32).
        loss: ``"ce"`` (CIFAR) or ``"symmetric"`` (ImageNet).
        momentum / weight_decay: for the built-in optimizers (weight decay 0 in the official runs).
        augment_kwargs: keyword arguments for :func:`~adaptkit.functional.augment.cotta_augment` (ranges,
            ``value_range``; ``adaptkit.functional.augment.COTTA_SOFT_AUGMENT`` for the official "soft" variant).
        seed: seed of the generators of the augmentations and the restoration masks (one per device, re-seeded on
            :meth:`reset`; on CUDA, bitwise replay also needs ``torch.use_deterministic_algorithms(True)``).
        include / exclude: restrict the adapted parameters by the name of the module owning them (full-match
            regex or a list of names / dotted suffixes). Batch statistics apply to every BatchNorm layer.
        check_inputs: validate each batch before adapting.

    Attributes:
        last_confidence: the anchor's mean confidence ``c`` on the last batch (a float; ``None`` after
            :meth:`reset`; kept by :meth:`restore`).
        last_augmented: whether the last step averaged augmented teacher outputs.

    Example:
        >>> import torch, torch.nn as nn, adaptkit
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                       nn.Flatten(), nn.Linear(8, 10)).eval()
        >>> with adaptkit.CoTTA(model, n_augmentations=4) as cotta:
        ...     preds = cotta(torch.rand(8, 3, 32, 32)).argmax(1)
        >>> preds.shape, cotta.last_augmented
        (torch.Size([8]), True)
    """

    name = "cotta"
    uses_grad = True
    transforms_input = True
    default_episodic = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: OptimizerSpec = None,
        *,
        alpha: float = 0.999,
        restore_prob: float = 0.01,
        aug_threshold: float = 0.92,
        n_augmentations: int = 32,
        loss: str = "ce",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        augment_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        check_inputs: bool = True,
    ) -> None:
        check_lr(lr, "CoTTA")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"CoTTA: steps must be a positive integer, got {steps}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"CoTTA: alpha (teacher EMA momentum) must be in [0, 1], got {alpha}")
        if not 0.0 <= restore_prob <= 1.0:
            raise ValueError(f"CoTTA: restore_prob must be in [0, 1], got {restore_prob}")
        if math.isnan(aug_threshold) or aug_threshold < 0:
            raise ValueError(f"CoTTA: aug_threshold must be >= 0, got {aug_threshold}")
        if int(n_augmentations) != n_augmentations or n_augmentations < 1:
            raise ValueError(f"CoTTA: n_augmentations must be a positive integer, got {n_augmentations}")
        if loss not in _LOSSES:
            raise ValueError(f"CoTTA: loss must be one of {list(_LOSSES)}, got {loss!r}")
        if augment_kwargs is not None and not isinstance(augment_kwargs, dict):
            raise ValueError(
                f"CoTTA: augment_kwargs must be a dict of cotta_augment arguments, got {augment_kwargs!r}"
            )
        if augment_kwargs and "generator" in augment_kwargs:
            raise ValueError("CoTTA: augment_kwargs must not contain 'generator' (use seed=)")
        unknown = sorted(set(augment_kwargs or {}) - set(inspect.signature(cotta_augment).parameters))
        if unknown:
            raise ValueError(f"CoTTA: augment_kwargs has arguments cotta_augment does not take: {unknown}")
        self.lr, self.steps, self.momentum, self.weight_decay = float(lr), int(steps), momentum, weight_decay
        self.alpha, self.restore_prob = float(alpha), float(restore_prob)
        self.aug_threshold, self.n_augmentations, self.loss_kind = float(aug_threshold), int(n_augmentations), loss
        self.augment_kwargs: dict[str, Any] = dict(augment_kwargs or {})
        self.seed = int(seed)
        self._opt_spec, self._include, self._exclude = optimizer, include, exclude
        self._params: list[nn.Parameter] = []
        self._bn: list[str] = []
        self._rng = SeededGenerators(self.seed)
        self._sources: list[torch.Tensor] = []
        self._teacher_params: list[torch.Tensor] = []
        self._teacher_names: list[str] = []
        self.last_confidence: float | None = None
        self.last_augmented: bool | None = None
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ selection
    def select(self) -> dict[str, nn.Module]:
        inner = self.inner
        owners = {
            n: m
            for n, m in inner.named_modules()
            if any(isinstance(m._parameters.get(k), nn.Parameter) for k in ("weight", "bias"))
        }
        include, exclude = self._include, self._exclude
        sel = filter_by_name(owners, include, exclude, "module with a weight or bias in CoTTA(include=...)")
        params = unique_parameters(sel.values(), names=("weight", "bias"), requires_grad=False)
        if not params:
            raise ValueError(
                "CoTTA adapts the parameters named 'weight' / 'bias', and the selection has none "
                f"(include={include!r}, exclude={exclude!r}); run adaptkit.list_layers(model) to see the valid names"
            )
        self._params = params
        self._bn = [n for n, m in inner.named_modules() if norm_kind(m) == "batch"]
        bn = set(self._bn)
        return {n: m for n, m in inner.named_modules() if n in sel or n in bn}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._params)

    def train_modules(self) -> list[str]:
        return list(self._bn)

    def configure(self) -> None:
        for n in self._bn:  # batch statistics in every BatchNorm layer; the running buffers are never written
            self._targets[n].track_running_stats = False
        live = self._named_trainable()
        self._sources = [self._snapshot.tensors[n] for n in live]
        # private copies of the configured model (batch-statistic BN, no hooks, no gradients)
        self.teacher = model_copy(self.inner)
        self.anchor = model_copy(self.inner)
        t_params = dict(self.teacher.named_parameters())
        self._teacher_names = list(live)
        self._teacher_params = [t_params[n] for n in live]
        self.optimizer = build_optimizer(
            self._opt_spec, self.trainable_parameters(), self.lr, self.momentum, self.weight_decay, "CoTTA"
        )

    # ------------------------------------------------------------------ adaptation
    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the student's log-softmax under the teacher's softmax (``"ce"``), or its
        symmetric version (``"symmetric"``); over classes on dim 1, averaged over samples (and pixels)."""
        t = teacher_logits.detach()
        ce = -(t.softmax(1) * student_logits.log_softmax(1)).sum(1)
        if self.loss_kind == "symmetric":
            ce = 0.5 * ce - 0.5 * (student_logits.softmax(1) * t.log_softmax(1)).sum(1)
        return ce.mean()

    def _augment_kwargs(self, dense: bool) -> dict[str, Any]:
        return {**self.augment_kwargs, **_NO_GEOMETRY} if dense else self.augment_kwargs

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self._who()} needs an image batch tensor (B, C, H, W) to augment, got {got}")
        rng_state = self._rng.state()
        try:
            out = self.model(x)
            s = get_logits(out)
            with torch.no_grad():
                anchor_prob = get_logits(self.anchor(x)).softmax(1).amax(1)
                conf = anchor_prob.mean()
                augment = bool(conf < self.aug_threshold)
                if augment:
                    self._check_range(x)
                    gen = self._rng.get(x.device)
                    kw = self._augment_kwargs(s.dim() > 2)
                    total: Any = None
                    for _ in range(self.n_augmentations):
                        total = _add_outputs(total, self.teacher(cotta_augment(x, gen, **kw)))
                    t_out = _mean_outputs(total, self.n_augmentations)
                else:
                    t_out = self.teacher(x)
            loss = self.loss(s, get_logits(t_out))
            loss.backward()
        except BaseException:
            self._rng.load_state(rng_state)  # a failed batch draws nothing: the stream replays as if it never came
            raise
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update_(self._teacher_params, self.trainable_parameters(), self.alpha)
        stochastic_restore_(self.trainable_parameters(), self._sources, self.restore_prob, self._rng)
        self.last_confidence, self.last_augmented = float(conf), augment
        return t_out

    def predict(self, x: Any, last: Any) -> Any:
        return last

    def _check_range(self, x: torch.Tensor) -> None:
        lo, hi = (float(v) for v in self.augment_kwargs.get("value_range", (0.0, 1.0)))
        xmin, xmax = torch.aminmax(x.detach())
        tol = 1e-3 * (hi - lo)
        if float(xmin) < lo - tol or float(xmax) > hi + tol:
            self.warn_once(
                "range",
                f"inputs span [{float(xmin):.3g}, {float(xmax):.3g}] but the CoTTA augmentation clips to "
                f"value_range ({lo:g}, {hi:g}); feed [0, 1] pixels and normalise inside the model, or pass "
                "augment_kwargs={'value_range': (lo, hi)}",
            )

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def reset_state(self) -> None:
        # the teacher back to the source, bitwise (the anchor is a frozen copy of the source)
        for t, a in zip(self.teacher.parameters(), self.anchor.parameters()):
            t.copy_(a)
        for t, a in zip(self.teacher.buffers(), self.anchor.buffers()):
            t.copy_(a)
        self._rng.clear()  # re-seeded lazily: a reset run replays the same augmentations and masks
        self.last_confidence = self.last_augmented = None

    def method_state(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self._rng.state("rng."))
        for n, t in zip(self._teacher_names, self._teacher_params):
            state[_TEACHER + n] = t.detach().clone()
        for n, b in self.teacher.named_buffers():
            state[_TEACHER + n] = b.detach().clone()
        return state

    def _teacher_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(zip(self._teacher_names, self._teacher_params))
        tensors.update(dict(self.teacher.named_buffers()))
        return tensors

    def load_adaptation_state_dict(self, state: dict[str, Any]) -> None:
        """Load the output of :meth:`adaptation_state_dict`; the teacher entries are checked before anything is
        written (same keys and shapes as this wrapper's teacher)."""
        self._check_alive()
        prefix = "_adaptkit.state." + _TEACHER
        got = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        want = self._teacher_tensors()
        if state.get("_adaptkit.method") == self.name:
            if set(got) != set(want):
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                raise KeyError(f"{self._who()}: teacher state mismatch; missing {missing[:5]}, unexpected {extra[:5]}")
            for k, v in got.items():
                if not isinstance(v, torch.Tensor) or v.shape != want[k].shape:
                    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(
                        f"{self._who()}: teacher state entry {k!r} has shape {shape}, the model's has "
                        f"{tuple(want[k].shape)}; this state was saved for another model"
                    )
        super().load_adaptation_state_dict(state)

    @torch.no_grad()
    def load_method_state(self, state: dict[str, Any]) -> None:
        want = self._teacher_tensors()
        for k, v in state.items():
            if k.startswith(_TEACHER):
                want[k[len(_TEACHER) :]].copy_(v)
        self._rng.load_state(state, "rng.")
        self.last_confidence = self.last_augmented = None

    def restore(self) -> nn.Module:
        last = (self.last_confidence, self.last_augmented)
        model = super().restore()
        self.last_confidence, self.last_augmented = last  # the last batch's diagnostics stay readable
        # the copies are no longer needed: free their memory (the wrapper refuses further forwards)
        self._teacher_params, self._sources = [], []
        for attr in ("teacher", "anchor"):
            if attr in self._modules:
                self._modules[attr] = nn.Identity()
        return model

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, alpha={self.alpha}, restore_prob={self.restore_prob}, "
            f"aug_threshold={self.aug_threshold}, n_augmentations={self.n_augmentations}, loss={self.loss_kind!r}, "
            + super().extra_repr()
        )
