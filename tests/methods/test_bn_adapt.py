"""BNAdapt against an independent float64 reference of the BN source prior (Schneider et al., 2020).

The reference runs the small network's layers by hand in float64: for each BN layer it takes the layer's input,
computes the per-channel mean and unbiased variance over B*H*W, mixes them with the running statistics using
``lam = N / (N + n)`` (``n`` = number of images) and normalises with the layer's affine parameters and eps.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn

import adaptkit
from adaptkit import BNAdapt

INF = float("inf")
BN_NAMES = ("bn1", "bn2")


class TinyNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-pool-Linear."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        pad = k // 2
        self.conv1 = nn.Conv2d(3, 4, k, padding=pad)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, k, padding=pad)
        self.bn2 = nn.BatchNorm2d(6, eps=1e-3)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def make_net(k: int = 3, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(k)
    for bn in (net.bn1, net.bn2):
        randomize_bn(bn, bias=0.3, mean=0.5, var=(0.3, 2.0), tracked=7)
    return net.eval()


def reference(
    net: TinyNet, x: torch.Tensor, N: float, seen: dict[str, list[torch.Tensor]] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 forward of ``TinyNet`` with prior-mixed BN statistics; ``seen`` pools inputs across calls."""
    p = {k: v.detach().double() for k, v in net.state_dict().items()}
    inputs: dict[str, torch.Tensor] = {}

    def bn(h: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        inputs[name] = h
        if seen is not None:
            seen.setdefault(name, []).append(h)
            pooled = torch.cat(seen[name])
        else:
            pooled = h
        n = pooled.shape[0]  # images
        c = pooled.shape[1]
        flat = pooled.transpose(0, 1).reshape(c, -1)  # (C, B*H*W)
        count = flat.shape[1]
        mt = flat.sum(1) / count
        vt = ((flat - mt[:, None]) ** 2).sum(1) / (count - 1) if count > 1 else torch.full_like(mt, math.nan)
        rm, rv = p[f"{name}.running_mean"], p[f"{name}.running_var"]
        lam = 1.0 if math.isinf(N) else N / (N + n)
        mu = lam * rm + (1 - lam) * mt
        var = rv if count == 1 else lam * rv + (1 - lam) * vt
        w, b = p[f"{name}.weight"], p[f"{name}.bias"]
        shape = (1, -1, 1, 1)
        return (h - mu.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)

    h = F.conv2d(x.double(), p["conv1.weight"], p["conv1.bias"], padding=net.conv1.padding)
    h = torch.relu(bn(h, "bn1", net.bn1.eps))
    h = F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=net.conv2.padding)
    h = bn(h, "bn2", net.bn2.eps)
    out = h.mean((2, 3)) @ p["fc.weight"].t() + p["fc.bias"]
    return out, inputs


def w2_reference(net: TinyNet, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Normalised W2 per layer: sqrt(mean_c [(mu_s-mu_t)^2 + (sd_s-sd_t)^2] / (var_s + eps))."""
    out = {}
    for name in BN_NAMES:
        bn = getattr(net, name)
        h = inputs[name]
        flat = h.transpose(0, 1).reshape(h.shape[1], -1)
        mt = flat.mean(1)
        vt = ((flat - mt[:, None]) ** 2).sum(1) / (flat.shape[1] - 1)
        ms, vs = bn.running_mean.double(), bn.running_var.double()
        terms = ((ms - mt) ** 2 + (vs.sqrt() - vt.sqrt()) ** 2) / (vs + bn.eps)
        out[name] = math.sqrt(float(terms.mean()))
    return out


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def _x(b: int = 8, hw: int = 6, seed: int = 1, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, hw, hw, generator=g) * 1.5 + shift


# ---------------------------------------------------------------- the prior formula


@pytest.mark.parametrize("N", [0, 4, 16, INF])
def test_matches_float64_reference(N: float) -> None:
    net = make_net()
    state = _state(net)
    x = _x(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with BNAdapt(net, N=N) as m:
            out = m(x)
            _assert_state(net, state)  # running buffers never written, num_batches_tracked unchanged
    ref, _ = reference(net, x, N)
    _close(out, ref)
    _assert_state(net, state)


def test_N_inf_is_the_source_model_exactly() -> None:
    net = make_net()
    x = _x(4)
    with torch.no_grad():
        src = net(x)
    with BNAdapt(net, N=INF) as m:
        assert torch.equal(m(x), src)


def test_N0_is_test_batch_statistics_up_to_bessel() -> None:
    """N=0 equals training-mode BN with the unbiased variance (n/(n-1) Bessel factor on var)."""
    net = make_net()
    x = _x(8)
    with BNAdapt(net, N=0) as m:
        out = m(x)
    ref, _ = reference(net, x, 0)
    _close(out, ref)
    # sanity: differs from biased training-mode BN (the documented convention is the unbiased variance)
    with torch.no_grad():
        tr = make_net()
        tr.bn1.train()
        tr.bn2.train()
        biased = tr(x)
    assert not torch.allclose(out, biased, atol=1e-6)


@pytest.mark.parametrize("N", [0, 16])
def test_accumulate_pools_all_samples_since_reset(N: float) -> None:
    net = make_net()
    xa, xb, xc = _x(4, seed=2), _x(6, seed=3, shift=0.5), _x(5, seed=4, shift=-0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = BNAdapt(net, N=N, accumulate=True)
    seen: dict[str, list[torch.Tensor]] = {}
    ra, _ = reference(net, xa, N, seen)
    rb, _ = reference(net, xb, N, seen)  # pooled moments of both batches, n = 10 images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(m(xa), ra)
        _close(m(xb), rb)
        acc = m._acc["bn1"]
        assert acc.samples == 10 and acc.count == 10 * 36
        m.reset()
        rc, _ = reference(net, xc, N, {})  # reset clears the pool
        _close(m(xc), rc)
    m.restore()


def test_accumulate_false_uses_each_batch_alone() -> None:
    net = make_net()
    xa, xb = _x(4, seed=2), _x(6, seed=3, shift=0.5)
    with BNAdapt(net, N=8) as m:
        m(xa)
        _close(m(xb), reference(net, xb, 8)[0])


def test_accumulate_episodic_resets_pool() -> None:
    net = make_net()
    xa, xb = _x(4, seed=2), _x(6, seed=3, shift=0.5)
    with BNAdapt(net, N=8, accumulate=True, episodic=True) as m:
        m(xa)
        _close(m(xb), reference(net, xb, 8)[0])


# ---------------------------------------------------------------- edge cases


def test_bs1_with_1x1_maps_no_nan_for_positive_N() -> None:
    net = make_net(k=1)
    state = _state(net)
    x = _x(1, hw=1)
    with BNAdapt(net, N=16) as m:
        out = m(x)
    assert torch.isfinite(out).all()
    ref, _ = reference(net, x, 16)  # mean mixed with lam = 16/17, source variance kept
    _close(out, ref)
    _assert_state(net, state)


def test_bs1_with_1x1_maps_N0_raises_naming_layer() -> None:
    net = make_net(k=1)
    state = _state(net)
    m = BNAdapt(net, N=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="'bn1'") as ei:
            m(_x(1, hw=1))
    assert "N > 0" in str(ei.value)
    _assert_state(net, state)
    assert all(b is not None for b in net.bn1._buffers.values())
    # still usable with a proper batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(m(_x(8, hw=1)), reference(net, _x(8, hw=1), 0)[0])
    m.restore()
    _assert_state(net, state)


def test_bs1_with_spatial_maps_has_variance() -> None:
    net = make_net()
    x = _x(1, hw=5)
    with BNAdapt(net, N=0) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(m(x), reference(net, x, 0)[0])


def test_small_n_warning_once_when_N0() -> None:
    net = make_net()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m = BNAdapt(net, N=0)
        m(_x(4))
        m(_x(4, seed=5))
    msgs = [str(w.message) for w in rec if "N=0" in str(w.message)]
    assert len(msgs) == 1 and "4 samples" in msgs[0]
    m.restore()


@pytest.mark.parametrize(("N", "b"), [(0, 8), (16, 4)])
def test_no_warning_otherwise(N: float, b: int) -> None:
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with BNAdapt(net, N=N) as m:
            m(_x(b))


@pytest.mark.parametrize("N", [-1, float("nan")])
def test_invalid_N_raises(N: float) -> None:
    with pytest.raises(ValueError, match="N must be"):
        BNAdapt(make_net(), N=N)


def test_requires_bn_layers() -> None:
    with pytest.raises(ValueError, match="list_layers"):
        BNAdapt(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))


# ---------------------------------------------------------------- grad contexts / modes


def test_works_under_inference_mode() -> None:
    net = make_net()
    state = _state(net)
    x = _x(8)
    m = BNAdapt(net, N=4)
    with torch.inference_mode():
        out = m(x)
    _close(out, reference(net, x, 4)[0])
    m.restore()
    _assert_state(net, state)


def test_works_under_no_grad_and_output_detached() -> None:
    net = make_net()
    with BNAdapt(net, N=4) as m:
        with torch.no_grad():
            out = m(_x(8))
        out2 = m(_x(8))
    assert not out.requires_grad and not out2.requires_grad


def test_robusta_bug_user_eval_then_two_batches() -> None:
    """After a user ``model.eval()``, each batch still uses its own statistics (no stale reuse)."""
    net = make_net()
    m = BNAdapt(net, N=2)
    net.eval()
    xa, xb = _x(8, seed=10), _x(8, seed=11, shift=1.0)
    _close(m(xa), reference(net, xa, 2)[0])
    net.eval()
    out_b = m(xb)
    _close(out_b, reference(net, xb, 2)[0])
    assert not torch.allclose(out_b, reference(net, xa, 2)[0].float(), atol=1e-3)
    net.train()  # a user train() changes nothing either, and never writes the buffers
    state = _state(net)
    _close(m(xb), reference(net, xb, 2)[0])
    _assert_state(net, state)
    m.restore()


# ---------------------------------------------------------------- BN1d


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("N", [0, 3, INF])
def test_bn1d_on_flat_inputs(N: float) -> None:
    net = MLP().eval()
    x = torch.randn(8, 5)
    with BNAdapt(net, N=N) as m:
        out = m(x)
    p = {k: v.detach().double() for k, v in net.state_dict().items()}
    h = x.double() @ p["fc1.weight"].t() + p["fc1.bias"]
    n = h.shape[0]
    mt = h.sum(0) / n
    vt = ((h - mt) ** 2).sum(0) / (n - 1)
    lam = 1.0 if math.isinf(N) else N / (N + n)
    mu = lam * p["bn.running_mean"] + (1 - lam) * mt
    var = lam * p["bn.running_var"] + (1 - lam) * vt
    h = (h - mu) / torch.sqrt(var + net.bn.eps) * p["bn.weight"] + p["bn.bias"]
    ref = torch.relu(h) @ p["fc2.weight"].t() + p["fc2.bias"]
    _close(out, ref)


# ---------------------------------------------------------------- shift score


def test_shift_score_function_vs_closed_form_and_model_unchanged() -> None:
    net = make_net()
    net.bn2.train()  # a mixed-mode model: flags must come back exactly
    state = _state(net)
    flags = {n: mod.training for n, mod in net.named_modules()}
    hooks = [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in net.modules()]
    x = _x(8, shift=0.7)
    score = adaptkit.shift_score(net, x)
    _, inputs = reference(net, x, INF)  # test statistics measured in the source model
    ref = w2_reference(net, inputs)
    assert list(score.per_layer) == list(BN_NAMES)
    for name in BN_NAMES:
        assert score.per_layer[name] == pytest.approx(ref[name], rel=1e-5)
    assert score.mean == pytest.approx(sum(ref.values()) / 2, rel=1e-5)
    assert float(score) == score.mean
    assert score.samples == 8
    _assert_state(net, state)
    assert {n: mod.training for n, mod in net.named_modules()} == flags
    assert [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in net.modules()] == hooks


def test_shift_score_over_batches_pools() -> None:
    net = make_net()
    xs = [_x(4, seed=20), _x(4, seed=21, shift=0.3)]
    score = adaptkit.shift_score(net, [(x, 0) for x in xs])
    seen: dict[str, list[torch.Tensor]] = {}
    for x in xs:
        _, inputs = reference(net, x, INF)
        for k, v in inputs.items():
            seen.setdefault(k, []).append(v)
    ref = w2_reference(net, {k: torch.cat(v) for k, v in seen.items()})
    for name in BN_NAMES:
        assert score.per_layer[name] == pytest.approx(ref[name], rel=1e-5)
    assert score.samples == 8
    one = adaptkit.shift_score(net, [(x, 0) for x in xs], max_batches=1)
    assert one.samples == 4


def test_shift_score_larger_for_shifted_data() -> None:
    net = make_net()
    torch.manual_seed(0)
    near = adaptkit.shift_score(net, _x(8))
    far = adaptkit.shift_score(net, _x(8) * 5 + 3)
    assert far.mean > near.mean


def test_wrapper_shift_score_after_forward() -> None:
    net = make_net()
    x = _x(8, shift=0.4)
    with BNAdapt(net, N=16) as m:
        with pytest.raises(RuntimeError, match="at least one batch"):
            m.shift_score()
        m(x)
        score = m.shift_score()
    _, inputs = reference(net, x, 16)  # statistics of the inputs the adapted layers saw
    ref = w2_reference(net, inputs)
    for name in BN_NAMES:
        assert score.per_layer[name] == pytest.approx(ref[name], rel=1e-5)
    with BNAdapt(net, N=INF) as m:
        m(x)
        src = m.shift_score()
    fn = adaptkit.shift_score(net, x)
    for name in BN_NAMES:
        assert src.per_layer[name] == pytest.approx(fn.per_layer[name], rel=1e-6)


def test_wrapper_shift_score_accumulated() -> None:
    net = make_net()
    xa, xb = _x(4, seed=30), _x(4, seed=31, shift=0.5)
    seen: dict[str, list[torch.Tensor]] = {}
    reference(net, xa, 16, seen)
    reference(net, xb, 16, seen)
    with BNAdapt(net, N=16, accumulate=True) as m:
        m(xa)
        m(xb)
        score = m.shift_score()
    ref = w2_reference(net, {k: torch.cat(v) for k, v in seen.items()})
    for name in BN_NAMES:
        assert score.per_layer[name] == pytest.approx(ref[name], rel=1e-5)
    assert score.samples == 8


# ---------------------------------------------------------------- selection / state


def test_include_exclude() -> None:
    net = make_net()
    x = _x(8)
    with BNAdapt(net, N=0, include=["bn1"]) as m:
        assert m.targeted_modules == ["bn1"]
        out = m(x)
    # independent: only bn1 adapted, bn2 uses source statistics
    p = {k: v.detach().double() for k, v in net.state_dict().items()}
    h = F.conv2d(x.double(), p["conv1.weight"], p["conv1.bias"], padding=1)
    flat = h.transpose(0, 1).reshape(4, -1)
    mt, vt = flat.mean(1), flat.var(1, unbiased=True)
    h = torch.relu(
        (h - mt.view(1, -1, 1, 1)) / (vt.view(1, -1, 1, 1) + 1e-5).sqrt() * p["bn1.weight"].view(1, -1, 1, 1)
        + p["bn1.bias"].view(1, -1, 1, 1)
    )
    h = F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)
    h = (h - p["bn2.running_mean"].view(1, -1, 1, 1)) / (p["bn2.running_var"].view(1, -1, 1, 1) + 1e-3).sqrt()
    h = h * p["bn2.weight"].view(1, -1, 1, 1) + p["bn2.bias"].view(1, -1, 1, 1)
    ref = h.mean((2, 3)) @ p["fc.weight"].t() + p["fc.bias"]
    _close(out, ref)
    with BNAdapt(net, N=0, exclude=r"bn1") as m:
        assert m.targeted_modules == ["bn2"]


def test_adaptation_state_roundtrip_accumulate() -> None:
    net = make_net()
    xa, xb = _x(4, seed=40), _x(4, seed=41)
    with BNAdapt(net, N=4, accumulate=True) as m:
        m(xa)
        sd = m.adaptation_state_dict()
        assert "bn1.num_batches_tracked" in sd and "bn1.running_mean" in sd
        after = m(xb)
        m.reset()
        m.load_adaptation_state_dict(sd)
        assert torch.equal(m(xb), after)


def test_half_precision_model_gets_float32_statistics() -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(8, 3, 32, 32)
    with adaptkit.BNAdapt(model, N=0) as bn:
        ref = bn(x)
    model = model.to(torch.bfloat16)
    with adaptkit.BNAdapt(model, N=0) as bn:
        out = bn(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref, atol=0.25, rtol=0.1)
