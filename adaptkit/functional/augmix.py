"""AugMix (Hendrycks et al., ICLR 2020) on ``(B, C, H, W)`` float tensors in ``[0, 1]``, seeded, as MEMO uses it.

Per image: a *pre-augmentation* (small images: random crop with 4 px zero padding + horizontal flip; images of 64
px or more: random resized crop + horizontal flip), then ``width = 3`` chains of 1-3 operations drawn uniformly
from :data:`AUGMIX_OPS`, mixed with Dirichlet(1, 1, 1) weights ``w`` and blended with the pre-augmented image by
``m ~ Beta(1, 1)``::

    out = m * pre + (1 - m) * sum_i w_i * chain_i(pre)

This is the recipe of MEMO's released code (zhangmarvin/memo, ``cifar-10-exps/utils/third_party.py`` and
``imagenet-exps/utils/third_party.py``, which copy google-research/augmix's ``augmentations.py``): the same nine
operations (shear and translate in x and y separately), the same magnitude rules (``level ~ U(0.1, severity)``,
``int(level * max / 10)``), MEMO's severity 1 and grey fill (128) for the geometric operations.

Differences from the PIL pipeline (the values are floats, not 8-bit levels):

* ``autocontrast`` maps each channel's ``[min, max]`` onto ``[0, 1]`` without PIL's truncation to 8-bit levels
  (they differ by less than ``1/255``); ``solarize`` compares the float value with ``threshold / 255``.
* ``posterize`` and ``equalize`` are defined on 8-bit levels: they quantise ``round(255 x)`` first and then follow
  PIL exactly (same bits, same histogram look-up table), so on images that came from ``uint8`` they equal PIL.
* the geometric operations sample bilinearly at PIL's coordinates (pixel centres at ``+0.5``, inverse affine
  map as in ``Image.transform``), replicate the border pixel inside the image and fill outside it, as PIL does.

All random draws come from one ``torch.Generator`` (:func:`augmix_params`), in a fixed order and fixed shapes that
do not depend on the pixel values, so a seeded call is reproducible. The Dirichlet(1, 1, 1) weights are drawn as
normalised exponentials and ``Beta(1, 1)`` as a uniform (the concentration is not configurable for that reason).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The operations of MEMO's (and AugMix's) list, in its order; each is drawn with probability 1/9.
AUGMIX_OPS: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "posterize",
)
#: Fill value of the geometric operations outside the image: PIL's ``fillcolor=128`` in MEMO's code.
FILL = 128.0 / 255.0
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
_PRE_AUGMENT = ("auto", "crop", "resized_crop", "none")
#: Smallest side from which ``pre_augment="auto"`` uses the random resized crop (ImageNet recipe).
RESIZED_CROP_MIN_SIZE = 64


# ---------------------------------------------------------------------------------------------- single ops
def _quantize(x: torch.Tensor) -> torch.Tensor:
    """8-bit levels ``round(255 x)`` as a float tensor (exact integers)."""
    return (x * 255.0).round().clamp(0.0, 255.0)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch every channel of every image to ``[0, 1]``: ``(x - min) / (max - min)``; constant channels are
    left as they are (PIL's ``ImageOps.autocontrast`` without cut-off, before its 8-bit truncation).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import autocontrast
        >>> autocontrast(torch.tensor([0.25, 0.5, 0.75]).view(1, 1, 1, 3)).flatten().tolist()
        [0.0, 0.5, 1.0]
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat = span <= 0
    return torch.where(flat, x, (x - lo) / torch.where(flat, torch.ones_like(span), span))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel, PIL's ``ImageOps.equalize`` on the 8-bit levels
    ``q = round(255 x)``: ``step = (n - h[q_max]) // 255``, ``lut[i] = (step // 2 + sum_{j < i} h[j]) // step``
    (clipped to 255); channels with a single level or ``step = 0`` are left as they are.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import equalize
        >>> x = torch.tensor([0.0] * 255 + [1 / 255] * 255 + [2 / 255] * 2).view(1, 1, 1, -1)
        >>> sorted(set((equalize(x) * 255).round().int().flatten().tolist()))  # two levels spread apart
        [0, 128, 255]
    """
    b, c = x.shape[0], x.shape[1]
    q = _quantize(x).long().flatten(2)  # (B, C, HW)
    n = q.shape[-1]
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, q, torch.ones_like(q))
    last = hist.gather(2, q.amax(dim=2, keepdim=True))  # count of the highest level present
    step = (n - last) // 255  # (B, C, 1)
    below = hist.cumsum(dim=2) - hist  # sum_{j < i} h[j]
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    out = (lut.gather(2, q).to(x.dtype) / 255.0).view_as(x)
    keep = ((hist > 0).sum(dim=2, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep.unsqueeze(-1), x, out)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` (per image, ``(B,)``) most significant bits of the 8-bit levels ``round(255 x)`` (PIL's
    ``ImageOps.posterize``); ``bits >= 8`` leaves the image as it is.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import posterize
        >>> x = torch.tensor([37 / 255, 200 / 255]).view(1, 1, 1, 2)
        >>> (posterize(x, torch.tensor([4])) * 255).round().flatten().tolist()  # 37 & 0xF0, 200 & 0xF0
        [32.0, 192.0]
    """
    bits = bits.to(x.device)
    shift = torch.pow(2.0, (8 - bits.clamp(0, 8)).to(x.dtype)).view(-1, 1, 1, 1)
    out = torch.floor(_quantize(x) / shift) * shift / 255.0
    return torch.where((bits >= 8).view(-1, 1, 1, 1), x, out)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above ``threshold`` (per image, ``(B,)``, in ``[0, 1]`` units): ``1 - x`` where
    ``x >= threshold`` (PIL's ``ImageOps.solarize(img, 255 * threshold)``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import solarize
        >>> solarize(torch.tensor([0.25, 0.5, 0.75]).view(1, 1, 1, 3), torch.tensor([0.5])).flatten().tolist()
        [0.25, 0.5, 0.25]
    """
    t = threshold.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return torch.where(x >= t, 1.0 - x, x)


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, data, BILINEAR, fillcolor)`` per image: output pixel centre
    ``(X, Y)`` (``j + 0.5, i + 0.5``) takes the bilinear sample of the input at ``(a X + b Y + c, d X + e Y + f)``
    for ``matrix[k] = [[a, b, c], [d, e, f]]`` (``(B, 2, 3)``); inside the image the border pixel is replicated,
    outside it ``fill`` is used.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import affine
        >>> x = torch.arange(4.0).view(1, 1, 1, 4) / 4
        >>> shift = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])  # read one pixel to the right
        >>> affine(x, shift, fill=0.5).flatten().tolist()
        [0.25, 0.5, 0.75, 0.5]
    """
    b, _, h, w = x.shape
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    mat = matrix.to(device=x.device, dtype=dt)
    ys = torch.arange(h, device=x.device, dtype=dt) + 0.5
    xs = torch.arange(w, device=x.device, dtype=dt) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, h * w, 3)
    src = pts @ mat.transpose(1, 2)  # (B, HW, 2): input coordinates (u, v)
    u, v = src[..., 0].view(b, h, w), src[..., 1].view(b, h, w)
    grid = torch.stack([2.0 * u / w - 1.0, 2.0 * v / h - 1.0], dim=-1)
    work = x if x.dtype == dt else x.to(dt)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    outside = ((u < 0) | (u >= w) | (v < 0) | (v >= h)).unsqueeze(1)
    return out.masked_fill_(outside, fill).to(x.dtype)


def rotation_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 2, 3)`` inverse maps of PIL's ``Image.rotate(degrees)`` (counter-clockwise, about the centre)."""
    a = -torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = width / 2.0, height / 2.0
    row0 = torch.stack([cos, sin, cx - cos * cx - sin * cy], dim=-1)
    row1 = torch.stack([-sin, cos, cy + sin * cx - cos * cy], dim=-1)
    return torch.stack([row0, row1], dim=1)


def _geometric_matrix(ops: list[str], mag: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse affine maps ``(B, 2, 3)`` of per-image geometric ops (``ops[k]`` with magnitude ``mag[k]``)."""
    n = len(ops)
    mag = mag.to(torch.float64)
    mat = torch.zeros(n, 2, 3, dtype=torch.float64, device=mag.device)
    mat[:, 0, 0] = 1.0
    mat[:, 1, 1] = 1.0
    kinds = {name: torch.tensor([o == name for o in ops], device=mag.device) for name in _GEOMETRIC}
    mat[:, 0, 1] = torch.where(kinds["shear_x"], mag, 0.0)
    mat[:, 1, 0] = torch.where(kinds["shear_y"], mag, 0.0)
    mat[:, 0, 2] = torch.where(kinds["translate_x"], mag, 0.0)
    mat[:, 1, 2] = torch.where(kinds["translate_y"], mag, 0.0)
    rot = kinds["rotate"]
    if bool(rot.any()):
        mat = torch.where(rot.view(-1, 1, 1), rotation_matrix(mag, height, width), mat)
    return mat


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """Rotate every image counter-clockwise by ``degrees`` (``(B,)``) about its centre, bilinear, ``fill``
    outside (PIL's ``Image.rotate(degrees, resample=BILINEAR, fillcolor=fill)``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import rotate
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> rotate(x, torch.tensor([90.0])).round().flatten().tolist()  # == torch.rot90
        [1.0, 3.0, 0.0, 2.0]
    """
    return affine(x, rotation_matrix(degrees, x.shape[-2], x.shape[-1]), fill)


def shear_x(x: torch.Tensor, shear: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """``Image.transform(AFFINE, (1, s, 0, 0, 1, 0))``: output ``(X, Y)`` reads input ``(X + s Y, Y)``."""
    return affine(x, _geometric_matrix(["shear_x"] * x.shape[0], shear, x.shape[-2], x.shape[-1]), fill)


def shear_y(x: torch.Tensor, shear: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """``Image.transform(AFFINE, (1, 0, 0, s, 1, 0))``: output ``(X, Y)`` reads input ``(X, s X + Y)``."""
    return affine(x, _geometric_matrix(["shear_y"] * x.shape[0], shear, x.shape[-2], x.shape[-1]), fill)


def translate_x(x: torch.Tensor, pixels: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """``Image.transform(AFFINE, (1, 0, t, 0, 1, 0))``: output ``(X, Y)`` reads input ``(X + t, Y)``."""
    return affine(x, _geometric_matrix(["translate_x"] * x.shape[0], pixels, x.shape[-2], x.shape[-1]), fill)


def translate_y(x: torch.Tensor, pixels: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """``Image.transform(AFFINE, (1, 0, 0, 0, 1, t))``: output ``(X, Y)`` reads input ``(X, Y + t)``."""
    return affine(x, _geometric_matrix(["translate_y"] * x.shape[0], pixels, x.shape[-2], x.shape[-1]), fill)


def pad_crop(x: torch.Tensor, offsets: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """``RandomCrop(size, padding)`` with given offsets: zero-pad every side by ``padding`` and cut the
    ``H x W`` window whose top-left corner is ``offsets[k] = (top, left)`` (each in ``[0, 2 * padding]``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import pad_crop
        >>> pad_crop(torch.ones(1, 1, 2, 2), torch.tensor([[0, 1]]), padding=1).flatten().tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    off = offsets.to(x.device).long()
    rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    idx = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import roi_align  # lazy: keeps ``import adaptkit`` light

    b, _, h, w = x.shape
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    idx = torch.arange(b, device=x.device, dtype=work.dtype)[:, None]
    rois = torch.cat([idx, boxes.to(device=x.device, dtype=work.dtype)], dim=1)
    out = roi_align(work, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class AugMixParams:
    """Every random choice of one :func:`augmix` call on ``B`` images (from :func:`augmix_params`).

    Attributes:
        pre_augment: ``"crop"``, ``"resized_crop"`` or ``"none"`` (resolved from ``"auto"``).
        crop: ``(B, 2)`` crop offsets ``(top, left)`` for ``"crop"``; ``(B, 4)`` boxes ``(x1, y1, x2, y2)`` for
            ``"resized_crop"``; ``(B, 0)`` for ``"none"``.
        flip: ``(B,)`` bool, horizontal flip after the crop.
        weights: ``(B, width)`` chain weights, Dirichlet(1, ..., 1).
        mix: ``(B,)`` weight ``m ~ Beta(1, 1)`` of the pre-augmented image.
        ops: ``(B, width, 3)`` indices into ``names`` (``-1``: the chain is shorter than 3 ops).
        magnitudes: ``(B, width, 3)`` the op's argument: degrees (rotate), threshold in ``[0, 1]`` (solarize),
            shear factor, translation in pixels, bits (posterize), 0 for autocontrast and equalize.
        names: the operation list the indices refer to.
    """

    pre_augment: str
    crop: torch.Tensor
    flip: torch.Tensor
    weights: torch.Tensor
    mix: torch.Tensor
    ops: torch.Tensor
    magnitudes: torch.Tensor
    names: tuple[str, ...]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Uniform ``[0, 1)`` float64 draws on the generator's device (or the CPU for the global generator)."""
    if generator is None:
        return torch.rand(shape, dtype=torch.float64)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)


def _resolve_pre_augment(pre_augment: str, height: int, width: int) -> str:
    if pre_augment not in _PRE_AUGMENT:
        raise ValueError(f"augmix: pre_augment must be one of {list(_PRE_AUGMENT)}, got {pre_augment!r}")
    if pre_augment == "auto":
        return "resized_crop" if min(height, width) >= RESIZED_CROP_MIN_SIZE else "crop"
    return pre_augment


def _magnitude(name: str, level: torch.Tensor, negative: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """AugMix's argument of op ``name`` for ``level ~ U(0.1, severity)`` (``int_parameter`` truncates)."""
    sign = torch.where(negative, -1.0, 1.0).to(level.dtype)
    if name == "rotate":
        return sign * torch.floor(level * 30 / 10)
    if name == "solarize":
        return (256 - torch.floor(level * 256 / 10)) / 255.0
    if name in ("shear_x", "shear_y"):
        return sign * level * 0.3 / 10
    if name == "translate_x":
        return sign * torch.floor(level * (width / 3) / 10)
    if name == "translate_y":
        return sign * torch.floor(level * (height / 3) / 10)
    if name == "posterize":
        return 4 - torch.floor(level * 4 / 10)
    return torch.zeros_like(level)


def augmix_params(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    severity: float = 1.0,
    chains: int = 3,
    depth: int | None = None,
    pre_augment: str = "auto",
    padding: int = 4,
    crop_scale: Sequence[float] = (0.08, 1.0),
    ops: Sequence[str] = AUGMIX_OPS,
) -> AugMixParams:
    """Draw the random choices of :func:`augmix` for ``n`` images of ``height x width``.

    The draws happen in a fixed order with fixed shapes (crop, flip, chain weights, mixing weight, chain depths,
    op indices, levels, signs), so the same generator state gives the same parameters whatever the pixels.

    Args:
        n: number of images.
        height, width: image size.
        generator: source of every draw (``None``: torch's global generator).
        severity: upper end of ``level ~ U(0.1, severity)`` (MEMO: 1; AugMix's training default: 3).
        chains: number of chains mixed (3).
        depth: ops per chain; ``None``: uniform in ``{1, 2, 3}`` per chain (AugMix's ``mixture_depth=-1``).
        pre_augment: ``"auto"`` (``"crop"`` below 64 px, ``"resized_crop"`` from 64 px), ``"crop"``,
            ``"resized_crop"`` or ``"none"``.
        padding: zero padding of ``"crop"`` (4).
        crop_scale: area range of ``"resized_crop"`` (torchvision's ``RandomResizedCrop``: 0.08-1).
        ops: the operations to draw from (a subset of :data:`AUGMIX_OPS`).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import augmix_params
        >>> p = augmix_params(4, 32, 32, torch.Generator().manual_seed(0))
        >>> p.pre_augment, tuple(p.weights.shape), bool(torch.allclose(p.weights.sum(1).float(), torch.ones(4)))
        ('crop', (4, 3), True)
    """
    names = tuple(ops)
    unknown = [o for o in names if o not in AUGMIX_OPS]
    if unknown or not names:
        raise ValueError(f"augmix: ops must be a non-empty subset of {list(AUGMIX_OPS)}, got {list(ops)}")
    if not severity >= 0.1:
        raise ValueError(f"augmix: severity must be >= 0.1 (level ~ U(0.1, severity)), got {severity}")
    if int(chains) != chains or chains < 1:
        raise ValueError(f"augmix: chains must be a positive integer, got {chains}")
    if depth is not None and (int(depth) != depth or not 1 <= depth <= 3):
        raise ValueError(f"augmix: depth must be None (random 1-3) or 1, 2 or 3, got {depth}")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"augmix: padding must be a non-negative integer, got {padding}")
    mode = _resolve_pre_augment(pre_augment, height, width)
    chains = int(chains)
    if mode == "crop":
        crop = torch.floor(_rand((n, 2), generator) * (2 * padding + 1))
    elif mode == "resized_crop":
        from adaptkit.functional.augment import sample_crop_boxes

        dev = generator.device if generator is not None else torch.device("cpu")
        crop = sample_crop_boxes(n, height, width, generator, scale=crop_scale, device=dev).double()
    else:
        crop = torch.zeros(n, 0, dtype=torch.float64)
    flip = _rand((n,), generator) < 0.5
    expo = -torch.log1p(-_rand((n, chains), generator))  # Exp(1): normalised, Dirichlet(1, ..., 1)
    weights = expo / expo.sum(dim=1, keepdim=True)
    mix = _rand((n,), generator)  # Beta(1, 1)
    n_ops = torch.floor(_rand((n, chains), generator) * 3).long() + 1 if depth is None else None
    op_idx = torch.floor(_rand((n, chains, 3), generator) * len(names)).long()
    level = 0.1 + (severity - 0.1) * _rand((n, chains, 3), generator)
    negative = _rand((n, chains, 3), generator) > 0.5  # MEMO: "if np.random.uniform() > 0.5: level = -level"
    if n_ops is None:
        n_ops = torch.full((n, chains), int(depth), dtype=torch.long, device=op_idx.device)  # type: ignore[arg-type]
    active = torch.arange(3, device=op_idx.device).view(1, 1, 3) < n_ops.unsqueeze(-1)
    op_idx = torch.where(active, op_idx, torch.full_like(op_idx, -1))
    mags = torch.zeros_like(level)
    for k, name in enumerate(names):
        mags = torch.where(op_idx == k, _magnitude(name, level, negative, height, width), mags)
    return AugMixParams(mode, crop, flip, weights, mix, op_idx, mags, names)


# ---------------------------------------------------------------------------------------------- apply
def _apply_op(name: str, x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    if name == "autocontrast":
        return autocontrast(x)
    if name == "equalize":
        return equalize(x)
    if name == "posterize":
        return posterize(x, mag.round().long())
    if name == "solarize":
        return solarize(x, mag)
    raise AssertionError(name)  # pragma: no cover - geometric ops are batched in apply_augmix


def pre_augment_images(x: torch.Tensor, params: AugMixParams, padding: int = 4) -> torch.Tensor:
    """The crop and flip of ``params`` applied to ``x`` (the image each chain starts from)."""
    if params.pre_augment == "crop":
        x = pad_crop(x, params.crop, padding)
    elif params.pre_augment == "resized_crop":
        x = _resized_crop(x, params.crop)
    return torch.where(params.flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def apply_augmix(x: torch.Tensor, params: AugMixParams, fill: float = FILL, padding: int = 4) -> torch.Tensor:
    """Apply the choices in ``params`` (from :func:`augmix_params`) to ``x`` ``(B, C, H, W)`` in ``[0, 1]``.

    Returns ``m * pre + (1 - m) * sum_i w_i * chain_i``, ``pre`` the cropped and flipped image and ``chain_i``
    the ops of chain ``i`` applied to ``pre`` one after the other.
    """
    b, c, h, w = x.shape
    pre = pre_augment_images(x, params, padding)
    width = params.weights.shape[1]
    chains = pre.repeat_interleave(width, dim=0)  # (B * width, C, H, W): image k's chains at k * width + i
    ops = params.ops.reshape(b * width, -1).cpu()
    mags = params.magnitudes.reshape(b * width, -1).to(x.device)
    geo = [k for k, n in enumerate(params.names) if n in _GEOMETRIC]
    for s in range(ops.shape[1]):
        col = ops[:, s]
        if geo:
            idx = torch.isin(col, torch.tensor(geo)).nonzero().flatten()
            if idx.numel():
                names = [params.names[int(k)] for k in col[idx]]
                dev_idx = idx.to(x.device)
                mat = _geometric_matrix(names, mags[dev_idx, s].double().cpu(), h, w)
                chains[dev_idx] = affine(chains[dev_idx], mat, fill)
        for k, name in enumerate(params.names):
            if name in _GEOMETRIC:
                continue
            idx = (col == k).nonzero().flatten()
            if idx.numel():
                dev_idx = idx.to(x.device)
                chains[dev_idx] = _apply_op(name, chains[dev_idx], mags[dev_idx, s])
    wts = params.weights.to(device=x.device, dtype=x.dtype).view(b, width, 1, 1, 1)
    mixed = (wts * chains.view(b, width, c, h, w)).sum(dim=1)
    m = params.mix.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 1)
    return m * pre + (1.0 - m) * mixed


def augmix(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    severity: float = 1.0,
    chains: int = 3,
    depth: int | None = None,
    pre_augment: str = "auto",
    padding: int = 4,
    crop_scale: Sequence[float] = (0.08, 1.0),
    ops: Sequence[str] = AUGMIX_OPS,
    fill: float = FILL,
) -> torch.Tensor:
    """One AugMix view of every image of ``x`` (MEMO's recipe; see the module doc).

    Args:
        x: ``(B, C, H, W)`` float images in ``[0, 1]`` (any channel count: the ops act per channel). For MEMO's
            ``B`` copies of one image, pass ``image.expand(B, -1, -1, -1)``.
        generator: source of every random draw (``None``: torch's global generator).
        severity, chains, depth, pre_augment, padding, crop_scale, ops: see :func:`augmix_params`.
        fill: value outside the image for the geometric ops (MEMO: ``128 / 255``).

    Returns:
        A tensor of the shape, dtype and device of ``x``, in ``[0, 1]``; no gradient flows back to ``x``.

    Raises:
        ValueError: ``x`` is not a 4-D float tensor with values in ``[0, 1]``, or an argument is out of range.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augmix import augmix
        >>> x = torch.rand(1, 3, 32, 32).expand(8, -1, -1, -1)  # 8 copies of one image
        >>> a = augmix(x, torch.Generator().manual_seed(0))
        >>> b = augmix(x, torch.Generator().manual_seed(0))
        >>> a.shape, torch.equal(a, b), bool(a.min() >= 0 and a.max() <= 1), torch.equal(a[0], a[1])
        (torch.Size([8, 3, 32, 32]), True, True, False)
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augmix: need float images (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    if not 0.0 <= fill <= 1.0 or math.isnan(fill):
        raise ValueError(f"augmix: fill must be in [0, 1], got {fill}")
    b, _, h, w = x.shape
    params = augmix_params(
        b, h, w, generator, severity=severity, chains=chains, depth=depth, pre_augment=pre_augment,
        padding=padding, crop_scale=crop_scale, ops=ops,
    )  # fmt: skip
    with torch.no_grad():
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            if not (bool(lo >= -1e-6) and bool(hi <= 1 + 1e-6)):
                raise ValueError(
                    f"augmix: expects images in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]; map "
                    "normalised inputs back to pixels first (x * std + mean)"
                )
        work = x.detach().clamp(0.0, 1.0)
        if work.dtype in (torch.float16, torch.bfloat16):
            return apply_augmix(work.float(), params, fill, padding).to(x.dtype)
        return apply_augmix(work, params, fill, padding)
