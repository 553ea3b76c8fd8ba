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
