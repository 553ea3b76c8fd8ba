"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise and the extra speckle_noise.

Reference: ``gaussian_noise``, ``shot_noise``, ``impulse_noise``, ``speckle_noise`` in ``make_cifar_c.py`` /
``make_imagenet_c.py`` (https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``) and
``imagecorruptions/corruptions.py`` (https://github.com/bethgelab/imagecorruptions). Every pixel and channel gets
independent noise, as in the references (``np.random.normal(size=x.shape)``, ``np.random.poisson``,
``skimage.util.random_noise(mode="s&p")``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import fast_poisson_, rand, randint, randn

#: images of at least this many values get a seed each instead of a stored noise tensor (see :func:`_image_noise`)
SEEDED_NOISE_MIN = 1 << 14


def _sample_noise(
    shape: Shape, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``{"seeds": (B,) int64}`` for large images, ``{"noise": N(0, 1) of shape}`` for small ones."""
    b, c, h, w = shape
    if c * h * w >= SEEDED_NOISE_MIN:
        return {"seeds": randint(0, 2**62, (b,), gen, device).cpu()}
    return {"noise": randn(shape, gen, device, dtype)}


def _image_noise(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (``(B, C, H, W)``): ``params["noise"]`` or drawn from the seeds.

    With seeds, image ``i``'s noise is drawn from ``seeds[i]`` only, so :meth:`Corruption.apply` generates it
    chunk by chunk in the cache and no batch-sized noise tensor is allocated and kept (+30 % images/s at 224 px;
    :meth:`Corruption.replay` regenerates it exactly). Re-seeding a generator costs ~10 us, so small images
    (CIFAR) keep one stored noise tensor instead. Returns a fresh tensor the caller may overwrite.
    """
    if "noise" in params:
        return params["noise"].to(x, copy=True)
    noise = torch.empty_like(x, memory_format=torch.contiguous_format)
    g = torch.Generator(device=x.device)
    for i, seed in enumerate(params["seeds"].tolist()):
        g.manual_seed(seed)
        torch.randn(noise.shape[1:], generator=g, out=noise[i])
    return noise


class GaussianNoise(Corruption):
    """Additive Gaussian noise ``x + N(0, sigma^2)`` (``sigma``: CIFAR 0.04-0.10, ImageNet 0.08-0.38).

    Example:
        >>> import torch
        >>> from adaptkit.data.corruptions import GaussianNoise
        >>> GaussianNoise(severity=3, generator=0)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    name = "gaussian_noise"
    batch_dims: ClassVar[dict[str, int] | None] = {"seeds": 0, "noise": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        return _sample_noise(shape, gen, device, dtype)

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        noise = _image_noise(x, params)
        return torch.add(x, noise, alpha=float(params["sigma"]), out=noise)


class ShotNoise(Corruption):
    """Poisson (photon) noise ``Poisson(x * rate) / rate`` (``rate``: CIFAR 500-50, ImageNet 60-3).

    Poisson counts depend on the image, so the random parameter is a seed drawn from ``generator``; the
    counts are drawn from it in ``transform`` (on ``x``'s device), which makes :meth:`replay` exact. The sampler
    is :func:`~adaptkit.data.corruptions._ops.fast_poisson_` (exact inversion for rates up to 10, a corrected
    normal expansion above, total variation distance to the Poisson law <= 5.5e-4).
    """

    name = "shot_noise"

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        return {"seed": int(randint(0, 2**62, (1,), gen, device).item())}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        g = torch.Generator(device=x.device)
        g.manual_seed(params["seed"])
        rate = float(params["rate"])
        return fast_poisson_(x.clamp(0, 1).mul_(rate), g).div_(rate)


class ImpulseNoise(Corruption):
    """Salt-and-pepper noise: a fraction ``amount`` of the values (per channel) set to 0 or 1 with equal odds.

    ``amount``: CIFAR 0.01-0.07, ImageNet 0.03-0.27 (``skimage.util.random_noise(mode="s&p", amount=...)``).
    """

    name = "impulse_noise"
    batch_dims: ClassVar[dict[str, int] | None] = {"u": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        return {"u": rand(shape, gen, device, dtype)}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # one uniform per value: u < amount / 2 -> pepper (0), amount / 2 <= u < amount -> salt (1); the same
        # distribution as skimage's two Bernoulli draws (flip with p = amount, then salt with p = 0.5)
        u = params["u"].to(x)
        amount = float(params["amount"])
        return torch.where(u < amount, (u >= 0.5 * amount).to(x.dtype), x)


class SpeckleNoise(GaussianNoise):
    """Multiplicative noise ``x + x * N(0, sigma^2)`` (extra corruption; CIFAR 0.06-0.2, ImageNet 0.15-0.6);
    the same noise draws as :class:`GaussianNoise`."""

    name = "speckle_noise"

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        noise = _image_noise(x, params)
        return torch.addcmul(x, x, noise, value=float(params["sigma"]), out=noise)


gaussian_noise = functional(GaussianNoise, "gaussian_noise")


shot_noise = functional(ShotNoise, "shot_noise")


impulse_noise = functional(ImpulseNoise, "impulse_noise")


speckle_noise = functional(SpeckleNoise, "speckle_noise")
