"""Output contrastive loss (OCL, Zhang et al. 2023) for test-time training of dense predictors.

Per pixel ``i`` and view ``v`` (the image and its horizontal flip, flipped back so pixels line up):
``z_{v,i} = p_{v,i} / ||p_{v,i}||_2`` with ``p = softmax(logits)`` over classes. Then

* positive term ``L_pos = -(1/N) sum_i <z_{a,i}, z_{b,i}>`` (same pixel, two views), in ``[-1, 0]``;
* negative term ``L_neg = 1/2 sum_v (1/M^2) sum_{i,j} <z_{v,i}, z_{v,j}>`` (all pixel pairs within a view,
  diagonal included), computed as ``1/2 sum_v ||mean_i z_{v,i}||^2`` (the mean of a Gram matrix is the squared
  norm of the mean vector): ``O(M C)`` instead of ``O(M^2)``, same value, in ``[1/C, 1]``;
* ``L = lambda_pos L_pos + lambda_neg L_neg``.

For a batch of ``B`` images each term is computed per image and averaged over images (negatives are never
pooled across images).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class OCLTerms(NamedTuple):
    """The output contrastive loss and its two unweighted terms (scalars)."""

    #: ``lambda_pos * positive + lambda_neg * negative`` (minimised)
    loss: torch.Tensor
    #: ``L_pos``: minus the mean cosine similarity of the two views' class distributions, per pixel
    positive: torch.Tensor
    #: ``L_neg``: mean over views of the mean pairwise similarity of a view's pixels (``||mean z||^2``)
    negative: torch.Tensor


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip along the last (width) dimension.

    Example:
        >>> import torch
        >>> from adaptkit.functional.ocl import hflip
        >>> hflip(torch.tensor([[1, 2, 3]])).tolist()
        [[3, 2, 1]]
    """
    return x.flip(-1)


def two_view_batch(x: torch.Tensor) -> torch.Tensor:
    """``cat([x, hflip(x)])``: the ``2B`` images OCL forwards in one pass (views ``k`` and ``k + B`` pair up).

    Example:
        >>> import torch
        >>> from adaptkit.functional.ocl import two_view_batch
        >>> two_view_batch(torch.tensor([[[[1, 2]]]])).flatten().tolist()
        [1, 2, 2, 1]
    """
    if x.dim() < 2:
        raise ValueError(f"two_view_batch expects a batch (B, ..., W), got shape {tuple(x.shape)}")
    return torch.cat([x, hflip(x)])


def split_views(output: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a two-view model output ``(2B, ...)`` into ``(view a, view b flipped back)``.

    Outputs with spatial dimensions (``dim >= 3``, e.g. ``(2B, C, H, W)``) have view b flipped back along the
    width so that pixel ``i`` lines up in both views; ``(2B, C)`` outputs (no spatial axis) are split as they are.

    Args:
        output: the model output on :func:`two_view_batch` of a batch of ``batch_size`` images.
        batch_size: ``B``.

    Example:
        >>> import torch
        >>> from adaptkit.functional.ocl import split_views
        >>> a, b = split_views(torch.tensor([[[[1, 2, 3]]], [[[3, 2, 1]]]]), 1)
        >>> a.tolist() == b.tolist()
        True
    """
    if output.shape[0] != 2 * batch_size:
        raise ValueError(
            f"expected a two-view output with {2 * batch_size} rows (the batch and its flip), got shape "
            f"{tuple(output.shape)}"
        )
    a, b = output[:batch_size], output[batch_size:]
    return a, (hflip(b) if output.dim() >= 3 else b)


def class_directions(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``softmax(logits)`` L2-normalised over the class dimension (unit vectors ``z``); fp16/bf16 run in fp32.

    Softmax probabilities are positive, so the norm is at least ``1/sqrt(C)`` and the division is safe.

    Example:
        >>> import torch
        >>> from adaptkit.functional.ocl import class_directions
        >>> [round(v, 4) for v in class_directions(torch.zeros(1, 4)).flatten().tolist()]
        [0.5, 0.5, 0.5, 0.5]
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.normalize(logits.softmax(dim), p=2.0, dim=dim)


def _mean_direction_sq(z: torch.Tensor, stride: int) -> torch.Tensor:
    """``||mean_i z_i||^2`` per image over the (grid-subsampled) pixels; ``(B, C)`` inputs are one pixel each."""
    if z.dim() == 2:
        return z.square().sum(dim=1)
    if stride > 1:
        z = z[(slice(None), slice(None)) + (slice(None, None, stride),) * (z.dim() - 2)]
    return z.flatten(2).mean(dim=2).square().sum(dim=1)


def output_contrastive_terms(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    lambda_pos: float = 3.0,
    lambda_neg: float = 1.0,
    stride: int = 1,
) -> OCLTerms:
    """The output contrastive loss with its positive and negative terms.

    Args:
        logits_a: logits of the original view, ``(B, C, *spatial)`` (or ``(B, C)``: one "pixel" per image).
        logits_b: logits of the flipped view, already flipped back (:func:`split_views`); same shape.
        lambda_pos: weight of the positive (flip-consistency) term; OCL default 3.0.
        lambda_neg: weight of the negative (within-view similarity) term; OCL default 1.0.
        stride: grid subsampling of the spatial dims for the negative term only (OCL ``--downsampling``, 1);
            kept pixels start at index 0.

    Returns:
        :class:`OCLTerms` ``(loss, positive, negative)``; the terms are averaged over the ``B`` images.

    Example:
        >>> import torch
        >>> from adaptkit.functional.ocl import output_contrastive_terms
        >>> logits = torch.zeros(1, 4, 2, 2)  # uniform predictions: both views agree, all pixels alike
        >>> [round(float(t), 4) for t in output_contrastive_terms(logits, logits)]
        [-2.0, -1.0, 1.0]
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"the two views' logits differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    if logits_a.dim() < 2:
        raise ValueError(f"expected logits (B, C, ...) with classes in dim 1, got shape {tuple(logits_a.shape)}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    z_a, z_b = class_directions(logits_a), class_directions(logits_b)
    positive = -(z_a * z_b).sum(dim=1).mean()
    negative = (0.5 * (_mean_direction_sq(z_a, int(stride)) + _mean_direction_sq(z_b, int(stride)))).mean()
    return OCLTerms(lambda_pos * positive + lambda_neg * negative, positive, negative)


def output_contrastive_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    lambda_pos: float = 3.0,
    lambda_neg: float = 1.0,
    stride: int = 1,
) -> torch.Tensor:
    """``lambda_pos * L_pos + lambda_neg * L_neg`` (see :func:`output_contrastive_terms` for the arguments).

    Example:
        >>> import torch
        >>> from adaptkit.functional.ocl import output_contrastive_loss
        >>> a = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])  # 2 classes, 2 confident pixels of either class
        >>> round(float(output_contrastive_loss(a, a)), 3)  # -3 * 1 + 1 * ||(1/2, 1/2)||^2
        -2.5
    """
    return output_contrastive_terms(logits_a, logits_b, lambda_pos, lambda_neg, stride).loss
