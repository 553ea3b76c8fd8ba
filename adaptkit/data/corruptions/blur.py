"""Deterministic blurs: defocus_blur and the extra gaussian_blur.

Reference: ``disk`` / ``defocus_blur`` and ``gaussian_blur`` in ``make_cifar_c.py`` / ``make_imagenet_c.py``
(https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``.
``defocus_blur`` correlates each channel with an anti-aliased disk (``cv2.filter2D``, ``BORDER_REFLECT_101``);
``gaussian_blur`` is ``skimage.filters.gaussian`` (``mode="nearest"``, ``truncate=4``).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, functional
from adaptkit.data.corruptions._ops import cv_gaussian_kernel1d, fft_filter2d, filter2d, gaussian_filter, pad2d


def disk_kernel(radius: float, alias_blur: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """ImageNet-C's ``disk``: a normalised disk on a 17 x 17 (radius <= 8) or ``2r + 1`` grid, Gaussian-smoothed.

    The smoothing is ``cv2.GaussianBlur`` with a 3 x 3 (radius <= 8) or 5 x 5 kernel and ``sigma=alias_blur``
    (``BORDER_REFLECT_101``). All-zero borders are trimmed.
    """
    if radius <= 8:
        coords = torch.arange(-8, 9, dtype=torch.float64)
        ksize = 3
    else:
        coords = -radius + torch.arange(math.ceil(2 * radius + 1), dtype=torch.float64)
        ksize = 5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    d = ((xx**2 + yy**2) <= radius**2).double()
    d = d / d.sum()
    g = cv_gaussian_kernel1d(ksize, alias_blur, torch.float64, torch.device("cpu"))
    d = pad2d(d[None, None], ksize // 2, ksize // 2, "reflect")
    d = torch.nn.functional.conv2d(d, g.reshape(1, 1, -1, 1))
    d = torch.nn.functional.conv2d(d, g.reshape(1, 1, 1, -1))[0, 0]
    n = d.shape[0]
    r = n // 2
    while r > 0 and bool((d[0] == 0).all() and (d[-1] == 0).all() and (d[:, 0] == 0).all() and (d[:, -1] == 0).all()):
        d = d[1:-1, 1:-1]
        r -= 1
    return d.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _cached_disk(radius: float, alias_blur: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`disk_kernel`, built once per parameters (``apply`` calls the transform once per CPU chunk)."""
    return disk_kernel(radius, alias_blur, dtype, device)


class DefocusBlur(Corruption):
    """Out-of-focus blur: correlation with an anti-aliased disk of ``radius`` px (CIFAR 0.3-1.5, ImageNet 3-10)."""

    name = "defocus_blur"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    #: on the CPU, kernels at least this wide are applied in the Fourier domain (measured at 224 px, batch 64,
    #: 1 thread: ~650 images/s for any size against 780 / 640 / 420 / ~300 / ~250 for the direct depthwise
    #: convolution with the 9 / 11 / 15 / 17 / 21 px ImageNet disks)
    fft_min_size: ClassVar[int] = 13

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        k = _cached_disk(float(params["radius"]), float(params["alias_blur"]), x.dtype, x.device)
        if x.device.type == "cpu" and min(k.shape) >= self.fft_min_size:
            return fft_filter2d(x, k, "reflect")
        return filter2d(x, k, "reflect")


class GaussianBlur(Corruption):
    """Gaussian blur with ``sigma`` px (extra corruption; CIFAR 0.4-1, ImageNet 1-6), edges replicated."""

    name = "gaussian_blur"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return gaussian_filter(x, float(params["sigma"]), truncate=4.0, mode="replicate")


defocus_blur = functional(DefocusBlur, "defocus_blur")


gaussian_blur = functional(GaussianBlur, "gaussian_blur")
