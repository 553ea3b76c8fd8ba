"""ETA: EATA without the Fisher regulariser (Niu et al., ICML 2022): no source data needed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch.nn as nn

from adaptkit.core.optim import OptimizerSpec
from adaptkit.methods.eata import EATA
from adaptkit.registry import register_method


@register_method
class ETA(EATA):
    """Entropy minimisation on reliable, non-redundant samples (EATA without its anti-forgetting regulariser).

    Everything of :class:`~adaptkit.EATA` (sample filters, entropy weights, moving average, counters, norm-layer
    affine parameters, predict-then-update) except the Fisher term, so no in-distribution data is needed.
    See ``docs/methods/eata.md``.

    Args:
        model: a classifier (logits ``(B, C)``) or dense predictor (filtered per image).
        lr: learning rate (default: CIFAR setting, Adam 1e-3; official ImageNet: ``optimizer="sgd", lr=2.5e-4``).
        steps: optimisation steps per batch.
        episodic: reset before every batch (default ``False``: online).
        optimizer: ``"adam"`` (default), ``"sgd"`` or a callable ``params -> torch.optim.Optimizer``.
        momentum / weight_decay: for the built-in optimizers.
        e_margin: entropy threshold ``E0``; ``None`` gives ``0.4 ln C``.
        d_margin: cosine threshold of the redundancy filter (CIFAR-10 0.4, CIFAR-100 0.1, ImageNet 0.05).
        norm / include / exclude: which norm layers adapt (as :class:`~adaptkit.Tent`).
        predict: ``"before"`` (official) or ``"after"`` the update.
        check_inputs: validate each batch before adapting.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.ETA(model, e_margin=3.0) as eta:  # a random net is unsure: a high E0 lets samples in
        ...     preds = eta(torch.randn(8, 3, 32, 32)).argmax(1)
        ...     counts = eta.last_reliable, eta.last_selected, eta.num_updates
        >>> preds.shape, counts
        (torch.Size([8]), (8, 8, 1))
    """

    name = "eta"
    source_data_arg: ClassVar[str | None] = None  # ETA takes no source data

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
        e_margin: float | None = None,
        d_margin: float = 0.4,
        norm: str | Sequence[str] = "auto",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predict: str = "before",
        check_inputs: bool = True,
    ) -> None:
        super().__init__(
            model,
            lr,
            steps,
            episodic,
            optimizer,
            fisher_alpha=0.0,
            momentum=momentum,
            weight_decay=weight_decay,
            e_margin=e_margin,
            d_margin=d_margin,
            norm=norm,
            include=include,
            exclude=exclude,
            predict=predict,
            check_inputs=check_inputs,
        )
