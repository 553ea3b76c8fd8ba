"""Sample filters of the entropy-based methods (EATA/ETA, SAR, DeYO ...): reliability and redundancy.

Pure functions on per-sample entropies and probabilities; the methods hold the thresholds and the moving
average. EATA (Niu et al., ICML 2022) and SAR (Niu et al., ICLR 2023) keep a sample when its entropy is below
``E0 = 0.4 * ln C``; EATA also drops samples whose prediction is too similar (cosine) to a moving average of
recent predictions, and weights the rest by ``exp(E0 - H)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """The reliability threshold ``E0 = factor * ln(num_classes)`` of EATA and SAR (``factor = 0.4``).

    Example:
        >>> from adaptkit.functional.filters import entropy_margin
        >>> round(entropy_margin(1000), 4)
        2.7631
    """
    if num_classes < 2:
        raise ValueError(f"entropy_margin: need at least 2 classes, got {num_classes}")
    return factor * math.log(num_classes)


def reliable_mask(entropy: torch.Tensor, margin: float) -> torch.Tensor:
    """``entropy < margin``: the samples confident enough to learn from (boolean, same shape).

    Example:
        >>> import torch
        >>> from adaptkit.functional.filters import reliable_mask
        >>> reliable_mask(torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist()
        [True, False, False]
    """
    return entropy < margin


def redundancy_mask(probs: torch.Tensor, average: torch.Tensor | None, margin: float) -> torch.Tensor:
    """EATA's non-redundancy test: ``|cos(p_i, m)| < margin`` against the moving-average prediction ``m``.

    Args:
        probs: ``(B, C)`` softmax probabilities.
        average: ``(C,)`` moving-average probability vector, or ``None`` (no history yet: every sample kept).
        margin: EATA's ``d_margin`` (0.05 ImageNet, 0.4 CIFAR-10).

    Example:
        >>> import torch
        >>> from adaptkit.functional.filters import redundancy_mask
        >>> m = torch.tensor([1.0, 0.0])
        >>> redundancy_mask(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), m, 0.5).tolist()  # cos 1 and 0
        [False, True]
    """
    if average is None:
        return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    cos = F.cosine_similarity(average.to(probs.dtype).unsqueeze(0), probs, dim=1)
    return cos.abs() < margin


def update_average(average: torch.Tensor | None, probs: torch.Tensor, momentum: float = 0.9) -> torch.Tensor | None:
    """EATA's moving average of predictions: ``m <- momentum * m + (1 - momentum) * mean_i p_i``.

    With no history (``average is None``) the batch mean itself; with no sample (``probs`` empty) ``average``
    unchanged. The result is detached.

    Example:
        >>> import torch
        >>> from adaptkit.functional.filters import update_average
        >>> m = update_average(None, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> m.tolist(), update_average(m, torch.tensor([[1.0, 0.0]])).tolist()
        ([0.5, 0.5], [0.550000011920929, 0.44999998807907104])
    """
    if probs.shape[0] == 0:
        return average
    mean = probs.detach().mean(0)
    if average is None:
        return mean
    return momentum * average + (1.0 - momentum) * mean


def entropy_weight(entropy: torch.Tensor, margin: float) -> torch.Tensor:
    """EATA's sample weight ``exp(E0 - H)`` (detached: it scales the loss, it is not optimised).

    Example:
        >>> import torch
        >>> from adaptkit.functional.filters import entropy_weight
        >>> entropy_weight(torch.tensor([1.0]), 1.0).tolist()
        [1.0]
    """
    return torch.exp(margin - entropy.detach())
