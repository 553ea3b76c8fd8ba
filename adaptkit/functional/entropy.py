"""Entropy of softmax predictions: per sample and of the average prediction."""

from __future__ import annotations

import math

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


def marginal_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of the *average* prediction of a set of logits: ``H(p_bar)``, ``p_bar = mean_i softmax(logits_i)``.

    The set runs along axis 0 (MEMO's augmented copies of one image), classes along ``dim``. ``log p_bar`` is
    computed as ``logsumexp_i log_softmax(logits_i) - log n`` and clamped to the dtype's smallest finite value
    (MEMO's reference), so the result stays finite for saturated logits.

    Args:
        logits: ``(n, C)`` (or ``(n, C, ...)``: one marginal per remaining position).
        dim: the class dimension (not 0).

    Returns:
        The entropy of the marginal: a scalar for ``(n, C)`` input.

    Example:
        >>> import torch
        >>> from adaptkit.functional import marginal_entropy
        >>> # two confident copies that disagree: the average is uniform over 2 of 4 classes -> log 2
        >>> round(float(marginal_entropy(torch.tensor([[50.0, 0, 0, 0], [0, 50.0, 0, 0]]))), 4)
        0.6931
    """
    if dim % logits.dim() == 0:
        raise ValueError("marginal_entropy: dim must not be 0 (axis 0 holds the copies that are averaged)")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("marginal_entropy: got an empty set of logits")
    log_p = logits.log_softmax(dim)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(n)
    log_mean = log_mean.clamp_min(torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum(dim - 1 if dim > 0 else dim)
