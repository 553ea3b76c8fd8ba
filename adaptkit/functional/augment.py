"""Batched, per-sample SimCLR augmentations on ``(B, C, H, W)`` float tensors (the views of TTT++).

Every sample draws its own parameters from one ``torch.Generator`` (seeded runs are reproducible); the ops are
vectorised over the batch: one ``roi_align`` call crops and resizes all samples, flips and colour ops are
masked tensor ops. The recipe of :func:`simclr_augment` is SupContrast's CIFAR SimCLR transform, used by the
released TTT++ code: ``RandomResizedCrop(scale=(0.2, 1))``, ``RandomHorizontalFlip()``,
``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, ``RandomGrayscale(p=0.2)``.

Value range: torchvision's colour ops assume images in ``[0, 1]`` and clamp to it. Models here often take
*normalised* inputs; ``value_range="auto"`` clamps to ``[0, 1]`` only when the batch lies in it and otherwise
does not clamp (brightness, contrast, saturation and hue are then applied to the normalised values as they
are: they still run, but are only an approximation of the pixel-space jitter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

#: ITU-R 601-2 luma weights (torchvision's ``rgb_to_grayscale``)
_LUMA = (0.2989, 0.587, 0.114)
#: RGB from the HSV sector ``i`` as indices into ``(v, q, p, t)`` (torchvision's ``_hsv2rgb`` table)
_SECTORS = ((0, 3, 2), (1, 0, 2), (2, 0, 3), (2, 1, 0), (3, 2, 0), (0, 2, 1))

ValueRange = Union[str, Sequence[float], None]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform ``[0, 1)`` draws from ``generator`` (on its own device), moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _bounds(x: torch.Tensor, value_range: ValueRange) -> tuple[float, float] | None:
    if value_range is None:
        return None
    if isinstance(value_range, str):
        if value_range != "auto":
            raise ValueError(f"value_range must be 'auto', None or (low, high), got {value_range!r}")
        lo, hi = torch.aminmax(x)
        return (0.0, 1.0) if bool(lo >= 0) and bool(hi <= 1) else None
    lo_f, hi_f = (float(v) for v in value_range)
    if not lo_f < hi_f:
        raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
    return lo_f, hi_f


def _clamp(x: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    return x if bounds is None else x.clamp(bounds[0], bounds[1])


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` of RGB images ``(B, 3, H, W)`` (torchvision's weights).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import rgb_to_gray
        >>> round(rgb_to_gray(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).item(), 4)  # pure red
        0.2989
    """
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` random-resized-crop boxes ``(x1, y1, x2, y2)`` in pixel-edge coordinates, torchvision's algorithm
    per sample, vectorised: 10 trials of (area fraction ``~ U(scale)``, log aspect ratio ``~ U(log ratio)``),
    integer sides, the first trial that fits; if none fits, the whole image clipped to the ratio range,
    centred. The crop's corner is uniform over the positions where it fits.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import sample_crop_boxes
        >>> sample_crop_boxes(2, 8, 8, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
        tensor([[0., 0., 8., 8.],
                [0., 0., 8., 8.]])
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"sample_crop_boxes: need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got "
                         f"scale={tuple(scale)}, ratio={tuple(ratio)}")  # fmt: skip
    area = float(height * width)
    u_scale = _rand((n, 10), generator, dev).double()
    u_ratio = _rand((n, 10), generator, dev).double()
    u_pos = _rand((n, 2), generator, dev).double()
    target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting trial (0 if none)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # fallback (torchvision): the whole image, clipped to the aspect-ratio range, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.where(found, torch.floor(u_pos[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u_pos[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([left, top, left + w, top + h], dim=1).float()


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> torch.Tensor:
    """Crop every sample of ``(B, C, H, W)`` to its own random box (:func:`sample_crop_boxes`) and resize it
    back to ``H x W``, bilinearly, in one batched ``torchvision.ops.roi_align`` call (pixel-centre aligned, one
    sample per output pixel; a box covering the whole image returns the image exactly). Near a crop's edge the
    interpolation may use the neighbouring pixel outside the box where ``torch`` / PIL resizes would
    replicate the edge pixel: a sub-pixel difference.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import random_resized_crop
        >>> x = torch.rand(3, 3, 16, 16)
        >>> random_resized_crop(x, torch.Generator().manual_seed(0)).shape
        torch.Size([3, 3, 16, 16])
    """
    from torchvision.ops import roi_align  # lazy: keeps ``import adaptkit`` light

    b, _, height, width = x.shape
    boxes = sample_crop_boxes(b, height, width, generator, scale, ratio, device=x.device)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    rois = torch.cat([torch.arange(b, device=x.device, dtype=work.dtype)[:, None], boxes.to(work.dtype)], dim=1)
    out = roi_align(work, rois, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return out.to(x.dtype)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each sample horizontally (last dimension) with probability ``p``.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import random_hflip
        >>> random_hflip(torch.tensor([[[[1.0, 2.0]]]]), p=1.0).tolist()
        [[[[2.0, 1.0]]]]
    """
    flip = _rand((x.shape[0],), generator, x.device) < p
    return torch.where(_per_sample(flip), x.flip(-1), x)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images ``(B, 3, H, W)`` by ``shift`` ``(B,)`` (fractions of a turn, torchvision's
    ``adjust_hue`` per sample). Written with the channel max/min instead of saturation, so it is exact for any
    real values (no division by the max, no clamping): for images in ``[0, 1]`` it equals torchvision's.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import adjust_hue
        >>> red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        >>> adjust_hue(red, torch.tensor([1 / 3])).flatten().tolist()  # red -> green
        [0.0, 1.0, 0.0]
    """
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    cr = maxc - minc
    eqc = cr == 0
    div = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.to(x.dtype).view(-1, 1, 1), 1.0)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long() % 6
    v, p = maxc, minc
    q, t = maxc - cr * f, minc + cr * f
    cand = torch.stack([v, q, p, t], dim=1)  # (B, 4, H, W)
    table = torch.tensor(_SECTORS, device=x.device)
    idx = table[sector].permute(0, 3, 1, 2)  # (B, 3, H, W)
    return cand.gather(1, idx)


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    value_range: ValueRange = "auto",
) -> torch.Tensor:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` per sample: each sample draws
    whether to jitter, its four factors (brightness, contrast, saturation ``~ U[max(0, 1 - a), 1 + a]``, hue
    shift ``~ U[-hue, hue]``) and a random order of the four ops, as torchvision's ``ColorJitter``.

    Brightness scales the values; contrast blends with the sample's mean luma; saturation blends with the
    luma image; hue rotates in HSV (:func:`adjust_hue`). Saturation and hue need RGB: for ``C != 3`` they
    are skipped (brightness and contrast, on the channel mean, still apply). Results are clamped to the value
    range after every op, as torchvision does for ``[0, 1]`` images (``value_range``: see the module doc).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import color_jitter
        >>> x = torch.rand(4, 3, 8, 8)
        >>> y = color_jitter(x, torch.Generator().manual_seed(0), p=1.0)
        >>> y.shape, bool(y.min() >= 0), bool(y.max() <= 1)
        (torch.Size([4, 3, 8, 8]), True, True)
    """
    n, c = x.shape[0], x.shape[1]
    bounds = _bounds(x, value_range)
    apply = _rand((n,), generator, x.device) < p
    u = _rand((n, 4), generator, x.device)
    order = _rand((n, 4), generator, x.device).argsort(dim=1)  # a uniform random permutation per sample
    factors = [
        (1 - brightness + 2 * brightness * u[:, 0]).clamp_min(0),
        (1 - contrast + 2 * contrast * u[:, 1]).clamp_min(0),
        (1 - saturation + 2 * saturation * u[:, 2]).clamp_min(0),
        hue * (2 * u[:, 3] - 1),
    ]
    amounts = (brightness, contrast, saturation, hue)
    out = x.clone()
    for pos in range(4):
        for op in range(4):
            if amounts[op] == 0 or (op >= 2 and c != 3):
                continue
            idx = (apply & (order[:, pos] == op)).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            img, f = out[idx], factors[op][idx].to(x.dtype)
            if op == 0:
                img = f.view(-1, 1, 1, 1) * img
            elif op == 1:
                gray = rgb_to_gray(img) if c == 3 else img
                mean = gray.mean(dim=(1, 2, 3), keepdim=True)
                img = f.view(-1, 1, 1, 1) * img + (1 - f.view(-1, 1, 1, 1)) * mean
            elif op == 2:
                img = f.view(-1, 1, 1, 1) * img + (1 - f.view(-1, 1, 1, 1)) * rgb_to_gray(img)
            else:
                img = adjust_hue(img, f)
            out[idx] = _clamp(img, bounds)
    return out


def random_grayscale(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.2) -> torch.Tensor:
    """Replace each RGB sample by its luma (repeated over the 3 channels) with probability ``p``; samples with
    ``C != 3`` channels are returned unchanged (a random number is still drawn, for reproducibility).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import random_grayscale
        >>> y = random_grayscale(torch.rand(2, 3, 4, 4), p=1.0)
        >>> bool((y[:, 0] == y[:, 1]).all() and (y[:, 1] == y[:, 2]).all())
        True
    """
    gray_mask = _rand((x.shape[0],), generator, x.device) < p
    if x.shape[1] != 3:
        return x
    return torch.where(_per_sample(gray_mask), rgb_to_gray(x).expand_as(x), x)


def simclr_augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    crop_scale: Sequence[float] = (0.2, 1.0),
    crop_ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    value_range: ValueRange = "auto",
) -> torch.Tensor:
    """One SimCLR view of every sample: random resized crop, horizontal flip, colour jitter, grayscale (in
    that order, each with its own per-sample parameters). Call it twice for the two views.

    Args:
        x: ``(B, C, H, W)`` float images (ideally in ``[0, 1]``; see the module doc for normalised inputs).
        generator: source of all random draws (``None``: the global generator on ``x``'s device).
        crop_scale / crop_ratio: area fraction and aspect-ratio ranges of the crop.
        flip_p: horizontal-flip probability.
        jitter: brightness, contrast, saturation, hue strengths (``hue`` 0 skips the hue op).
        jitter_p: probability of jittering a sample.
        grayscale_p: probability of converting a sample to grayscale.
        value_range: ``"auto"``, ``None`` (never clamp) or ``(low, high)`` to clamp the colour ops to.

    Returns:
        A tensor of the same shape, dtype and device (no gradient to ``x`` is intended).

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import simclr_augment
        >>> x = torch.rand(4, 3, 16, 16)
        >>> a = simclr_augment(x, torch.Generator().manual_seed(1))
        >>> b = simclr_augment(x, torch.Generator().manual_seed(1))
        >>> a.shape, torch.equal(a, b), bool(a.min() >= 0) and bool(a.max() <= 1)
        (torch.Size([4, 3, 16, 16]), True, True)
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"simclr_augment: need float images (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    if len(jitter) != 4:
        raise ValueError(f"simclr_augment: jitter must be (brightness, contrast, saturation, hue), got {jitter}")
    with torch.no_grad():
        bounds = _bounds(x, value_range)
        vr = None if bounds is None else bounds
        out = random_resized_crop(x, generator, crop_scale, crop_ratio)
        out = random_hflip(out, generator, flip_p)
        out = color_jitter(out, generator, *jitter, p=jitter_p, value_range=vr)
        return random_grayscale(out, generator, grayscale_p)


#: the "soft" variant of CoTTA's augmentation (``get_tta_transforms(soft=True)`` in the official code), to pass as
#: ``cotta_augment(x, g, **COTTA_SOFT_AUGMENT)``
COTTA_SOFT_AUGMENT: dict[str, tuple[float, float]] = {
    "brightness": (0.8, 1.2),
    "contrast": (0.85, 1.15),
    "saturation": (0.75, 1.25),
    "hue": (-0.03, 0.03),
    "gamma": (0.85, 1.15),
    "degrees": (-8.0, 8.0),
    "scale": (0.95, 1.05),
    "blur_sigma": (0.001, 0.25),
}


def _draws(n: int, generator: torch.Generator | None) -> list[float]:
    """``n`` uniform ``[0, 1)`` floats from ``generator`` (the global CPU generator when ``None``)."""
    if generator is None:
        return torch.rand(n, dtype=torch.float64).tolist()
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).tolist()


def _uniform(u: float, bounds: Sequence[float]) -> float:
    return float(bounds[0]) + (float(bounds[1]) - float(bounds[0])) * u


def _check_pair(name: str, bounds: Sequence[float], low: float | None = None) -> None:
    if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
        raise ValueError(f"cotta_augment: {name} must be (low, high) with low <= high, got {bounds!r}")
    if low is not None and float(bounds[0]) < low:
        raise ValueError(f"cotta_augment: {name} must be >= {low}, got {bounds!r}")


def _cotta_colour(img: torch.Tensor, op: int, f: float) -> torch.Tensor:
    """One of CoTTA's ``ColorJitterPro`` ops on ``[0, 1]`` images with torchvision's float formulas:
    0 brightness, 1 contrast, 2 saturation, 3 hue, 4 gamma (after the official ``clamp(1e-8, 1)``)."""
    c = img.shape[1]
    if op == 0:
        return (img * f).clamp(0.0, 1.0)
    if op == 1:
        gray = rgb_to_gray(img) if c == 3 else img
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        return (f * img + (1.0 - f) * mean).clamp(0.0, 1.0)
    if op == 2:
        if c != 3:
            return img
        return (f * img + (1.0 - f) * rgb_to_gray(img)).clamp(0.0, 1.0)
    if op == 3:
        if c != 3:
            return img
        return _shift_hue(img, f)
    return img.clamp(1e-8, 1.0).pow(f)


def _shift_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Hue rotation of RGB images by one ``shift`` for the batch: :func:`adjust_hue`'s hue, then the closed-form
    HSV-to-RGB ``v - c * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``, ``n = 5, 3, 1`` (no gather)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    cr = maxc - x.amin(dim=1)
    div = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + shift, 1.0) * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        out.append(maxc - cr * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


def _affine_theta(
    angle: float, tx: float, ty: float, scale: float, height: int, width: int
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``affine_grid`` matrix (normalised coordinates, ``align_corners=False``) of torchvision's tensor
    ``affine(img, angle, [tx, ty], scale, shear=0)`` about the image centre (its inverse matrix, rescaled)."""
    rot = math.radians(angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]  # inverse rotation-scale, pixel units
    m[2] -= m[0] * tx + m[1] * ty
    m[5] -= m[3] * tx + m[4] * ty
    return (
        (m[0], m[1] * height / width, 2.0 * m[2] / width),
        (m[3] * width / height, m[4], 2.0 * m[5] / height),
    )


def cotta_augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    brightness: Sequence[float] = (0.6, 1.4),
    contrast: Sequence[float] = (0.7, 1.3),
    saturation: Sequence[float] = (0.5, 1.5),
    hue: Sequence[float] = (-0.06, 0.06),
    gamma: Sequence[float] = (0.7, 1.3),
    degrees: Sequence[float] = (-15.0, 15.0),
    translate: float = 1.0 / 16.0,
    scale: Sequence[float] = (0.9, 1.1),
    blur_kernel: int = 5,
    blur_sigma: Sequence[float] = (0.001, 0.5),
    flip_p: float = 0.5,
    noise_std: float = 0.005,
    value_range: Sequence[float] = (0.0, 1.0),
) -> torch.Tensor:
    """CoTTA's strong test-time augmentation (also RoTTA's), on a batch of image tensors.

    The official ``get_tta_transforms()`` (qinenergy/cotta ``cifar/cotta.py``, ``my_transforms.py``) applied to a
    batch tensor, so **one parameter draw per call is shared by the whole batch** (as there); only the noise is
    per pixel. In order:

    1. clip to ``[0, 1]``;
    2. ``ColorJitterPro``: brightness ``x*b``, contrast (blend with the per-image mean luma), saturation (blend
       with the luma image), hue (HSV rotation), gamma ``clamp(x, 1e-8, 1) ** g``, in a random order, each factor
       uniform in its range, each op clamped to ``[0, 1]`` (torchvision's float formulas);
    3. edge-pad ``H // 2`` rows and ``W // 2`` columns on each side (official: ``int(n_pixels / 2)``, square images);
    4. affine about the centre, bilinear, fill 0 (torchvision's fill mask): angle ``~ U(degrees)``, translation a
       whole number of pixels ``round(U(-t, t) * size)`` of the *padded* size, scale ``~ U(scale)``, no shear;
    5. Gaussian blur, ``blur_kernel`` taps, ``sigma ~ U(blur_sigma)``, reflect padding;
    6. centre crop back to ``H x W``; 7. horizontal flip with probability ``flip_p``;
    8. add ``N(0, noise_std^2)`` noise per element; 9. clip to ``[0, 1]``.

    Channels: saturation and hue need RGB and are skipped (their factors still drawn) for ``C != 3``; for
    ``C == 1`` contrast uses the image mean (torchvision), for other ``C`` the mean over all channels.

    Value range: the recipe works on ``[0, 1]`` pixels, so the model should normalise internally (as the
    official RobustBench models do). ``value_range=(low, high)`` maps the input linearly to ``[0, 1]`` first and
    the result back (all constants, noise included, stay relative to that range). It is not a substitute for
    per-channel mean/std normalisation: for such inputs pass un-normalised images and normalise in the model.

    Args:
        x: ``(B, C, H, W)`` floating-point images.
        generator: source of every random draw (``None``: the global generators). Use one on ``x``'s device:
            the noise is drawn on the generator's device and then moved.
        brightness, contrast, saturation, gamma: factor ranges (the "soft" variant:
            :data:`COTTA_SOFT_AUGMENT`); hue: shift range in fractions of a turn.
        degrees: rotation range in degrees; translate: maximum translation as a fraction of the padded size;
        scale: zoom range; blur_kernel: odd kernel size; blur_sigma: blur sigma range (positive).
        flip_p: probability of flipping the batch; noise_std: standard deviation of the additive noise.
        value_range: ``(low, high)`` of the input pixel values (default ``(0, 1)``).

    Returns:
        The augmented batch, same shape, dtype and device, no autograd history.

    Example:
        >>> import torch
        >>> from adaptkit.functional.augment import cotta_augment
        >>> x = torch.rand(4, 3, 32, 32)
        >>> a = cotta_augment(x, torch.Generator().manual_seed(0))
        >>> b = cotta_augment(x, torch.Generator().manual_seed(0))
        >>> a.shape, a.dtype, torch.equal(a, b), bool(a.min() >= 0) and bool(a.max() <= 1)
        (torch.Size([4, 3, 32, 32]), torch.float32, True, True)
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"cotta_augment: need float images (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    _check_pair("brightness", brightness, 0.0)
    _check_pair("contrast", contrast, 0.0)
    _check_pair("saturation", saturation, 0.0)
    _check_pair("hue", hue, -0.5)
    if float(hue[1]) > 0.5:
        raise ValueError(f"cotta_augment: hue must lie in [-0.5, 0.5], got {hue!r}")
    _check_pair("gamma", gamma, 0.0)
    _check_pair("degrees", degrees)
    _check_pair("scale", scale)
    if float(scale[0]) <= 0:
        raise ValueError(f"cotta_augment: scale must be positive, got {scale!r}")
    _check_pair("blur_sigma", blur_sigma)
    if float(blur_sigma[0]) <= 0:
        raise ValueError(f"cotta_augment: blur_sigma must be positive, got {blur_sigma!r}")
    if not 0.0 <= translate <= 1.0:
        raise ValueError(f"cotta_augment: translate must be in [0, 1], got {translate!r}")
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"cotta_augment: blur_kernel must be a positive odd integer, got {blur_kernel!r}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"cotta_augment: flip_p must be in [0, 1], got {flip_p!r}")
    if noise_std < 0:
        raise ValueError(f"cotta_augment: noise_std must be >= 0, got {noise_std!r}")
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"cotta_augment: value_range must be (low, high) with low < high, got {value_range!r}")

    # one draw per call, shared by the batch: colour order (5) and factors (5), angle, tx, ty, scale, sigma, flip
    u = _draws(16, generator)
    order = sorted(range(5), key=lambda i: u[i])
    factors = [
        _uniform(u[5], brightness),
        _uniform(u[6], contrast),
        _uniform(u[7], saturation),
        _uniform(u[8], hue),
        _uniform(u[9], gamma),
    ]
    b, c, height, width = x.shape
    ph, pw = height // 2, width // 2
    hp, wp = height + 2 * ph, width + 2 * pw
    angle = _uniform(u[10], degrees)
    tx = float(round(_uniform(u[11], (-translate * wp, translate * wp))))
    ty = float(round(_uniform(u[12], (-translate * hp, translate * hp))))
    zoom = _uniform(u[13], scale)
    sigma = _uniform(u[14], blur_sigma)
    flip = u[15] < flip_p

    with torch.no_grad():
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if (lo, hi) != (0.0, 1.0):
            work = (work - lo) / (hi - lo)
        out = work.clamp(0.0, 1.0)
        for op in order:
            out = _cotta_colour(out, op, factors[op])
        # edge padding, then the affine warp of the padded image (torchvision's grid; fill 0 through a mask
        # channel), then the blur, then the centre crop. Only the crop plus the blur's margin is computed: the
        # rows/columns of the affine grid outside it are never needed (identical values, ~3x less work).
        half = blur_kernel // 2
        windowed = ph >= half and pw >= half
        out = torch.nn.functional.pad(out, (pw, pw, ph, ph), mode="replicate")
        theta = torch.tensor(_affine_theta(angle, tx, ty, zoom, hp, wp), dtype=out.dtype, device=out.device)
        grid = torch.nn.functional.affine_grid(theta.expand(b, 2, 3), [b, c + 1, hp, wp], align_corners=False)
        if windowed:
            grid = grid[:, ph - half : ph + height + half, pw - half : pw + width + half]
        ones = torch.ones(b, 1, hp, wp, dtype=out.dtype, device=out.device)
        warped = torch.nn.functional.grid_sample(
            torch.cat([out, ones], dim=1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        out = warped[:, :c] * warped[:, c:]
        if half > 0:  # Gaussian blur, separable, torchvision's kernel (reflect padding of the padded image)
            taps = torch.arange(blur_kernel, dtype=torch.float64, device=out.device) - half
            k1 = torch.softmax(-0.5 * (taps / sigma) ** 2, dim=0).to(out.dtype)
            if not windowed:
                mode = "reflect" if min(hp, wp) > half else "replicate"
                out = torch.nn.functional.pad(out, (half, half, half, half), mode=mode)
            out = torch.nn.functional.conv2d(out, k1.view(1, 1, 1, -1).expand(c, 1, 1, blur_kernel), groups=c)
            out = torch.nn.functional.conv2d(out, k1.view(1, 1, -1, 1).expand(c, 1, blur_kernel, 1), groups=c)
        if not windowed:
            out = out[:, :, ph : ph + height, pw : pw + width]
        if flip:
            out = out.flip(-1)
        if noise_std > 0:
            if generator is None:
                noise = torch.randn(out.shape, dtype=out.dtype, device=out.device)
            else:
                noise = torch.randn(out.shape, generator=generator, device=generator.device, dtype=out.dtype)
            out = out + noise.to(out.device) * noise_std
        out = out.clamp(0.0, 1.0)
        if (lo, hi) != (0.0, 1.0):
            out = out * (hi - lo) + lo
        return out.to(x.dtype).contiguous()
