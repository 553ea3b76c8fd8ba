"""pixelate: box downsampling and box upsampling.

Reference: ``pixelate`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``): ``PIL.Image.resize`` to ``int(side * factor)`` with ``Image.BOX`` and back with
``Image.BOX`` (imagecorruptions upsamples with ``NEAREST``, which is the same map for these factors up to ties).
PIL's BOX coefficients are reproduced exactly (window means: pooling or weighted gathers; nearest to upsample); PIL
rounds to 8 bits after each pass, this version stays in float.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, functional
from adaptkit.data.corruptions._ops import pil_box_resize


class Pixelate(Corruption):
    """Pixelate by resizing to ``factor`` of the size and back (CIFAR 0.95-0.65, ImageNet 0.6-0.25)."""

    name = "pixelate"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = float(params["factor"])
        hs, ws = max(1, int(h * f)), max(1, int(w * f))
        return pil_box_resize(pil_box_resize(x, hs, ws), h, w)


pixelate = functional(Pixelate, "pixelate")
