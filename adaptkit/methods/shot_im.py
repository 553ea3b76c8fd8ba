"""SHOT-IM: the information-maximisation part of SHOT (Liang et al., ICML 2020), online, on norm-layer affine
parameters (the test-time variant of the LAME benchmark, Boudiaf et al., CVPR 2022).

Official code: tim-learn/SHOT ``object/image_target.py`` (loss: ``ent`` + ``gent`` terms, ``ent_par`` 1.0, epsilon
1e-5); online variant: fiveai/LAME ``src/adaptation/shot.py`` with ``configs/method/best/Shot/overall_best.yaml``
(SGD lr 1e-3, momentum 0, all BatchNorm affine parameters) and ``src/config/defaults.py`` (weight decay 1e-4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.optim import OptimizerSpec, build_optimizer, check_lr
from adaptkit.functional.clust3 import information_maximization_terms
from adaptkit.methods._norm_affine import NormAffineMixin
from adaptkit.registry import register_method


@register_method
class SHOTIM(NormAffineMixin, TTAMethod):
    """Make each prediction confident and the batch's predictions diverse: minimise ``mean_i H(p_i) - H(p_bar)``.

    Per batch: forward (BatchNorm in batch-statistics form, as :class:`~adaptkit.Tent`), loss
    ``L = mean_i H(p_i) - diversity_weight * H(p_bar)`` with ``p_bar`` the batch-mean softmax, one optimizer step on
    the norm-layer affine parameters (BatchNorm; LayerNorm / GroupNorm on BatchNorm-free models). The entropies are
    computed from ``log_softmax`` / ``logsumexp`` (:func:`adaptkit.functional.clust3.information_maximization_terms`)
    instead of the official ``log(p + 1e-5)``: the same value up to ~1e-5 per class, finite for saturated logits.
    The classifier-free SHOT-IM leaves out full SHOT's pseudo-label term (``cls_par`` 0.3).

    Dense outputs (``(B, C, H, W)`` or a dict with ``"out"``): every pixel is a sample (``p_bar`` is the mean over
    all pixels of the batch).

    Args:
        model: a classifier (logits ``(B, C)``) or dense predictor.
        lr: learning rate (online variant: SGD 1e-3).
        steps: optimisation steps per batch (1).
        episodic: reset before every batch (default ``False``: online).
        optimizer: ``"sgd"`` (default), ``"adam"`` or a callable ``params -> torch.optim.Optimizer``.
        momentum: SGD momentum (online variant: 0).
        weight_decay: weight decay (LAME benchmark default: 1e-4).
        diversity_weight: weight of ``H(p_bar)`` (1.0; 0 gives Tent's entropy loss). The diversity term assumes
            class-balanced batches.
        norm / include / exclude: which norm layers adapt (as :class:`~adaptkit.Tent`).
        predict: ``"after"`` (default, the online variant's protocol: adapt on the batch, then predict it with the
            updated parameters; one extra forward) or ``"before"`` (the logits of the forward that produced the
            loss, no extra cost).
        check_inputs: validate each batch before adapting.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.SHOTIM(model, lr=1e-3) as shot:
        ...     preds = shot(torch.randn(8, 3, 32, 32)).argmax(1)
        >>> preds.shape
        torch.Size([8])
    """

    name = "shot_im"
    uses_grad = True
    default_episodic = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: OptimizerSpec = "sgd",
        *,
        momentum: float = 0.0,
        weight_decay: float = 1e-4,
        diversity_weight: float = 1.0,
        norm: str | Sequence[str] = "auto",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predict: str = "after",
        check_inputs: bool = True,
    ) -> None:
        check_lr(lr, "SHOTIM")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"SHOTIM: steps must be a positive integer, got {steps}")
        if not (momentum >= 0 and weight_decay >= 0):
            raise ValueError(f"SHOTIM: momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if not math.isfinite(diversity_weight) or diversity_weight < 0:
            raise ValueError(f"SHOTIM: diversity_weight must be a finite number >= 0, got {diversity_weight}")
        if predict not in ("before", "after"):
            raise ValueError(f"SHOTIM: predict must be 'before' or 'after', got {predict!r}")
        self.lr, self.steps, self.momentum, self.weight_decay = float(lr), int(steps), momentum, weight_decay
        self.diversity_weight = float(diversity_weight)
        self.predict_when = predict
        self._opt_spec = optimizer
        self._norm, self._include, self._exclude = norm, include, exclude
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    def configure(self) -> None:
        self.use_batch_statistics()  # batch statistics; buffers kept, never written
        self.optimizer = build_optimizer(
            self._opt_spec, self.trainable_parameters(), self.lr, self.momentum, self.weight_decay, "SHOTIM"
        )

    def loss(self, output: Any) -> torch.Tensor:
        """``mean_i H(p_i) - diversity_weight * H(p_bar)`` of the output's logits (pixels are samples)."""
        terms = information_maximization_terms(get_logits(output), dim=1)
        return terms.conditional_entropy - self.diversity_weight * terms.marginal_entropy

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        out = self.model(x)
        self.loss(out).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def predict(self, x: Any, last: Any) -> Any:
        if self.predict_when == "after":
            return self.model(x)
        return last

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, diversity_weight={self.diversity_weight:g}, predict={self.predict_when!r}, "
            + super().extra_repr()
        )
