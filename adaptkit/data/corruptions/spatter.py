"""spatter: water drops (severities 1-3) or mud (4-5) on the lens; an extra corruption.

Reference: ``spatter`` in ``make_cifar_c.py`` / ``make_imagenet_c.py`` (https://github.com/hendrycks/robustness,
``ImageNet-C/create_c/``) and ``imagecorruptions/corruptions.py``. A liquid field ``N(loc, scale^2)`` is smoothed
(``skimage`` Gaussian, ``sigma``) and thresholded at ``threshold``.

* Water (``mud == 0``): OpenCV ``Canny`` edges of the 8-bit field, a distance transform truncated at 20 px,
  3 x 3 box blur, histogram equalisation, an emboss filter and another box blur give a shading ``dist``; the
  mask ``m = field * dist / max * intensity`` adds pale turquoise ``(175, 238, 238) / 255``.
* Mud (``mud == 1``): the binary field is Gaussian-smoothed with ``sigma = intensity``, values under 0.8 are
  dropped and the image is replaced by mud brown ``(63, 42, 20) / 255`` with weight ``m``.

Deviations (all in the water branch, pure torch instead of OpenCV): Canny (L1 Sobel magnitude, non-maximum
suppression on 4 directions, hysteresis 50 / 150) follows weak edges for 8 steps only; the Euclidean distance
transform is a 20-step chamfer propagation (weights 1 and 1.4, OpenCV's
``DIST_L2`` 3 x 3 mask values). Grayscale images get the luma of the added colour, as imagecorruptions does.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from adaptkit.data.corruptions._base import Corruption, Params, Shape, functional
from adaptkit.data.corruptions._ops import (
    IC_GRAY,
    box_blur3,
    gaussian_filter,
    randn,
    to_gray,
)

_WATER = (175 / 255, 238 / 255, 238 / 255)
_MUD = (63 / 255, 42 / 255, 20 / 255)


def _sobel(img8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3 x 3 Sobel gradients ``(gx, gy)`` of an integer-valued ``(B, 1, H, W)`` image, ``BORDER_REFLECT_101``.

    Separable differences and ``[1, 2, 1]`` sums of shifted views: on integer values every partial sum is exact,
    so this equals the 3 x 3 correlation (up to the sign of zeros) and avoids a depthwise convolution with as
    few channels as images, which oneDNN does not vectorise (~10x slower here).
    """
    p = F.pad(img8, (1, 1, 1, 1), mode="reflect")
    dx = p[..., :, 2:] - p[..., :, :-2]  # (H + 2, W)
    gx = dx[..., :-2, :] + dx[..., 2:, :]
    gx.add_(dx[..., 1:-1, :]).add_(dx[..., 1:-1, :])
    dy = p[..., 2:, :] - p[..., :-2, :]  # (H, W + 2)
    gy = dy[..., :, :-2] + dy[..., :, 2:]
    gy.add_(dy[..., :, 1:-1]).add_(dy[..., :, 1:-1])
    return gx, gy


def _emboss(img8: torch.Tensor) -> torch.Tensor:
    """``cv2.filter2D`` with the emboss kernel (``BORDER_REFLECT_101``) of an integer-valued ``(B, 1, H, W)`` map.

    Sums of shifted views, exact on integer values (see :func:`_sobel`).
    """
    h, w = img8.shape[-2:]
    p = F.pad(img8, (1, 1, 1, 1), mode="reflect")

    def nb(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    out = nb(0, 0) + nb(0, 1)  # kernel ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))
    out.add_(nb(1, 0)).add_(nb(1, 1)).add_(nb(1, 1)).sub_(nb(-1, 0)).sub_(nb(0, -1)).sub_(nb(-1, -1)).sub_(nb(-1, -1))
    return out


def _canny_like(img8: torch.Tensor, low: float = 50.0, high: float = 150.0, hysteresis_steps: int = 8) -> torch.Tensor:
    """Boolean edge map of an 8-bit-valued ``(B, 1, H, W)`` image (see the module docstring); ``0 <= low <= high``."""
    gx, gy = _sobel(img8)
    mag = gx.abs() + gy.abs()
    # non-maximum suppression along the gradient direction quantised to 0 / 45 / 90 / 135 degrees
    h, w = mag.shape[-2:]
    p = F.pad(mag, (1, 1, 1, 1))

    def nb(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # sectors of atan2(gy, gx) mod 180 degrees at 22.5 / 67.5 / 112.5 / 157.5, decided exactly on the integer
    # gradients: |gy| < tan(22.5) |gx|  <=>  (|gx| + |gy|)^2 < 2 gx^2 (the same sectors as the float atan2 for
    # every pair of 8-bit Sobel gradients, checked exhaustively, and no transcendental functions)
    mag2 = mag * mag
    horiz = (mag2 < 2 * gx * gx) | (mag == 0)
    vert = mag2 < 2 * gy * gy  # disjoint from horiz
    diag = (gx * gy > 0) & ~horiz & ~vert  # 45 degrees (same signs); the rest is 135 degrees
    anti = ~(horiz | vert | diag)
    # keep the local maxima along the sector's direction (boolean algebra: torch.where is slow on the CPU)
    keep = horiz & (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep |= vert & (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep |= diag & (mag > nb(-1, -1)) & (mag >= nb(1, 1))
    keep |= anti & (mag > nb(-1, 1)) & (mag >= nb(1, -1))
    strong = keep & (mag > high)  # suppressed pixels count as 0, below both (non-negative) thresholds
    weak = keep & (mag > low)
    for _ in range(hysteresis_steps):  # grow strong edges into connected weak ones
        strong = weak & _dilate3(strong)
    return strong


def _dilate3(m: torch.Tensor) -> torch.Tensor:
    """3 x 3 binary dilation of a boolean ``(..., H, W)`` map (= ``max_pool2d(3, stride 1, padding 1) > 0``)."""
    r = m.clone()
    r[..., :, 1:] |= m[..., :, :-1]
    r[..., :, :-1] |= m[..., :, 1:]
    out = r.clone()
    out[..., 1:, :] |= r[..., :-1, :]
    out[..., :-1, :] |= r[..., 1:, :]
    return out


def _chamfer_distance(edges: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """Distance to the nearest edge pixel (``(B, 1, H, W)``), truncated at ``cap``.

    Synchronous (Jacobi) chamfer steps ``d = min(d, min(4 axial neighbours) + 1, min(4 diagonal neighbours) + 1.4)``:
    after ``k`` steps ``d`` is the shortest path of at most ``k`` moves. A path of ``k`` moves is at least ``k``
    long (also in float32, whose rounding is monotone), so steps ``>= cap`` cannot lower a value below ``cap``
    and are skipped; and a step that changes nothing is a fixed point, so the loop stops there (checked every
    other step). Both give exactly the values of ``int(cap)`` steps.
    """
    d = torch.where(
        edges, torch.zeros_like(edges, dtype=torch.float32), torch.full_like(edges, cap, dtype=torch.float32)
    )
    # the neighbour minima are built from a horizontal pair minimum (float min and +w commute exactly, so this
    # is the 8-tap update)
    p = F.pad(d, (1, 1, 1, 1), value=cap)
    hmin = torch.empty_like(p[..., :, 1:-1])
    axial = torch.empty_like(d)
    diag = torch.empty_like(d)
    inner = p[..., 1:-1, 1:-1]
    for step in range(min(int(cap), math.ceil(cap) - 1)):
        torch.minimum(p[..., :, :-2], p[..., :, 2:], out=hmin)  # (H + 2, W): min of left / right neighbours
        torch.minimum(p[..., :-2, 1:-1], p[..., 2:, 1:-1], out=axial)
        torch.minimum(axial, hmin[..., 1:-1, :], out=axial)
        torch.minimum(hmin[..., :-2, :], hmin[..., 2:, :], out=diag)
        torch.minimum(axial.add_(1.0), diag.add_(1.4), out=axial)  # the step's candidate distances
        if step % 2 and not bool((axial < inner).any()):
            break
        torch.minimum(inner, axial, out=inner)
    return inner.clamp(max=cap)


def _equalize_hist(img8: torch.Tensor) -> torch.Tensor:
    """``cv2.equalizeHist`` per image of an integer-valued ``(B, 1, H, W)`` float tensor in ``[0, 255]``."""
    b = img8.shape[0]
    flat = img8.reshape(b, -1).long().clamp(0, 255)
    hist = torch.zeros(b, 256, dtype=torch.float64, device=img8.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    cdf = hist.cumsum(1)
    total = cdf[:, -1:]
    first = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(dim=1, keepdim=True)
    denom = (total - first).clamp_min(1)
    lut = torch.round((cdf - first).clamp_min(0) * 255 / denom)
    lut = torch.where(total == first, torch.arange(256, device=img8.device, dtype=torch.float64)[None], lut)
    return lut.gather(1, flat).reshape(img8.shape).to(img8.dtype)


class Spatter(Corruption):
    """Spatter (``loc``, ``scale``, ``sigma``, ``threshold``, ``intensity``, ``mud``); see the module docstring."""

    name = "spatter"
    batch_dims: ClassVar[dict[str, int] | None] = {"liquid": 0}

    def sample(
        self, shape: Shape, params: Params, gen: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Params:
        b, _, h, w = shape
        return {"liquid": randn((b, 1, h, w), gen, device, dtype).mul_(params["scale"]).add_(params["loc"])}

    def transform(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        liquid = gaussian_filter(params["liquid"].to(x), float(params["sigma"]), truncate=4.0, mode="replicate")
        thr = float(params["threshold"])
        liquid = torch.where(liquid < thr, torch.zeros_like(liquid), liquid)
        if int(params["mud"]) == 0:
            liquid8 = torch.floor(liquid.clamp(0, 1) * 255)
            dist = _chamfer_distance(_canny_like(liquid8)).to(x.dtype)
            dist = torch.floor(box_blur3(dist))
            dist = _equalize_hist(dist)
            dist = _emboss(dist).clamp_(0, 255)  # integer values: no rounding needed
            dist = box_blur3(dist)
            m = liquid8 * dist
            m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) * float(params["intensity"])
            color = torch.tensor(_WATER, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
            add = m * color
            if x.shape[1] == 1:
                return x + to_gray(add.clamp(0, 1), IC_GRAY)
            return x + add
        m = (liquid > thr).to(x.dtype)
        m = gaussian_filter(m, float(params["intensity"]), truncate=4.0, mode="replicate")
        m = torch.where(m < 0.8, torch.zeros_like(m), m)
        color = torch.tensor(_MUD, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1) * m
        if x.shape[1] == 1:
            color = to_gray(color, IC_GRAY)
        return x * (1 - m) + color


spatter = functional(Spatter, "spatter")
