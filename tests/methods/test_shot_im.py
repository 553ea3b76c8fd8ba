"""SHOT-IM against a hand-written reference step (the loss of tim-learn/SHOT ``object/image_target.py`` and the
online setting of fiveai/LAME ``src/adaptation/shot.py``: BN affine parameters, SGD lr 1e-3, no momentum, weight
decay 1e-4), written out here with explicit formulas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, randomize_bn, snapshot_model

from adaptkit import SHOTIM, Tent

TOL = dict(rtol=1e-5, atol=1e-6)
C = 5
BN_PARAMS = ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return 3.0 * self.fc(self.drop(h.mean((2, 3))))


def make_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet()
    for bn in (net.bn1, net.bn2):
        randomize_bn(bn, bias=0.3, mean=0.5, tracked=3)
    return net.eval()


def _x(b: int = 10, seed: int = 1, hw: int = 6) -> torch.Tensor:
    return torch.randn(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def im_loss(z: torch.Tensor, eps: float = 0.0, diversity: float = 1.0) -> torch.Tensor:
    """``mean_i H(p_i) - H(p_bar)`` written out; ``eps`` inside the logs as the official code (1e-5)."""
    if z.dim() > 2:  # every pixel a sample
        z = z.movedim(1, -1).reshape(-1, z.shape[1])
    p = torch.exp(z - z.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    cond = -(p * torch.log(p + eps)).sum(1).mean()
    p_bar = p.mean(0)
    marg = -(p_bar * torch.log(p_bar + eps)).sum()
    return cond - diversity * marg


class Ref:
    """The online SHOT-IM recipe on a deep copy: BN in training mode without running statistics, only BN affine
    parameters trainable, SGD (momentum buffer as torch: buf = g first, then momentum * buf + g; weight decay
    added to the gradient)."""

    def __init__(self, model: nn.Module, logits: Any = lambda o: o) -> None:
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.logits = logits
        self.buf: dict[str, torch.Tensor] = {}

    def step(
        self, x: torch.Tensor, lr: float = 1e-3, wd: float = 1e-4, momentum: float = 0.0, diversity: float = 1.0
    ) -> Any:
        out = self.model(x)
        loss = im_loss(self.logits(out), diversity=diversity)
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                d = g + wd * self.params[n]
                if momentum:
                    d = d.clone() if n not in self.buf else momentum * self.buf[n] + d
                    self.buf[n] = d
                self.params[n] -= lr * d
        return out

    def forward(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.model(x)


def _assert_params_match(model: nn.Module, ref: Ref) -> None:
    rp = dict(ref.model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), rp[n].detach(), **TOL, msg=n)


# ---------------------------------------------------------------------------------------------- loss
def test_loss_matches_the_explicit_formula_and_the_official_epsilon_version() -> None:
    w = SHOTIM(make_net())
    z = torch.randn(16, C) * 4
    torch.testing.assert_close(w.loss(z), im_loss(z), **TOL)
    # the official log(p + 1e-5): the same value up to ~C * 1e-5
    assert abs(w.loss(z).item() - im_loss(z, eps=1e-5).item()) < 1e-4
    dense = torch.randn(3, C, 4, 2) * 4
    torch.testing.assert_close(w.loss({"out": dense}), im_loss(dense), **TOL)
    confident_balanced = torch.eye(C).repeat(2, 1) * 50.0  # minimum -ln C
    assert w.loss(confident_balanced).item() == pytest.approx(-torch.log(torch.tensor(float(C))).item(), abs=1e-5)
    assert torch.isfinite(w.loss(torch.tensor([[1e4, -1e4, 0, 0, 0]]))).all()  # saturated: still finite
    w.diversity_weight = 0.0
    z.requires_grad_(True)
    torch.testing.assert_close(w.loss(z), im_loss(z, diversity=0.0), **TOL)
    w.restore()


# ---------------------------------------------------------------------------------------------- steps vs hand
def test_one_step_matches_hand_reference_and_predicts_after_the_update() -> None:
    net = make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ref = Ref(net)
    x = _x()
    w = SHOTIM(net)
    assert isinstance(w.optimizer, torch.optim.SGD)
    assert w.optimizer.defaults["momentum"] == 0.0 and w.optimizer.defaults["weight_decay"] == 1e-4
    out = w(x)
    pre = ref.step(x)
    torch.testing.assert_close(out, ref.forward(x), **TOL)  # default: the forward after the update
    assert (out - pre.detach()).abs().max() > 1e-7  # small at lr 1e-3, but a different forward
    _assert_params_match(net, ref)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(BN_PARAMS)
    w.restore()


def test_predict_before_and_three_steps_with_momentum() -> None:
    net = make_net(1)
    ref = Ref(net)
    w = SHOTIM(net, lr=0.05, momentum=0.9, weight_decay=0.0, predict="before")
    for i in range(3):
        x = _x(seed=10 + i)
        torch.testing.assert_close(w(x), ref.step(x, lr=0.05, wd=0.0, momentum=0.9).detach(), **TOL)
        _assert_params_match(net, ref)
    w.restore()


def test_diversity_weight_zero_is_tent_with_the_same_optimizer() -> None:
    a, b = make_net(), make_net()
    s = SHOTIM(a, diversity_weight=0.0, weight_decay=0.0, predict="before", lr=0.01)
    t = Tent(b, optimizer="sgd", momentum=0.0, lr=0.01)
    for i in range(2):
        x = _x(seed=20 + i)
        torch.testing.assert_close(s(x), t(x), **TOL)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    s.restore()
    t.restore()


def test_diversity_term_pushes_towards_balanced_predictions() -> None:
    """A batch whose predictions collapse on one class: SHOT-IM raises the batch-mean entropy H(p_bar), Tent lowers
    or keeps it."""
    net = make_net()
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([2.0, 0, 0, 0, 0]))
    x = _x(16, seed=30)

    def marginal_entropy(model: nn.Module) -> float:
        ref = Ref(model)
        p = ref.forward(x).softmax(1).mean(0)
        return float(-(p * p.log()).sum())

    start = marginal_entropy(net)
    with SHOTIM(net, lr=0.05) as w:
        for _ in range(3):
            w(x)
        shot = marginal_entropy(net)
    assert shot > start


def test_batch_of_one_only_weight_decay_moves() -> None:
    """One sample: H(p_bar) = H(p_1), the loss is 0 with zero gradient; only weight decay acts."""
    net = make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    w = SHOTIM(net, lr=0.1)
    out = w(_x(1, seed=40))
    assert torch.isfinite(out).all()
    for n, p in net.named_parameters():
        want = before[n] * (1 - 0.1 * 1e-4) if n in BN_PARAMS else before[n]
        torch.testing.assert_close(p.detach(), want, **TOL, msg=n)
    w.restore()


# ---------------------------------------------------------------------------------------------- models / outputs
class SegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.cls = nn.Conv2d(4, C, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.cls(torch.relu(self.bn(self.conv(x))))}


def test_dense_outputs_use_every_pixel_as_a_sample() -> None:
    net = SegNet().eval()
    ref = Ref(net, logits=lambda o: o["out"])
    x = _x(4, hw=5)
    out = SHOTIM(net, lr=0.1, predict="before")(x)
    assert isinstance(out, dict) and out["out"].shape == (4, C, 5, 5)
    torch.testing.assert_close(out["out"], ref.step(x, lr=0.1)["out"].detach(), **TOL)
    _assert_params_match(net, ref)


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = nn.Linear(6, 8)
        self.ln1 = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.ln1(self.fc1(x))))


def test_layernorm_model_adapts_ln_affine_only() -> None:
    net = LNNet().eval()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with SHOTIM(net, lr=0.1) as w:
        assert w.targeted_modules == ["ln1"]
        w(torch.randn(8, 6))
        changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {"ln1.weight", "ln1.bias"}
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_running_statistics_untouched_reset_and_episodic() -> None:
    net = make_net()
    bufs = {n: b.clone() for n, b in net.named_buffers()}
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    w = SHOTIM(net, momentum=0.9)
    first = w(_x(seed=50))
    w(_x(seed=51))
    assert all(torch.equal(b, bufs[n]) for n, b in net.named_buffers())
    assert len(w.optimizer.state) > 0  # type: ignore[union-attr]
    w.reset()
    assert len(w.optimizer.state) == 0  # type: ignore[union-attr]
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert torch.equal(w(_x(seed=50)), first)
    w.restore()
    e = SHOTIM(net, episodic=True)
    e(_x(seed=52))
    out = e(_x(seed=50))
    assert torch.equal(out, first)  # reset before each batch: as if it were the first
    e.restore()


def test_bad_hyperparameters_raise_with_the_model_untouched() -> None:
    net = make_net()
    snap = snapshot_model(net)
    for kw, match in [
        ({"lr": 0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"momentum": -0.1}, "momentum"),
        ({"diversity_weight": float("nan")}, "diversity_weight"),
        ({"predict": "during"}, "predict"),
        ({"optimizer": "rmsprop"}, "optimizer"),
    ]:
        with pytest.raises(ValueError, match=match):
            SHOTIM(net, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list_layers"):
        SHOTIM(net, include=["no_such_layer"])
    assert_model_unchanged(net, snap)
