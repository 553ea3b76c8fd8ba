"""``cotta_augment``: CoTTA's strong augmentation on tensors, checked op by op against torchvision's functional ops
(the official code applies torchvision transforms to the batch tensor) and as a whole against a pipeline written
here from the official ``get_tta_transforms()`` with the same parameter draws."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from adaptkit.functional.augment import (
    COTTA_SOFT_AUGMENT,
    _affine_theta,
    _cotta_colour,
    _shift_hue,
    cotta_augment,
)

#: every op at zero magnitude (blur sigma tiny: the kernel is a delta to float precision)
IDENTITY = {
    "brightness": (1.0, 1.0),
    "contrast": (1.0, 1.0),
    "saturation": (1.0, 1.0),
    "hue": (0.0, 0.0),
    "gamma": (1.0, 1.0),
    "degrees": (0.0, 0.0),
    "translate": 0.0,
    "scale": (1.0, 1.0),
    "blur_sigma": (1e-3, 1e-3),
    "flip_p": 0.0,
    "noise_std": 0.0,
}
# the official (strong) constants, cifar/cotta.py get_tta_transforms(soft=False)
OFFICIAL = {
    "brightness": (0.6, 1.4),
    "contrast": (0.7, 1.3),
    "saturation": (0.5, 1.5),
    "hue": (-0.06, 0.06),
    "gamma": (0.7, 1.3),
    "degrees": (-15.0, 15.0),
    "translate": 1 / 16,
    "scale": (0.9, 1.1),
    "blur_sigma": (0.001, 0.5),
    "noise_std": 0.005,
    "flip_p": 0.5,
}


def _images(b: int = 3, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _reference(x: torch.Tensor, seed: int, p: dict) -> torch.Tensor:
    """The official pipeline with torchvision's ops, parameters drawn as documented: 16 uniforms (5 for the order of
    the colour ops, then brightness, contrast, saturation, hue, gamma, angle, tx, ty, scale, sigma, flip), then the
    noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(16, generator=g, dtype=torch.float64).tolist()

    def uni(v: float, r: tuple) -> float:
        return r[0] + (r[1] - r[0]) * v

    order = sorted(range(5), key=lambda i: u[i])
    h, w = x.shape[-2:]
    y = x.clamp(0, 1)
    for op in order:
        if op == 0:
            y = TF.adjust_brightness(y, uni(u[5], p["brightness"]))
        elif op == 1:
            y = TF.adjust_contrast(y, uni(u[6], p["contrast"]))
        elif op == 2:
            y = TF.adjust_saturation(y, uni(u[7], p["saturation"]))
        elif op == 3:
            y = TF.adjust_hue(y, uni(u[8], p["hue"]))
        else:
            y = TF.adjust_gamma(y.clamp(1e-8, 1.0), uni(u[9], p["gamma"]))
    y = TF.pad(y, [w // 2, h // 2, w // 2, h // 2], padding_mode="edge")
    hp, wp = y.shape[-2:]
    angle = uni(u[10], p["degrees"])
    tx = round(uni(u[11], (-p["translate"] * wp, p["translate"] * wp)))
    ty = round(uni(u[12], (-p["translate"] * hp, p["translate"] * hp)))
    y = TF.affine(
        y, angle=angle, translate=[tx, ty], scale=uni(u[13], p["scale"]), shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR, fill=0.0,
    )  # fmt: skip
    sigma = uni(u[14], p["blur_sigma"])
    y = TF.gaussian_blur(y, kernel_size=[5, 5], sigma=[sigma, sigma])
    y = TF.center_crop(y, [h, w])
    if u[15] < p["flip_p"]:
        y = TF.horizontal_flip(y)
    y = y + torch.randn(y.shape, generator=g) * p["noise_std"]
    return y.clamp(0, 1)


# ------------------------------------------------------------------------------------------------ basics
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((4, 3, 32, 32), torch.float32),
        ((2, 3, 20, 28), torch.float64),
        ((2, 1, 17, 9), torch.float32),
        ((2, 4, 8, 8), torch.float32),
        ((1, 3, 3, 3), torch.float32),
        ((2, 3, 1, 1), torch.float32),
        ((2, 3, 8, 8), torch.float16),
        ((2, 3, 8, 8), torch.bfloat16),
    ],
)
def test_shape_dtype_device_and_range(shape: tuple, dtype: torch.dtype) -> None:
    x = torch.rand(shape).to(dtype)
    y = cotta_augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y.float()).all()
    assert y.min() >= 0 and y.max() <= 1


def test_seeded_determinism_and_seed_dependence() -> None:
    x = _images()
    a = cotta_augment(x, torch.Generator().manual_seed(3))
    b = cotta_augment(x, torch.Generator().manual_seed(3))
    c = cotta_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(9)  # generator=None: the global generator
    d = cotta_augment(x)
    torch.manual_seed(9)
    assert torch.equal(d, cotta_augment(x))
    g = torch.Generator().manual_seed(3)  # successive calls draw new parameters
    assert not torch.equal(cotta_augment(x, g), cotta_augment(x, g))


def test_input_untouched_and_no_autograd_history() -> None:
    x = _images().requires_grad_(True)
    before = x.detach().clone()
    y = cotta_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(x.detach(), before)
    assert not y.requires_grad and y.grad_fn is None


def test_identity_when_every_magnitude_is_zero() -> None:
    x = _images(c=3, h=12, w=20) * 0.98 + 0.01
    for seed in range(3):
        y = cotta_augment(x, torch.Generator().manual_seed(seed), **IDENTITY)
        torch.testing.assert_close(y, x, rtol=0, atol=2e-6)


def test_one_draw_shared_by_the_batch() -> None:
    """As the official transform applied to the batch tensor: every sample gets the same colour, affine, blur and
    flip parameters (only the noise is per element)."""
    img = _images(b=1)
    x = img.expand(5, -1, -1, -1).contiguous()
    y = cotta_augment(x, torch.Generator().manual_seed(2), noise_std=0.0)
    assert all(torch.equal(y[i], y[0]) for i in range(5))
    assert not torch.allclose(y[0], img[0], atol=1e-3)  # it did augment


# ------------------------------------------------------------------------------------------------ ops vs formulas
@pytest.mark.parametrize("c", [1, 3])
def test_colour_ops_match_torchvision(c: int) -> None:
    x = _images(b=2, c=c, h=9, w=11, seed=5)
    x[0, :, 0, 0] = 0.0  # exact zeros: gamma's clamp
    refs = {
        0: lambda im, f: TF.adjust_brightness(im, f),
        1: lambda im, f: TF.adjust_contrast(im, f),
        2: lambda im, f: TF.adjust_saturation(im, f),
        3: lambda im, f: TF.adjust_hue(im, f),
        4: lambda im, f: TF.adjust_gamma(im.clamp(1e-8, 1.0), f),
    }
    for op, factors in {0: [0.6, 1.4], 1: [0.7, 1.3], 2: [0.5, 1.5], 3: [-0.06, 0.06, 0.5], 4: [0.7, 1.3]}.items():
        for f in factors:
            torch.testing.assert_close(_cotta_colour(x, op, f), refs[op](x, f), rtol=0, atol=3e-6, msg=f"op {op} {f}")


def test_colour_formulas_by_hand() -> None:
    """Independent formulas: brightness scales, contrast blends with the image's mean luma, saturation with the
    per-pixel luma (ITU-R 601-2 weights), gamma is a power; all clamped to [0, 1]."""
    x = _images(b=2, c=3, h=4, w=5, seed=6).double()
    luma = 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(_cotta_colour(x, 0, 1.3), (1.3 * x).clamp(0, 1))
    mean = luma.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(_cotta_colour(x, 1, 0.7), (0.7 * x + 0.3 * mean).clamp(0, 1))
    torch.testing.assert_close(_cotta_colour(x, 2, 1.5), (1.5 * x - 0.5 * luma).clamp(0, 1))
    torch.testing.assert_close(_cotta_colour(x, 4, 0.8), x.clamp(1e-8, 1) ** 0.8)
    zero = torch.zeros(1, 3, 1, 1, dtype=torch.float64)  # the official clamp(1e-8, 1) before gamma: 0 -> 1e-8 ** g
    torch.testing.assert_close(_cotta_colour(zero, 4, 0.8), torch.full_like(zero, 1e-8**0.8), rtol=1e-12, atol=0)
    grey = _images(b=2, c=1, h=4, w=5, seed=6)
    assert torch.equal(_cotta_colour(grey, 2, 1.5), grey) and torch.equal(_cotta_colour(grey, 3, 0.05), grey)
    four = _images(b=2, c=4, h=4, w=5, seed=6)  # other channel counts: contrast on the mean over all channels
    torch.testing.assert_close(
        _cotta_colour(four, 1, 0.7), (0.7 * four + 0.3 * four.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    )


def test_hue_rotation_of_primaries() -> None:
    px = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 1, 4)
    out = _shift_hue(px, 1 / 3)  # red -> green -> blue -> red; grey unchanged
    want = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 1, 4)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("angle,tx,ty,scale", [(12.0, 2.0, -1.0, 1.05), (-15.0, 0.0, 3.0, 0.9), (0.0, -2.0, 0.0, 1.0)])
def test_affine_grid_matches_torchvision_affine(angle: float, tx: float, ty: float, scale: float) -> None:
    x = _images(b=2, c=3, h=14, w=18, seed=7)
    want = TF.affine(
        x, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR, fill=0.0,
    )  # fmt: skip
    theta = torch.tensor(_affine_theta(angle, tx, ty, scale, 14, 18)).expand(2, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [2, 4, 14, 18], align_corners=False)
    sampled = torch.nn.functional.grid_sample(torch.cat([x, torch.ones(2, 1, 14, 18)], 1), grid, align_corners=False)
    torch.testing.assert_close(sampled[:, :3] * sampled[:, 3:], want, rtol=0, atol=1e-5)


def test_integer_translation_is_a_shift() -> None:
    """Zero angle, unit scale, translation (2, -1) px: the padded image shifted right 2 and up 1, then cropped."""
    x = _images(b=1, c=3, h=16, w=16, seed=8)
    p = {**IDENTITY, "translate": 2.4 / 32}  # |tx| <= 2.4 px of the 32-px padded image: rounds to -2..2
    g = torch.Generator().manual_seed(0)
    u = torch.rand(16, generator=g, dtype=torch.float64).tolist()
    tx = round(-2.4 + 4.8 * u[11])
    ty = round(-2.4 + 4.8 * u[12])
    y = cotta_augment(x, torch.Generator().manual_seed(0), **p)
    padded = torch.nn.functional.pad(x, (8, 8, 8, 8), mode="replicate")
    want = padded[..., 8 - ty : 8 - ty + 16, 8 - tx : 8 - tx + 16]
    torch.testing.assert_close(y, want, rtol=0, atol=2e-6)


def test_blur_matches_gaussian_formula() -> None:
    """With every other op off: a 5-tap Gaussian exp(-d^2 / 2 sigma^2), normalised, over the edge-padded image."""
    x = _images(b=2, c=3, h=10, w=10, seed=9)
    sigma = 0.4
    y = cotta_augment(x, torch.Generator().manual_seed(0), **{**IDENTITY, "blur_sigma": (sigma, sigma)})
    d = torch.arange(-2, 3, dtype=torch.float64)
    k = torch.exp(-(d**2) / (2 * sigma**2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).float()
    padded = torch.nn.functional.pad(x, (5, 5, 5, 5), mode="replicate")
    want = torch.nn.functional.conv2d(padded, k2.expand(3, 1, 5, 5), groups=3)[..., 3:13, 3:13]
    torch.testing.assert_close(y, want, rtol=0, atol=2e-6)


def test_flip_and_noise() -> None:
    x = _images(b=2, c=3, h=8, w=12, seed=10)
    y = cotta_augment(x, torch.Generator().manual_seed(0), **{**IDENTITY, "flip_p": 1.0})
    torch.testing.assert_close(y, x.flip(-1), rtol=0, atol=2e-6)
    flat = torch.full((8, 3, 32, 32), 0.5)
    noisy = cotta_augment(flat, torch.Generator().manual_seed(0), **{**IDENTITY, "noise_std": 0.005})
    diff = noisy - flat
    assert abs(diff.mean().item()) < 2e-4
    assert abs(diff.std().item() - 0.005) < 2e-4
    clipped = cotta_augment(torch.ones(2, 3, 8, 8), torch.Generator().manual_seed(0), **{**IDENTITY, "noise_std": 0.5})
    assert clipped.max() <= 1 and clipped.min() >= 0


# ------------------------------------------------------------------------------------------------ whole pipeline
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 24, 24), (2, 3, 20, 20)])
def test_pipeline_matches_official_transform_with_the_same_draws(seed: int, shape: tuple) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(100 + seed))
    got = cotta_augment(x, torch.Generator().manual_seed(seed))
    want = _reference(x, seed, OFFICIAL)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("seed", range(3))
def test_pipeline_with_the_fill_region_inside_the_crop(seed: int) -> None:
    """Zoomed out and shifted far enough that the affine's zero fill (torchvision's fill mask: bilinear weights of
    the valid region) reaches the centre crop."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(200 + seed))
    p = {**OFFICIAL, "degrees": (20.0, 40.0), "scale": (0.3, 0.4), "translate": 0.2}
    got = cotta_augment(x, torch.Generator().manual_seed(seed), **p)
    assert (got < 0.02).float().mean() > 0.05  # the fill is visible
    torch.testing.assert_close(got, _reference(x, seed, p), rtol=0, atol=2e-5)


def test_soft_variant_matches_official_soft_constants() -> None:
    assert COTTA_SOFT_AUGMENT == {
        "brightness": (0.8, 1.2),
        "contrast": (0.85, 1.15),
        "saturation": (0.75, 1.25),
        "hue": (-0.03, 0.03),
        "gamma": (0.85, 1.15),
        "degrees": (-8.0, 8.0),
        "scale": (0.95, 1.05),
        "blur_sigma": (0.001, 0.25),
    }
    x = _images(b=2, c=3, h=16, w=16)
    got = cotta_augment(x, torch.Generator().manual_seed(1), **COTTA_SOFT_AUGMENT)
    torch.testing.assert_close(got, _reference(x, 1, {**OFFICIAL, **COTTA_SOFT_AUGMENT}), rtol=0, atol=2e-5)


def test_value_range_maps_linearly() -> None:
    x = _images(b=2, c=3, h=12, w=12) * 2 - 1
    a = cotta_augment(x, torch.Generator().manual_seed(0), value_range=(-1.0, 1.0))
    b = cotta_augment((x + 1) / 2, torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert a.min() >= -1 and a.max() <= 1


def test_magnitudes_are_those_of_the_official_recipe() -> None:
    """The drawn strength lands where the official ranges put it: mean absolute change of a mid-grey-ish image is
    clearly non-zero and far from destroying it (sanity band, many seeds)."""
    x = _images(b=4, c=3, h=32, w=32, seed=11) * 0.5 + 0.25
    diffs = [float((cotta_augment(x, torch.Generator().manual_seed(s)) - x).abs().mean()) for s in range(8)]
    assert 0.02 < sum(diffs) / len(diffs) < 0.3


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "x,kw,match",
    [
        (torch.rand(3, 8, 8), {}, "B, C, H, W"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), {}, "float"),
        (torch.rand(1, 3, 8, 8), {"brightness": (1.4, 0.6)}, "brightness"),
        (torch.rand(1, 3, 8, 8), {"contrast": (-0.1, 1.0)}, "contrast"),
        (torch.rand(1, 3, 8, 8), {"hue": (-0.6, 0.1)}, "hue"),
        (torch.rand(1, 3, 8, 8), {"hue": (0.0, 0.7)}, "hue"),
        (torch.rand(1, 3, 8, 8), {"scale": (0.0, 1.0)}, "scale"),
        (torch.rand(1, 3, 8, 8), {"blur_sigma": (0.0, 0.5)}, "blur_sigma"),
        (torch.rand(1, 3, 8, 8), {"blur_kernel": 4}, "blur_kernel"),
        (torch.rand(1, 3, 8, 8), {"translate": 1.5}, "translate"),
        (torch.rand(1, 3, 8, 8), {"flip_p": 2.0}, "flip_p"),
        (torch.rand(1, 3, 8, 8), {"noise_std": -1.0}, "noise_std"),
        (torch.rand(1, 3, 8, 8), {"value_range": (1.0, 0.0)}, "value_range"),
    ],
)
def test_bad_arguments_raise(x: torch.Tensor, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cotta_augment(x, **kw)


def test_rotta_call_signature() -> None:
    """RoTTA imports ``cotta_augment(x, generator=None)`` -> a tensor of the same shape and dtype."""
    x = _images(b=2)
    y = cotta_augment(x, generator=None)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert math.isfinite(float(y.sum()))
