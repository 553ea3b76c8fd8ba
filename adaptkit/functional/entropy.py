"""Entropy of softmax predictions."""

from __future__ import annotations

import torch


def softmax_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy ``-sum_c p_c log p_c`` of ``softmax(logits)`` along ``dim``.

    Computed from ``log_softmax`` so that it stays finite for saturated logits.

    Args:
        logits: unnormalised scores, classes along ``dim`` (``(B, C)`` or ``(B, C, H, W)``).
        dim: the class dimension.

    Returns:
        The entropy per sample (per pixel for dense outputs): ``logits`` with ``dim`` removed.

    Example:
        >>> import torch
        >>> from adaptkit.functional import softmax_entropy
        >>> float(softmax_entropy(torch.zeros(1, 4))[0])  # uniform over 4 classes: log 4
        1.3862943649291992
    """
    log_p = logits.log_softmax(dim)
    return -(log_p.exp() * log_p).sum(dim)
