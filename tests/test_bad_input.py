"""Bad input for every registered method: a clear ``ValueError`` / ``TypeError`` that says what to do, raised before
the model runs on the batch, and the model (weights, statistics, flags) bitwise as it was.

Covers wrong rank, wrong channel count, integer images, empty batches, NaN / Inf, a batch on another device than
the model, unknown layers and heads trained for another layer or model, on the first batch and after adapting; a
hypothesis property test drives random shapes, dtypes and values through every method.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, snapshot_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_contract import BATCH, SIZE, TinyCNN, batch, get_model, wrap

import adaptkit

METHODS = adaptkit.list_methods()
AUX = {"ncttt": adaptkit.NCTTT, "clust3": adaptkit.ClusT3, "ttt": adaptkit.TTT, "ttt_pp": adaptkit.TTTPlusPlus}


def _bad_batches() -> dict[str, tuple[torch.Tensor, type[Exception], str]]:
    x = batch(0)
    nan, inf = x.clone(), x.clone()
    nan[1, 2, 3, 4] = float("nan")
    inf[0, 0, 0, 0] = float("inf")
    return {
        "single_image": (x[0], ValueError, r"unsqueeze\(0\)"),
        "rank5": (x[:, None], ValueError, "rank 4"),
        "rank2": (x.flatten(1), ValueError, "rank 4"),
        "grey": (x[:, :1], ValueError, "takes 3 channels, the batch has 1"),
        "channels_last": (x.permute(0, 2, 3, 1).contiguous()[:, :5], ValueError, r"permute\(0, 3, 1, 2\)"),
        "uint8": ((x.clamp(0, 1) * 255).to(torch.uint8), TypeError, "float"),
        "int64": (x.long(), TypeError, "float"),
        "bool": (x > 0, TypeError, "float"),
        "empty": (x[:0], ValueError, "empty batch"),
        "nan": (nan, ValueError, "NaN or Inf"),
        "inf": (inf, ValueError, "NaN or Inf"),
        "other_device": (torch.empty(BATCH, 3, SIZE, SIZE, device="meta"), ValueError, "move it first"),
        "zero_dim": (torch.tensor(1.0), ValueError, "0-d"),
    }


BAD = _bad_batches()


@pytest.mark.parametrize("first", [True, False], ids=["first_batch", "after_adapting"])
@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("method", METHODS)
def test_bad_batch_refused_before_the_model_runs(method: str, kind: str, first: bool) -> None:
    model = get_model("tiny_cnn")
    pristine = snapshot_model(model)
    w = wrap(method, model, episodic=False)
    if not first:
        w(batch(1))
    snap = snapshot_model(model)  # wrapped (hooks, flags) and possibly adapted: nothing of it may change
    x, exc, match = BAD[kind]
    with pytest.raises(exc, match=match):
        w(x)
    assert_model_unchanged(model, snap)
    w(batch(2))  # still usable
    w.restore()
    assert_model_unchanged(model, pristine)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_layer_is_refused_with_the_model_untouched(method: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match="list_layers"):
        if method in AUX:
            head = wrap(method, get_model("tiny_cnn")).restore() and None  # noqa: F841 (trains the cached head)
            wrap(method, model, layer="no_such_layer")
        else:
            wrap(method, model, include=["no_such_layer"])
    assert_model_unchanged(model, snap)


def _head(method: str, model: nn.Module, layer: Any) -> Any:
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    return AUX[method].train_head(model, layer, data, epochs=1, progress=False)


@pytest.mark.parametrize("method", list(AUX))
def test_head_for_another_layer_or_model_is_refused(method: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    head = _head(method, get_model("tiny_cnn"), "conv1")
    with pytest.raises(ValueError, match="conv1"):  # trained on conv1, asked for bn1: says which layer it knows
        AUX[method](model, layer="bn1", head=head)
    assert_model_unchanged(model, snap)

    class OtherNet(TinyCNN):
        pass

    other = OtherNet()
    other.conv1 = nn.Conv2d(3, 5, 3, stride=2, padding=1)  # same layer name, other features
    with pytest.raises(ValueError):
        AUX[method](other.eval(), layer="conv1", head=head)
    with pytest.raises(TypeError, match="head="):
        AUX[method](model, layer="conv1", head=nn.Linear(2, 2))  # not a trained head of this method
    assert_model_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------ property test
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.uint8, torch.int32, torch.bool]


@st.composite
def _batches(draw: Any) -> torch.Tensor:
    rank = draw(st.integers(0, 5))
    shape = [draw(st.integers(0, 5 if i < 2 else 40)) for i in range(rank)]
    dtype = draw(st.sampled_from(_DTYPES))
    seed = draw(st.integers(0, 2**16))
    special = draw(st.sampled_from([None, "nan", "inf", "-inf", "huge"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if special is not None and x.numel():
        flat = x.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = {"nan": float("nan"), "inf": float("inf")}.get(
            special, float("-inf") if special == "-inf" else 1e30
        )
    return x.to(dtype) if dtype.is_floating_point else (x.abs() * 10).clamp(max=200).to(dtype)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=_batches())
def test_random_batches_either_adapt_or_raise_cleanly(method: str, x: torch.Tensor) -> None:
    """Any tensor: a finite prediction; or adaptkit's ValueError / TypeError with the model bitwise unchanged; or,
    for a plausible image batch, the model's own error with adaptkit's note. Bitwise restore in every case; no
    other exception type, no silent NaN in the model."""
    model = get_model("tiny_cnn")
    pristine = snapshot_model(model)
    w = wrap(method, model, episodic=False)
    snap = snapshot_model(model)
    try:
        out = w(x)
    except (ValueError, TypeError, RuntimeError) as e:
        if str(e).startswith("adaptkit"):  # refused by adaptkit's checks, before the model ran
            assert isinstance(e, (ValueError, TypeError)), e
            assert_model_unchanged(model, snap)
        else:  # the model's own error for a batch it cannot take (too small for its layers, one value per channel)
            assert x.dim() == 4 and x.shape[1] == 3 and x.numel() > 0 and x.is_floating_point(), e
            assert any("adaptkit" in n for n in getattr(e, "__notes__", [])), e
            # an error after the first step keeps the steps taken (documented); restore() below undoes them
    else:
        assert x.dim() == 4 and x.shape[1] == 3 and x.is_floating_point() and x.shape[0] > 0
        assert bool(torch.isfinite(adaptkit.core.get_logits(out)).all()) or x.dtype == torch.float16
        assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    w.restore()
    assert_model_unchanged(model, pristine)


@pytest.mark.parametrize("method", METHODS)
def test_adaptation_state_of_another_model_is_refused_before_loading(method: str) -> None:
    model = get_model("tiny_cnn")
    w = wrap(method, model)
    w(batch(0))
    state = w.adaptation_state_dict()
    w.reset()
    snap = snapshot_model(model)
    name = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1)
    bad = {**state, name: state[name][:-1]}
    with pytest.raises(ValueError, match="another model"):
        w.load_adaptation_state_dict(bad)
    assert_model_unchanged(model, snap)
    w.restore()


def test_the_bare_model_keeps_torchs_own_errors_while_wrapped() -> None:
    """The stem check acts only inside the wrapper's forward: the user's own call of the wrapped model with a bad
    batch raises what torch raises, not adaptkit's ValueError."""
    model = get_model("tiny_cnn")
    w = wrap("bn_adapt", model)
    with pytest.raises(RuntimeError):
        model(torch.randn(BATCH, 5, SIZE, SIZE))
    with pytest.raises(ValueError, match="takes 3 channels"):
        w(torch.randn(BATCH, 5, SIZE, SIZE))
    w.restore()
