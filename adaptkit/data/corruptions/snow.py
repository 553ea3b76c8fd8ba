"""snow: motion-blurred snow flakes over a brightened image.

Reference: ``snow`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``: a Gaussian field ``N(loc, scale^2)`` zoomed by
``zoom`` (``clipped_zoom``), thresholded at ``threshold``, motion-blurred (``blur_radius``, ``blur_sigma``, angle
``U(-135, -45)``) and quantised to 8 bits; the image is blended towards ``max(x, 1.5 * gray + 0.5)`` with weight
``1 - blend`` and the flake layer is added twice (as is and rotated by 180 degrees).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import (
    CV_GRAY,
    clipped_zoom,
    motion_blur_shifts,
    randn,
    to_gray,
    uniform,
)


class Snow(Corruption):
    """Snow (flake field ``loc``/``scale``/``zoom``/``threshold``, blur ``blur_radius``/``blur_sigma``, ``blend``)."""

    name = "snow"
    batch_dims: ClassVar[dict[str, int] | None] = {"field": 0, "angle": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        b, _, h, w = shape
        field = randn((b, 1, h, w), gen, device, dtype).mul_(params["scale"]).add_(params["loc"])
        return {"field": field, "angle": uniform(-135.0, -45.0, (b,), gen, device, torch.float64)}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        z = float(params["zoom"])
        layer = params["field"].to(x)
        layer = clipped_zoom(layer, z)
        layer = torch.where(layer < params["threshold"], 0.0, layer).clamp_(0, 1)
        layer = motion_blur_shifts(layer, int(params["blur_radius"]), float(params["blur_sigma"]), params["angle"])
        layer = layer.mul_(255).round_().div_(255)  # fresh: quantised in place
        gray = x if x.shape[1] == 1 else to_gray(x, CV_GRAY)
        blend = float(params["blend"])
        # blend * x + (1 - blend) * max(x, 1.5 gray + 0.5), with one batch-sized buffer per term
        bright = torch.maximum(x, (gray * 1.5).add_(0.5)).mul_(1 - blend)
        return torch.mul(x, blend).add_(bright).add_(layer).add_(layer.flip(-1, -2))


snow = functional(Snow, "snow")
