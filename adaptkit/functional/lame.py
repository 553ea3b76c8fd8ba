"""LAME (Boudiaf et al., CVPR 2022): affinity matrices and the Laplacian-regularised fixed-point solver.

Pure functions, torch only. Given a batch's source log-probabilities ``log p`` ``(N, C)``, L2-normalised
penultimate features ``f`` ``(N, d)`` and an affinity matrix ``W`` ``(N, N)``, LAME returns the assignments ``Y``
``(N, C)`` (rows on the simplex) found by the bound-optimisation fixed point of the official code
(fiveai/LAME, ``src/adaptation/lame.py``)::

    Y_0 = p;    Y_{n+1} = softmax(log p + lam * W @ Y_n)   (row-wise)

stopping after ``max_iters`` updates or when the relative change of the energy
``E_n = sum_i [ y_i . (-log p_i) - lam * y_i . (W Y_{n-1})_i + y_i . log y_i ]`` is at most ``tol`` (tested from
the third update on, as the official ``i > 1``). For a symmetric positive semi-definite ``W`` (the RBF and
linear affinities) each update does not increase the objective
``sum_i KL(y_i || p_i) - lam / 2 * sum_ij W_ij y_i . y_j`` (a concave-convex bound step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "AFFINITIES",
    "LAMEResult",
    "affinity_matrix",
    "feature_distances",
    "knn_affinity",
    "lame",
    "laplacian_fixed_point",
    "linear_affinity",
    "rbf_affinity",
]

#: the paper's three affinities (LAME-K / LAME-R / LAME-L in its tables)
AFFINITIES = ("knn", "rbf", "linear")


def feature_distances(feats: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``feats`` ``(N, d)``: ``(N, N)``, exactly 0 on the diagonal.

    Computed from differences (not the ``|a|^2 + |b|^2 - 2ab`` expansion), as the official
    ``torch.norm(X[None] - X[:, None], dim=-1)``, without the ``(N, N, d)`` intermediate.

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import feature_distances
        >>> feature_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).tolist()
        [[0.0, 5.0], [5.0, 0.0]]
    """
    return torch.cdist(feats, feats, compute_mode="donot_use_mm_for_euclid_dist")


def knn_affinity(feats: torch.Tensor, knn: int) -> torch.Tensor:
    """``W_ij = 1`` if ``j`` is one of the ``knn`` nearest neighbours of ``i`` (itself excluded), else 0.

    Not symmetric (official default; see ``force_symmetry`` in :func:`affinity_matrix`). ``knn`` is clamped to
    ``N - 1``; one sample gives ``W = 0``.

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import knn_affinity
        >>> knn_affinity(torch.tensor([[0.0], [1.0], [3.0]]), 1).tolist()
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    n = feats.shape[0]
    k = min(int(knn), n - 1)
    w = torch.zeros(n, n, dtype=feats.dtype, device=feats.device)
    if k <= 0:
        return w
    dist = feature_distances(feats)
    dist.fill_diagonal_(float("inf"))  # the official code drops the first (closest) entry, assumed to be itself
    idx = dist.topk(k, dim=-1, largest=False).indices
    return w.scatter_(-1, idx, 1.0)


def rbf_affinity(feats: torch.Tensor, knn: int) -> torch.Tensor:
    """``W_ij = exp(-d_ij^2 / (2 sigma^2))``, ``sigma`` = mean over ``i`` of the ``knn``-th smallest ``d_ij``.

    As in the official code, the ``knn``-th smallest distance counts ``d_ii = 0`` (so ``knn=5`` is the distance to
    the 4th other sample), ``knn`` is clamped to ``N``, the configured ``sigma`` of the official config is
    ignored, and the self-affinity ``W_ii = 1`` is kept. Where ``sigma`` is 0 (every sample has ``knn - 1``
    exact duplicates) the kernel's limit is used: 1 for identical features, 0 otherwise.

    Raises:
        ValueError: ``knn < 2`` (``sigma`` would always be 0: the official code returns NaN there).

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import rbf_affinity
        >>> w = rbf_affinity(torch.tensor([[0.0], [1.0], [2.0]]), 2)  # sigma = mean(1, 1, 1) = 1
        >>> [round(v, 4) for v in w[0].tolist()]
        [1.0, 0.6065, 0.1353]
    """
    if int(knn) < 2:
        raise ValueError(
            f"rbf_affinity: knn must be >= 2, got {knn} (sigma is the mean distance to the knn-th nearest sample "
            "counting the sample itself, so knn=1 gives sigma = 0)"
        )
    n = feats.shape[0]
    dist = feature_distances(feats)
    k = min(int(knn), n)
    sigma = dist.topk(k, dim=-1, largest=False).values[:, -1].mean()
    w = torch.exp(-dist.square() / (2 * sigma.square()))
    return torch.where(dist == 0, torch.ones_like(w), w)  # sigma = 0: the limit (0/0 on identical features)


def linear_affinity(feats: torch.Tensor) -> torch.Tensor:
    """``W = F F^T`` (cosine similarities for L2-normalised features; the diagonal is kept).

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import linear_affinity
        >>> linear_affinity(torch.tensor([[1.0, 0.0], [0.6, 0.8]])).tolist()
        [[1.0, 0.6000000238418579], [0.6000000238418579, 1.0]]
    """
    return feats @ feats.T


def affinity_matrix(
    feats: torch.Tensor, kind: str = "rbf", knn: int = 5, force_symmetry: bool = False
) -> torch.Tensor:
    """The ``(N, N)`` affinity of ``feats`` (use L2-normalised features, as LAME does).

    Args:
        feats: ``(N, d)`` features.
        kind: ``"rbf"`` (official default), ``"knn"`` or ``"linear"`` (case-insensitive).
        knn: neighbours for ``"knn"``; the rank of the distance that sets ``sigma`` for ``"rbf"``.
        force_symmetry: return ``(W + W^T) / 2`` (official ``LAME_FORCE_SYMMETRY``, default off).

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import affinity_matrix
        >>> affinity_matrix(torch.eye(3), "knn", knn=1, force_symmetry=True).shape
        torch.Size([3, 3])
    """
    k = kind.lower()
    if k == "knn":
        w = knn_affinity(feats, knn)
    elif k == "rbf":
        w = rbf_affinity(feats, knn)
    elif k == "linear":
        w = linear_affinity(feats)
    else:
        raise ValueError(f"affinity must be one of {list(AFFINITIES)}, got {kind!r}")
    return (w + w.T) / 2 if force_symmetry else w


class LAMEResult(NamedTuple):
    """Output of :func:`laplacian_fixed_point`.

    Attributes:
        log_y: ``log Y`` ``(N, C)``, finite (a ``log_softmax``); ``log_y.exp()`` is ``Y``.
        iterations: updates made (``1 .. max_iters``).
        energy: the energy ``E`` of the last update (see the module docstring).
    """

    log_y: torch.Tensor
    iterations: int
    energy: float


def laplacian_fixed_point(
    log_p: torch.Tensor,
    kernel: torch.Tensor,
    lam: float = 1.0,
    max_iters: int = 100,
    tol: float = 1e-8,
) -> LAMEResult:
    """LAME's fixed-point iteration ``Y <- softmax(log p + lam * kernel @ Y)`` from ``Y = p``.

    Args:
        log_p: source log-probabilities ``(N, C)``.
        kernel: affinity ``(N, N)``.
        lam: weight of the Laplacian term (official ``bound_lambda``, 1).
        max_iters: most updates (official 100).
        tol: stop when ``|E_n - E_{n-1}| <= tol * |E_{n-1}|``, checked from the third update on (official
            1e-8 and ``i > 1``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import laplacian_fixed_point
        >>> log_p = torch.tensor([[0.9, 0.1], [0.4, 0.6]]).log()
        >>> res = laplacian_fixed_point(log_p, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        >>> res.log_y.exp().argmax(1).tolist(), res.iterations < 100
        ([0, 0], True)
    """
    y = log_p.exp()
    log_y = log_p
    old = math.inf
    energy = math.nan
    it = 0
    for it in range(1, int(max_iters) + 1):
        pairwise = lam * (kernel @ y)
        log_y = torch.log_softmax(log_p + pairwise, dim=-1)
        y = log_y.exp()
        energy = float((y * (log_y - log_p - pairwise)).sum())
        if it > 2 and abs(energy - old) <= tol * abs(old):
            break
        old = energy
    return LAMEResult(log_y, it, energy)


def lame(
    logits: torch.Tensor,
    feats: torch.Tensor,
    affinity: str = "rbf",
    knn: int = 5,
    lam: float = 1.0,
    max_iters: int = 100,
    tol: float = 1e-8,
    force_symmetry: bool = False,
) -> LAMEResult:
    """LAME on one batch: source ``logits`` ``(N, C)`` and penultimate ``feats`` ``(N, d)`` -> ``log Y``.

    The features are L2-normalised, the affinity built (:func:`affinity_matrix`) and the fixed point solved
    (:func:`laplacian_fixed_point`) in at least float32. A single sample has no neighbours: ``Y = p``
    (``iterations == 0``), for every affinity.

    Example:
        >>> import torch
        >>> from adaptkit.functional.lame import lame
        >>> g = torch.Generator().manual_seed(0)
        >>> res = lame(torch.randn(8, 3, generator=g), torch.randn(8, 16, generator=g), "knn", knn=3)
        >>> res.log_y.shape, bool(torch.allclose(res.log_y.exp().sum(1), torch.ones(8)))
        (torch.Size([8, 3]), True)
    """
    if logits.dim() != 2 or feats.dim() != 2 or logits.shape[0] != feats.shape[0]:
        raise ValueError(
            f"lame: expected logits (N, C) and features (N, d) for the same N, got {tuple(logits.shape)} and "
            f"{tuple(feats.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(logits.dtype, feats.dtype), torch.float32)
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    if logits.shape[0] == 1:
        return LAMEResult(log_p, 0, math.nan)
    f = F.normalize(feats.to(dtype), p=2, dim=-1)
    kernel = affinity_matrix(f, affinity, knn, force_symmetry)
    return laplacian_fixed_point(log_p, kernel, lam, max_iters, tol)
