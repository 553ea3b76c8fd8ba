"""Tent against a reference implementation written here (the official recipe on a deep copy)."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from helpers import randomize_bn

from adaptkit import Tent

TOL = dict(rtol=1e-5, atol=1e-5)


class ConvNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Dropout-Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(self.drop(h.mean((2, 3))))


def make_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet()
    for bn in (net.bn1, net.bn2):
        randomize_bn(bn, bias=0.3, mean=0.5, tracked=3)
    return net.eval()


def _x(b: int = 8, seed: int = 1, hw: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, hw, hw, generator=g)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Reference loss: -(softmax * log_softmax).sum(1).mean() (over pixels too for dense logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


class RefTent:
    """The official Tent recipe on a deep copy: BN in train mode without running statistics (deleted, as in
    the reference code), only norm affine parameters trainable, one optimiser step per forward."""

    def __init__(
        self,
        model: nn.Module,
        norm_types: tuple[type, ...] = (nn.BatchNorm2d,),
        opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        logits: Callable[[Any], torch.Tensor] = lambda o: o,
    ) -> None:
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)
        params = []
        for m in self.model.modules():
            if isinstance(m, norm_types):
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    m.track_running_stats = False
                    m.running_mean = None
                    m.running_var = None
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                params += [m.weight, m.bias]
        self.params = params
        self.opt = opt(params) if opt else torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
        self.logits = logits

    def step(self, x: torch.Tensor) -> Any:
        out = self.model(x)
        loss = entropy(self.logits(out))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return out

    def forward_only(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.model(x)


def _assert_params_match(model: nn.Module, ref: RefTent, names: list[str] | None = None) -> None:
    rp = dict(ref.model.named_parameters())
    for n, p in model.named_parameters():
        if names is None or n in names:
            torch.testing.assert_close(p.detach(), rp[n].detach(), **TOL, msg=n)


def _bn_params(model: nn.Module) -> list[str]:
    return [f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for k in ("weight", "bias")]


# ---------------------------------------------------------------- against the reference


def test_one_step_matches_reference() -> None:
    net = make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ref = RefTent(net)
    x = _x()
    out = Tent(net, lr=1e-3)(x)
    ref_out = ref.step(x)
    torch.testing.assert_close(out, ref_out.detach(), **TOL)  # logits of the forward before the update
    _assert_params_match(net, ref)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(_bn_params(net))  # only BN affine parameters are updated


def test_three_online_steps_match_reference() -> None:
    net = make_net()
    ref = RefTent(net)
    m = Tent(net)
    for i in range(3):
        x = _x(seed=10 + i)
        torch.testing.assert_close(m(x), ref.step(x).detach(), **TOL)
        _assert_params_match(net, ref)
    m.restore()


def test_predict_after_returns_post_update_logits() -> None:
    net = make_net()
    ref = RefTent(net)
    x = _x()
    out = Tent(net, predict="after")(x)
    pre = ref.step(x)
    post = ref.forward_only(x)
    torch.testing.assert_close(out, post, **TOL)
    assert not torch.allclose(out, pre.detach(), atol=1e-7)


def test_two_steps_per_batch() -> None:
    net = make_net()
    ref = RefTent(net)
    x = _x()
    out = Tent(net, steps=2)(x)
    ref.step(x)
    second = ref.step(x)  # the returned logits: last step's forward, before its update
    torch.testing.assert_close(out, second.detach(), **TOL)
    _assert_params_match(net, ref)


def test_sgd_optimizer() -> None:
    net = make_net()
    ref = RefTent(net, opt=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    m = Tent(net, lr=0.05, optimizer="sgd", momentum=0.9)
    assert isinstance(m.optimizer, torch.optim.SGD)
    for i in range(2):
        x = _x(seed=20 + i)
        torch.testing.assert_close(m(x), ref.step(x).detach(), **TOL)
    _assert_params_match(net, ref)
    m.restore()


def test_callable_optimizer_factory() -> None:
    net = make_net()

    def factory(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(ps, lr=0.1)

    ref = RefTent(net, opt=factory)
    m = Tent(net, optimizer=factory)
    x = _x()
    torch.testing.assert_close(m(x), ref.step(x).detach(), **TOL)
    _assert_params_match(net, ref)
    assert {id(p) for g in m.optimizer.param_groups for p in g["params"]} == {  # type: ignore[union-attr]
        id(p) for p in m.trainable_parameters()
    }
    m.restore()
    with pytest.raises(TypeError, match="Optimizer"):
        Tent(net, optimizer=lambda ps: "not an optimizer")  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="optimizer"):
        Tent(net, optimizer="rmsprop")


# ---------------------------------------------------------------- buffers, episodic, restore


def test_running_stats_and_counter_unchanged() -> None:
    net = make_net()
    bufs = {n: b.clone() for n, b in net.named_buffers()}
    with Tent(net) as m:
        for i in range(3):
            m(_x(seed=30 + i))
        for n, b in net.named_buffers():
            assert torch.equal(b, bufs[n]), n
        assert net.bn1.running_mean is not None
    for n, b in net.named_buffers():
        assert torch.equal(b, bufs[n]), n
    assert net.bn1.track_running_stats is True and net.bn2.track_running_stats is True


def test_episodic_resets_before_each_batch() -> None:
    net = make_net()
    x, y = _x(seed=40), _x(seed=41)
    m = Tent(net, episodic=True)
    m(y)
    out = m(x)
    ref = RefTent(make_net())  # a fresh reference: one step on x only
    torch.testing.assert_close(out, ref.step(x).detach(), **TOL)
    _assert_params_match(net, ref)
    assert torch.equal(m(x), out)
    m.restore()


def test_dropout_stays_off_and_user_modes_ignored() -> None:
    net = make_net().train()
    ref = RefTent(make_net())
    m = Tent(net)
    assert not net.drop.training and net.bn1.training
    net.eval()
    x = _x()
    torch.testing.assert_close(m(x), ref.step(x).detach(), **TOL)
    m.restore()
    assert all(mod.training for mod in net.modules())


def test_requires_grad_map_restored_exactly() -> None:
    net = make_net()
    net.conv1.weight.requires_grad_(False)
    net.bn2.bias.requires_grad_(False)
    net.fc.bias.requires_grad_(False)
    rg = {n: p.requires_grad for n, p in net.named_parameters()}
    objs = {n: p for n, p in net.named_parameters()}
    m = Tent(net)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == {n: n in _bn_params(net) for n in rg}
    m(_x())
    assert m.restore() is net
    assert {n: p.requires_grad for n, p in net.named_parameters()} == rg
    assert all(p is objs[n] for n, p in net.named_parameters())
    assert all(p.grad is None for p in net.parameters())


def test_reset_restores_parameters_and_optimizer() -> None:
    net = make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    m = Tent(net)
    x = _x()
    first = m(x)
    m(x)
    m.reset()
    assert len(m.optimizer.state) == 0  # type: ignore[union-attr]
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(m(x), first)
    m.restore()


# ---------------------------------------------------------------- grad contexts


def test_inside_no_grad_parameters_change() -> None:
    net = make_net()
    before = net.bn1.weight.detach().clone()
    ref = RefTent(net)
    x = _x()
    with Tent(net) as m:
        with torch.no_grad():
            out = m(x)
        assert not torch.equal(net.bn1.weight, before)
        torch.testing.assert_close(out, ref.step(x).detach(), **TOL)
        _assert_params_match(net, ref)


def test_inside_inference_mode_parameters_change() -> None:
    net = make_net()
    ref = RefTent(net)
    x = _x()
    m = Tent(net)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
        out = m(xi)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.step(x).detach(), **TOL)
    _assert_params_match(net, ref)
    assert not net.bn1.weight.is_inference()
    m(x)  # and keeps working outside
    m.restore()


# ---------------------------------------------------------------- other norms / outputs


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = nn.Linear(6, 8)
        self.ln1 = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.ln2 = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.ln1(self.fc1(x)))
        return self.head(self.ln2(self.fc2(h)))


def test_layernorm_model_updates_ln_affine_only() -> None:
    net = LNNet().eval()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ref = RefTent(net, norm_types=(nn.LayerNorm,))
    x = torch.randn(8, 6)
    m = Tent(net)
    assert m.targeted_modules == ["ln1", "ln2"]
    for _ in range(2):
        torch.testing.assert_close(m(x), ref.step(x).detach(), **TOL)
    _assert_params_match(net, ref)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"}
    m.restore()


def test_timm_vit_updates_layernorm_only() -> None:
    timm = pytest.importorskip("timm")
    net = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).eval()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ln_params = {
        f"{n}.{k}"
        for n, mod in net.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for k, p in mod.named_parameters(recurse=False)
    }
    with Tent(net, lr=1e-2) as m:
        m(torch.randn(4, 3, 32, 32))
        changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= ln_params
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n


class SegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.cls = nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.cls(torch.relu(self.bn(self.conv(x))))}


def test_dict_output_uses_per_pixel_entropy() -> None:
    net = SegNet().eval()
    ref = RefTent(net, logits=lambda o: o["out"])
    x = _x(4, hw=6)
    out = Tent(net)(x)
    assert isinstance(out, dict) and out["out"].shape == (4, 5, 6, 6)
    torch.testing.assert_close(out["out"], ref.step(x)["out"].detach(), **TOL)
    _assert_params_match(net, ref)


def test_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="lr"):
        Tent(make_net(), lr=0)
    with pytest.raises(ValueError, match="steps"):
        Tent(make_net(), steps=0)
    with pytest.raises(ValueError, match="predict"):
        Tent(make_net(), predict="during")
    with pytest.raises(ValueError, match="affine"):
        Tent(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False)))
