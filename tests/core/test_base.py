"""TTAMethod template: validation, all-or-nothing configure, input checks, reset/restore, modes."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.nn as nn

from adaptkit.core import HookManager, TTAMethod, get_logits
from adaptkit.core.layers import select_norm_layers


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class BiasNudge(TTAMethod):
    """Test method: adds ``delta`` to every selected BN bias per step; BN layers run in training mode."""

    name = "bias_nudge_test"
    uses_grad = False
    default_episodic = False

    def __init__(self, model: nn.Module, delta: float = 1.0, fail_in: str | None = None, **kw: Any) -> None:
        self.delta, self.fail_in = delta, fail_in
        self.step_calls = 0
        self.state_resets = 0
        super().__init__(model, **kw)

    def select(self) -> dict[str, nn.Module]:
        if self.fail_in == "select":
            raise ValueError("select failed on purpose")
        return select_norm_layers(self.inner, ["batch"], who="BiasNudge")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [m.bias for m in self._targets.values()]

    def train_modules(self) -> list[str]:
        return list(self._targets)

    def configure(self) -> None:
        for m in self._targets.values():
            self.hooks.forward(m, lambda mod, i, o: None)
            m.momentum = 0.5
        self.optimizer = torch.optim.SGD(self.trainable_parameters(), lr=0.1)
        if self.fail_in == "configure":
            raise RuntimeError("configure failed on purpose")

    def adapt_step(self, x: Any) -> Any:
        out = self.model(x)
        self.step_calls += 1
        with torch.no_grad():
            for m in self._targets.values():
                m.bias.add_(self.delta)
        return out

    def reset_state(self) -> None:
        self.state_resets += 1


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": {n: id(p) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "bn": [(m.momentum, m.eps, m.track_running_stats) for m in model.modules() if isinstance(m, nn.BatchNorm2d)],
        "attrs": sorted(vars(model)),
    }


def _assert_same(model: nn.Module, fp: dict[str, Any]) -> None:
    now = _fingerprint(model)
    assert now["state"].keys() == fp["state"].keys()
    for k, v in fp["state"].items():
        assert torch.equal(now["state"][k], v), k
    for key in ("params", "requires_grad", "training", "hooks", "bn", "attrs"):
        assert now[key] == fp[key], key


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("where", ["select", "configure"])
def test_failure_during_wrap_rolls_back(where: str) -> None:
    model = _net().train()
    model[0].weight.requires_grad_(False)
    fp = _fingerprint(model)
    with pytest.raises((ValueError, RuntimeError), match="on purpose"):
        BiasNudge(model, fail_in=where)
    _assert_same(model, fp)
    # the model can be wrapped afterwards (no stale "already wrapped" tag)
    m = BiasNudge(model)
    assert m.restore() is model
    _assert_same(model, fp)


def test_empty_selection_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    fp = _fingerprint(model)
    with pytest.raises(ValueError, match="list_layers"):
        BiasNudge(model)
    _assert_same(model, fp)


def test_modes_and_requires_grad_while_wrapped() -> None:
    model = _net().train()
    m = BiasNudge(model)
    assert m.targeted_modules == ["1"]
    assert {n: mod.training for n, mod in model.named_modules()} == {n: n == "1" for n, _ in model.named_modules()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: n == "1.bias" for n, _ in model.named_parameters()
    }
    model.eval()  # a user eval() after wrapping changes nothing at the next forward
    m(torch.randn(2, 3, 8, 8))
    assert model[1].training and not model[3].training
    model.train()
    m(torch.randn(2, 3, 8, 8))
    assert not model[3].training  # dropout stays off
    m.train(False)
    assert m.training is False and model[1].training  # the wrapper flag does not recurse
    m.restore()


def test_double_wrap_raises() -> None:
    model = _net()
    m = BiasNudge(model)
    with pytest.raises(RuntimeError, match="already wrapped"):
        BiasNudge(model)
    with pytest.raises(RuntimeError, match="already wrapped"):
        BiasNudge(nn.DataParallel(model))
    with pytest.raises(TypeError, match="already an adaptkit wrapper"):
        BiasNudge(m)
    m.restore()
    BiasNudge(model).restore()


def test_not_a_module_raises() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        BiasNudge(lambda x: x)  # type: ignore[arg-type]


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.empty(0, 3, 8, 8), "empty batch"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN or Inf"),
        (torch.tensor([[[[float("inf")]]]]).expand(2, 3, 8, 8).clone(), "NaN or Inf"),
        (torch.tensor(1.0), "0-d"),
    ],
    ids=["empty", "nan", "inf", "0d"],
)
def test_bad_inputs_raise_and_leave_model_intact(x: torch.Tensor, match: str) -> None:
    model = _net()
    m = BiasNudge(model)
    fp = _fingerprint(model)
    with pytest.raises(ValueError, match=match) as ei:
        m(x)
    assert "BiasNudge" in str(ei.value)
    _assert_same(model, fp)
    assert m.step_calls == 0
    m(torch.randn(2, 3, 8, 8))  # still usable
    assert m.step_calls == 1
    m.restore()


def test_single_nan_pixel_rejected() -> None:
    m = BiasNudge(_net())
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="nan_to_num"):
        m(x)
    m.restore()


def test_check_inputs_false_skips_validation() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    m = BiasNudge(model, check_inputs=False)
    out = m(torch.full((2, 3), float("nan")))
    assert torch.isnan(out).all()
    m.restore()


def test_3d_image_error_mentions_unsqueeze() -> None:
    model = _net()
    m = BiasNudge(model)
    fp_params = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)") as ei:
        m(torch.randn(3, 8, 8))
    assert "(3, 8, 8)" in str(ei.value)
    for n, p in model.named_parameters():
        assert torch.equal(p, fp_params[n]), n
    m.restore()


def test_non_tensor_inputs_are_passed_through() -> None:
    class DictIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.bn(batch["x"])

    m = BiasNudge(DictIn())
    assert m({"x": torch.randn(4, 2)}).shape == (4, 2)
    m.restore()


# ---------------------------------------------------------------- template, reset, restore


def test_forward_returns_detached_pre_step_output_and_steps() -> None:
    model = _net()
    m = BiasNudge(model, delta=0.25)
    m.steps = 3
    out = m(torch.randn(2, 3, 8, 8))
    assert m.step_calls == 3 and not out.requires_grad
    assert torch.allclose(model[1].bias, torch.full((4,), 0.75))
    m.restore()


def test_reset_is_bitwise_in_place_and_clears_state() -> None:
    model = _net()
    m = BiasNudge(model)
    bias = model[1].bias
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    first = m(x)
    m(x)
    assert not torch.equal(model[1].bias, orig["1.bias"])
    m.optimizer.state[bias] = {"momentum_buffer": torch.ones(4)}  # type: ignore[union-attr]
    resets = m.state_resets
    m.reset()
    assert model[1].bias is bias
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k]), k
    assert len(m.optimizer.state) == 0  # type: ignore[union-attr]
    assert m.state_resets == resets + 1
    assert torch.equal(m(x), first)
    m.restore()


def test_episodic_resets_before_each_batch() -> None:
    model = _net()
    m = BiasNudge(model, episodic=True)
    x = torch.randn(2, 3, 8, 8)
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    assert torch.allclose(model[1].bias, torch.ones(4))
    m.restore()


def test_restore_returns_same_object_idempotent_and_forward_raises() -> None:
    model = _net().train()
    fp = _fingerprint(model)
    m = BiasNudge(model)
    m(torch.randn(2, 3, 8, 8))
    assert m.restore() is model
    assert m.restore() is model
    _assert_same(model, fp)
    with pytest.raises(RuntimeError, match="restored"):
        m(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="restored"):
        m.reset()


def test_context_manager_restores_on_exception() -> None:
    model = _net()
    fp = _fingerprint(model)
    with pytest.raises(KeyError), BiasNudge(model) as m:
        assert isinstance(m, BiasNudge)
        m(torch.randn(2, 3, 8, 8))
        raise KeyError("user error")
    _assert_same(model, fp)


def test_restore_when_forward_raised() -> None:
    model = _net()
    fp = _fingerprint(model)
    with BiasNudge(model) as m, pytest.raises(ValueError, match="takes 3 channels, the batch has 5"):
        m(torch.randn(2, 5, 8, 8))  # wrong channels: refused before the model runs
    _assert_same(model, fp)


def test_adaptation_state_round_trip() -> None:
    model = _net()
    m = BiasNudge(model)
    x = torch.randn(2, 3, 8, 8)
    m(x)
    sd = m.adaptation_state_dict()
    assert sd["_adaptkit.method"] == "bias_nudge_test"
    assert "1.bias" in sd and "1.num_batches_tracked" in sd
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    after = m(x)
    m.reset()
    m.load_adaptation_state_dict(sd)
    assert torch.equal(m(x), after)
    with pytest.raises(ValueError, match="method"):
        m.load_adaptation_state_dict({**sd, "_adaptkit.method": "other"})
    with pytest.raises(KeyError, match="missing"):
        m.load_adaptation_state_dict({k: v for k, v in sd.items() if k != "1.bias"})
    m.restore()


def test_hook_manager_attribute() -> None:
    m = BiasNudge(_net())
    assert isinstance(m.hooks, HookManager) and len(m.hooks) == 1
    m.restore()
    assert len(m.hooks) == 0


# ---------------------------------------------------------------- get_logits


def test_get_logits_variants() -> None:
    t = torch.randn(2, 3)
    assert get_logits(t) is t
    assert get_logits({"out": t, "aux": t + 1}) is t
    assert get_logits({"logits": t}) is t
    assert get_logits((t, t + 1)) is t
    assert get_logits([t]) is t
    Out = namedtuple("Out", ["logits", "hidden"])
    assert get_logits(Out(t, None)) is t

    class HF:
        logits = t

    assert get_logits(HF()) is t
    with pytest.raises(TypeError, match="logits"):
        get_logits({"foo": t})


def test_adaptation_state_dict_is_a_snapshot_of_the_optimizer() -> None:
    """A saved state dict kept in memory must not follow later steps (torch's state_dict() holds live moments)."""
    import copy as _copy

    import torch
    import torch.nn as nn

    import adaptkit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with adaptkit.Tent(model) as tent:
        tent(torch.rand(8, 3, 8, 8))
        sd = tent.adaptation_state_dict()
        kept = _copy.deepcopy(sd)
        tent(torch.rand(8, 3, 8, 8))
        moments = sd["_adaptkit.optimizer"]["state"]
        assert moments, "Tent keeps Adam moments"
        for k, st in moments.items():
            for name, v in st.items():
                assert torch.equal(v, kept["_adaptkit.optimizer"]["state"][k][name]), name


@pytest.mark.parametrize("method", ["tent", "eata", "eta", "shot_im", "sar", "cotta", "memo", "rotta"])
@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused(method: str, lr: float) -> None:
    import torch.nn as nn

    import adaptkit

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lr"):
        adaptkit.adapt(model, method, lr=lr)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
