"""Published per-severity constants of the 15 + 4 common corruptions.

Two presets, copied from the reference generators:

* ``"cifar"``: CIFAR-10-C / CIFAR-100-C, ``ImageNet-C/create_c/make_cifar_c.py`` in
  https://github.com/hendrycks/robustness (Hendrycks & Dietterich, ICLR 2019), 32 x 32 images.
* ``"imagenet"``: ImageNet-C, ``ImageNet-C/create_c/make_imagenet_c.py`` in the same repository, 224 x 224
  images; these constants are identical in https://github.com/bethgelab/imagecorruptions
  (``imagecorruptions/corruptions.py``, the ``imagecorruptions`` / ``imagecorruptions-imaug`` packages), except
  ``elastic_transform`` which imagecorruptions re-parameterised (see :mod:`.elastic`).

Each table row is a dict of named constants; the names are the keyword overrides accepted by the corruption
(e.g. ``GaussianNoise(severity=3, sigma=0.1)``). Units: images are floats in ``[0, 1]``; lengths are pixels,
except ``elastic_transform`` whose lengths are fractions of a reference size (see :mod:`.elastic`) and ``frost``'s
``texture_scale`` (the reference resized its frost photographs by 0.2 for CIFAR).
"""

from __future__ import annotations

from typing import Any


def _rows(keys: tuple[str, ...], values: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(keys, v)) for v in values]


def _zooms(step: float, count: int) -> tuple[float, ...]:
    # ``np.arange(1, stop, step)`` as evaluated by NumPy (the float end point is sometimes included).
    return tuple(1.0 + k * step for k in range(count))


TABLES: dict[str, dict[str, list[dict[str, Any]]]] = {
    "gaussian_noise": {
        "cifar": _rows(("sigma",), [(0.04,), (0.06,), (0.08,), (0.09,), (0.10,)]),
        "imagenet": _rows(("sigma",), [(0.08,), (0.12,), (0.18,), (0.26,), (0.38,)]),
    },
    "shot_noise": {
        "cifar": _rows(("rate",), [(500,), (250,), (100,), (75,), (50,)]),
        "imagenet": _rows(("rate",), [(60,), (25,), (12,), (5,), (3,)]),
    },
    "impulse_noise": {
        "cifar": _rows(("amount",), [(0.01,), (0.02,), (0.03,), (0.05,), (0.07,)]),
        "imagenet": _rows(("amount",), [(0.03,), (0.06,), (0.09,), (0.17,), (0.27,)]),
    },
    "speckle_noise": {
        "cifar": _rows(("sigma",), [(0.06,), (0.1,), (0.12,), (0.16,), (0.2,)]),
        "imagenet": _rows(("sigma",), [(0.15,), (0.2,), (0.35,), (0.45,), (0.6,)]),
    },
    "gaussian_blur": {
        "cifar": _rows(("sigma",), [(0.4,), (0.6,), (0.7,), (0.8,), (1.0,)]),
        "imagenet": _rows(("sigma",), [(1,), (2,), (3,), (4,), (6,)]),
    },
    "defocus_blur": {
        "cifar": _rows(("radius", "alias_blur"), [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)]),
        "imagenet": _rows(("radius", "alias_blur"), [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)]),
    },
    "glass_blur": {
        "cifar": _rows(
            ("sigma", "max_delta", "iterations"),
            [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        ),
        "imagenet": _rows(
            ("sigma", "max_delta", "iterations"),
            [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        ),
    },
    "motion_blur": {
        "cifar": _rows(("radius", "sigma"), [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)]),
        "imagenet": _rows(("radius", "sigma"), [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]),
    },
    "zoom_blur": {
        # np.arange(1, 1.06, .01), (1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .01), (1, 1.26, .01)
        "cifar": _rows(
            ("zooms",),
            [(_zooms(0.01, 7),), (_zooms(0.01, 12),), (_zooms(0.01, 16),), (_zooms(0.01, 21),), (_zooms(0.01, 26),)],
        ),
        # np.arange(1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .02), (1, 1.26, .02), (1, 1.31, .03)
        "imagenet": _rows(
            ("zooms",),
            [(_zooms(0.01, 12),), (_zooms(0.01, 16),), (_zooms(0.02, 11),), (_zooms(0.02, 13),), (_zooms(0.03, 11),)],
        ),
    },
    "snow": {
        "cifar": _rows(
            ("loc", "scale", "zoom", "threshold", "blur_radius", "blur_sigma", "blend"),
            [
                (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
                (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
            ],
        ),
        "imagenet": _rows(
            ("loc", "scale", "zoom", "threshold", "blur_radius", "blur_sigma", "blend"),
            [
                (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
                (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
                (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
            ],
        ),
    },
    "frost": {
        "cifar": _rows(
            ("image_weight", "frost_weight", "texture_scale"),
            [(1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2), (0.75, 0.45, 0.2)],
        ),
        "imagenet": _rows(
            ("image_weight", "frost_weight", "texture_scale"),
            [(1, 0.4, 1.0), (0.8, 0.6, 1.0), (0.7, 0.7, 1.0), (0.65, 0.7, 1.0), (0.6, 0.75, 1.0)],
        ),
    },
    "fog": {
        "cifar": _rows(("strength", "decay"), [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)]),
        "imagenet": _rows(("strength", "decay"), [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)]),
    },
    "brightness": {
        "cifar": _rows(("delta",), [(0.05,), (0.1,), (0.15,), (0.2,), (0.3,)]),
        "imagenet": _rows(("delta",), [(0.1,), (0.2,), (0.3,), (0.4,), (0.5,)]),
    },
    "contrast": {
        "cifar": _rows(("factor",), [(0.75,), (0.5,), (0.4,), (0.3,), (0.15,)]),
        "imagenet": _rows(("factor",), [(0.4,), (0.3,), (0.2,), (0.1,), (0.05,)]),
    },
    "elastic_transform": {
        # make_cifar_c.py: (IMSIZE*0, IMSIZE*0, IMSIZE*0.08), ... with IMSIZE = 32 (fractions of the image size)
        "cifar": _rows(
            ("alpha", "sigma", "affine"),
            [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
        ),
        # make_imagenet_c.py: (244 * 2, 244 * 0.7, 244 * 0.1), ... (fractions of 244 px for a 224 px image)
        "imagenet": _rows(
            ("alpha", "sigma", "affine"),
            [(2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)],
        ),
    },
    "pixelate": {
        "cifar": _rows(("factor",), [(0.95,), (0.9,), (0.85,), (0.75,), (0.65,)]),
        "imagenet": _rows(("factor",), [(0.6,), (0.5,), (0.4,), (0.3,), (0.25,)]),
    },
    "jpeg_compression": {
        "cifar": _rows(("quality",), [(80,), (65,), (58,), (50,), (40,)]),
        "imagenet": _rows(("quality",), [(25,), (18,), (15,), (10,), (7,)]),
    },
    "spatter": {
        "cifar": _rows(
            ("loc", "scale", "sigma", "threshold", "intensity", "mud"),
            [
                (0.62, 0.1, 0.7, 0.7, 0.5, 0),
                (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1),
            ],
        ),
        "imagenet": _rows(
            ("loc", "scale", "sigma", "threshold", "intensity", "mud"),
            [
                (0.65, 0.3, 4, 0.69, 0.6, 0),
                (0.65, 0.3, 3, 0.68, 0.6, 0),
                (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1),
                (0.67, 0.4, 1, 0.65, 1.5, 1),
            ],
        ),
    },
    "saturate": {
        "cifar": _rows(("factor", "shift"), [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)]),
        "imagenet": _rows(("factor", "shift"), [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)]),
    },
}

PRESETS = ("auto", "cifar", "imagenet")
#: ``preset="auto"`` uses the CIFAR constants when ``min(H, W) <= AUTO_CIFAR_MAX_SIDE``, else ImageNet's.
AUTO_CIFAR_MAX_SIDE = 64


def resolve_preset(preset: str, height: int, width: int) -> str:
    """``"auto"`` -> ``"cifar"`` for small images (``min(H, W) <= 64``), else ``"imagenet"``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset == "auto":
        return "cifar" if min(height, width) <= AUTO_CIFAR_MAX_SIDE else "imagenet"
    return preset


def severity_params(name: str, preset: str, severity: int) -> dict[str, Any]:
    """The published constants of corruption ``name`` at ``severity`` (1-5) for a resolved ``preset``."""
    return dict(TABLES[name][preset][severity - 1])
