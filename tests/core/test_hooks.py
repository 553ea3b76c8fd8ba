"""HookManager owns and removes hooks; FeatureTap keys captures by device and drops them on read."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from adaptkit.core import FeatureTap, HookManager


def _hook_counts(net: nn.Module) -> list[tuple[int, int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in net.modules()]


def test_register_and_remove_all_idempotent() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    before = _hook_counts(net)
    hooks = HookManager()
    calls: list[str] = []
    hooks.forward(net[0], lambda m, i, o: calls.append("fwd"))
    hooks.forward_pre(net[2], lambda m, i: calls.append("pre"))
    hooks.forward(net[2], lambda m, i, o: calls.append("always"), always_call=True)
    assert len(hooks) == 3
    net(torch.zeros(1, 2))
    assert calls == ["fwd", "pre", "always"]
    hooks.remove_all()
    assert len(hooks) == 0
    assert _hook_counts(net) == before
    hooks.remove_all()  # idempotent
    net(torch.zeros(1, 2))
    assert calls == ["fwd", "pre", "always"]


def test_always_call_hook_runs_when_forward_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    mod, hooks, seen = Boom(), HookManager(), []
    hooks.forward(mod, lambda m, i, o: seen.append(o), always_call=True)
    with pytest.raises(RuntimeError, match="boom"):
        mod(torch.zeros(1))
    assert len(seen) == 1
    hooks.remove_all()
    assert len(mod._forward_hooks) == 0


def test_remove_all_leaves_foreign_hooks() -> None:
    lin = nn.Linear(2, 2)
    foreign = lin.register_forward_hook(lambda m, i, o: None)
    hooks = HookManager()
    hooks.forward(lin, lambda m, i, o: None)
    hooks.remove_all()
    assert len(lin._forward_hooks) == 1
    foreign.remove()


def test_feature_tap_pop_clears() -> None:
    net, hooks = nn.Sequential(nn.Linear(3, 2), nn.ReLU()), HookManager()
    tap = FeatureTap(net[0], hooks)
    x = torch.randn(4, 3)
    with torch.no_grad():
        ref = x @ net[0].weight.t() + net[0].bias
    net(x)
    out = tap.pop()
    assert out is not None
    torch.testing.assert_close(out, ref)
    assert tap.pop() is None
    net(x)
    assert tap.pop(torch.device("cpu")) is not None
    assert tap.pop("cpu") is None
    net(x)
    tap.clear()
    assert tap.pop() is None
    hooks.remove_all()
    net(x)
    assert tap.pop() is None


def test_feature_tap_keeps_graph_for_backward() -> None:
    lin, hooks = nn.Linear(3, 2), HookManager()
    tap = FeatureTap(lin, hooks)
    lin(torch.randn(4, 3)).sum()
    feat = tap.pop()
    assert feat is not None and feat.requires_grad
    feat.pow(2).sum().backward()
    assert lin.weight.grad is not None
    hooks.remove_all()


def test_feature_tap_tuple_output_first_item() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x + 1, x - 1

    mod, hooks = Pair(), HookManager()
    tap = FeatureTap(mod, hooks)
    mod(torch.zeros(2))
    assert torch.equal(tap.pop(), torch.ones(2))
    hooks.remove_all()


def test_feature_tap_last_capture_wins_and_thread_safe() -> None:
    lin, hooks = nn.Linear(2, 2), HookManager()
    tap = FeatureTap(lin, hooks)
    xs = [torch.full((1, 2), float(i)) for i in range(8)]
    threads = [threading.Thread(target=lin, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = tap.pop()
    assert out is not None and out.shape == (1, 2)  # one capture per device, the rest overwritten
    assert tap.pop() is None
    hooks.remove_all()
