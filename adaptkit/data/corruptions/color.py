"""Photometric corruptions: brightness, contrast and the extra saturate.

Reference: ``brightness``, ``contrast``, ``saturate`` in ``make_cifar_c.py`` / ``make_imagenet_c.py``
(https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``.
``brightness`` and ``saturate`` change V resp. S of ``skimage.color.rgb2hsv`` and convert back; with hue kept
fixed this has a closed form on RGB, used here (no HSV round trip):

* brightness: ``rgb * V' / V`` with ``V = max(r, g, b)`` and ``V' = clip(V + delta, 0, 1)`` (black pixels become
  gray ``V'``); grayscale images: ``x + delta`` (imagecorruptions).
* saturate: ``V - (V - rgb) * S' / S`` with ``S = (V - min) / V`` and ``S' = clip(S * factor + shift, 0, 1)``;
  gray pixels (``S = 0``, hue 0 in skimage) become ``(V, V (1 - S'), V (1 - S'))`` as in the reference.
  Grayscale images are unchanged (imagecorruptions converts to RGB and keeps the red channel, which is V).
* contrast: ``(x - mean) * factor + mean`` with the per-image, per-channel mean.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, functional


class Brightness(Corruption):
    """Raise the HSV value by ``delta`` (CIFAR 0.05-0.3, ImageNet 0.1-0.5)."""

    name = "brightness"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        delta = float(params["delta"])
        if x.shape[1] == 1:
            return x + delta
        v = x.amax(dim=1, keepdim=True)
        v_new = (v + delta).clamp(0, 1)
        scaled = x * (v_new / v.clamp_min(1e-12))
        return torch.where(v > 0, scaled, v_new.expand_as(x))


class Contrast(Corruption):
    """Shrink the contrast around the channel means by ``factor`` (CIFAR 0.75-0.15, ImageNet 0.4-0.05)."""

    name = "contrast"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        means = x.mean(dim=(2, 3), keepdim=True)
        return torch.lerp(means.expand_as(x), x, float(params["factor"]))


class Saturate(Corruption):
    """Scale and shift the HSV saturation (``factor``, ``shift``; extra corruption, de- then over-saturates)."""

    name = "saturate"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if x.shape[1] == 1:
            return x.clone()
        v = x.amax(dim=1, keepdim=True)
        mn = x.amin(dim=1, keepdim=True)
        s = torch.where(v > 0, (v - mn) / v.clamp_min(1e-12), torch.zeros_like(v))
        s_new = (s * float(params["factor"]) + float(params["shift"])).clamp(0, 1)
        colored = v - (v - x) * (s_new / s.clamp_min(1e-12))
        gray_px = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
        return torch.where(s > 0, colored, gray_px)


brightness = functional(Brightness, "brightness")


contrast = functional(Contrast, "contrast")


saturate = functional(Saturate, "saturate")
