"""Snapshot: clones what it is told to, restores in place (identity kept) together with flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adaptkit.core import Snapshot


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2, 2))


def test_restore_tensors_in_place_bitwise() -> None:
    net = _net()
    names = ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    originals = {
        n: t.detach().clone() for n, t in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()
    }
    ids = {n: t.data_ptr() for n, t in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()}
    weight_obj = net[1].weight
    snap = Snapshot(net, names, ["1"])
    assert set(snap.tensors) == set(names)
    with torch.no_grad():
        net[1].weight.mul_(3).add_(1)
        net[1].bias.fill_(7)
        net[1].running_mean.add_(1)
        net[1].running_var.mul_(2)
        net[1].num_batches_tracked.add_(5)
        net[0].weight.add_(1)  # not in the snapshot: stays changed
    snap.restore_tensors()
    assert net[1].weight is weight_obj
    for n in names:
        live = dict(net.named_parameters()).get(n, dict(net.named_buffers()).get(n))
        assert torch.equal(live, originals[n]), n
        assert live.data_ptr() == ids[n]
    assert torch.equal(net[0].weight, originals["0.weight"] + 1)


def test_snapshot_is_a_clone_not_alias() -> None:
    net = _net()
    snap = Snapshot(net, ["1.weight"])
    assert snap.tensors["1.weight"].data_ptr() != net[1].weight.data_ptr()
    assert not snap.tensors["1.weight"].requires_grad
    assert snap.nbytes() == 4 * 4


def test_restore_flags() -> None:
    net = _net()
    net.eval()
    net[0].weight.requires_grad_(False)
    net[1].momentum = 0.3
    snap = Snapshot(net, [], ["1"])
    rg = {n: p.requires_grad for n, p in net.named_parameters()}
    tr = {n: m.training for n, m in net.named_modules()}
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    net[1].momentum = None
    net[1].eps = 1e-1
    net[1].track_running_stats = False
    snap.restore_flags()
    assert {n: p.requires_grad for n, p in net.named_parameters()} == rg
    assert {n: m.training for n, m in net.named_modules()} == tr
    assert net[1].momentum == 0.3 and net[1].eps == 1e-5 and net[1].track_running_stats is True


def test_restore_does_both() -> None:
    net = _net()
    snap = Snapshot(net, ["1.bias"], ["1"])
    with torch.no_grad():
        net[1].bias.fill_(2)
    net.eval()
    snap.restore()
    assert torch.equal(net[1].bias, torch.zeros(4))
    assert net.training and net[3].training


def test_unknown_name_raises() -> None:
    with pytest.raises(KeyError, match="nope"):
        Snapshot(_net(), ["nope"])


def test_shape_change_detected() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    snap = Snapshot(net, ["0.weight"])
    net[0].weight = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="changed shape"):
        snap.restore_tensors()
