"""The 15 ImageNet-C / CIFAR-10-C corruptions and the 4 extra ones, batched in torch.

Every corruption is a functional op ``name(x, severity=1, generator=None, preset="auto", **params)`` and an
``nn.Module`` (:class:`Corruption` subclass) taking float batches ``(B, C, H, W)`` (or one ``(C, H, W)`` image) in
``[0, 1]`` with ``C`` = 1 or 3 on any device, and returning the same shape, dtype and device, clamped to
``[0, 1]``. Constants are the published per-severity tables (see :mod:`._params`): ``preset="auto"`` picks the
CIFAR-10-C ones when ``min(H, W) <= 64`` and the ImageNet-C ones otherwise; ``"cifar"`` / ``"imagenet"`` force a
table and keyword arguments override single constants. Randomness comes from ``generator`` (a
``torch.Generator`` or an int seed) or the global torch RNG; modules keep the last drawn parameters
(``last_params``) and :meth:`Corruption.replay` re-applies them.

References: ``make_imagenet_c.py`` and ``make_cifar_c.py`` in https://github.com/hendrycks/robustness
(Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019) and ``imagecorruptions/corruptions.py`` in https://github.com/bethgelab/imagecorruptions
(Michaelis et al., 2019). Documented deviations: ``frost`` uses procedural textures instead of the six
photographs (nothing is downloaded), ``glass_blur`` shuffles pixels in parallel, ``spatter`` approximates
OpenCV's Canny / distance transform, ``jpeg_compression`` runs libjpeg on the CPU via ``torchvision.io``.

Example:
    >>> import torch
    >>> from adaptkit.data.corruptions import CORRUPTIONS, corrupt
    >>> x = torch.rand(4, 3, 32, 32)
    >>> y = corrupt(x, "fog", severity=3, generator=0)
    >>> y.shape, len(CORRUPTIONS)
    (torch.Size([4, 3, 32, 32]), 15)
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from adaptkit.data.corruptions._base import Corruption
from adaptkit.data.corruptions._ops import GeneratorLike
from adaptkit.data.corruptions._params import TABLES
from adaptkit.data.corruptions.blur import DefocusBlur, GaussianBlur, defocus_blur, gaussian_blur
from adaptkit.data.corruptions.color import Brightness, Contrast, Saturate, brightness, contrast, saturate
from adaptkit.data.corruptions.elastic import ElasticTransform, elastic_transform
from adaptkit.data.corruptions.fog import Fog, fog
from adaptkit.data.corruptions.frost import Frost, frost
from adaptkit.data.corruptions.glass_blur import GlassBlur, glass_blur
from adaptkit.data.corruptions.jpeg import JpegCompression, jpeg_compression
from adaptkit.data.corruptions.motion_blur import MotionBlur, motion_blur
from adaptkit.data.corruptions.noise import (
    GaussianNoise,
    ImpulseNoise,
    ShotNoise,
    SpeckleNoise,
    gaussian_noise,
    impulse_noise,
    shot_noise,
    speckle_noise,
)
from adaptkit.data.corruptions.pixelate import Pixelate, pixelate
from adaptkit.data.corruptions.snow import Snow, snow
from adaptkit.data.corruptions.spatter import Spatter, spatter
from adaptkit.data.corruptions.zoom_blur import ZoomBlur, zoom_blur

#: the 15 benchmark corruptions, in the standard ImageNet-C / CIFAR-10-C order
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: the 4 held-out ("validation") corruptions
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

_CLASSES: dict[str, type[Corruption]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        ShotNoise,
        ImpulseNoise,
        DefocusBlur,
        GlassBlur,
        MotionBlur,
        ZoomBlur,
        Snow,
        Frost,
        Fog,
        Brightness,
        Contrast,
        ElasticTransform,
        Pixelate,
        JpegCompression,
        SpeckleNoise,
        GaussianBlur,
        Spatter,
        Saturate,
    )
}
assert set(_CLASSES) == set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS) == set(TABLES)


def list_corruptions(extra: bool = False) -> list[str]:
    """Names of the 15 corruptions in the standard order, plus the 4 extra ones when ``extra``."""
    return list(CORRUPTIONS) + (list(EXTRA_CORRUPTIONS) if extra else [])


def get_corruption(name: str) -> type[Corruption]:
    """The :class:`Corruption` subclass registered as ``name`` (e.g. ``"gaussian_noise"``).

    Example:
        >>> from adaptkit.data.corruptions import get_corruption
        >>> get_corruption("fog")(severity=2)
        Fog(severity=2, preset='auto')
    """
    cls = _CLASSES.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(_CLASSES), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown corruption {name!r}.{hint} Available: {list_corruptions(extra=True)}")
    return cls


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int = 1,
    generator: GeneratorLike = None,
    preset: str = "auto",
    **params: Any,
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to ``x``; see the module docstring for the conventions."""
    return get_corruption(name)(severity, preset, **params)(x, generator)


__all__ = [
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "Brightness",
    "Contrast",
    "Corruption",
    "DefocusBlur",
    "ElasticTransform",
    "Fog",
    "Frost",
    "GaussianBlur",
    "GaussianNoise",
    "GlassBlur",
    "ImpulseNoise",
    "JpegCompression",
    "MotionBlur",
    "Pixelate",
    "Saturate",
    "ShotNoise",
    "Snow",
    "SpeckleNoise",
    "Spatter",
    "ZoomBlur",
    "brightness",
    "contrast",
    "corrupt",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_blur",
    "gaussian_noise",
    "get_corruption",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "list_corruptions",
    "motion_blur",
    "pixelate",
    "saturate",
    "shot_noise",
    "snow",
    "spatter",
    "speckle_noise",
    "zoom_blur",
]
