"""Rotation prediction (Gidaris et al. 2018; the self-supervised task of TTT, Sun et al. 2020): rotated batches,
their labels and the loss.

Label ``k`` in ``{0, 1, 2, 3}`` means the image was rotated by ``k * 90`` degrees counter-clockwise in the
``(H, W)`` plane (``torch.rot90(img, k, dims=(-2, -1))``, the same images as the official TTT code's
``tensor_rot_90`` = ``flip(W)`` then transpose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROTATION_MODES = ("all", "random")


def rotate_batch(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotate every sample ``x[i]`` by ``labels[i] * 90`` degrees over its last two dimensions ``(H, W)``.

    Batched: one :func:`torch.rot90` per rotation present, not one per sample. Odd multiples of 90 degrees swap
    ``H`` and ``W``, so images of a batch holding them must be square.

    Args:
        x: ``(B, ..., H, W)`` images (any number of leading per-sample dimensions, e.g. channels).
        labels: ``(B,)`` integers in ``0..3`` (see :func:`rotation_targets`).

    Returns:
        The rotated batch, same shape, dtype and device as ``x`` (differentiable in ``x``).

    Raises:
        ValueError: ``labels`` has the wrong shape or values, or the images are not square while some label is
            odd.

    Example:
        >>> import torch
        >>> from adaptkit.functional.rotation import rotate_batch
        >>> img = torch.tensor([[1, 2], [3, 4]]).view(1, 1, 2, 2)
        >>> rotate_batch(img.repeat(2, 1, 1, 1), torch.tensor([0, 1]))[:, 0].tolist()  # 0 and 90 degrees
        [[[1, 2], [3, 4]], [[2, 4], [1, 3]]]
    """
    if x.dim() < 3:
        raise ValueError(f"rotate_batch: expected images (B, ..., H, W), got a tensor of shape {tuple(x.shape)}")
    if labels.shape != (x.shape[0],):
        raise ValueError(
            f"rotate_batch: need one label per sample, got labels of shape {tuple(labels.shape)} for a batch of "
            f"{x.shape[0]}"
        )
    labels = labels.to(x.device)
    present = [int(k) for k in torch.unique(labels).tolist()]
    if any(k not in (0, 1, 2, 3) for k in present):
        raise ValueError(f"rotate_batch: labels must be in 0..3 (multiples of 90 degrees), got {present}")
    if x.shape[-1] != x.shape[-2] and any(k % 2 for k in present):
        raise ValueError(
            f"rotate_batch: rotating by 90 or 270 degrees needs square images, got H x W = {x.shape[-2]} x "
            f"{x.shape[-1]}; resize or crop the batch to a square first"
        )
    if present == [0]:
        return x.clone()
    out = x.clone()
    for k in present:
        if k == 0:
            continue
        idx = (labels == k).nonzero(as_tuple=True)[0]
        out[idx] = torch.rot90(x[idx], k, dims=(-2, -1))
    return out


def rotation_targets(
    batch_size: int,
    mode: str = "all",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotation labels for a batch of ``batch_size`` images.

    * ``"all"`` (TTT's training, and adaptkit's default at test time): every image in all four rotations,
      ``4 * batch_size`` labels in blocks, ``[0]*B + [1]*B + [2]*B + [3]*B`` (the official code's ``"expand"``).
    * ``"random"`` (TTT's test-time protocol): one uniformly random rotation per image, ``batch_size`` labels.

    In both modes label ``j`` belongs to source image ``j % batch_size``, so the rotated batch is
    ``rotate_batch(x.repeat(len(labels) // B, 1, 1, 1), labels)``.

    Args:
        batch_size: number of source images ``B``.
        mode: ``"all"`` or ``"random"``.
        generator: for reproducible random labels (its device is used when ``device`` is ``None``).
        device: where to put the labels.

    Returns:
        ``int64`` labels, ``(4 * B,)`` for ``"all"`` and ``(B,)`` for ``"random"``.

    Example:
        >>> import torch
        >>> from adaptkit.functional.rotation import rotation_targets
        >>> rotation_targets(2, "all").tolist()
        [0, 0, 1, 1, 2, 2, 3, 3]
        >>> rotation_targets(5, "random", torch.Generator().manual_seed(0)).shape
        torch.Size([5])
    """
    if mode not in ROTATION_MODES:
        raise ValueError(f"rotation_targets: mode must be one of {ROTATION_MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"rotation_targets: batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if mode == "all":
        return torch.arange(4, device=device).repeat_interleave(batch_size)
    gen_dev = generator.device if generator is not None else torch.device(device)
    return torch.randint(0, 4, (batch_size,), generator=generator, device=gen_dev).to(device)


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of 4-way rotation logits ``(N, 4)`` against labels ``(N,)`` (mean over samples).

    Example:
        >>> import torch
        >>> from adaptkit.functional.rotation import rotation_loss
        >>> round(rotation_loss(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item(), 4)  # ln 4
        1.3863
    """
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"rotation_loss: expected logits (N, 4) and labels (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return F.cross_entropy(logits, labels.to(logits.device))
