"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022); ETA is its subclass without the
Fisher regulariser (:mod:`adaptkit.methods.eta`).

Official code: mr-eggplant/EATA ``eata.py`` / ``main.py`` (ImageNet-C setting); CIFAR setting from
mariodoebler/test-time-adaptation ``classification/methods/eata.py`` and ``cfgs/cifar10_c/eata.yaml``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn

from adaptkit.core.alerts import AdaptationWarning
from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.optim import OptimizerSpec, build_optimizer, check_lr
from adaptkit.functional.entropy import softmax_entropy
from adaptkit.functional.filters import (
    entropy_margin,
    entropy_weight,
    redundancy_mask,
    reliable_mask,
    update_average,
)
from adaptkit.functional.fisher import diagonal_fisher, fisher_penalty
from adaptkit.methods._norm_affine import NormAffineMixin
from adaptkit.registry import register_method

#: EATA's moving average of predictions: ``m <- 0.9 m + 0.1 mean_{S2} p`` (fixed in the official code)
AVERAGE_MOMENTUM = 0.9


def per_sample_entropy_and_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample entropy ``(B,)`` and probability vector ``(B, C)`` of logits with classes along dim 1.

    For dense logits ``(B, C, H, W, ...)`` a sample is an image: its entropy is the mean of its pixels' entropies
    and its probability vector the mean of its pixels' softmax vectors (adaptkit's extension; EATA is defined for
    classifiers).

    Example:
        >>> import torch
        >>> from adaptkit.methods.eata import per_sample_entropy_and_probs
        >>> h, p = per_sample_entropy_and_probs(torch.zeros(2, 4, 3, 3))
        >>> h.shape, p.shape, round(h[0].item(), 4)  # uniform pixels: ln 4
        (torch.Size([2]), torch.Size([2, 4]), 1.3863)
    """
    if logits.dim() < 2:
        raise ValueError(f"expected logits with classes along dim 1, got shape {tuple(logits.shape)}")
    ent = softmax_entropy(logits, dim=1)
    probs = logits.softmax(1)
    if logits.dim() > 2:
        ent = ent.flatten(1).mean(1)
        probs = probs.flatten(2).mean(2)
    return ent, probs


@register_method
class EATA(NormAffineMixin, TTAMethod):
    """Entropy minimisation on reliable, non-redundant samples, with a Fisher anchor against forgetting.

    Per batch (predict-then-update, as the official code): one forward; per-sample entropies ``H``; reliable set
    ``S1 = {H < E0}`` (``E0 = e_margin``, default ``0.4 ln C``); non-redundant set ``S2 = {i in S1 :
    |cos(p_i, m)| < d_margin}`` against the moving average ``m`` of past predictions (no history yet: ``S2 = S1``);
    ``m <- 0.9 m + 0.1 mean_{S2} p`` (first time: ``mean_{S1} p``; unchanged when the set is empty); loss
    ``mean_{S2} H exp(E0 - H)`` (weights detached) ``+ fisher_alpha * sum_k F_k (theta_k - theta0_k)^2``; one
    optimizer step, skipped (no step, optimizer state untouched) when ``S2`` is empty. The adapted parameters are
    the norm-layer affine parameters (BatchNorm in batch-statistics form, buffers never written; LayerNorm /
    GroupNorm on BatchNorm-free models), as :class:`~adaptkit.Tent`.

    The diagonal Fisher ``F`` and the anchor ``theta0`` (the weights at wrap time) are computed once, when wrapping,
    from ``fisher_data``: unlabeled in-distribution batches (``(x, y)`` tuples: ``y`` is ignored), cross-entropy
    against the model's own argmax, squared batch gradients averaged over batches, at most ``fisher_samples``
    samples (:func:`adaptkit.functional.fisher.diagonal_fisher`). The pass runs on the configured model (BatchNorm
    in batch-statistics form, as the official code), writes no running statistic and no ``.grad``. Without
    ``fisher_data`` or ``fisher`` EATA warns and runs as :class:`~adaptkit.ETA` (no regulariser).

    Dense outputs (``(B, C, H, W)`` or a dict with ``"out"``) are filtered per image: an image's entropy is the
    mean of its pixels' entropies, its probability vector the mean of its pixels' softmax vectors.

    Args:
        model: a classifier (logits ``(B, C)``) or dense predictor.
        lr: learning rate (default: the CIFAR setting of mariodoebler/test-time-adaptation, Adam 1e-3; official
            ImageNet: ``optimizer="sgd", lr=2.5e-4`` with momentum 0.9).
        steps: optimisation steps per batch (official: 1).
        episodic: reset before every batch (default ``False``: online; a reset also clears ``m`` and counters).
        optimizer: ``"adam"`` (default), ``"sgd"`` or a callable ``params -> torch.optim.Optimizer``.
        fisher_data: an iterable of in-distribution batches (a DataLoader, a list of tensors or ``(x, y)`` tuples,
            or one tensor), used once at wrap time and not kept.
        fisher: a precomputed Fisher ``{parameter name: tensor}`` (e.g. ``other_eata.fisher``) instead of
            ``fisher_data``; names relative to the unwrapped model, one entry per adapted parameter.
        fisher_alpha: weight of the regulariser (CIFAR 1.0; official ImageNet 2000). ``0`` turns it off (ETA).
        fisher_samples: at most this many samples of ``fisher_data`` are used (2000, as official).
        momentum / weight_decay: for the built-in optimizers (SGD momentum only with ``optimizer="sgd"``).
        e_margin: entropy threshold ``E0``; ``None`` gives ``0.4 ln C`` with ``C`` the model's number of classes.
        d_margin: cosine threshold of the redundancy filter (CIFAR-10 0.4, CIFAR-100 0.1, ImageNet 0.05); a
            value above 1 keeps every reliable sample.
        norm / include / exclude: which norm layers adapt (as :class:`~adaptkit.Tent`).
        predict: ``"before"`` (official: the logits of the forward that produced the loss) or ``"after"`` (one
            more forward after the last update).
        check_inputs: validate each batch before adapting.

    Attributes:
        last_reliable / last_selected: ``|S1|`` and ``|S2|`` of the last step.
        num_reliable / num_selected / num_updates: totals since wrapping or the last :meth:`reset` (official
            ``num_samples_update_1`` / ``num_samples_update_2``) and the number of optimizer steps taken.
        average: the moving-average probability vector ``m`` (``None`` before the first reliable sample).
        fisher: ``{name: F}`` (``None`` without the regulariser).

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> clean = [torch.randn(8, 3, 32, 32) for _ in range(2)]  # in-distribution data, labels not needed
        >>> with adaptkit.EATA(model, fisher_data=clean, fisher_samples=16) as eata:
        ...     preds = eata(torch.randn(8, 3, 32, 32)).argmax(1)
        >>> preds.shape, eata.fisher_samples_used
        (torch.Size([8]), 16)
    """

    name = "eata"
    uses_grad = True
    default_episodic = False
    #: ``adaptkit bench`` hands source training images to this argument (the Fisher's in-distribution data)
    source_data_arg: ClassVar[str | None] = "fisher_data"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: OptimizerSpec = None,
        *,
        fisher_data: Iterable[Any] | torch.Tensor | None = None,
        fisher: Mapping[str, torch.Tensor] | None = None,
        fisher_alpha: float = 1.0,
        fisher_samples: int = 2000,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        e_margin: float | None = None,
        d_margin: float = 0.4,
        norm: str | Sequence[str] = "auto",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predict: str = "before",
        check_inputs: bool = True,
    ) -> None:
        who = type(self).__name__
        check_lr(lr, who)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"{who}: steps must be a positive integer, got {steps}")
        if predict not in ("before", "after"):
            raise ValueError(f"{who}: predict must be 'before' or 'after', got {predict!r}")
        if e_margin is not None and not (e_margin > 0 and math.isfinite(e_margin)):
            raise ValueError(f"{who}: e_margin must be a positive number or None (0.4 ln C), got {e_margin}")
        if not (d_margin > 0 and math.isfinite(d_margin)):
            raise ValueError(f"{who}: d_margin must be a positive number (> 1 disables the filter), got {d_margin}")
        if not (fisher_alpha >= 0 and math.isfinite(fisher_alpha)):
            raise ValueError(f"{who}: fisher_alpha must be >= 0, got {fisher_alpha}")
        if isinstance(fisher_samples, bool) or int(fisher_samples) != fisher_samples or fisher_samples < 1:
            raise ValueError(f"{who}: fisher_samples must be a positive integer, got {fisher_samples}")
        if fisher_data is not None and fisher is not None:
            raise ValueError(f"{who}: pass fisher_data or a precomputed fisher, not both")
        if fisher is not None and not isinstance(fisher, Mapping):
            raise TypeError(f"{who}: fisher must be a dict {{parameter name: tensor}}, got {type(fisher).__name__}")
        if isinstance(fisher_data, torch.Tensor):
            fisher_data = [fisher_data]  # one batch (iterating a tensor would yield single samples)
        if fisher_alpha > 0 and fisher_data is None and fisher is None:
            warnings.warn(
                f"adaptkit.{who}: no fisher_data (nor a precomputed fisher) given, so there is no anti-forgetting "
                "regulariser: this runs as ETA. Pass fisher_data=<in-distribution batches> to get EATA, or use "
                "adaptkit.ETA (or fisher_alpha=0) to say that ETA is what you want.",
                AdaptationWarning,
                stacklevel=2,
            )
        self.lr, self.steps, self.momentum, self.weight_decay = float(lr), int(steps), momentum, weight_decay
        self.e_margin = None if e_margin is None else float(e_margin)
        self.d_margin = float(d_margin)
        self.fisher_alpha = float(fisher_alpha)
        self.fisher_samples = int(fisher_samples)
        self.predict_when = predict
        self._opt_spec = optimizer
        self._norm, self._include, self._exclude = norm, include, exclude
        self._fisher_data = fisher_data if fisher_alpha > 0 else None  # used once in configure(), then dropped
        self._fisher_given = dict(fisher) if fisher is not None and fisher_alpha > 0 else None
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.fisher_samples_used = 0
        self._clear_counters()
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ configuration
    def configure(self) -> None:
        self.use_batch_statistics()  # BN-batch: buffers kept, never written (also during the Fisher pass)
        self._params = self._named_trainable()
        self.optimizer = build_optimizer(
            self._opt_spec, list(self._params.values()), self.lr, self.momentum, self.weight_decay, type(self).__name__
        )
        try:
            if self._fisher_given is not None:
                self.fisher = self._check_fisher(self._fisher_given)
            elif self._fisher_data is not None:
                self.fisher, self.fisher_samples_used = diagonal_fisher(
                    self.inner,
                    self._params,
                    self._fisher_data,
                    max_samples=self.fisher_samples,
                    logits=get_logits,
                    skip_single=bool(self.train_modules()),
                )
            if self.fisher is not None:
                with torch.inference_mode(False), torch.no_grad():
                    self.anchor = {n: p.detach().clone() for n, p in self._params.items()}
        finally:
            self._fisher_data = self._fisher_given = None  # never kept (a loader may hold a dataset)

    def _check_fisher(self, fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        who = type(self).__name__
        missing = sorted(set(self._params) - set(fisher))
        extra = sorted(set(fisher) - set(self._params))
        if missing or extra:
            raise ValueError(
                f"{who}: the fisher dict must have one entry per adapted parameter; missing {missing[:3]}, "
                f"unexpected {extra[:3]} (wrapper.fisher of an EATA with the same selection has the right keys)"
            )
        out = {}
        with torch.inference_mode(False), torch.no_grad():
            for n, p in self._params.items():
                f = fisher[n]
                if not isinstance(f, torch.Tensor) or f.shape != p.shape:
                    got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                    raise ValueError(f"{who}: fisher[{n!r}] has shape {got}, the parameter has {tuple(p.shape)}")
                out[n] = f.detach().to(device=p.device, dtype=p.dtype).clone()
        return out

    # ------------------------------------------------------------------ adaptation
    def margin(self, num_classes: int) -> float:
        """The entropy threshold ``E0`` for ``num_classes`` classes (``e_margin``, or ``0.4 ln C``)."""
        return self.e_margin if self.e_margin is not None else entropy_margin(num_classes)

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        out = self.model(x)
        ent, probs = per_sample_entropy_and_probs(get_logits(out))
        e0 = self.margin(probs.shape[1])
        reliable = reliable_mask(ent.detach(), e0)
        selected = reliable.clone()
        if self.average is not None:  # no history yet: every reliable sample is kept
            selected &= redundancy_mask(probs.detach(), self.average, self.d_margin)
        self.average = update_average(self.average, probs.detach()[selected], AVERAGE_MOMENTUM)
        n1, n2 = int(reliable.sum()), int(selected.sum())
        self.last_reliable, self.last_selected = n1, n2
        self.num_reliable += n1
        self.num_selected += n2
        if n2 > 0:
            h = ent[selected]
            loss = (h * entropy_weight(h, e0)).mean()
            if self.fisher is not None and self.anchor is not None:
                loss = loss + fisher_penalty(self._params, self.fisher, self.anchor, self.fisher_alpha)
            loss.backward()
            self.optimizer.step()
            self.num_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def predict(self, x: Any, last: Any) -> Any:
        if self.predict_when == "after":
            return self.model(x)
        return last

    # ------------------------------------------------------------------ state
    def _clear_counters(self) -> None:
        self.average: torch.Tensor | None = None
        self.last_reliable = self.last_selected = 0
        self.num_reliable = self.num_selected = self.num_updates = 0

    def reset_state(self) -> None:
        self._clear_counters()

    def method_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "average": None if self.average is None else self.average.detach().clone(),
            "num_reliable": self.num_reliable,
            "num_selected": self.num_selected,
            "num_updates": self.num_updates,
        }
        if self.fisher is not None and self.anchor is not None:
            for n in self.fisher:
                state[f"fisher.{n}"] = self.fisher[n].detach().clone()
                state[f"anchor.{n}"] = self.anchor[n].detach().clone()
        return state

    def load_method_state(self, state: dict[str, Any]) -> None:
        fisher = {k[len("fisher.") :]: v for k, v in state.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}
        if fisher:
            self.fisher = self._check_fisher(fisher)
            self.anchor = self._check_fisher(anchor)
        else:
            self.fisher = self.anchor = None  # the state was saved without a regulariser: reproduce that
        avg = state.get("average")
        device = next(iter(self._params.values())).device
        self.average = None if avg is None else avg.detach().to(device).clone()
        self.num_reliable = int(state.get("num_reliable", 0))
        self.num_selected = int(state.get("num_selected", 0))
        self.num_updates = int(state.get("num_updates", 0))
        self.last_reliable = self.last_selected = 0

    def extra_repr(self) -> str:
        e0 = "0.4*ln(C)" if self.e_margin is None else f"{self.e_margin:g}"
        reg = f", fisher_alpha={self.fisher_alpha:g}" if self.fisher is not None else ", fisher=None"
        return f"lr={self.lr}, e_margin={e0}, d_margin={self.d_margin:g}{reg}, " + super().extra_repr()
