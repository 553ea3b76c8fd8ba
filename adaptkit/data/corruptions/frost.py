"""frost: an icy texture blended over the image.

Reference: ``frost`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``: ``image_weight * x + frost_weight * F`` where
``F`` is a random crop of one of five photographs of frost (``frost1.png`` ... ``frost5.jpg``, picked with
``randint(5)``), resized by 0.2 for CIFAR.

No photographs are shipped or downloaded. Instead a bank of five procedural "photographs" is generated once
per image size and device, from a fixed seed (so, like the reference files, they are the same every run):

1. texture ``k`` has the per-channel mean of reference photograph ``k`` and the standard deviation of its
   224 px crops (measured once from the imagecorruptions-imaug 1.1.5 files and written below as constants);
2. each texture field is built from two diamond-square fractals: a smooth one (frosted haze) plus a "ridged"
   one ``(1 - |2 p - 1|)^4`` that draws thin bright crystal veins, standardised and mapped to the colour
   statistics, then box-resized by ``texture_scale`` (CIFAR's 0.2, which also lowers the contrast as the
   reference resize does);
3. per image, one of the five textures is picked uniformly and a random crop of the image size is taken,
   exactly as the reference picks a photograph and crops it.

So frost matches the reference in blend weights, colour and contrast statistics, not pixel for pixel. (The
``imagecorruptions-imaug`` fork draws ``randint(6)``, i.e. also the darker ``frost6.jpg``; the ImageNet-C and
CIFAR-10-C generators and this module use the first five.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import (
    IC_GRAY,
    Generator,
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


#: fixed seed of the texture bank: like the reference's five photographs, the textures are the same every run
_BANK_SEED = 20190419
_BANK: dict[tuple[Any, ...], torch.Tensor] = {}


def frost_bank(
    height: int, width: int, texture_scale: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Five procedural frost "photographs" ``(5, 3, H, W)``, one per style, large enough for random
    ``height x width`` crops after resizing by ``texture_scale``; built once per size and device, then cached."""
    hs = max(1, math.ceil(height / texture_scale))
    ws = max(1, math.ceil(width / texture_scale))
    size = 2 * next_power_of_2(max(hs, ws))
    key = (size, float(texture_scale), str(device), dtype)
    bank = _BANK.get(key)
    if bank is None:
        gen = torch.Generator().manual_seed(_BANK_SEED)
        cpu = torch.device("cpu")
        k = len(FROST_MEANS)
        haze = plasma_fractal(k, size, _HAZE_DECAY, gen, cpu, torch.float64)[:, None]
        veins = plasma_fractal(k, size, _VEIN_DECAY, gen, cpu, torch.float64)[:, None]
        field = haze + _VEIN_WEIGHT * (1 - (2 * veins - 1).abs()) ** 4
        field = field - field.mean(dim=(2, 3), keepdim=True)
        field = field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-8)
        means = torch.tensor(FROST_MEANS, dtype=torch.float64).reshape(k, 3, 1, 1)
        stds = torch.tensor(FROST_STDS, dtype=torch.float64).reshape(k, 1, 1, 1)
        tex = (means + stds * field).clamp(0, 1)
        out = max(height, math.ceil(size * texture_scale)), max(width, math.ceil(size * texture_scale))
        if out != (size, size):
            tex = pil_box_resize(tex, *out)
        bank = _BANK[key] = tex.to(device=device, dtype=dtype)
    return bank


def frost_texture(
    batch: int, height: int, width: int, texture_scale: float, gen: Generator, device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Frost textures ``(batch, 3, height, width)``: per image, a random one of the five bank textures and a
    random crop of it (the reference's ``randint(5)`` photograph and random crop)."""
    bank = frost_bank(height, width, texture_scale, device, dtype)
    style = randint(0, bank.shape[0], (batch,), gen, device)
    top = randint(0, bank.shape[2] - height + 1, (batch,), gen, device)
    left = randint(0, bank.shape[3] - width + 1, (batch,), gen, device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]
    return bank[style[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


class Frost(Corruption):
    """Frost: ``image_weight * x + frost_weight * texture`` (procedural texture, see the module docstring)."""

    name = "frost"
    batch_dims: ClassVar[dict[str, int] | None] = {"texture": 0}

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


frost = functional(Frost, "frost")
