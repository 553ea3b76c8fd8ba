"""batch_moments, prior_weight, bn_prior_mix, merge_moments and gaussian_w2 against float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptkit.functional import Moments, batch_moments, bn_prior_mix, gaussian_w2, merge_moments, prior_weight


def _loop_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and unbiased variance with explicit Python loops over every element (float64)."""
    x = x.astype(np.float64)
    c = x.shape[1]
    means, vars_ = [], []
    count = 0
    for ch in range(c):
        vals = [float(v) for v in x[:, ch].reshape(-1)]
        count = len(vals)
        mu = sum(vals) / count
        means.append(mu)
        vars_.append(sum((v - mu) ** 2 for v in vals) / (count - 1) if count > 1 else float("nan"))
    return np.array(means), np.array(vars_), count


SHAPES = [(6, 3), (4, 3, 5), (3, 2, 4, 5), (2, 2, 3, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BCL", "BCHW", "BCDHW"])
def test_batch_moments_vs_loops(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
    m = batch_moments(x)
    mean, var, count = _loop_moments(x.numpy())
    assert isinstance(m, Moments)
    assert m.mean.dtype == torch.float64 and m.mean.shape == (shape[1],)
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.var.numpy(), var, rtol=1e-10)
    assert m.count == count == shape[0] * int(np.prod(shape[2:], dtype=np.int64))
    assert m.samples == shape[0]


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BCL", "BCHW", "BCDHW"])
def test_batch_moments_float32_vs_float64_numpy(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(10 + len(shape))
    x = torch.randn(*shape, generator=g) * 3 - 2
    m = batch_moments(x)
    xn = x.double().numpy()
    axes = (0, *range(2, x.dim()))
    np.testing.assert_allclose(m.mean.double().numpy(), xn.mean(axis=axes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.var.double().numpy(), xn.var(axis=axes, ddof=1), rtol=1e-5)


def test_batch_moments_dtype_argument_and_half() -> None:
    x = torch.randn(4, 3, 2, 2)
    assert batch_moments(x, dtype=torch.float64).mean.dtype == torch.float64
    assert batch_moments(x.half()).mean.dtype == torch.float32
    assert batch_moments(x.bfloat16()).var.dtype == torch.float32


def test_single_element_channel_gives_nan_var() -> None:
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    m = batch_moments(x)
    assert m.count == 1 and m.samples == 1
    assert torch.equal(m.mean, x.reshape(4))
    assert torch.isnan(m.var).all()
    m1 = batch_moments(torch.randn(1, 3))
    assert m1.count == 1 and torch.isnan(m1.var).all()


def test_bs1_with_spatial_has_variance() -> None:
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    m = batch_moments(x)
    assert m.count == 9 and m.samples == 1
    np.testing.assert_allclose(m.var.numpy(), x.numpy().reshape(2, 9).var(axis=1, ddof=1), rtol=1e-12)


def test_batch_moments_rejects_1d() -> None:
    with pytest.raises(ValueError, match="B, C"):
        batch_moments(torch.randn(5))


# ---------------------------------------------------------------- prior weight


@pytest.mark.parametrize(("N", "n"), [(16, 16), (16, 1), (1, 16), (0.5, 3), (128, 8)])
def test_prior_weight_formula(N: float, n: float) -> None:
    assert prior_weight(N, n) == pytest.approx(N / (N + n), rel=1e-15)


def test_prior_weight_limits() -> None:
    assert prior_weight(float("inf"), 8) == 1.0
    assert prior_weight(float("inf"), 0) == 1.0
    assert prior_weight(float("inf"), 10**9) == 1.0
    assert prior_weight(0, 8) == 0.0
    assert prior_weight(0.0, 1) == 0.0


@pytest.mark.parametrize(("N", "n"), [(-1, 4), (4, -1), (float("nan"), 4), (0, 0), (-float("inf"), 1)])
def test_prior_weight_invalid(N: float, n: float) -> None:
    with pytest.raises(ValueError):
        prior_weight(N, n)


# ---------------------------------------------------------------- prior mix


@pytest.mark.parametrize(("N", "n"), [(0, 8), (16, 8), (16, 1), (4, 64), (1e6, 2)])
def test_bn_prior_mix_vs_formula_float64(N: float, n: int) -> None:
    g = torch.Generator().manual_seed(3)
    ms, mt = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    vs = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    vt = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    mu, var = bn_prior_mix(ms, vs, mt, vt, N, n)
    for c in range(5):
        lam = N / (N + n)
        assert float(mu[c]) == pytest.approx(lam * float(ms[c]) + (1 - lam) * float(mt[c]), rel=1e-13, abs=1e-15)
        assert float(var[c]) == pytest.approx(lam * float(vs[c]) + (1 - lam) * float(vt[c]), rel=1e-13)


def test_bn_prior_mix_N_inf_is_source_exactly() -> None:
    ms, vs = torch.randn(4), torch.rand(4) + 0.5
    mu, var = bn_prior_mix(ms, vs, torch.randn(4), torch.rand(4), float("inf"), 8)
    assert torch.equal(mu, ms) and torch.equal(var, vs)
    assert mu.data_ptr() != ms.data_ptr()  # a copy, not an alias


def test_bn_prior_mix_N0_is_test_exactly() -> None:
    mt, vt = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    mu, var = bn_prior_mix(torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64), mt, vt, 0, 8)
    assert torch.equal(mu, mt) and torch.equal(var, vt)


def test_bn_prior_mix_nan_test_var_keeps_source_var() -> None:
    ms = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    vs = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    mt = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    vt = torch.tensor([float("nan"), 10.0, float("nan")], dtype=torch.float64)
    mu, var = bn_prior_mix(ms, vs, mt, vt, N=16, n=1)
    lam = 16 / 17
    np.testing.assert_allclose(mu.numpy(), lam * ms.numpy() + (1 - lam) * mt.numpy(), rtol=1e-14)
    assert float(var[0]) == 1.0 and float(var[2]) == 3.0
    assert float(var[1]) == pytest.approx(lam * 2.0 + (1 - lam) * 10.0, rel=1e-14)
    assert not torch.isnan(var).any()


def test_bn_prior_mix_invalid_N() -> None:
    z = torch.zeros(2)
    with pytest.raises(ValueError):
        bn_prior_mix(z, z + 1, z, z + 1, N=-1, n=4)


# ---------------------------------------------------------------- merge


def test_merge_none_returns_b() -> None:
    b = batch_moments(torch.randn(4, 3))
    assert merge_moments(None, b) is b


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=5),
    spatial=st.sampled_from([(), (3,), (2, 2)]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_merge_equals_concatenation(sizes: list[int], spatial: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 3, *spatial, generator=g, dtype=torch.float64) * 4 + 2
    acc = None
    for part in torch.split(x, sizes):
        acc = merge_moments(acc, batch_moments(part))
    assert acc is not None
    mean, var, count = _loop_moments(x.numpy())
    np.testing.assert_allclose(acc.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acc.var.numpy(), var, rtol=1e-9)
    assert acc.count == count
    assert acc.samples == sum(sizes)
    whole = batch_moments(x)
    np.testing.assert_allclose(acc.var.numpy(), whole.var.numpy(), rtol=1e-9)


def test_merge_single_elements() -> None:
    # two batches of one 1x1 sample each: each alone has NaN variance, pooled has a variance
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    acc = merge_moments(batch_moments(x[:1]), batch_moments(x[1:]))
    assert acc.count == 2 and acc.samples == 2
    assert float(acc.mean) == 2.0 and float(acc.var) == 2.0


# ---------------------------------------------------------------- W2


def _w2_closed_form(ma, va, mb, vb, normalize: bool, eps: float = 1e-5) -> float:
    """Diagonal Gaussians: W2^2 = sum_c (mu_a-mu_b)^2 + (sqrt(va)-sqrt(vb))^2 (trace term of the Bures metric)."""
    terms = []
    for a, sa, b, sb in zip(ma, va, mb, vb):
        sq = (a - b) ** 2 + (math.sqrt(sa) - math.sqrt(sb)) ** 2
        terms.append(sq / (sa + eps) if normalize else sq)
    return math.sqrt(sum(terms) / len(terms)) if normalize else math.sqrt(sum(terms))


def _bures_w2(ma, va, mb, vb) -> float:
    """General Gaussian W2 with covariance matrices, via tr(A + B - 2 (A^1/2 B A^1/2)^1/2)."""
    a, b = np.diag(va), np.diag(vb)
    ra = np.diag(np.sqrt(va))
    inner = ra @ b @ ra
    w, v = np.linalg.eigh(inner)
    sqrt_inner = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    d2 = np.sum((np.asarray(ma) - np.asarray(mb)) ** 2) + np.trace(a + b - 2 * sqrt_inner)
    return float(np.sqrt(max(d2, 0.0)))


@pytest.mark.parametrize("normalize", [False, True])
def test_gaussian_w2_closed_form(normalize: bool) -> None:
    g = torch.Generator().manual_seed(5)
    ma, mb = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    va = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    vb = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    d = gaussian_w2(ma, va, mb, vb, normalize=normalize)
    assert d.dim() == 0
    ref = _w2_closed_form(ma.tolist(), va.tolist(), mb.tolist(), vb.tolist(), normalize)
    assert float(d) == pytest.approx(ref, rel=1e-12)
    if not normalize:
        assert float(d) == pytest.approx(_bures_w2(ma.numpy(), va.numpy(), mb.numpy(), vb.numpy()), rel=1e-9)


def test_gaussian_w2_known_values() -> None:
    z, one = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    assert float(gaussian_w2(z, one, z, one)) == 0.0
    assert float(gaussian_w2(z, one, z + 3, one, normalize=False)) == pytest.approx(math.sqrt(18), rel=1e-15)
    # std 1 vs std 2 in one channel: W2 = 1
    assert float(gaussian_w2(z[:1], one[:1], z[:1], 4 * one[:1], normalize=False)) == pytest.approx(1.0)
    # normalized: channel in units of a's std, averaged
    va = torch.tensor([4.0], dtype=torch.float64)
    d = gaussian_w2(z[:1], va, z[:1] + 2, va, normalize=True, eps=0.0)
    assert float(d) == pytest.approx(1.0, rel=1e-15)


def test_gaussian_w2_scale_invariance_when_normalized() -> None:
    g = torch.Generator().manual_seed(6)
    ma, mb = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    va = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    vb = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    d1 = gaussian_w2(ma, va, mb, vb, normalize=True, eps=0.0)
    d2 = gaussian_w2(10 * ma, 100 * va, 10 * mb, 100 * vb, normalize=True, eps=0.0)
    assert float(d1) == pytest.approx(float(d2), rel=1e-12)
