"""glass_blur: Gaussian blur, local pixel shuffling, Gaussian blur.

Reference: ``glass_blur`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``: ``skimage`` Gaussian blur (``sigma``), conversion
to uint8, ``iterations`` sweeps of random swaps of each pixel with a neighbour at offset ``randint(-d, d)`` in each
axis (``d = max_delta``, so offsets in ``[-d, d - 1]``), then the same blur again.

Deviation: the reference swaps pixels one after the other in a Python loop (a sequential random walk), which
cannot be batched. Here every sweep is one parallel step: each pixel of the swept region takes the value at its
own random offset (a gather). Offsets, region and blurs match the reference; the pixel shuffle is a local random
resampling instead of a permutation, which gives a very similar texture (see ``benchmarks/corruptions.py``).

Implementation: a pixel's two offsets are one uniform code in ``[0, (2 d)^2)`` (8 random bits per code, exact by
rejection when ``(2 d)^2`` is not a power of two), and the sweeps are composed into one source-index map, so
the image is gathered once whatever the number of iterations.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import gaussian_filter, randint, uniform_codes


def _offset_table(d: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat source offsets ``dr * width + dc`` of the codes ``(dr + d) * 2 d + (dc + d)``, ``dr, dc in [-d, d)``."""
    o = torch.arange(-d, d, device=device)
    return (o[:, None] * width + o[None, :]).reshape(-1)


class GlassBlur(Corruption):
    """Frosted-glass blur (``sigma``, ``max_delta`` px, ``iterations``; CIFAR d=1, ImageNet d=1-4)."""

    name = "glass_blur"
    batch_dims: ClassVar[dict[str, int] | None] = {"codes": 1}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        b, _, h, w = shape
        d = int(params["max_delta"])
        it = int(params["iterations"])
        if d <= 0 or it <= 0 or h <= 2 * d + 1 or w <= 2 * d + 1:
            return {"codes": None}
        # the reference sweeps rows in (d, h - d] and columns in (d, w - d]: one offset code per swept pixel
        region = (it, b, h - 2 * d, w - 2 * d)
        n = (2 * d) ** 2
        codes = uniform_codes(n, region, gen, device) if n <= 256 else randint(0, n, region, gen, device)
        return {"codes": codes}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        sigma = float(params["sigma"])
        d = int(params["max_delta"])
        x = gaussian_filter(x, sigma, truncate=4.0, mode="replicate")
        x = torch.clamp(x, 0, 1).mul_(255).floor_().div_(255)  # np.uint8(... * 255)
        codes = params["codes"]
        if codes is None:
            return gaussian_filter(x, sigma, truncate=4.0, mode="replicate")
        b, c, h, w = x.shape
        table = _offset_table(d, w, x.device)
        pix = torch.arange(h * w, device=x.device)
        inner = (slice(None), slice(d + 1, h - d + 1), slice(d + 1, w - d + 1))
        base = pix.reshape(h, w)[inner[1:]]  # flat indices of the swept pixels
        # sweep s moves pixel p to m_s(p), so after all sweeps x_out = x_in[src] with src = m_1(m_2(... m_n(p)))
        src = pix.expand(b, h * w).clone()
        for i, sweep in enumerate(codes.to(x.device)):
            moved = table.index_select(0, sweep.reshape(-1).long()).view_as(sweep).add_(base)  # m_s, swept pixels
            src.view(b, h, w)[inner] = moved if i == 0 else src.gather(1, moved.reshape(b, -1)).view_as(moved)
        x = x.reshape(b, c, h * w).gather(2, src.unsqueeze(1).expand(b, c, h * w)).reshape(b, c, h, w)
        return gaussian_filter(x, sigma, truncate=4.0, mode="replicate")


glass_blur = functional(GlassBlur, "glass_blur")
