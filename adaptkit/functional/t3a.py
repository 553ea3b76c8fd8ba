"""T3A (Iwasawa & Matsuo, NeurIPS 2021): support sets and prototypes, as pure functions.

A support set holds features ``z`` ``(M, d)``, their pseudo-labels ``(M,)`` (class indices) and the entropies of
the source predictions ``(M,)``. It starts from the rows of the linear classifier's weight (each labelled by the
classifier's own argmax on it), grows by every test batch and is filtered to the ``filter_k`` lowest-entropy
supports of each class; the prototype of class ``k`` is the normalised sum of its normalised supports and the
logits are ``z @ prototypes.T``. Official code: matsuolab/T3A, ``domainbed/adapt_algorithms.py`` (class ``T3A``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from adaptkit.functional.entropy import softmax_entropy

__all__ = ["Supports", "append_supports", "prototypes", "select_supports", "t3a_logits", "warmup_supports"]


class Supports(NamedTuple):
    """A T3A support set.

    Attributes:
        feats: ``(M, d)`` features (unnormalised).
        labels: ``(M,)`` int64 pseudo-labels (argmax of the source prediction).
        ent: ``(M,)`` softmax entropies of the source predictions.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    ent: torch.Tensor


def warmup_supports(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Supports:
    """The warm-up supports: the classifier's weight rows, labelled by the classifier's argmax on them.

    Args:
        weight: ``(C, d)`` weight of the final linear layer.
        bias: its ``(C,)`` bias, or ``None`` (used for the labels and entropies, as ``classifier(weight)``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.t3a import warmup_supports
        >>> s = warmup_supports(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        >>> s.labels.tolist(), [round(v, 4) for v in s.ent.tolist()]
        ([0, 1], [0.0901, 0.5822])
    """
    logits = F.linear(weight, weight, bias)
    return Supports(weight, logits.argmax(1), softmax_entropy(logits, dim=1))


def append_supports(supports: Supports, z: torch.Tensor, logits: torch.Tensor) -> Supports:
    """``supports`` plus a batch: features ``z`` ``(B, d)``, labels ``argmax logits``, entropies ``H(softmax)``.

    Example:
        >>> import torch
        >>> from adaptkit.functional.t3a import append_supports, warmup_supports
        >>> s = append_supports(warmup_supports(torch.eye(2)), torch.ones(3, 2), torch.tensor([[0.0, 1.0]] * 3))
        >>> s.feats.shape, s.labels.tolist()
        (torch.Size([5, 2]), [0, 1, 1, 1, 1])
    """
    feats = torch.cat([supports.feats, z.to(supports.feats.dtype)])
    labels = torch.cat([supports.labels, logits.argmax(1).to(supports.labels.device)])
    ent = torch.cat([supports.ent, softmax_entropy(logits, dim=1).to(supports.ent.dtype)])
    return Supports(feats, labels, ent)


def select_supports(supports: Supports, filter_k: int, num_classes: int) -> Supports:
    """Keep the ``filter_k`` lowest-entropy supports of each class (``-1``: keep all).

    The result is ordered by class, then by increasing entropy within a class (a stable sort: ties keep
    arrival order), as the official ``select_supports``. Unlike the official code, ``filter_k=-1`` keeps every
    support (the official ``[:-1]`` slice drops each class's highest-entropy one).

    Example:
        >>> import torch
        >>> from adaptkit.functional.t3a import Supports, select_supports
        >>> s = Supports(torch.arange(5.0)[:, None], torch.tensor([1, 0, 1, 0, 1]), torch.tensor([.3, .2, .1, .4, .2]))
        >>> select_supports(s, 2, 2).feats.flatten().tolist()
        [1.0, 3.0, 2.0, 4.0]
    """
    labels, ent = supports.labels, supports.ent
    # class-major, increasing entropy within a class: sort by entropy, then stably by class
    by_ent = torch.argsort(ent, stable=True)
    order = by_ent[torch.argsort(labels[by_ent], stable=True)]
    if filter_k >= 0:
        sorted_labels = labels[order]
        counts = torch.bincount(sorted_labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_labels]
        order = order[rank < filter_k]
    return Supports(supports.feats[order], labels[order], ent[order])


def prototypes(supports: Supports, num_classes: int) -> torch.Tensor:
    """``(C, d)`` prototypes: ``normalise(sum of normalise(z) over the class's supports)``.

    A class without supports gets the zero vector (its logit is 0), as the official ``F.normalize`` of a zero
    column.

    Example:
        >>> import torch
        >>> from adaptkit.functional.t3a import Supports, prototypes
        >>> s = Supports(torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 5.0]]), torch.tensor([0, 0, 1]), torch.zeros(3))
        >>> [[round(v, 4) for v in row] for row in prototypes(s, 3).tolist()]
        [[0.7071, 0.7071], [0.0, 1.0], [0.0, 0.0]]
    """
    feats = F.normalize(supports.feats, dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, supports.labels, feats)
    return F.normalize(sums, dim=1)


def t3a_logits(z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """T3A's logits ``z @ protos.T`` (``z`` not normalised, no bias).

    Example:
        >>> import torch
        >>> from adaptkit.functional.t3a import t3a_logits
        >>> t3a_logits(torch.tensor([[2.0, 1.0]]), torch.eye(2)).tolist()
        [[2.0, 1.0]]
    """
    return z.to(protos.dtype) @ protos.T
