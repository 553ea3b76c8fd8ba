"""fog: a diamond-square (plasma fractal) haze.

Reference: ``plasma_fractal`` / ``fog`` in ``make_cifar_c.py`` / ``make_imagenet_c.py``
(https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``:
``(x + strength * plasma) * max(x) / (max(x) + strength)`` with a plasma map of the next power of two of the
image side (32 for CIFAR, 256 for ImageNet) and roughness ``decay`` (``wibbledecay``). The map is generated in
torch with the same recursion (one map per image).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import next_power_of_2, plasma_fractal


class Fog(Corruption):
    """Fog of ``strength`` (CIFAR 0.2-1.5, ImageNet 1.5-3) and fractal roughness ``decay``."""

    name = "fog"
    batch_dims: ClassVar[dict[str, int] | None] = {"plasma": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        b, _, h, w = shape
        size = next_power_of_2(max(h, w))
        plasma = plasma_fractal(b, size, float(params["decay"]), gen, device, dtype)
        return {"plasma": plasma[:, None, :h, :w]}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        s = float(params["strength"])
        max_val = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x + s * params["plasma"].to(x)) * max_val / (max_val + s)


fog = functional(Fog, "fog")
