"""Hook-based truncation: stops after the tapped layers on any model, leaves no hooks, errors clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from adaptkit.core import HookManager
from adaptkit.core.truncate import ForwardStopper, modules_registered_before, probe_upstream


class Branchy(nn.Module):
    """Registers its layers out of forward order (head first) and uses a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 2)
        self.b = nn.Conv2d(4, 6, 1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + self.side(x)
        return self.head(self.b(h).mean((2, 3)))


def test_run_stops_and_matches_the_full_forward_features() -> None:
    m = torchvision.models.resnet18().eval()
    hooks = HookManager()
    stop = ForwardStopper({"layer2": m.layer2}, hooks)
    ran = []
    h = m.layer3.register_forward_pre_hook(lambda mod, i: ran.append(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = stop.run(m, x)["layer2"]
        full, captured = stop.capture(m, x)
        ref = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
    assert ran == [1]  # only the capture (full) forward reached layer3
    assert torch.equal(got, ref) and torch.equal(captured["layer2"], ref)
    assert full.shape == (2, 1000)
    h.remove()
    hooks.remove_all()
    assert not m.layer2._forward_hooks


def test_run_waits_for_every_tapped_layer_whatever_the_order() -> None:
    m = torchvision.models.resnet18().eval()
    stop = ForwardStopper({"layer3": m.layer3, "layer1": m.layer1}, HookManager())
    with torch.no_grad():
        got = stop.run(m, torch.randn(1, 3, 32, 32))
    assert set(got) == {"layer1", "layer3"}


def test_gradients_flow_through_the_truncated_graph() -> None:
    m = Branchy()
    stop = ForwardStopper({"a": m.a}, HookManager())
    stop.run(m, torch.randn(2, 3, 5, 5))["a"].sum().backward()
    assert m.a.weight.grad is not None and m.b.weight.grad is None and m.head.weight.grad is None


def test_unused_layer_raises_clearly() -> None:
    m = nn.Sequential(nn.Linear(3, 3))
    unused = nn.Linear(3, 3)
    m.add_module("unused", unused)
    m2 = nn.Module()
    m2.used, m2.unused = nn.Linear(3, 3), nn.Linear(3, 3)
    m2.forward = lambda x: m2.used(x)  # type: ignore[method-assign]
    stop = ForwardStopper({"unused": m2.unused}, HookManager())
    with pytest.raises(RuntimeError, match="never ran"):
        stop.run(m2, torch.zeros(1, 3))


def test_non_tensor_output_raises() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": x}

    net = nn.Sequential(Pair())
    stop = ForwardStopper({"0": net[0]}, HookManager())
    with pytest.raises(TypeError, match="not a tensor"):
        stop.run(net, torch.zeros(1, 2))


def test_probe_upstream_uses_execution_order() -> None:
    m = Branchy()
    names, out = probe_upstream(m, ["a"], torch.zeros(1, 3, 5, 5))
    assert names == ["a"] and out["a"].shape == (1, 4, 5, 5)
    names, _ = probe_upstream(m, ["b"], torch.zeros(1, 3, 5, 5))
    assert names == ["a", "side", "b"]  # 'head' is registered first but runs last
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())
    # the registration-order fallback is wrong for this model (it documents the assumption)
    assert modules_registered_before(m, "b") == ["head", "b"]


def test_registered_before_excludes_ancestors_and_later_siblings() -> None:
    m = torchvision.models.resnet18()
    names = modules_registered_before(m, "layer2.0.conv1")
    assert names[-1] == "layer2.0.conv1"
    assert "layer2" not in names and "layer2.0" not in names and "layer2.0.bn1" not in names
    assert "layer1.1.bn2" in names and "fc" not in names
