"""ClusT3's information-maximisation (IM) clustering loss (Hakim et al., ICCV 2023; spec ncttt.md section 2).

A projector maps a feature map to cluster logits ``(B, K, H, W)``. Every spatial location of every image is
one point ``i`` with a softmax ``p_i`` over the ``K`` clusters (``N = B*H*W`` points), and

``L_IM = H(Z|X) - H(Z)``, with ``H(Z|X) = (1/N) sum_i H(p_i)`` (mean per-point entropy: confident assignments)
and ``H(Z) = H(p_bar)``, ``p_bar = (1/N) sum_i p_i`` (marginal entropy: balanced clusters).

The official code views the ``(B, K, H, W)`` logits as ``(K, B*H*W)`` without a permute, so its "softmax over
the K clusters" runs over memory-strided entries of *different images and channels* (pitfall 2 of the spec).
Here the cluster axis is moved last before flattening, so each group really is one location's K logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class IMTerms(NamedTuple):
    """The information-maximisation loss and its two terms (scalars)."""

    #: ``conditional_entropy - marginal_entropy`` (minimised)
    loss: torch.Tensor
    #: ``H(Z|X)``: mean over points of the entropy of each point's cluster distribution
    conditional_entropy: torch.Tensor
    #: ``H(Z)``: entropy of the mean cluster distribution
    marginal_entropy: torch.Tensor


def cluster_log_probs(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-point cluster log-probabilities ``(N, K)``: the cluster axis ``dim`` is moved last, every other axis
    is flattened into points (``N = B*H*W`` for ``(B, K, H, W)`` maps), then ``log_softmax`` over ``K``.

    Args:
        logits: cluster logits with the ``K`` clusters along ``dim`` (``(B, K, H, W)``, ``(N, K)``, ...).
        dim: the cluster axis.

    Raises:
        ValueError: fewer than 2 dimensions, or no point or no cluster.

    Example:
        >>> import torch
        >>> from adaptkit.functional.clust3 import cluster_log_probs
        >>> cluster_log_probs(torch.zeros(2, 3, 4, 5)).shape  # 2*4*5 points, 3 clusters
        torch.Size([40, 3])
    """
    if logits.dim() < 2:
        raise ValueError(f"cluster logits need a point axis and a cluster axis, got shape {tuple(logits.shape)}")
    k = logits.shape[dim]
    if k < 1 or logits.numel() == 0:
        raise ValueError(f"cluster logits of shape {tuple(logits.shape)} hold no point or no cluster")
    return logits.movedim(dim, -1).reshape(-1, k).log_softmax(dim=1)


def information_maximization_terms(logits: torch.Tensor, dim: int = 1) -> IMTerms:
    """``L_IM = H(Z|X) - H(Z)`` of cluster logits, with both terms (see the module docstring).

    Both entropies are computed from log-probabilities (``log_softmax``, and ``logsumexp`` for the marginal),
    so they stay finite for saturated logits. ``L_IM`` lies in ``[-log K, log K]``; its minimum ``-log K`` is
    reached by confident assignments spread evenly over the ``K`` clusters.

    Args:
        logits: cluster logits, ``K`` clusters along ``dim`` (``(B, K, H, W)`` maps or ``(N, K)`` vectors).
        dim: the cluster axis.

    Returns:
        :class:`IMTerms` ``(loss, conditional_entropy, marginal_entropy)``, each a scalar tensor.

    Example:
        >>> import torch
        >>> from adaptkit.functional.clust3 import information_maximization_terms
        >>> t = information_maximization_terms(torch.tensor([[9.0, -9.0], [-9.0, 9.0]]))  # confident, balanced
        >>> round(t.conditional_entropy.item(), 4), round(t.marginal_entropy.item(), 4), round(t.loss.item(), 4)
        (0.0, 0.6931, -0.6931)
    """
    log_p = cluster_log_probs(logits, dim)
    conditional = -(log_p.exp() * log_p).sum(dim=1).mean()
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])  # log p_bar, (K,)
    marginal = -(log_mean.exp() * log_mean).sum()
    return IMTerms(conditional - marginal, conditional, marginal)


def information_maximization_loss(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """ClusT3's clustering loss ``L_IM = H(Z|X) - H(Z)`` (scalar); see :func:`information_maximization_terms`.

    Args:
        logits: cluster logits, ``K`` clusters along ``dim`` (``(B, K, H, W)`` maps or ``(N, K)`` vectors).
        dim: the cluster axis.

    Example:
        >>> import torch
        >>> from adaptkit.functional.clust3 import information_maximization_loss
        >>> round(information_maximization_loss(torch.zeros(4, 10, 3, 3)).item(), 6)  # uniform points: 0
        0.0
    """
    return information_maximization_terms(logits, dim).loss
