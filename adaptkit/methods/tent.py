"""Tent: test-time entropy minimisation on normalisation-layer affine parameters (Wang et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.optim import OptimizerSpec, build_optimizer, check_lr
from adaptkit.functional.entropy import softmax_entropy
from adaptkit.methods._norm_affine import NormAffineMixin
from adaptkit.registry import register_method


@register_method
class Tent(NormAffineMixin, TTAMethod):
    """Minimise the softmax entropy of the predictions by updating norm-layer affine parameters.

    BatchNorm layers normalise with the current batch's statistics (training form, ``track_running_stats``
    off for the duration), so the source running statistics are kept intact - unlike the reference code,
    which deletes them. Models without BatchNorm (ViT, ConvNeXt) adapt their LayerNorm / GroupNorm affine
    parameters instead. Predictions are the logits of the forward that produced the loss, i.e. *before*
    that step's update (reference behaviour); ``predict="after"`` runs one more forward after the update.

    Args:
        model: a classifier (logits ``(B, C)``) or dense predictor (``(B, C, H, W)`` or a dict with ``"out"``).
        lr: learning rate (reference CIFAR: 1e-3 with Adam; ImageNet: 2.5e-4 with SGD momentum 0.9).
        steps: optimisation steps per batch.
        episodic: reset before every batch (default ``False``: online).
        optimizer: ``"adam"`` (default), ``"sgd"`` or a callable ``params -> torch.optim.Optimizer``.
        momentum: SGD momentum when ``optimizer="sgd"``.
        weight_decay: weight decay for the built-in optimizers.
        norm: ``"auto"`` (BatchNorm if the model has any, else LayerNorm + GroupNorm) or a list of kinds
            among ``"batch"``, ``"layer"``, ``"group"``.
        include / exclude: restrict the norm layers (full-match regex or list of names / dotted suffixes).
        predict: ``"before"`` (reference) or ``"after"`` the update.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.Tent(model, lr=1e-3) as tent:
        ...     preds = tent(torch.randn(8, 3, 32, 32)).argmax(1)
        >>> preds.shape
        torch.Size([8])
    """

    name = "tent"
    uses_grad = True
    default_episodic = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: OptimizerSpec = None,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        norm: str | Sequence[str] = "auto",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predict: str = "before",
        check_inputs: bool = True,
    ) -> None:
        check_lr(lr, "Tent")
        if int(steps) < 1:
            raise ValueError(f"Tent: steps must be >= 1, got {steps}")
        if predict not in ("before", "after"):
            raise ValueError(f"Tent: predict must be 'before' or 'after', got {predict!r}")
        self.lr, self.steps, self.momentum, self.weight_decay = float(lr), int(steps), momentum, weight_decay
        self.predict_when = predict
        self._opt_spec = optimizer
        self._norm, self._include, self._exclude = norm, include, exclude
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    def configure(self) -> None:
        self.use_batch_statistics()  # batch statistics; buffers kept, never written
        self.optimizer = build_optimizer(
            self._opt_spec, self.trainable_parameters(), self.lr, self.momentum, self.weight_decay, "Tent"
        )

    def loss(self, output: Any) -> torch.Tensor:
        """Mean softmax entropy of the logits (per pixel for dense outputs)."""
        return softmax_entropy(get_logits(output), dim=1).mean()

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        out = self.model(x)
        loss = self.loss(out)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def predict(self, x: Any, last: Any) -> Any:
        if self.predict_when == "after":
            return self.model(x)
        return last

    def extra_repr(self) -> str:
        return f"lr={self.lr}, steps={self.steps}, predict={self.predict_when!r}, " + super().extra_repr()
