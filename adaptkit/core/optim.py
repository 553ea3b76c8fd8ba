"""The built-in optimizer choices shared by every gradient method and the head-training helper."""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn as nn

OptimizerSpec = Union[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer], None]


def check_lr(lr: float, who: str) -> float:
    """``lr`` as a float, or a ``ValueError`` naming ``who`` when it is not a finite positive number.

    Example:
        >>> from adaptkit.core.optim import check_lr
        >>> check_lr(1e-3, "Tent")
        0.001
    """
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: lr must be a positive number, got {lr!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{who}: lr must be positive and finite, got {lr}")
    return value


def build_optimizer(
    spec: OptimizerSpec, params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float, who: str
) -> torch.optim.Optimizer:
    """``"adam"`` (betas 0.9/0.999), ``"sgd"`` (with ``momentum``) or a callable ``params -> Optimizer``."""
    if spec is None or spec == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{who}: optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    raise ValueError(f"{who}: optimizer must be 'adam', 'sgd' or a callable params -> Optimizer, got {spec!r}")
