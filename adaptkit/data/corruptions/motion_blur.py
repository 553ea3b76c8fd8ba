"""motion_blur: blur along a random direction.

Reference: ``motion_blur`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``), which calls ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` with
``angle ~ U(-45, 45)``, and its NumPy port ``_motion_blur`` in ``imagecorruptions/corruptions.py``: ``2 r + 1``
taps with one-sided Gaussian weights ``exp(-i^2 / 2 sigma^2)`` at integer offsets along the angle, edges
replicated. This implementation follows the imagecorruptions port, batched with one angle per image.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import motion_blur_shifts, uniform


class MotionBlur(Corruption):
    """Motion blur with ``radius`` / ``sigma`` px (CIFAR (6, 1)-(9, 2.5), ImageNet (10, 3)-(20, 15))."""

    name = "motion_blur"
    batch_dims: ClassVar[dict[str, int] | None] = {"angle": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        return {"angle": uniform(-45.0, 45.0, (shape[0],), gen, device, torch.float64)}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return motion_blur_shifts(x, int(params["radius"]), float(params["sigma"]), params["angle"])


motion_blur = functional(MotionBlur, "motion_blur")
