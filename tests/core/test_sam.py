"""SAM (adaptkit.core.sam) against hand-written SAM steps on a quadratic with analytic gradients (float64)."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from adaptkit.core.sam import SAM, sam_grad_norm, sam_perturbation

DT = torch.float64


def _problem() -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.Tensor, torch.Tensor]:
    """Two parameters of L(w, b) = 0.5 * sum(a * w^2) + sum(c * w) + 0.5 * sum(b^2) * 3 + sum(b); gradient
    a * w + c and 3 * b + 1 (written out below, never taken from autograd in the reference)."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=DT))
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=DT))
    a = torch.rand(3, 2, generator=g, dtype=DT) + 0.5
    c = torch.randn(3, 2, generator=g, dtype=DT)
    return w, b, a, c


def _loss(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a * w**2).sum() + (c * w).sum() + 1.5 * (b**2).sum() + b.sum()


def _grads(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a * w + c, 3 * b + 1


def test_perturbation_direction_scale_restore_and_momentum_step() -> None:
    w, b, a, c = _problem()
    w0, b0 = w.detach().clone(), b.detach().clone()
    rho, lr, mom = 0.3, 0.1, 0.9
    sam = SAM(torch.optim.SGD([w, b], lr=lr, momentum=mom), rho=rho)

    # hand-written reference, two SAM steps with SGD momentum (buf_1 = g, buf_t = mom * buf + g)
    rw, rb = w0.clone(), b0.clone()
    bufs = None
    for _ in range(2):
        gw, gb = _grads(rw, rb, a, c)
        norm = math.sqrt(float((gw**2).sum() + (gb**2).sum()))  # one global L2 norm over both tensors
        ew, eb = rho * gw / norm, rho * gb / norm
        gw2, gb2 = _grads(rw + ew, rb + eb, a, c)  # gradient at the perturbed point
        bufs = (gw2, gb2) if bufs is None else (mom * bufs[0] + gw2, mom * bufs[1] + gb2)
        rw, rb = rw - lr * bufs[0], rb - lr * bufs[1]  # applied to the *original* weights

        before_w, before_b = w.detach().clone(), b.detach().clone()
        _loss(w, b, a, c).backward()
        with sam.perturbed():
            assert sam.is_perturbed
            dw, db = w.detach() - before_w, b.detach() - before_b
            torch.testing.assert_close(dw, ew, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(db, eb, rtol=1e-12, atol=1e-14)
            assert math.isclose(float(torch.cat([dw.flatten(), db]).norm()), rho, rel_tol=1e-12)
            assert w.grad is None and b.grad is None  # first_step dropped the gradient at w
            _loss(w, b, a, c).backward()
        assert torch.equal(w.detach(), before_w) and torch.equal(b.detach(), before_b)  # restore is bitwise
        assert not sam.is_perturbed
        sam.base_step()
        assert w.grad is None and b.grad is None
        torch.testing.assert_close(w.detach(), rw, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), rb, rtol=1e-12, atol=1e-14)
    assert len(sam.optimizer.state) == 2  # momentum buffers
    sam.clear()
    assert len(sam.optimizer.state) == 0


def test_adaptive_perturbation_matches_asam_formula() -> None:
    w, b, a, c = _problem()
    rho = 0.7
    sam = SAM(torch.optim.SGD([w, b], lr=0.1), rho=rho, adaptive=True)
    gw, gb = _grads(w.detach(), b.detach(), a, c)
    tw, tb = w.detach().abs(), b.detach().abs()
    norm = math.sqrt(float(((tw * gw) ** 2).sum() + ((tb * gb) ** 2).sum()))
    ew, eb = rho * tw**2 * gw / norm, rho * tb**2 * gb / norm
    w0, b0 = w.detach().clone(), b.detach().clone()
    _loss(w, b, a, c).backward()
    with sam.perturbed():
        torch.testing.assert_close(w.detach() - w0, ew, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach() - b0, eb, rtol=1e-12, atol=1e-14)
    assert torch.equal(w.detach(), w0)


def test_norm_is_global_over_param_groups_and_skips_params_without_grad() -> None:
    w, b, a, c = _problem()
    unused = torch.nn.Parameter(torch.ones(5, dtype=DT))
    sam = SAM(torch.optim.SGD([{"params": [w]}, {"params": [b, unused], "lr": 0.5}], lr=0.1), rho=1.0)
    gw, gb = _grads(w.detach(), b.detach(), a, c)
    norm = math.sqrt(float((gw**2).sum() + (gb**2).sum()))
    _loss(w, b, a, c).backward()
    assert unused.grad is None
    assert math.isclose(float(sam_grad_norm(sam.params)), norm, rel_tol=1e-12)
    e = sam_perturbation(sam.params, 1.0)
    assert e[2] is None
    torch.testing.assert_close(e[1], gb / norm, rtol=1e-12, atol=1e-14)
    with sam.perturbed():
        assert torch.equal(unused.detach(), torch.ones(5, dtype=DT))  # no gradient: not moved


def _closure(*args: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = _loss(*args)
        loss.backward()
        return loss

    return closure


def test_step_with_closure_equals_the_manual_sequence() -> None:
    results = []
    for use_closure in (False, True):
        w, b, a, c = _problem()
        sam = SAM(torch.optim.SGD([w, b], lr=0.05, momentum=0.9), rho=0.2)
        for _ in range(3):
            _loss(w, b, a, c).backward()
            if use_closure:
                sam.step(_closure(w, b, a, c))
            else:
                with sam.perturbed():
                    _loss(w, b, a, c).backward()
                sam.second_step()
        results.append((w.detach().clone(), b.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_restores_when_the_second_pass_raises() -> None:
    w, b, a, c = _problem()
    w0 = w.detach().clone()
    sam = SAM(torch.optim.SGD([w, b], lr=0.1), rho=0.5)
    _loss(w, b, a, c).backward()
    with pytest.raises(KeyError), sam.perturbed():
        assert not torch.equal(w.detach(), w0)
        raise KeyError("boom")
    assert torch.equal(w.detach(), w0)
    assert not sam.is_perturbed


def test_zero_gradient_gives_no_perturbation_and_no_nan() -> None:
    w = torch.nn.Parameter(torch.ones(3, dtype=DT))
    w.grad = torch.zeros(3, dtype=DT)
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    sam.first_step()
    assert torch.equal(w.detach(), torch.ones(3, dtype=DT))
    sam.restore()
    assert float(sam_grad_norm([torch.nn.Parameter(torch.ones(2))])) == 0.0  # no gradient at all


def test_identity_kept_and_double_perturbation_refused() -> None:
    w, b, a, c = _problem()
    data_ptr = w.data_ptr()
    sam = SAM(torch.optim.SGD([w, b], lr=0.1), rho=0.5)
    _loss(w, b, a, c).backward()
    sam.first_step(zero_grad=False)
    with pytest.raises(RuntimeError, match="already perturbed"):
        sam.first_step()
    sam.restore()
    sam.restore()  # idempotent
    assert w.data_ptr() == data_ptr


@pytest.mark.parametrize("kw", [{"rho": -0.1}, {"eps": 0.0}, {"rho": float("nan")}])
def test_bad_arguments(kw: dict[str, float]) -> None:
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=next(iter(kw))):
        SAM(torch.optim.SGD([w], lr=0.1), **kw)
    with pytest.raises(TypeError, match="Optimizer"):
        SAM([w])  # type: ignore[arg-type]
