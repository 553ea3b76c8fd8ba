"""Segmentation scenes built from real images: Fashion-MNIST items placed on textured canvases.

No segmentation dataset can be downloaded offline, but Fashion-MNIST ships with Debian. A scene is a colour
canvas with a smooth random texture on which a few Fashion-MNIST items are pasted at random positions and
scales, each tinted with a random colour; the per-pixel label is the item's class + 1 where the item's own
pixels are bright enough (its silhouette), ``0`` (background) elsewhere, and later items occlude earlier
ones. The result is a real-image, 11-class semantic segmentation task with class imbalance (background
dominates), object boundaries and occlusion, on which adaptkit's corruptions give a segmentation benchmark.

Example:
    >>> import torch
    >>> from adaptkit.data.scenes import make_scenes
    >>> items = (torch.rand(20, 1, 28, 28) * 255).to(torch.uint8)
    >>> x, m = make_scenes(items, torch.arange(20) % 10, n=4, size=48, seed=0)
    >>> x.shape, x.dtype, m.shape, m.dtype
    (torch.Size([4, 3, 48, 48]), torch.uint8, torch.Size([4, 48, 48]), torch.int64)
    >>> int(m.max()) <= 10
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adaptkit.data.datasets import FASHION_MNIST_CLASSES, as_unit_float

#: class names of the scene task: background, then the ten Fashion-MNIST classes
SCENE_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)


def _background(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth coloured textures ``(n, 3, size, size)`` in about [0.05, 0.65]: a random colour plus
    low-frequency noise (a 4x4 grid upsampled bicubically) and a little fine grain."""
    base = 0.15 + 0.35 * torch.rand(n, 3, 1, 1, generator=gen)
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size), mode="bicubic", align_corners=False)
    grain = torch.rand(n, 1, size, size, generator=gen)
    return (base + 0.25 * (low - 0.5) + 0.06 * (grain - 0.5)).clamp(0.0, 1.0)


def make_scenes(
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    size: int = 64,
    items: tuple[int, int] = (2, 3),
    scale: tuple[float, float] = (0.8, 1.3),
    threshold: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``n`` scenes from single-object images (e.g. Fashion-MNIST).

    Args:
        images: item images ``(M, 1, h, w)`` (uint8 or floats in [0, 1]), dark background.
        labels: their classes ``(M,)``; the scene label of an item pixel is ``label + 1``.
        n: number of scenes.
        size: canvas side in pixels.
        items: inclusive range of items per scene.
        scale: range of the items' resize factor (relative to ``h``).
        threshold: an item pixel belongs to the item (label and paste) where its intensity exceeds this.
        seed: everything (items drawn, positions, scales, colours, textures) follows from it.

    Returns:
        ``(scenes, masks)``: uint8 ``(n, 3, size, size)`` and int64 ``(n, size, size)`` in ``[0, classes]``.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (M, 1, h, w) single-object images, got {tuple(images.shape)}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need matching, non-empty images and labels, got {len(images)} and {len(labels)}")
    lo, hi = items
    if not 1 <= lo <= hi:
        raise ValueError(f"items must be a range (lo, hi) with 1 <= lo <= hi, got {items}")
    side = images.shape[-1]
    if round(side * scale[1]) > size:
        raise ValueError(f"items of {side} px scaled by up to {scale[1]} do not fit a {size} px canvas")
    gen = torch.Generator().manual_seed(int(seed))
    canvas = _background(n, size, gen)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    counts = torch.randint(lo, hi + 1, (n,), generator=gen)
    for i in range(n):
        picks = torch.randint(0, len(images), (int(counts[i]),), generator=gen)
        for j in picks.tolist():
            s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen))
            k = max(4, round(side * s))
            item = as_unit_float(images[j : j + 1]).float()
            item = F.interpolate(item, size=(k, k), mode="bilinear", align_corners=False, antialias=s < 1)[0, 0]
            top, left = (int(v) for v in torch.randint(0, size - k + 1, (2,), generator=gen))
            tint = 0.45 + 0.55 * torch.rand(3, 1, 1, generator=gen)
            inside = item > threshold
            region = canvas[i, :, top : top + k, left : left + k]
            region[:, inside] = (item * tint)[:, inside].clamp(0.0, 1.0)
            masks[i, top : top + k, left : left + k][inside] = int(labels[j]) + 1
    return (canvas * 255.0).round().to(torch.uint8), masks


def fashion_scenes(
    n: int,
    train: bool = False,
    size: int = 64,
    seed: int = 0,
    root: str | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes from the Fashion-MNIST training or test split (items of the test split only in test scenes).

    Args:
        n: number of scenes.
        train: draw items from the 60k training split (else the 10k test split).
        size / seed / kwargs: as in :func:`make_scenes`.
        root: a folder with the Fashion-MNIST IDX files (default search: see ``FashionMNIST``).
    """
    from adaptkit.data.datasets import FashionMNIST

    ds = FashionMNIST(root, train=train)
    return make_scenes(ds.images, ds.targets, n, size=size, seed=seed, **kwargs)  # type: ignore[arg-type]


__all__: Sequence[str] = ["SCENE_CLASSES", "fashion_scenes", "make_scenes"]
