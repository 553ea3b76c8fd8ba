"""A long online stream, every method: 75 consecutive shifts (15 corruptions x 5 severities) without reset, with live
tensors (first and last shift), hooks, optimizer state and held gradients (every 15 shifts) counted, not timed:
flat after the first shift.

The full-size run over real corruptions is ``benchmarks/long_stream.py`` (figures in docs/benchmarks.md); here the
shifts are synthetic (a per-shift gain, offset and noise level) so that the test takes a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, count_live_tensors, snapshot_model
from test_contract import BATCH, SIZE, get_model, wrap

import adaptkit

METHODS = adaptkit.list_methods()
SHIFTS = 75  # 15 corruptions x 5 severities


def _hooks(model: nn.Module) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def _counts(w: adaptkit.TTAMethod, model: nn.Module, live: bool) -> dict[str, int]:
    opt = w.optimizer.state.values() if w.optimizer is not None else []
    opt_tensors = [v for st in opt for v in st.values() if isinstance(v, torch.Tensor)]
    return {
        "live_tensors": count_live_tensors() if live else -1,  # a full gc pass: only at the first and last count
        "hooks": _hooks(model),
        "optimizer_tensors": len(opt_tensors),
        "optimizer_bytes": sum(t.numel() * t.element_size() for t in opt_tensors),
        "grads_held": sum(p.grad is not None for p in model.parameters()),
    }


@pytest.mark.parametrize("method", METHODS)
def test_75_shifts_online_hold_resources_flat(method: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    g = torch.Generator().manual_seed(0)
    stream = [
        (torch.randn(BATCH, 3, SIZE, SIZE, generator=g) * (0.5 + s % 5) + (s % 15) / 5 - 1.5) for s in range(SHIFTS)
    ]
    w = wrap(method, model, episodic=False)
    counts = []
    for s, x in enumerate(stream):
        w(x)
        if s == 0 or (s + 1) % 15 == 0:
            del x
            counts.append(_counts(w, model, live=s in (0, SHIFTS - 1)))
    for c in counts[1:]:
        for k in ("hooks", "optimizer_tensors", "optimizer_bytes", "grads_held"):
            assert c[k] == counts[0][k], f"{k} grew: {[c[k] for c in counts]}"
    assert counts[-1]["live_tensors"] - counts[0]["live_tensors"] <= 2, [c["live_tensors"] for c in counts]
    assert counts[0]["grads_held"] == 0
    w.restore()
    assert _hooks(model) == 0
    assert_model_unchanged(model, snap)
