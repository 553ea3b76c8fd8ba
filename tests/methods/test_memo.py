"""MEMO against a reference written here: a hand-written float64 forward of a small CNN (BN prior by formula),
the marginal entropy by formula, the SGD step by hand, AugMix copies from the same seeded generator."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn

import adaptkit
from adaptkit import MEMO
from adaptkit.functional import marginal_entropy
from adaptkit.functional.augmix import augmix

TOL = dict(rtol=1e-5, atol=1e-6)  # outputs: float32 model vs float64 reference
PTOL = dict(rtol=1e-5, atol=1e-7)  # parameters (steps are 1e-4 to 1e-3; measured agreement ~1e-8)
EPS = 1e-5


class ConvNet(nn.Module):
    """Conv-Norm-ReLU-Conv(stride 2)-Norm-ReLU-pool-Dropout-Linear with BatchNorm or GroupNorm."""

    def __init__(self, norm: str = "bn") -> None:
        super().__init__()
        self.kind = norm
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.n1 = nn.BatchNorm2d(4) if norm == "bn" else nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.n2 = nn.BatchNorm2d(6) if norm == "bn" else nn.GroupNorm(2, 6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.n1(self.conv1(x)))
        h = torch.relu(self.n2(self.conv2(h)))
        return self.fc(self.drop(h.mean((2, 3))))


def make_net(norm: str = "bn", seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet(norm)
    with torch.no_grad():
        for m in (net.n1, net.n2):
            if norm == "bn":
                randomize_bn(m, bias=0.3, mean=0.5, tracked=3)
            else:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def images(b: int = 1, hw: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, hw, hw, generator=g)


# ---------------------------------------------------------------------------------------------- reference
def ref_forward(
    P: dict[str, torch.Tensor], buf: dict[str, torch.Tensor], x: torch.Tensor, kind: str, N: float, detach: bool = True
) -> torch.Tensor:
    """The ConvNet forward written out; BN: w * source + (1 - w) * test statistics, w = N / (N + 1)."""

    def norm(h: torch.Tensor, name: str) -> torch.Tensor:
        wt, bs = P[f"{name}.weight"].view(1, -1, 1, 1), P[f"{name}.bias"].view(1, -1, 1, 1)
        if kind == "gn":
            g = h.view(h.shape[0], 2, -1)
            mu, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
            return ((g - mu) / torch.sqrt(var + EPS)).view_as(h) * wt + bs
        rm, rv = buf[f"{name}.running_mean"], buf[f"{name}.running_var"]
        if math.isinf(N):
            mean, var = rm, rv
        else:
            w = N / (N + 1)
            hs = h.detach() if detach else h
            mean = w * rm + (1 - w) * hs.mean((0, 2, 3))
            var = w * rv + (1 - w) * hs.var((0, 2, 3), unbiased=True)
        return (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS) * wt + bs

    h = torch.relu(norm(F.conv2d(x, P["conv1.weight"], P["conv1.bias"], padding=1), "n1"))
    h = torch.relu(norm(F.conv2d(h, P["conv2.weight"], P["conv2.bias"], padding=1, stride=2), "n2"))
    return h.mean((2, 3)) @ P["fc.weight"].T + P["fc.bias"]


def ref_marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    p_bar = logits.softmax(1).mean(0)
    return -(p_bar * p_bar.log()).sum()


class RefMEMO:
    """The official recipe, per image: (reset,) B AugMix copies, marginal entropy, SGD step, predict the clean
    image; float64 parameters, gradients by autograd through the hand-written forward."""

    def __init__(self, net: ConvNet, lr: float, B: int, N: float = 16, seed: int = 0, detach: bool = True) -> None:
        self.kind, self.lr, self.B, self.N, self.detach = net.kind, lr, B, N, detach
        self.source = {n: p.detach().double().clone() for n, p in net.named_parameters()}
        self.buf = {n: b.detach().double().clone() for n, b in net.named_buffers()}
        self.P = {n: p.clone().requires_grad_(True) for n, p in self.source.items()}
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []

    def reset(self) -> None:
        self.P = {n: p.clone().requires_grad_(True) for n, p in self.source.items()}
        self.gen = torch.Generator().manual_seed(self.seed)

    def copies(self, image: torch.Tensor) -> torch.Tensor:
        return augmix(image.expand(self.B, -1, -1, -1), self.gen).double()

    def step(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        copies = self.copies(image)
        loss = ref_marginal_entropy(ref_forward(self.P, self.buf, copies, self.kind, self.N, self.detach))
        grads = torch.autograd.grad(loss, list(self.P.values()))
        self.losses.append(float(loss.detach()))
        with torch.no_grad():
            new = {n: (p - self.lr * g).requires_grad_(True) for (n, p), g in zip(self.P.items(), grads)}
        self.P = new
        return dict(zip(self.P, grads))

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ref_forward(self.P, self.buf, image.double(), self.kind, self.N)


def assert_params(net: nn.Module, ref: RefMEMO) -> None:
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref.P[n].detach(), **PTOL, msg=n)


# ---------------------------------------------------------------------------------------------- losses
def test_marginal_entropy_against_explicit_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    p = [[math.exp(v) for v in row] for row in logits.tolist()]
    p = [[v / sum(row) for v in row] for row in p]
    p_bar = [sum(row[c] for row in p) / 7 for c in range(5)]
    want = -sum(v * math.log(v) for v in p_bar)
    assert float(marginal_entropy(logits)) == pytest.approx(want, rel=1e-12)
    # confident copies that agree: ~0; that disagree uniformly over 5 classes: log 5; saturated logits: finite
    sharp = torch.eye(5, dtype=torch.float64) * 1e4
    assert float(marginal_entropy(sharp)) == pytest.approx(math.log(5), rel=1e-9)
    assert float(marginal_entropy(sharp[:1].repeat(3, 1))) == pytest.approx(0.0, abs=1e-9)
    assert torch.isfinite(marginal_entropy(torch.tensor([[1e4, -1e4], [1e4, -1e4]]))).all()


def test_dense_loss_is_the_marginal_over_copies_and_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)
    p_bar = logits.softmax(1).mean((0, 2, 3))
    want = -(p_bar * p_bar.log()).sum()
    w = MEMO(make_net(), n_augmentations=2)
    torch.testing.assert_close(w.loss(logits), want)
    torch.testing.assert_close(w.loss({"out": logits, "aux": logits * 0}), want)
    w.restore()


# ---------------------------------------------------------------------------------------------- reference step
@pytest.mark.parametrize("N", [16.0, 0.0, float("inf")])
def test_one_step_matches_reference(N: float) -> None:
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = images(1)
    ref = RefMEMO(net, lr=0.05, B=8, N=N, seed=3)
    w = MEMO(net, lr=0.05, n_augmentations=8, N=N, seed=3)
    out = w(x)
    grads = ref.step(x)
    assert_params(net, ref)
    torch.testing.assert_close(out.double(), ref.predict(x), **TOL)  # the clean image, adapted model
    assert w.last_loss is not None and float(w.last_loss[0]) == pytest.approx(ref.losses[0], rel=1e-4)
    # every parameter moved by -lr * grad (the whole network); the BN buffers were never written
    for n, p in net.named_parameters():
        delta = (p.detach().double() - before[n].double()).flatten()
        torch.testing.assert_close(delta, -0.05 * grads[n].flatten(), rtol=1e-3, atol=1e-6, msg=n)
        assert delta.abs().max() > 0, n
    for n, b in net.named_buffers():
        assert torch.equal(b, before[n]), n
    # the step lowers the marginal entropy of the same copies (direction)
    copies = RefMEMO(net, 0.05, 8, N, seed=3).copies(x)
    src = {n: v.double() for n, v in before.items()}
    with torch.no_grad():
        l0 = ref_marginal_entropy(ref_forward(src, src, copies, "bn", N))
        l1 = ref_marginal_entropy(ref_forward(ref.P, ref.buf, copies, "bn", N))
    assert l1 < l0
    w.restore()


def test_no_gradient_flows_through_the_test_statistics() -> None:
    """As the official code (statistics written as running buffers): the update equals the reference with detached
    statistics and differs visibly from one whose gradient flows through them."""
    net = make_net()
    x = images(1)
    detached, live = RefMEMO(net, 0.05, 8, N=16, seed=0), RefMEMO(net, 0.05, 8, N=16, seed=0, detach=False)
    w = MEMO(net, lr=0.05, n_augmentations=8, N=16, seed=0)
    w(x)
    g_det, g_live = detached.step(x), live.step(x)
    assert_params(net, detached)
    gap = max((g_det[n] - g_live[n]).abs().max().item() for n in g_det) * 0.05  # in parameter units
    assert gap > 100 * PTOL["atol"], gap  # the parameter check above would catch the other gradient
    w.restore()


def test_groupnorm_model_needs_no_prior() -> None:
    net = make_net("gn")
    x = images(1)
    ref = RefMEMO(net, lr=0.05, B=6, seed=1)
    w = MEMO(net, lr=0.05, n_augmentations=6, seed=1)
    assert not w._bn and not net.n1._forward_pre_hooks and not net.n2._forward_pre_hooks
    out = w(x)
    ref.step(x)
    assert_params(net, ref)
    torch.testing.assert_close(out.double(), ref.predict(x), **TOL)
    w.restore()


def test_two_steps_per_image() -> None:
    net = make_net()
    x = images(1)
    ref = RefMEMO(net, lr=0.05, B=4, seed=2)
    w = MEMO(net, lr=0.05, n_augmentations=4, steps=2, seed=2)
    assert w.steps_per_image == 2 and w.steps == 1
    out = w(x)
    ref.step(x)
    ref.step(x)  # fresh copies from the same generator
    assert_params(net, ref)
    torch.testing.assert_close(out.double(), ref.predict(x), **TOL)
    w.restore()


# ---------------------------------------------------------------------------------------------- episodes
def test_batch_is_n_independent_episodes() -> None:
    x = images(3)
    a, b = make_net(), make_net()
    wa = MEMO(a, lr=0.05, n_augmentations=4)
    wb = MEMO(b, lr=0.05, n_augmentations=4)
    assert wa.episodic
    out = wa(x)
    one_by_one = torch.cat([wb(x[i : i + 1]) for i in range(3)])
    assert torch.equal(out, one_by_one)
    # each image starts from the source weights and a freshly seeded generator: image 2 as if it came first
    ref = RefMEMO(make_net(), lr=0.05, B=4, seed=0)
    ref.step(x[2:3])
    torch.testing.assert_close(out[2:3].double(), ref.predict(x[2:3]), **TOL)
    assert_params(a, ref)  # after the call the model holds the last image's adapted weights
    torch.testing.assert_close(wa(x), out, rtol=0, atol=0)  # episodic: the same batch gives the same outputs
    wa.restore()
    wb.restore()


def test_online_mode_carries_weights_and_generator() -> None:
    x = images(2)
    net = make_net()
    w = MEMO(net, lr=0.05, n_augmentations=4, episodic=False, seed=5)
    out = w(x)
    ref = RefMEMO(make_net(), lr=0.05, B=4, seed=5)
    preds = []
    for i in range(2):
        ref.step(x[i : i + 1])
        preds.append(ref.predict(x[i : i + 1]))
    torch.testing.assert_close(out.double(), torch.cat(preds), **TOL)
    assert_params(net, ref)
    twin = MEMO(make_net(), lr=0.05, n_augmentations=4, episodic=False, seed=5)
    assert torch.equal(torch.cat([twin(x[:1]), twin(x[1:])]), out)  # one call or two: the same stream
    w.restore()
    twin.restore()


def test_reset_is_bitwise_including_the_generator_and_state_round_trip() -> None:
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w = MEMO(net, lr=0.05, n_augmentations=4, episodic=False, momentum=0.9)
    first = w(images(2, seed=1))
    w(images(2, seed=2))
    sd = copy.deepcopy(w.adaptation_state_dict())  # the optimizer entry holds the live momentum buffers
    assert "_adaptkit.state.rng.cpu" in sd
    nxt = w(images(2, seed=3))
    w.reset()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert len(w.optimizer.state) == 0 and w.last_loss is None
    assert torch.equal(w(images(2, seed=1)), first)
    other = MEMO(make_net(), lr=0.05, n_augmentations=4, episodic=False, momentum=0.9)
    other.load_adaptation_state_dict(sd)
    assert torch.equal(other(images(2, seed=3)), nxt)  # weights, momentum and generator state restored
    w.restore()
    other.restore()


def test_global_generator_when_seed_is_none() -> None:
    x = images(1)
    outs = []
    for _ in range(2):
        w = MEMO(make_net(), lr=0.05, n_augmentations=4, seed=None)
        torch.manual_seed(11)
        outs.append(w(x))
        assert "_adaptkit.state.rng.cpu" not in w.adaptation_state_dict()
        w.restore()
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------- BN corner cases
class PooledBN(nn.Module):
    """A BatchNorm1d after global pooling: one value per channel for a single image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x).mean((2, 3))))


def test_single_value_channel_keeps_the_source_variance() -> None:
    torch.manual_seed(0)
    net = PooledBN().eval()
    randomize_bn(net.bn, tracked=3)
    x = images(1, hw=8)
    w = MEMO(net, lr=0.05, n_augmentations=4, N=16)
    out = w(x)
    # prediction on the single image with the adapted weights: mean mixed with w = 16/17, variance the source's
    with torch.no_grad():
        h = F.conv2d(x, net.conv.weight, net.conv.bias, padding=1).mean((2, 3))
        lam = 16 / 17
        mean = lam * net.bn.running_mean + (1 - lam) * h[0]
        z = (h - mean) / torch.sqrt(net.bn.running_var + net.bn.eps) * net.bn.weight + net.bn.bias
        want = F.linear(z, net.fc.weight, net.fc.bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(MEMO(PooledBN().eval(), n_augmentations=1)(x)).all()  # one copy: count 1 while adapting
    w.restore()


def test_n0_with_a_single_value_per_channel_raises() -> None:
    w = MEMO(PooledBN().eval(), n_augmentations=4, N=0)
    with pytest.raises(ValueError, match="N > 0"):
        w(images(1, hw=8))
    w.restore()


# ---------------------------------------------------------------------------------------------- inputs
def _first_input(w: MEMO, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = net.conv1.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    w(x)
    handle.remove()
    return seen[0]


def test_copies_in_pixel_space_and_normalization() -> None:
    x = images(1)
    net = make_net()
    w = MEMO(net, n_augmentations=4, seed=4)
    want = augmix(x.expand(4, -1, -1, -1), torch.Generator().manual_seed(4))
    torch.testing.assert_close(_first_input(w, net, x), want, rtol=0, atol=0)  # in [0, 1]: the copies as they are
    w.restore()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    mt, st = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    xn = (x - mt) / st
    w = MEMO(net, n_augmentations=4, seed=4, normalization=(mean, std))
    pix = (xn * st + mt).clamp(0, 1)
    want = (augmix(pix.expand(4, -1, -1, -1), torch.Generator().manual_seed(4)) - mt) / st
    torch.testing.assert_close(_first_input(w, net, xn), want, rtol=1e-5, atol=1e-5)
    w.restore()
    w = MEMO(net, n_augmentations=4, normalization=((0.5, 0.5), (0.2, 0.2)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="2 channel values, the batch has 3"):
        w(xn)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    w.restore()


def test_out_of_range_inputs_are_rescaled_per_image_with_a_warning() -> None:
    x = images(1) * 4 - 1.5
    net = make_net()
    w = MEMO(net, n_augmentations=4, seed=4)
    with pytest.warns(UserWarning, match="normalization"):
        got = _first_input(w, net, x)
    lo, hi = x.min(), x.max()
    want = augmix(((x - lo) / (hi - lo)).clamp(0, 1).expand(4, -1, -1, -1), torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want * (hi - lo) + lo, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(x)  # once per wrapper
    w.restore()


class TinySeg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(torch.relu(self.bn(self.conv1(x))))
        return {"out": out, "aux": out * 0.5}


def test_dense_outputs_keep_their_type_and_shape() -> None:
    torch.manual_seed(0)
    net = TinySeg().eval()
    x = images(2, hw=8)
    with MEMO(net, n_augmentations=3) as w:
        out = w(x)
        assert list(out) == ["out", "aux"] and out["out"].shape == (2, 3, 8, 8)
        assert w.last_loss is not None and w.last_loss.shape == (2,)


def test_only_parameters_that_require_grad_or_are_included_adapt() -> None:
    net = make_net()
    net.conv1.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with MEMO(net, lr=0.05, n_augmentations=4, exclude=["n1"]) as w:
        w(images(1))
        changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {"conv2.weight", "conv2.bias", "n2.weight", "n2.bias", "fc.weight", "fc.bias"}
        assert set(w._bn) == {"n1", "n2"}  # the prior still applies to every BN layer
    assert all(not p.requires_grad for p in net.conv1.parameters())
    with MEMO(net, lr=0.05, n_augmentations=4, include=["fc"]) as w:
        assert [n for n, _ in w.named_adapted_parameters()] == ["fc.weight", "fc.bias"]


def test_works_at_batch_size_one_under_no_grad_and_inference_mode() -> None:
    x = images(1)
    ref = MEMO(make_net(), n_augmentations=4)(x)
    for ctx in (torch.no_grad, torch.inference_mode):
        w = MEMO(make_net(), n_augmentations=4)
        with ctx():
            out = w(x)
        assert torch.equal(out, ref) and not out.requires_grad
        w.restore()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, "lr"),
        ({"n_augmentations": 0}, "n_augmentations"),
        ({"steps": 0}, "steps"),
        ({"N": -1.0}, "N must"),
        ({"N": float("nan")}, "N must"),
        ({"severity": 0.0}, "severity"),
        ({"pre_augment": "center"}, "pre_augment"),
        ({"normalization": ((0.5,), (0.0,))}, "normalization"),
        ({"normalization": (0.5, 0.5)}, "normalization"),
        ({"seed": 1.5}, "seed"),
        ({"momentum": -0.1}, "momentum"),
        ({"include": ["nope"]}, "list_layers"),
    ],
)
def test_bad_arguments_raise_with_the_model_untouched(kwargs: dict[str, Any], match: str) -> None:
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=match):
        MEMO(net, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not hasattr(net, "_adaptkit_wrapped_by")


def test_registered_and_exported() -> None:
    assert "memo" in adaptkit.list_methods()
    w = adaptkit.adapt(make_net(), "memo", n_augmentations=2)
    assert isinstance(w, MEMO) and w.n_augmentations == 2 and w.lr == 5e-3 and w.N == 16
    w.restore()


def test_a_failed_call_before_any_update_leaves_the_generator_as_it_was() -> None:
    x = images(2)
    net, twin = make_net(), make_net()
    w = MEMO(net, lr=0.05, n_augmentations=4, episodic=False)
    ref = MEMO(twin, lr=0.05, n_augmentations=4, episodic=False)
    assert torch.equal(w(x), ref(x))

    def boom(module: nn.Module, inputs: Any) -> None:
        raise RuntimeError("sensor offline")

    handle = net.n2.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="sensor offline"):
        w(x)
    handle.remove()
    assert torch.equal(w(x), ref(x))  # as if the failed call never came (weights and augmentation draws)
    w.restore()
    ref.restore()
