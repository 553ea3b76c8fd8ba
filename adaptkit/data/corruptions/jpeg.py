"""jpeg_compression: JPEG encoding at a low quality.

Reference: ``jpeg_compression`` in ``make_cifar_c.py`` / ``make_imagenet_c.py``
(https://github.com/hendrycks/robustness, ``ImageNet-C/create_c/``): ``PIL.Image.save(..., "JPEG", quality=q)``
and decoding. Here ``torchvision.io.encode_jpeg`` / ``decode_jpeg`` (libjpeg, same default 4:2:0 chroma
subsampling) on the 8-bit rounded image. The codec runs on the CPU: CUDA batches are copied to the host and
back (this is the one corruption that is not pure tensor math; there is no NumPy or PIL involved).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch

from adaptkit.data.corruptions._base import Corruption, Params, functional


class JpegCompression(Corruption):
    """JPEG round trip at ``quality`` (CIFAR 80-40, ImageNet 25-7)."""

    name = "jpeg_compression"
    batch_dims: ClassVar[dict[str, int] | None] = {}
    stochastic = False

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its codecs in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg, encode_jpeg

            q = int(params["quality"])
            imgs = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).cpu()
            encoded = encode_jpeg(list(imgs.unbind(0)), quality=q)
            decoded = decode_jpeg(encoded)
        out = torch.stack(list(decoded), dim=0)
        return out.to(device=x.device, dtype=x.dtype) / 255


jpeg_compression = functional(JpegCompression, "jpeg_compression")
