"""frost: an icy texture blended over the image.

Reference: ``frost`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``: ``image_weight * x + frost_weight * F`` where
``F`` is a random crop of one of five photographs of frost (``frost1.png`` ... ``frost5.jpg``, picked with
``randint(5)``), resized by 0.2 for CIFAR.

No photographs are shipped or downloaded. ``F`` is generated procedurally per image and call:

1. one of five styles is picked uniformly, each with the per-channel mean of one reference photograph and the
   standard deviation of its 224 px crops (measured once from the imagecorruptions-imaug 1.1.5 files and
   written below as constants);
2. a texture field is built at ``ceil(side / texture_scale)`` px from two diamond-square fractals: a smooth
   one (frosted haze) plus a "ridged" one ``(1 - |2 p - 1|)^4`` that draws thin bright crystal veins;
3. the field is standardised, mapped to the style's colour statistics and box-downsampled to the image size
   when ``texture_scale < 1`` (CIFAR's 0.2, which also lowers the contrast as the reference resize does).

So frost matches the reference in blend weights, colour and contrast statistics, not pixel for pixel. (The
``imagecorruptions-imaug`` fork draws ``randint(6)``, i.e. also the darker ``frost6.jpg``; the ImageNet-C and
CIFAR-10-C generators and this module use the first five.)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape
from adaptkit.data.corruptions._ops import (
    IC_GRAY,
    Generator,
    GeneratorLike,
    next_power_of_2,
    pil_box_resize,
    plasma_fractal,
    randint,
    to_gray,
)

#: per-channel (RGB) mean of frost1.png ... frost5.jpg (imagecorruptions-imaug 1.1.5), in [0, 1]
FROST_MEANS = (
    (0.305, 0.585, 0.650),
    (0.787, 0.805, 0.841),
    (0.787, 0.805, 0.841),
    (0.540, 0.599, 0.648),
    (0.441, 0.484, 0.528),
)
#: mean standard deviation (gray) of 224 px crops of the same photographs
FROST_STDS = (0.061, 0.072, 0.072, 0.093, 0.124)
# fractal roughness of the two layers and weight of the crystal veins
_HAZE_DECAY = 1.25
_VEIN_DECAY = 1.15
_VEIN_WEIGHT = 1.0


def frost_texture(
    batch: int, height: int, width: int, texture_scale: float, gen: Generator, device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Procedural frost textures ``(batch, 3, height, width)`` in ``[0, 1]`` (see the module docstring)."""
    hs = max(1, math.ceil(height / texture_scale))
    ws = max(1, math.ceil(width / texture_scale))
    size = next_power_of_2(max(hs, ws))
    haze = plasma_fractal(batch, size, _HAZE_DECAY, gen, device, torch.float64)[:, None, :hs, :ws]
    veins = plasma_fractal(batch, size, _VEIN_DECAY, gen, device, torch.float64)[:, None, :hs, :ws]
    veins = (1 - (2 * veins - 1).abs()) ** 4
    field = haze + _VEIN_WEIGHT * veins
    field = field - field.mean(dim=(2, 3), keepdim=True)
    field = field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    style = randint(0, len(FROST_MEANS), (batch,), gen, device)
    means = torch.tensor(FROST_MEANS, dtype=torch.float64, device=device)[style].reshape(batch, 3, 1, 1)
    stds = torch.tensor(FROST_STDS, dtype=torch.float64, device=device)[style].reshape(batch, 1, 1, 1)
    tex = (means + stds * field).clamp(0, 1)
    if (hs, ws) != (height, width):
        tex = pil_box_resize(tex, height, width)
    return tex.to(dtype)


class Frost(Corruption):
    """Frost: ``image_weight * x + frost_weight * texture`` (procedural texture, see the module docstring)."""

    name = "frost"

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        b, _, h, w = shape
        return {"texture": frost_texture(b, h, w, float(params["texture_scale"]), gen, device, dtype)}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        tex = params["texture"].to(x)
        if x.shape[1] == 1:
            tex = to_gray(tex, IC_GRAY)
        return float(params["image_weight"]) * x + float(params["frost_weight"]) * tex


def frost(
    x: torch.Tensor, severity: int = 1, generator: GeneratorLike = None, preset: str = "auto", **params: Any
) -> torch.Tensor:
    """Functional :class:`Frost`."""
    return Frost(severity, preset, **params)(x, generator)
