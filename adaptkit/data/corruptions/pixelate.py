"""pixelate: box downsampling and box upsampling.

Reference: ``pixelate`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``): ``PIL.Image.resize`` to ``int(side * factor)`` with ``Image.BOX`` and back with
``Image.BOX`` (imagecorruptions upsamples with ``NEAREST``, which is the same map for these factors up to ties).
PIL's BOX coefficients are reproduced exactly as resampling matrices; PIL rounds to 8 bits after each pass,
this version stays in float.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptkit.data.corruptions._base import Corruption, Params
from adaptkit.data.corruptions._ops import GeneratorLike, apply_separable_matrices, pil_box_matrix


class Pixelate(Corruption):
    """Pixelate by resizing to ``factor`` of the size and back (CIFAR 0.95-0.65, ImageNet 0.6-0.25)."""

    name = "pixelate"
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = float(params["factor"])
        hs, ws = max(1, int(h * f)), max(1, int(w * f))
        down_h = pil_box_matrix(h, hs, x.dtype, x.device)
        down_w = pil_box_matrix(w, ws, x.dtype, x.device)
        up_h = pil_box_matrix(hs, h, x.dtype, x.device)
        up_w = pil_box_matrix(ws, w, x.dtype, x.device)
        return apply_separable_matrices(x, up_h @ down_h, up_w @ down_w)


def pixelate(
    x: torch.Tensor, severity: int = 1, generator: GeneratorLike = None, preset: str = "auto", **params: Any
) -> torch.Tensor:
    """Functional :class:`Pixelate` (``generator`` is accepted for a uniform signature and unused)."""
    return Pixelate(severity, preset, **params)(x, generator)
