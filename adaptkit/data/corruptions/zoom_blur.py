"""zoom_blur: average of centre zooms.

Reference: ``clipped_zoom`` / ``zoom_blur`` in ``make_cifar_c.py`` / ``make_imagenet_c.py``
(https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``): the mean of the image and its centre crops
zoomed back by each factor in ``np.arange(1, z_max, step)`` with ``scipy.ndimage.zoom(order=1)``. Each zoom is an
exact separable linear map (``(H, H)`` and ``(W, W)`` matrices). imagecorruptions keeps the top-left corner of the
zoomed image instead of its centre (a small shift); the centred Hendrycks version is used here.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptkit.data.corruptions._base import Corruption, Params
from adaptkit.data.corruptions._ops import GeneratorLike, apply_separable_matrices, linear_zoom_matrix


class ZoomBlur(Corruption):
    """Zoom blur over the factors ``zooms`` (CIFAR up to 1.06-1.25, ImageNet up to 1.11-1.30)."""

    name = "zoom_blur"
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = x.clone()
        for z in params["zooms"]:
            mh = linear_zoom_matrix(h, float(z), x.dtype, x.device)
            mw = mh if w == h else linear_zoom_matrix(w, float(z), x.dtype, x.device)
            out = out + apply_separable_matrices(x, mh, mw)
        return out / (len(params["zooms"]) + 1)


def zoom_blur(
    x: torch.Tensor, severity: int = 1, generator: GeneratorLike = None, preset: str = "auto", **params: Any
) -> torch.Tensor:
    """Functional :class:`ZoomBlur` (``generator`` is accepted for a uniform signature and unused)."""
    return ZoomBlur(severity, preset, **params)(x, generator)
