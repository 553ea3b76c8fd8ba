"""zoom_blur: average of centre zooms.

Reference: ``clipped_zoom`` / ``zoom_blur`` in ``make_cifar_c.py`` / ``make_imagenet_c.py``
(https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``): the mean of the image and its centre crops
zoomed back by each factor in ``np.arange(1, z_max, step)`` with ``scipy.ndimage.zoom(order=1)``, which is a
corner-aligned bilinear ``F.interpolate`` of the crop. imagecorruptions keeps the top-left corner of the
zoomed image instead of its centre (a small shift); the centred Hendrycks version is used here.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, functional
from adaptkit.data.corruptions._ops import clipped_zoom


class ZoomBlur(Corruption):
    """Zoom blur over the factors ``zooms`` (CIFAR up to 1.06-1.25, ImageNet up to 1.11-1.30)."""

    name = "zoom_blur"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        out = x.clone()
        for z in params["zooms"]:
            out += clipped_zoom(x, float(z))
        return out.mul_(1.0 / (len(params["zooms"]) + 1))


zoom_blur = functional(ZoomBlur, "zoom_blur")
