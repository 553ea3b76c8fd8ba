"""The bench's cost figures: tensor memory counted op by op, ratios in the report, source data for EATA-like
methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, snapshot_model

import adaptkit
from adaptkit.bench import BenchConfig, run_bench
from adaptkit.bench.memory import TensorMemory
from adaptkit.bench.report import cost_table
from adaptkit.bench.runner import measure_cost
from adaptkit.bench.spec import MethodSpec


def test_tensor_memory_counts_allocations_and_frees() -> None:
    x = torch.ones(256)  # allocated before: not counted
    with TensorMemory() as mem:
        a = x * 2  # 1 KiB
        b = torch.zeros(512)  # 2 KiB
        v = b[:10]  # a view: same storage, nothing new
        del b
        c = a + 1  # 1 KiB; peak 4 KiB
        del a
        w = x.view(16, 16).to(torch.float32)  # views and no-op casts of an older tensor allocate nothing
        x.add_(0)  # in place: nothing new
    assert w.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert mem.peak == 4096
    assert mem.current == 1024 + 2048  # c, and b's storage kept alive by the view
    del v
    assert mem.current == 1024
    del c
    assert mem.current == 0


def test_tensor_memory_sees_the_backward_pass() -> None:
    lin = nn.Linear(64, 64, bias=False)
    x = torch.randn(32, 64)
    with TensorMemory() as fwd:
        lin(x).sum()
    with TensorMemory() as both:
        lin(x).sum().backward()
    assert lin.weight.grad is not None
    assert both.current >= 64 * 64 * 4  # the gradient stays alive
    assert both.peak > fwd.peak


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    return nn.Sequential(*layers).eval()


def test_measure_cost_counts_tent_gradients_and_snapshot() -> None:
    model, x = _tiny(), torch.rand(8, 1, 8, 8)
    snap = snapshot_model(model)
    src = measure_cost(model, MethodSpec("source"), x)
    tent = measure_cost(model, MethodSpec("tent"), x)
    assert src["state_bytes"] == 0
    assert (
        tent["model_bytes"]
        == src["model_bytes"]
        == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()] if t.dtype == torch.float32) + 8
    )  # num_batches_tracked (int64)
    # Tent keeps the snapshot of the 8 BN affine values and Adam's two moments for them
    assert tent["state_bytes"] >= 3 * 8 * 4
    assert tent["peak_bytes"] > src["peak_bytes"]  # activations kept for the backward pass
    assert_model_unchanged(model, snap)  # measured on a wrapper that was restored


class _NeedsSource(adaptkit.Tent):
    """A registered test method that records what it got through ``source_data_arg``."""

    name = "test_needs_source"
    source_data_arg: ClassVar[str] = "fisher_data"
    seen: ClassVar[list[Any]] = []

    def __init__(self, model: nn.Module, fisher_data: Any = None, **kw: Any) -> None:
        type(self).seen.append(fisher_data)
        super().__init__(model, **kw)


def test_bench_passes_source_batches_and_reports_costs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptkit import registry

    monkeypatch.setitem(registry._REGISTRY, "test_needs_source", _NeedsSource)
    _NeedsSource.seen.clear()
    cfg = BenchConfig(
        dataset="synthetic", corruptions=["gaussian_noise"], severities=[5], batch_size=32, progress=False,
        methods=["source", "test_needs_source"], out_dir=str(tmp_path), clean=False, shift_score=False,
    )  # fmt: skip
    res = run_bench(cfg)
    batches = [b for b in _NeedsSource.seen if b is not None]
    assert batches, "the source batches never reached the method"
    first = batches[0]
    assert isinstance(first, list) and all(b.dtype == torch.float32 and b.shape[0] <= 32 for b in first)
    assert float(first[0].min()) >= 0.0 and float(first[0].max()) <= 1.0
    assert set(res.costs) == {"source", "test_needs_source"}
    rows = {r["method"]: r for r in cost_table(res)}
    assert rows["source"]["time_ratio"] == pytest.approx(1.0)
    # the ratio is the run's own seconds per batch divided by the source's
    sec = {r["method"]: r["seconds"] for r in res.rows}
    assert rows["test_needs_source"]["time_ratio"] == pytest.approx(sec["test_needs_source"] / sec["source"])
    assert rows["test_needs_source"]["peak_ratio"] == pytest.approx(
        res.costs["test_needs_source"]["peak_bytes"] / res.costs["source"]["peak_bytes"]
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["costs"]["source"]["state_bytes"] == 0
    assert "| method | s / batch | time (x forward)" in (tmp_path / "report.md").read_text()


def test_eata_declares_its_source_data_and_eta_none() -> None:
    assert adaptkit.EATA.source_data_arg == "fisher_data"
    assert adaptkit.ETA.source_data_arg is None
    assert adaptkit.Tent.source_data_arg is None
