"""core/teacher.py: hook-free model copies, EMA, stochastic restore, seeded generators (against formulas)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn

import adaptkit
from adaptkit.core.teacher import SeededGenerators, ema_update_, model_copy, stochastic_restore_


class _Owner:
    """A hook owner that counts how often it is deep-copied."""

    copies = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> _Owner:
        type(self).copies += 1
        return _Owner()

    def hook(self, m: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return out * 0


def test_model_copy_drops_every_hook_without_copying_their_owners() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    owner = _Owner()
    _Owner.copies = 0
    net[0].register_forward_hook(owner.hook)
    net[1].register_forward_pre_hook(lambda m, i: None, with_kwargs=False)
    net.register_forward_hook(lambda m, i, o: o + 1, always_call=True)
    net[2].weight.grad = torch.ones_like(net[2].weight)
    net._adaptkit_tag = "tent"  # type: ignore[attr-defined]
    twin = model_copy(net, tag="_adaptkit_tag")
    assert _Owner.copies == 0  # the bound-method hook's owner was never visited
    for m in twin.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_always_called
    assert not hasattr(twin, "_adaptkit_tag") and net._adaptkit_tag == "tent"  # type: ignore[attr-defined]
    assert all(p.grad is None and not p.requires_grad for p in twin.parameters())
    assert net[2].weight.grad is not None and net[0].weight.requires_grad  # the original is untouched
    assert len(net[0]._forward_hooks) == 1 and len(net._forward_hooks) == 1
    x = torch.randn(5, 3)
    plain = copy.deepcopy(net)
    plain._forward_hooks.clear()
    plain[0]._forward_hooks.clear()
    torch.testing.assert_close(twin(x), plain(x), rtol=0, atol=0)
    for a, b in zip(twin.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert twin[1].training is False  # flags as they were


def test_ema_update_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, generator=g), torch.randn(5, generator=g)
    expected = 0.99 * t + 0.01 * s
    ema_update_([t], [s], 0.99)
    torch.testing.assert_close(t, expected)
    with pytest.raises(ValueError, match="2 source"):
        ema_update_([t], [s, s], 0.9)


def test_stochastic_restore_rate_and_replay() -> None:
    n = 20000
    p, src = torch.ones(n), torch.zeros(n)
    gens = SeededGenerators(7)
    stochastic_restore_([p], [src], 0.1, gens)
    frac = float((p == 0).float().mean())
    assert abs(frac - 0.1) < 0.01  # about p of the elements restored (binomial sd 0.002)
    q = torch.ones(n)
    gens.clear()  # re-seeded: the same mask
    stochastic_restore_([q], [src], 0.1, gens)
    assert torch.equal(p, q)
    r = torch.ones(n)
    stochastic_restore_([r], [src], 0.0, gens)
    assert torch.equal(r, torch.ones(n))


def test_seeded_generators_state_round_trip() -> None:
    gens = SeededGenerators(3)
    cpu = torch.device("cpu")
    torch.rand(4, generator=gens.get(cpu))
    state = gens.state()
    a = torch.rand(4, generator=gens.get(cpu))
    other = SeededGenerators(99)
    other.load_state(state)
    assert torch.equal(torch.rand(4, generator=other.get(cpu)), a)
    assert list(state) == ["rng.cpu"]


def test_seeded_generators_load_skips_unusable_devices_and_is_all_or_nothing() -> None:
    """A state saved on a device this machine lacks (a GPU checkpoint on a CPU machine) loads with a warning
    (that device re-seeds); a state that does not fit leaves the current generators untouched."""
    cpu = torch.device("cpu")
    gens = SeededGenerators(3)
    torch.rand(4, generator=gens.get(cpu))
    state = gens.state()
    state["rng.cuda:99"] = torch.zeros(16, dtype=torch.uint8)  # no such device here
    other = SeededGenerators(99)
    with pytest.warns(adaptkit.AdaptationWarning, match="cuda:99"):
        other.load_state(state)
    assert torch.equal(torch.rand(4, generator=other.get(cpu)), torch.rand(4, generator=gens.get(cpu)))
    keep = other.state()
    with pytest.raises(RuntimeError):
        other.load_state({"rng.cpu": torch.zeros(3, dtype=torch.uint8)})  # a corrupt state
    assert all(torch.equal(v, keep[k]) for k, v in other.state().items()) and set(other.state()) == set(keep)
