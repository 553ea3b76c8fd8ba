"""softmax_entropy against an explicit ``-sum_c p_c log p_c``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptkit.functional import softmax_entropy


def _explicit_entropy(logits: np.ndarray, axis: int) -> np.ndarray:
    """``-sum p log p`` with a float64 numpy softmax (max-shifted, terms with p == 0 count as 0)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=axis)


def test_uniform_is_log_c() -> None:
    for c in (2, 4, 10):
        h = softmax_entropy(torch.zeros(3, c, dtype=torch.float64))
        assert torch.allclose(h, torch.full((3,), math.log(c), dtype=torch.float64))


def test_one_hot_limit_is_zero() -> None:
    logits = torch.tensor([[1000.0, 0.0, 0.0]])
    h = softmax_entropy(logits)
    assert torch.isfinite(h).all()
    assert h.abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(5, 7), (1, 3), (8, 10)])
def test_matches_explicit_sum_classification(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g) * 3
    h = softmax_entropy(logits)
    assert h.shape == (shape[0],)
    ref = _explicit_entropy(logits.numpy(), axis=1)
    np.testing.assert_allclose(h.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_matches_explicit_sum_dense() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64) * 2
    h = softmax_entropy(logits, dim=1)
    assert h.shape == (2, 4, 3)
    # explicit loop over pixels
    for b in range(2):
        for i in range(4):
            for j in range(3):
                z = logits[b, :, i, j].tolist()
                m = max(z)
                e = [math.exp(v - m) for v in z]
                s = sum(e)
                p = [v / s for v in e]
                ref = -sum(q * math.log(q) for q in p)
                assert abs(float(h[b, i, j]) - ref) < 1e-12


def test_other_dim() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64)
    h = softmax_entropy(logits.t(), dim=0)
    np.testing.assert_allclose(h.numpy(), _explicit_entropy(logits.numpy(), axis=1), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_logits_stay_finite(dtype: torch.dtype) -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 3e4], [80.0, -80.0, 0.0]], dtype=dtype)
    h = softmax_entropy(logits)
    assert torch.isfinite(h).all()
    ref = _explicit_entropy(logits.double().numpy(), axis=1)
    np.testing.assert_allclose(h.double().numpy(), ref, atol=1e-5)
    # two tied huge logits: exactly log 2
    assert abs(float(h[1]) - math.log(2)) < 1e-5
    dense = torch.full((2, 3, 2, 2), -1e4, dtype=dtype)
    dense[:, 0] = 1e4
    hd = softmax_entropy(dense)
    assert torch.isfinite(hd).all() and hd.abs().max() < 1e-6


def test_gradient_finite_for_saturated_logits() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    softmax_entropy(logits).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_gradcheck_float64() -> None:
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: softmax_entropy(z), (logits,))
