"""BNStatsOverride: per-forward statistic replacement that never writes the running buffers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import randomize_bn

from adaptkit.core import HookManager
from adaptkit.core.bn import BNStatsOverride
from adaptkit.functional import Moments


def _bn(c: int = 3, cls: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    bn = cls(c)
    return randomize_bn(bn).eval()


def _state(bn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bn.state_dict().items()}


def _ref(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in float64 with channel dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xd = x.double()
    out = (xd - mean.double().view(shape)) / (var.double().view(shape) + bn.eps).sqrt()
    return out * bn.weight.double().view(shape) + bn.bias.double().view(shape)


def test_policy_stats_used_and_buffers_untouched() -> None:
    bn, hooks = _bn(), HookManager()
    before = _state(bn)
    bufs = {k: id(v) for k, v in bn._buffers.items()}
    mean, var = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 1.5, 2.5])
    seen: list[tuple[str, nn.Module, Moments]] = []

    def policy(name: str, module: nn.Module, mom: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((name, module, mom))
        return mean, var

    BNStatsOverride({"the_bn": bn}, policy, hooks)
    x = torch.randn(4, 3, 5, 5)
    y = bn(x)
    torch.testing.assert_close(y.double(), _ref(x, mean, var, bn), rtol=1e-5, atol=1e-5)
    (name, module, mom) = seen[0]
    assert name == "the_bn" and module is bn
    xd = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mom.mean.double(), xd.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mom.var.double(), xd.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    assert mom.count == 100 and mom.samples == 4
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: id(v) for k, v in bn._buffers.items()} == bufs
    assert bn.training is False
    hooks.remove_all()
    assert not bn._forward_hooks and not bn._forward_pre_hooks


def test_policy_none_is_source_model() -> None:
    bn, hooks = _bn(), HookManager()
    x = torch.randn(4, 3, 2, 2)
    ref = bn(x)
    BNStatsOverride({"bn": bn}, lambda n, m, mom: None, hooks)
    assert torch.equal(bn(x), ref)
    hooks.remove_all()


def test_works_with_module_in_train_mode() -> None:
    bn, hooks = _bn(), HookManager()
    bn.train()
    before = _state(bn)
    mean, var = torch.zeros(3), torch.full((3,), 4.0)
    BNStatsOverride({"bn": bn}, lambda n, m, mom: (mean, var), hooks)
    x = torch.randn(6, 3, 3, 3)
    y = bn(x)
    torch.testing.assert_close(y.double(), _ref(x, mean, var, bn), rtol=1e-5, atol=1e-5)
    assert bn.training is True  # flag restored after the call
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(bn.num_batches_tracked) == 11
    hooks.remove_all()


def test_buffers_restored_when_forward_raises() -> None:
    class BoomBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom inside the layer")

    bn, hooks = _bn(cls=BoomBN), HookManager()
    bn.train()
    before = _state(bn)
    bufs = {k: v for k, v in bn._buffers.items()}
    BNStatsOverride({"bn": bn}, lambda n, m, mom: (mom.mean * 0 + 9, mom.var * 0 + 9), hooks)
    with pytest.raises(RuntimeError, match="boom"):
        bn(torch.randn(2, 3, 2, 2))
    for k, v in bn._buffers.items():
        assert v is bufs[k], k
        assert torch.equal(v, before[k]), k
    assert bn.training is True
    hooks.remove_all()


def test_buffers_restored_when_kernel_raises_on_shape_mismatch() -> None:
    bn, hooks = _bn(), HookManager()
    bufs = dict(bn._buffers)
    BNStatsOverride({"bn": bn}, lambda n, m, mom: (mom.mean, mom.var), hooks)
    with pytest.raises(RuntimeError):
        bn(torch.randn(2, 5, 2, 2))  # 5 channels into a 3-channel layer
    assert all(bn._buffers[k] is v for k, v in bufs.items())
    assert bn.running_mean.shape == (3,)
    hooks.remove_all()


def test_bn1d_on_2d_inputs_and_multiple_layers() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 3), _bn(3, nn.BatchNorm1d), nn.ReLU(), nn.Linear(3, 2), _bn(2, nn.BatchNorm1d))
    net.eval()
    hooks = HookManager()
    names: list[str] = []

    def policy(name: str, module: nn.Module, mom: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        names.append(name)
        assert mom.count == 8 and mom.samples == 8
        return mom.mean, mom.var

    BNStatsOverride({"1": net[1], "4": net[4]}, policy, hooks)
    x = torch.randn(8, 4, dtype=torch.float64)
    net.double()
    y = net(x)
    assert names == ["1", "4"]
    # independent: run layers by hand with the batch's unbiased statistics
    h = net[0](x)
    h = _ref(h, h.mean(0), h.var(0, unbiased=True), net[1]).relu()
    h = net[3](h)
    ref = _ref(h, h.mean(0), h.var(0, unbiased=True), net[4])
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    hooks.remove_all()


def test_no_class_level_patching() -> None:
    fwd = nn.BatchNorm2d.forward
    bn, hooks = _bn(), HookManager()
    BNStatsOverride({"bn": bn}, lambda n, m, mom: (mom.mean, mom.var), hooks)
    assert nn.BatchNorm2d.forward is fwd
    other = _bn()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(other(x).double(), _ref(x, other.running_mean, other.running_var, other))
    hooks.remove_all()
