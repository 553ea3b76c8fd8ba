"""glass_blur: Gaussian blur, local pixel shuffling, Gaussian blur.

Reference: ``glass_blur`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``: ``skimage`` Gaussian blur (``sigma``), conversion
to uint8, ``iterations`` sweeps of random swaps of each pixel with a neighbour at offset ``randint(-d, d)`` in each
axis (``d = max_delta``), then the same blur again.

Deviation: the reference swaps pixels one after the other in a Python loop (a sequential random walk), which
cannot be batched. Here every sweep is one parallel step: each pixel of the swept region takes the value at its
own random offset (a gather). Offsets, region and blurs match the reference; the pixel shuffle is a local random
resampling instead of a permutation, which gives a very similar texture (see ``benchmarks/corruptions.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import gaussian_filter, randint


class GlassBlur(Corruption):
    """Frosted-glass blur (``sigma``, ``max_delta`` px, ``iterations``; CIFAR d=1, ImageNet d=1-4)."""

    name = "glass_blur"
    batch_dims: ClassVar[dict[str, int] | None] = {"offsets": 1}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        b, _, h, w = shape
        d = int(params["max_delta"])
        it = int(params["iterations"])
        return {"offsets": randint(-d, d, (it, b, 2, h, w), gen, device) if d > 0 else None}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        sigma = float(params["sigma"])
        d = int(params["max_delta"])
        x = gaussian_filter(x, sigma, truncate=4.0, mode="replicate")
        x = torch.floor(x.clamp(0, 1) * 255) / 255  # np.uint8(... * 255)
        b, c, h, w = x.shape
        offsets = params["offsets"]
        if offsets is not None and h > 2 * d + 1 and w > 2 * d + 1:
            rows = torch.arange(h, device=x.device).reshape(1, h, 1)
            cols = torch.arange(w, device=x.device).reshape(1, 1, w)
            # the reference sweeps h in (d, h - d], w in (d, w - d]
            region = (rows > d) & (rows <= h - d) & (cols > d) & (cols <= w - d)
            for off in offsets.to(x.device):
                src_r = torch.where(region, rows + off[:, 0], rows).clamp(0, h - 1)
                src_c = torch.where(region, cols + off[:, 1], cols).clamp(0, w - 1)
                idx = (src_r * w + src_c).reshape(b, 1, h * w).expand(b, c, h * w)
                x = x.reshape(b, c, h * w).gather(2, idx).reshape(b, c, h, w)
        return gaussian_filter(x, sigma, truncate=4.0, mode="replicate")


glass_blur = functional(GlassBlur, "glass_blur")
