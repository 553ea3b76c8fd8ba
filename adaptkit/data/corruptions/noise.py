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
from adaptkit.data.corruptions._ops import rand, randint, randn


class GaussianNoise(Corruption):
    """Additive Gaussian noise ``x + N(0, sigma^2)`` (``sigma``: CIFAR 0.04-0.10, ImageNet 0.08-0.38).

    Example:
        >>> import torch
        >>> from adaptkit.data.corruptions import GaussianNoise
        >>> GaussianNoise(severity=3, generator=0)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    name = "gaussian_noise"
    batch_dims: ClassVar[dict[str, int] | None] = {"noise": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        return {"noise": randn(shape, gen, device, dtype)}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.add(x, params["noise"].to(x), alpha=float(params["sigma"]))


class ShotNoise(Corruption):
    """Poisson (photon) noise ``Poisson(x * rate) / rate`` (``rate``: CIFAR 500-50, ImageNet 60-3).

    Poisson counts depend on the image, so the random parameter is a seed drawn from ``generator``; the
    counts are drawn from it in ``transform`` (on ``x``'s device), which makes :meth:`replay` exact.
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
        return torch.poisson(x.clamp(0, 1) * rate, generator=g) / rate


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


class SpeckleNoise(Corruption):
    """Multiplicative noise ``x + x * N(0, sigma^2)`` (extra corruption; CIFAR 0.06-0.2, ImageNet 0.15-0.6)."""

    name = "speckle_noise"
    batch_dims: ClassVar[dict[str, int] | None] = {"noise": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        return {"noise": randn(shape, gen, device, dtype)}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.addcmul(x, x, params["noise"].to(x), value=float(params["sigma"]))


gaussian_noise = functional(GaussianNoise, "gaussian_noise")


shot_noise = functional(ShotNoise, "shot_noise")


impulse_noise = functional(ImpulseNoise, "impulse_noise")


speckle_noise = functional(SpeckleNoise, "speckle_noise")
