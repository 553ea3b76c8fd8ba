"""Robust BatchNorm (RoTTA) through hooks: the update and eval forwards against the formula (float64), gradients
against a transcription of the official ``RobustBN2d`` (BIT-DA/RoTTA ``core/utils/bn_layers.py``, commit
67e34c9), the layers' buffers and parameters never written or replaced, reset, state, and clean-up on errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptkit.core import HookManager
from adaptkit.core.robust_bn import RobustBN, robust_bn_update


def _bn(c: int = 3, dim: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = (nn.BatchNorm2d(c) if dim == 2 else nn.BatchNorm1d(c)).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    return bn.eval()


def _normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


class OfficialRobustBN(nn.Module):
    """BIT-DA/RoTTA ``RobustBN2d`` / ``RobustBN1d``, transcribed."""

    def __init__(self, bn: nn.Module, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("source_mean", copy.deepcopy(bn.running_mean))
        self.register_buffer("source_var", copy.deepcopy(bn.running_var))
        self.weight = copy.deepcopy(bn.weight)
        self.bias = copy.deepcopy(bn.bias)
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            b_var, b_mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            mean = (1 - self.momentum) * self.source_mean + self.momentum * b_mean
            var = (1 - self.momentum) * self.source_var + self.momentum * b_var
            self.source_mean, self.source_var = copy.deepcopy(mean.detach()), copy.deepcopy(var.detach())
            mean, var = mean.view(shape), var.view(shape)
        else:
            mean, var = self.source_mean.view(shape), self.source_var.view(shape)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


def test_update_rule_hand_values() -> None:
    m, v = robust_bn_update(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([6.0]), 0.05)
    torch.testing.assert_close(m, torch.tensor([0.95 * 1 + 0.05 * 3]))
    torch.testing.assert_close(v, torch.tensor([0.95 * 2 + 0.05 * 6]))


@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (6, 3), (6, 3, 7)])
def test_update_forward_matches_the_formula(shape: tuple[int, ...]) -> None:
    bn = _bn(3, dim=2 if len(shape) == 4 else 1)
    src_mean, src_var = bn.running_mean.clone(), bn.running_var.clone()
    buffers = {k: (b, b.clone()) for k, b in bn.named_buffers()}
    hooks = HookManager()
    rbn = RobustBN({"bn": bn}, hooks, alpha=0.05)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    mean, var = src_mean.clone(), src_var.clone()
    for x in xs:
        dims = [0, *range(2, x.dim())]
        b_mean = x.mean(dims)
        b_var = ((x - b_mean.view((1, -1) + (1,) * (x.dim() - 2))) ** 2).mean(dims)  # biased
        mean, var = 0.95 * mean + 0.05 * b_mean, 0.95 * var + 0.05 * b_var
        with rbn.update():
            out = bn(x)
        torch.testing.assert_close(out, _normalise(x, mean, var, bn), rtol=1e-12, atol=1e-12)  # the updated stats
        torch.testing.assert_close(rbn.mean["bn"], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rbn.var["bn"], var, rtol=1e-12, atol=1e-12)
    # eval forwards: the global statistics, unchanged by the forward
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    held = rbn.state()
    torch.testing.assert_close(bn(x), _normalise(x, mean, var, bn), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(rbn.state()[k], v) for k, v in held.items())
    assert not rbn.updating
    # the layer's own buffers: the same objects, bitwise unchanged (num_batches_tracked included); flags kept
    for k, (obj, val) in buffers.items():
        assert bn._buffers[k] is obj and torch.equal(obj, val), k
    assert not bn.training and isinstance(bn.weight, nn.Parameter)
    hooks.remove_all()
    torch.testing.assert_close(bn(x), _normalise(x, src_mean, src_var, bn), rtol=1e-12, atol=1e-12)


def test_gradients_flow_through_the_batch_statistics_as_official() -> None:
    torch.manual_seed(0)
    f32 = torch.float32
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), _bn(4, seed=1, dtype=f32), nn.ReLU(), nn.Conv2d(4, 4, 3), _bn(4, seed=2, dtype=f32),
        nn.Flatten(), nn.Linear(64, 3), _bn(3, dim=1, seed=3, dtype=f32),
    ).double()  # fmt: skip
    ref = copy.deepcopy(net)
    detached = copy.deepcopy(net)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)

    def adapted(model: nn.Module) -> list[nn.Parameter]:
        model.requires_grad_(False)
        ps = [p for i in (1, 4, 7) for p in (model[i].weight, model[i].bias)]
        for p in ps:
            p.requires_grad_(True)
        return ps

    hooks = HookManager()
    rbn = RobustBN({"1": net[1], "4": net[4], "7": net[7]}, hooks, alpha=0.05)
    params = adapted(net)
    with rbn.update():
        out = net(x)
    grads = torch.autograd.grad(out.square().sum(), params)

    for i in (1, 4, 7):
        ref[i] = OfficialRobustBN(ref[i], 0.05)
    ref_params = adapted(ref)
    ref.train()
    ref_out = ref(x)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), ref_params)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for i, name in ((1, "1"), (4, "4"), (7, "7")):
        torch.testing.assert_close(rbn.mean[name], ref[i].source_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rbn.var[name], ref[i].source_var, rtol=1e-12, atol=1e-12)

    # the check can fail: statistics used as constants give other gradients for the earlier layers
    det_params = adapted(detached)
    d_hooks = HookManager()
    d_rbn = RobustBN({"1": detached[1], "4": detached[4], "7": detached[7]}, d_hooks, alpha=0.05)
    d_rbn.load_state(rbn.state())
    const_out = detached(x)  # eval forward: the same (updated) statistics, as constants
    torch.testing.assert_close(const_out, out, rtol=1e-12, atol=1e-12)
    const_grads = torch.autograd.grad(const_out.square().sum(), det_params)
    assert not torch.allclose(const_grads[0], grads[0], rtol=1e-6, atol=1e-9)
    hooks.remove_all()
    d_hooks.remove_all()


def test_bn_act_layers_keep_their_activation() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    layer = BatchNormAct2d(4, act_layer=nn.ReLU).eval()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.bias.uniform_(-1, 1)
    assert timm is not None
    hooks = HookManager()
    rbn = RobustBN({"l": layer}, hooks, alpha=0.3)
    x = torch.randn(4, 4, 3, 3)
    with rbn.update():
        out = layer(x)
    want = F.relu(_normalise(x, rbn.mean["l"], rbn.var["l"], layer))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out >= 0).all()
    hooks.remove_all()


def test_reset_state_and_load() -> None:
    bn = _bn()
    hooks = HookManager()
    rbn = RobustBN({"bn": bn}, hooks, alpha=0.5)
    src = rbn.state()
    ids = (id(rbn.mean["bn"]), id(rbn.var["bn"]))
    with rbn.update():
        bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    moved = rbn.state()
    assert not torch.equal(moved["bn.mean"], src["bn.mean"])
    rbn.reset()
    assert all(torch.equal(rbn.state()[k], v) for k, v in src.items())
    assert (id(rbn.mean["bn"]), id(rbn.var["bn"])) == ids  # in place
    rbn.load_state(moved)
    assert all(torch.equal(rbn.state()[k], v) for k, v in moved.items())
    with pytest.raises(ValueError, match="another model"):
        rbn.load_state({"bn.mean": moved["bn.mean"][:2], "bn.var": moved["bn.var"]})
    with pytest.raises(ValueError, match="another model"):
        rbn.load_state({})
    assert all(torch.equal(rbn.state()[k], v) for k, v in moved.items())  # a refused load wrote nothing
    hooks.remove_all()


def test_error_inside_the_layer_leaves_nothing_swapped() -> None:
    bn = _bn()
    params = {k: p for k, p in bn.named_parameters()}
    buffers = {k: b for k, b in bn.named_buffers()}
    hooks = HookManager()
    rbn = RobustBN({"bn": bn}, hooks, alpha=0.1)

    def boom(m: nn.Module, i: object) -> None:
        raise KeyError("boom")

    h = bn.register_forward_pre_hook(boom)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    for ctx in (rbn.update(), torch.no_grad()):
        with pytest.raises(KeyError), ctx:
            bn(x)
        assert all(bn._parameters[k] is p for k, p in params.items())
        assert all(bn._buffers[k] is b for k, b in buffers.items())
        assert not bn.training
    h.remove()

    def interrupt(m: nn.Module, i: object) -> None:
        raise KeyboardInterrupt

    h = bn.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), rbn.update():
        bn(x)
    h.remove()
    hooks.remove_all()  # puts back what the interrupted forward left swapped
    assert all(bn._parameters[k] is p for k, p in params.items())
    assert all(bn._buffers[k] is b for k, b in buffers.items())


def test_non_finite_channel_keeps_its_statistics_and_argument_checks() -> None:
    bn = _bn(dtype=torch.float32)
    hooks = HookManager()
    rbn = RobustBN({"bn": bn}, hooks, alpha=0.5)
    x = torch.randn(2, 3, 2, 2)
    x[:, 1] *= 1e38  # the variance overflows in channel 1
    before = rbn.state()
    with rbn.update():
        bn(x)
    assert torch.equal(rbn.var["bn"][1], before["bn.var"][1])
    assert torch.isfinite(rbn.mean["bn"]).all() and torch.isfinite(rbn.var["bn"]).all()
    assert not torch.equal(rbn.var["bn"][0], before["bn.var"][0])
    hooks.remove_all()
    with pytest.raises(ValueError, match="alpha"):
        RobustBN({"bn": bn}, HookManager(), alpha=1.5)
    with pytest.raises(ValueError, match="running statistics"):
        RobustBN({"ln": nn.LayerNorm(3)}, HookManager())
    with pytest.raises(ValueError, match="running statistics"):
        RobustBN({"bn": nn.BatchNorm2d(3, track_running_stats=False)}, HookManager())
