"""AugMix on tensors (adaptkit.functional.augmix): every op against a formula written here (and against PIL on
8-bit images), the chain/mixing composition rebuilt op by op, the sampling distributions, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaptkit.functional.augmix import (
    AUGMIX_OPS,
    FILL,
    AugMixParams,
    apply_augmix,
    augmix,
    augmix_params,
    autocontrast,
    equalize,
    pad_crop,
    posterize,
    pre_augment_images,
    rotate,
    shear_x,
    shear_y,
    solarize,
    translate_x,
    translate_y,
)


def _img(b: int = 2, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


def _levels(b: int = 1, c: int = 3, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    """Images on the 8-bit grid (what a uint8 image gives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g).float() / 255


# ------------------------------------------------------------------------------------------- single ops
def test_autocontrast_formula() -> None:
    x = torch.tensor([[0.2, 0.6, 0.4], [0.3, 0.5, 0.2]]).view(1, 1, 2, 3).repeat(1, 2, 1, 1)
    x[0, 1] = 0.7  # a constant channel is left as it is
    out = autocontrast(x)
    lo, hi = 0.2, 0.6
    for i in range(2):
        for j in range(3):
            assert out[0, 0, i, j].item() == pytest.approx((x[0, 0, i, j].item() - lo) / (hi - lo), abs=1e-6)
    assert torch.equal(out[0, 1], x[0, 1])


def test_solarize_formula() -> None:
    x = torch.tensor([0.0, 0.2, 0.5, 0.50001, 0.9, 1.0]).view(1, 1, 1, 6)
    out = solarize(x, torch.tensor([0.5]))
    want = [v if v < 0.5 else 1 - v for v in x.flatten().tolist()]
    assert out.flatten().tolist() == pytest.approx(want)
    assert torch.equal(solarize(x, torch.tensor([1.01])), x)  # threshold above every value: unchanged


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8])
def test_posterize_formula(bits: int) -> None:
    q = torch.arange(256)
    x = (q.float() / 255).view(1, 1, 16, 16)
    out = posterize(x, torch.tensor([bits]))
    mask = (0xFF << (8 - bits)) & 0xFF
    want = torch.tensor([(v & mask) / 255 for v in q.tolist()]).view(1, 1, 16, 16)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-7)


def _equalize_reference(levels: list[int]) -> list[int]:
    """PIL's ImageOps.equalize for one band, written out."""
    h = [0] * 256
    for v in levels:
        h[v] += 1
    histo = [c for c in h if c]
    if len(histo) <= 1:
        return list(levels)
    step = (sum(histo) - histo[-1]) // 255
    if not step:
        return list(levels)
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += h[i]
    return [lut[v] for v in levels]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equalize_formula(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 3, 40, 40), generator=g)  # 1600 pixels: step = 6, so step // 2 matters
    x[1] = x[1] // 60 * 60  # few levels: large steps
    x[1, 2] = 7  # a single level: unchanged
    out = equalize(x.float() / 255)
    for b in range(2):
        for c in range(3):
            want = _equalize_reference(x[b, c].flatten().tolist())
            got = (out[b, c] * 255).round().int().flatten().tolist()
            assert got == want, (b, c)
    assert torch.equal(out[1, 2], x[1, 2].float() / 255)


def test_translate_integer_pixels_is_a_shift_with_fill() -> None:
    x = _img(1, 1, 4, 5)
    out = translate_x(x, torch.tensor([2.0]))  # output (X, Y) reads input (X + 2, Y)
    want = torch.full_like(x, FILL)
    want[..., :3] = x[..., 2:]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    out = translate_y(x, torch.tensor([-1.0]))
    want = torch.full_like(x, FILL)
    want[..., 1:, :] = x[..., :-1, :]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_rotate_90_is_rot90_and_small_angles_keep_the_centre() -> None:
    x = _img(2, 3, 6, 6)
    torch.testing.assert_close(rotate(x, torch.tensor([90.0, 90.0])), torch.rot90(x, 1, (2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(rotate(x, torch.tensor([-90.0, 0.0]))[0], torch.rot90(x[0], -1, (1, 2)), rtol=0,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(rotate(x, torch.tensor([0.0, 0.0])), x, rtol=0, atol=1e-6)


def test_shear_formula_on_one_pixel() -> None:
    x = _img(1, 1, 6, 6)
    s = 0.25
    out = shear_x(x, torch.tensor([s]))
    # output pixel (i=3, j=1): centre (1.5, 3.5) reads input x = 1.5 + 0.25 * 3.5 = 2.375 -> between cols 1 and 2
    u = 1.5 + s * 3.5 - 0.5  # pixel-index coordinate
    j0, t = math.floor(u), u - math.floor(u)
    want = (1 - t) * x[0, 0, 3, j0] + t * x[0, 0, 3, j0 + 1]
    assert out[0, 0, 3, 1].item() == pytest.approx(want.item(), abs=1e-6)
    out = shear_y(x, torch.tensor([s]))
    v = 3.5 + s * 1.5 - 0.5  # output (i=3, j=1) reads input y = 3.5 + 0.25 * 1.5
    i0, t = math.floor(v), v - math.floor(v)
    want = (1 - t) * x[0, 0, i0, 1] + t * x[0, 0, i0 + 1, 1]
    assert out[0, 0, 3, 1].item() == pytest.approx(want.item(), abs=1e-6)


def test_pad_crop_formula() -> None:
    x = _img(3, 2, 5, 6)
    off = torch.tensor([[4, 4], [0, 0], [8, 3]])
    out = pad_crop(x, off, padding=4)
    padded = F.pad(x, (4, 4, 4, 4))
    for k, (top, left) in enumerate(off.tolist()):
        assert torch.equal(out[k], padded[k, :, top : top + 5, left : left + 6])
    assert torch.equal(out[0], x[0])


PIL_CASES = ["equalize", "posterize", "solarize", "autocontrast", "rotate", "shear_x", "translate_y"]


@pytest.mark.parametrize("op", PIL_CASES)
def test_ops_match_pil_on_8bit_images(op: str) -> None:
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    rng = np.random.default_rng(0)
    for trial in range(3):
        a = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
        if trial == 1:
            a = (a // 4 + 60).astype(np.uint8)
        if op == "equalize":  # enough pixels for PIL's step = (n - h[last]) // 255 to exceed 1
            a = rng.integers(0, 256, (40, 45, 3), dtype=np.uint8) // (1 + 40 * trial)
        img = Image.fromarray(a)
        t = torch.from_numpy(a).float().div(255).permute(2, 0, 1)[None]
        fill = (128, 128, 128)
        if op == "equalize":
            ref, got, tol = ImageOps.equalize(img), equalize(t), 0.0
        elif op == "posterize":
            ref, got, tol = ImageOps.posterize(img, 3), posterize(t, torch.tensor([3])), 0.0
        elif op == "solarize":
            ref, got, tol = ImageOps.solarize(img, 200), solarize(t, torch.tensor([200 / 255])), 0.0
        elif op == "autocontrast":  # PIL truncates to 8-bit levels
            ref, got, tol = ImageOps.autocontrast(img), autocontrast(t), 1.0
        elif op == "rotate":
            ref = img.rotate(-7, resample=Image.BILINEAR, fillcolor=fill)
            got, tol = rotate(t, torch.tensor([-7.0])), 1.0
        elif op == "shear_x":
            ref = img.transform((11, 9), Image.AFFINE, (1, -0.2, 0, 0, 1, 0), resample=Image.BILINEAR, fillcolor=fill)
            got, tol = shear_x(t, torch.tensor([-0.2])), 1.0
        else:
            ref = img.transform((11, 9), Image.AFFINE, (1, 0, 0, 0, 1, 3), resample=Image.BILINEAR, fillcolor=fill)
            got, tol = translate_y(t, torch.tensor([3.0])), 0.0
        ref_t = torch.from_numpy(np.array(ref)).float().permute(2, 0, 1)[None]
        diff = (got * 255 - ref_t).abs().max().item()
        assert diff <= tol + 1e-3, (op, trial, diff)


# ------------------------------------------------------------------------------------------- composition
def _chain_op(name: str, img: torch.Tensor, mag: float) -> torch.Tensor:
    m = torch.tensor([mag], dtype=torch.float64)
    return {
        "autocontrast": lambda: autocontrast(img),
        "equalize": lambda: equalize(img),
        "rotate": lambda: rotate(img, m),
        "solarize": lambda: solarize(img, m),
        "shear_x": lambda: shear_x(img, m),
        "shear_y": lambda: shear_y(img, m),
        "translate_x": lambda: translate_x(img, m),
        "translate_y": lambda: translate_y(img, m),
        "posterize": lambda: posterize(img, torch.tensor([round(mag)])),
    }[name]()


@pytest.mark.parametrize("n,size,severity", [(8, 16, 1.0), (3, 64, 3.0)])
def test_mixing_rebuilt_op_by_op(n: int, size: int, severity: float) -> None:
    """apply_augmix == m * pre + (1 - m) * sum_i w_i chain_i, each chain applied here one op at a time."""
    x = _levels(n, 3, size, size, seed=3)
    p = augmix_params(n, size, size, torch.Generator().manual_seed(5), severity=severity)
    out = apply_augmix(x, p)
    pre = pre_augment_images(x, p)
    for k in range(n):
        mixed = torch.zeros_like(x[k : k + 1])
        for i in range(3):
            img = pre[k : k + 1]
            for s in range(3):
                op = int(p.ops[k, i, s])
                if op >= 0:
                    img = _chain_op(p.names[op], img, float(p.magnitudes[k, i, s]))
            mixed += float(p.weights[k, i]) * img
        m = float(p.mix[k])
        torch.testing.assert_close(out[k : k + 1], m * pre[k : k + 1] + (1 - m) * mixed, rtol=0, atol=1e-5)


def test_pre_augment_crop_then_flip() -> None:
    x = _img(2, 3, 8, 8)
    p = augmix_params(2, 8, 8, torch.Generator().manual_seed(0), pre_augment="crop")
    p.crop = torch.tensor([[4.0, 4.0], [1.0, 6.0]], dtype=torch.float64)
    p.flip = torch.tensor([True, False])
    pre = pre_augment_images(x, p)
    assert torch.equal(pre[0], x[0].flip(-1))
    assert torch.equal(pre[1], F.pad(x, (4, 4, 4, 4))[1, :, 1:9, 6:14])
    # a resized crop whose box is the whole image returns the image
    p = augmix_params(2, 64, 64, torch.Generator().manual_seed(0))
    assert p.pre_augment == "resized_crop"
    p.crop = torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2, dtype=torch.float64)
    p.flip = torch.tensor([False, False])
    x64 = _img(2, 3, 64, 64)
    torch.testing.assert_close(pre_augment_images(x64, p), x64, rtol=0, atol=1e-6)


def test_sampling_distributions() -> None:
    n = 20000
    p = augmix_params(n, 32, 32, torch.Generator().manual_seed(0))
    w = p.weights
    assert bool((w >= 0).all()) and torch.allclose(w.sum(1), torch.ones(n, dtype=w.dtype))
    # Dirichlet(1, 1, 1): each weight ~ Beta(1, 2): mean 1/3, variance 1/18
    assert w.mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.01)
    assert w.var(0).tolist() == pytest.approx([1 / 18] * 3, abs=0.004)
    assert p.mix.mean().item() == pytest.approx(0.5, abs=0.01)  # Beta(1, 1) = U(0, 1)
    assert p.mix.var().item() == pytest.approx(1 / 12, abs=0.004)
    depth = (p.ops >= 0).sum(-1)
    assert bool((p.ops[..., 0] >= 0).all())  # every chain has at least one op, ops fill from the start
    assert [(depth == d).double().mean().item() for d in (1, 2, 3)] == pytest.approx([1 / 3] * 3, abs=0.01)
    counts = torch.bincount(p.ops[p.ops >= 0], minlength=9).double()
    assert (counts / counts.sum()).tolist() == pytest.approx([1 / 9] * 9, abs=0.01)
    assert bool(((p.crop >= 0) & (p.crop <= 8)).all()) and set(p.crop.unique().tolist()) == set(range(9))
    assert p.flip.double().mean().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("severity", [1.0, 3.0])
def test_magnitude_rules(severity: float) -> None:
    """AugMix's int_parameter / float_parameter with level ~ U(0.1, severity), at 32 px."""
    p = augmix_params(4000, 32, 32, torch.Generator().manual_seed(1), severity=severity)

    def mags(name: str) -> torch.Tensor:
        return p.magnitudes[p.ops == AUGMIX_OPS.index(name)]

    top = severity * 3
    rot = mags("rotate")
    assert bool((rot == rot.round()).all()) and rot.abs().max() <= math.floor(top) and rot.min() < 0 < rot.max()
    post = mags("posterize")
    assert set(post.tolist()) == ({4.0} if severity == 1 else {3.0, 4.0})
    sol = mags("solarize") * 255
    assert bool((sol == sol.round()).all())
    assert sol.min() >= 256 - math.floor(severity * 25.6) and sol.max() <= 256 - math.floor(0.1 * 25.6)
    shear = mags("shear_x")
    assert shear.abs().min() >= 0.1 * 0.03 - 1e-12 and shear.abs().max() <= severity * 0.03
    tx = mags("translate_x")
    assert bool((tx == tx.round()).all()) and tx.abs().max() <= math.floor(severity * 32 / 30)
    assert bool((mags("autocontrast") == 0).all())


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 16, 16), (2, 3, 64, 72)])
def test_shapes_range_dtype(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape)
    out = augmix(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool((out >= 0).all() and (out <= 1).all())
    assert not torch.equal(out, x)
    for dtype in (torch.float64, torch.float16):
        y = augmix(x.to(dtype), torch.Generator().manual_seed(0))
        assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(augmix(x.double(), torch.Generator().manual_seed(0)).float(), out, rtol=0, atol=1e-5)


def test_seeded_determinism_and_independence_from_pixels() -> None:
    x = _img(1, 3, 32, 32).expand(8, -1, -1, -1)
    a = augmix(x, torch.Generator().manual_seed(7))
    b = augmix(x, torch.Generator().manual_seed(7))
    c = augmix(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the copies differ
    g = torch.Generator().manual_seed(7)
    assert torch.equal(apply_augmix(x, augmix_params(8, 32, 32, g)), a)  # params drawn first, then applied
    # the same generator state gives the same parameters whatever the pixels
    p1 = augmix_params(8, 32, 32, torch.Generator().manual_seed(7))
    p2 = augmix_params(8, 32, 32, torch.Generator().manual_seed(7))
    assert all(torch.equal(getattr(p1, f), getattr(p2, f)) for f in ("crop", "flip", "weights", "mix", "ops"))
    torch.manual_seed(3)
    d = augmix(x)
    torch.manual_seed(3)
    assert torch.equal(augmix(x), d)  # the global generator when none is given


def test_no_gradient_to_the_input() -> None:
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    assert not augmix(x, torch.Generator().manual_seed(0)).requires_grad


def test_bad_arguments_raise() -> None:
    x = torch.rand(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augmix(x * 2 - 0.5, g)
    with pytest.raises(ValueError, match="float images"):
        augmix(x[0], g)
    with pytest.raises(ValueError, match="ops"):
        augmix(x, g, ops=["blur"])
    with pytest.raises(ValueError, match="severity"):
        augmix(x, g, severity=0.0)
    with pytest.raises(ValueError, match="pre_augment"):
        augmix(x, g, pre_augment="center")
    with pytest.raises(ValueError, match="depth"):
        augmix(x, g, depth=4)
    with pytest.raises(ValueError, match="fill"):
        augmix(x, g, fill=2.0)


def test_fixed_depth_and_op_subset() -> None:
    p = augmix_params(50, 16, 16, torch.Generator().manual_seed(0), depth=2, ops=["solarize", "posterize"])
    assert isinstance(p, AugMixParams) and p.names == ("solarize", "posterize")
    assert bool((p.ops[..., :2] >= 0).all()) and bool((p.ops[..., 2] == -1).all())
    x = _img(50, 3, 16, 16)
    out = apply_augmix(x, p)
    assert out.shape == x.shape
