"""TTT++ losses (Liu et al. 2021; spec ../shared/reference/baselines.md section 10): the SimCLR NT-Xent
contrastive loss and the two feature-alignment terms (CORAL on covariances, a linear discrepancy on means).

Notation: ``z1``, ``z2`` the projections of two augmented views of the same ``B`` images; ``d`` the feature
dimension; covariances are the unbiased ``(N - 1)``-normalised sample covariances of ``(N, d)`` features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over the ``2B`` views.

    Every view is an anchor; its positive is the other view of the same image, its negatives the other
    ``2B - 2`` views. With cosine similarities ``s_ij`` (self-similarity masked out):

    ``loss = mean_i -log( exp(s_{i,p(i)} / T) / sum_{j != i} exp(s_ij / T) )``.

    This is the released code's ``SupConLoss`` without labels up to its constant factor
    ``temperature / base_temperature`` (see :class:`~adaptkit.methods.tttpp.TTTPlusPlus`, ``ssl_weight``).

    Args:
        z1: ``(B, D)`` projections of the first views (any scale: they are L2-normalised here).
        z2: ``(B, D)`` projections of the second views.
        temperature: ``T`` (TTT++ uses 0.5).

    Example:
        >>> import math, torch
        >>> from adaptkit.functional.tttpp import nt_xent_loss
        >>> z = torch.eye(2)  # image 0 and 1, views identical, images orthogonal
        >>> want = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(0)))
        >>> round(nt_xent_loss(z, z, temperature=0.5).item(), 5) == round(want, 5)
        True
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent_loss: need two (B, D) tensors of the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")  # fmt: skip
    if temperature <= 0:
        raise ValueError(f"nt_xent_loss: temperature must be positive, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, pos)


def feature_moments(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``(N, d)`` features (``N >= 2``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.tttpp import feature_moments
        >>> mu, cov = feature_moments(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> mu.tolist(), cov.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    if feats.dim() != 2:
        raise ValueError(f"feature_moments: need (N, d) features, got shape {tuple(feats.shape)}")
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"feature_moments: the unbiased covariance needs at least 2 samples, got {n}")
    mu = feats.mean(dim=0)
    centred = feats - mu
    return mu, centred.t() @ centred / (n - 1)


def coral_loss(cov_s: torch.Tensor, cov_t: torch.Tensor) -> torch.Tensor:
    """CORAL: ``||cov_s - cov_t||_F^2 / (4 d^2)`` for ``(d, d)`` covariances.

    Example:
        >>> import torch
        >>> from adaptkit.functional.tttpp import coral_loss
        >>> coral_loss(torch.eye(2), torch.zeros(2, 2)).item()  # 2 / (4 * 4)
        0.125
    """
    if cov_s.shape != cov_t.shape or cov_s.dim() != 2 or cov_s.shape[0] != cov_s.shape[1]:
        raise ValueError(f"coral_loss: need two (d, d) covariances, got {tuple(cov_s.shape)} and "
                         f"{tuple(cov_t.shape)}")  # fmt: skip
    d = cov_s.shape[0]
    return (cov_s - cov_t).pow(2).sum() / (4.0 * d * d)


def mean_discrepancy(mu_s: torch.Tensor, mu_t: torch.Tensor) -> torch.Tensor:
    """Linear discrepancy of means (the released code's ``linear_mmd``): ``mean((mu_s - mu_t)^2)``.

    Example:
        >>> import torch
        >>> from adaptkit.functional.tttpp import mean_discrepancy
        >>> mean_discrepancy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).item()
        0.5
    """
    if mu_s.shape != mu_t.shape:
        raise ValueError(f"mean_discrepancy: shapes differ: {tuple(mu_s.shape)} vs {tuple(mu_t.shape)}")
    return (mu_s - mu_t).pow(2).mean()
