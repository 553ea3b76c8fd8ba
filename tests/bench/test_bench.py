"""``adaptkit bench`` end to end on a tiny model and tiny data, plus spec parsing and report maths."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch.nn as nn

import adaptkit
from adaptkit.bench.report import summarize
from adaptkit.bench.spec import MethodSpec, parse_sweep, parse_value
from adaptkit.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "adaptkit-cache"))


def _has_matplotlib() -> bool:
    """Plots are optional (the ``[bench]`` extra): without matplotlib the report is written without them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    rc = main([
        "bench", "--dataset", "synthetic", "--corruptions", "gaussian_noise", "contrast", "--severities", "3", "5",
        "--methods", "source", "bn_adapt:N=0", "tent", "--batch-size", "32", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| shift |" in printed and f"report: {out.resolve()}" in printed
    plots = ("corruption_bars.png", "accuracy_vs_severity.png", "shift_vs_error.png") if _has_matplotlib() else ()
    for name in ("report.md", "results.json", "results.csv", *plots):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"config", "env", "rows", "shift", "summary"}
    assert data["config"]["protocol"] == "reset_each_shift" and data["config"]["batch_size"] == 32
    assert data["config"]["severities"] == [3, 5]
    rows = data["rows"]
    assert {r["method"] for r in rows} == {"source", "bn_adapt(N=0)", "tent"}
    # 2 corruptions x 2 severities + clean, per method
    assert len(rows) == 3 * 5
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0 and math.isclose(r["accuracy"] + r["error"], 100.0)
        assert r["n"] == 256
    assert set(data["shift"]) == {"gaussian_noise-3", "gaussian_noise-5", "contrast-3", "contrast-5"}
    summ = {s["method"]: s for s in data["summary"]}
    assert summ["source"]["mce"] == pytest.approx(100.0) and summ["source"]["gain_over_source"] == 0.0
    md = (out / "report.md").read_text()
    assert "reset_each_shift" in md and "**mean**" in md and "mCE" in md
    assert plots or "(plots skipped: install adaptkit[bench] for matplotlib)" in md


def test_bench_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    rc = main([
        "bench", "--dataset", "synthetic", "--corruptions", "gaussian_noise", "--methods", "source", "bn_adapt",
        "--sweep", "bn_adapt.N=0,16,inf", "--sweep", "batch_size=8,64", "--sweep", "severity=1,5",
        "--out", str(out), "--quiet", "--no-clean", "--no-shift-score",
    ])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    bn = [r for r in data["rows"] if r["base_method"] == "bn_adapt"]
    assert len(bn) == 3 * 2 * 2
    assert {float(r["bn_adapt.N"]) for r in bn} == {0.0, 16.0, math.inf}
    assert (out / "sweep_bn_adapt_N.png").is_file() or not _has_matplotlib()
    # N = inf is the source model exactly, at every batch size and severity
    src = {(r["batch_size"], r["severity"]): r["accuracy"] for r in data["rows"] if r["method"] == "source"}
    for r in bn:
        if math.isinf(float(r["bn_adapt.N"])):
            assert r["accuracy"] == src[(r["batch_size"], r["severity"])]


def test_bench_rejects_unknown_corruption(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dataset", "synthetic", "--corruptions", "gaussian_nois", "--quiet"]) == 2
    assert "unknown corruptions" in capsys.readouterr().err


def test_method_spec_and_values() -> None:
    s = MethodSpec.parse("bn-adapt:N=16,accumulate=true")
    assert s.name == "bn_adapt" and s.overrides == {"N": 16, "accumulate": True}
    assert s.label == "bn_adapt(N=16,accumulate=True)"
    assert MethodSpec.parse("tent").label == "tent"
    assert math.isinf(parse_value("inf")) and parse_value("1e-3") == 0.001
    assert parse_sweep("bn_adapt.N=0,4,inf")[1][:2] == [0, 4]
    with pytest.raises(ValueError):
        MethodSpec.parse("tent:lr")
    with pytest.raises(ValueError):
        parse_sweep("batch_size")


def test_summary_metrics_by_hand() -> None:
    def row(m: str, c: str, s: int, acc: float) -> dict[str, object]:
        return {"method": m, "domain": f"{c}-{s}" if s else "clean", "corruption": c, "severity": s,
                "accuracy": acc, "error": 100.0 - acc}  # fmt: skip

    rows = [
        row("source", "fog", 5, 40.0), row("source", "snow", 5, 60.0), row("source", "clean", 0, 90.0),
        row("m", "fog", 5, 70.0), row("m", "snow", 5, 80.0), row("m", "clean", 0, 90.0),
    ]  # fmt: skip
    s = {x["method"]: x for x in summarize(rows, "fashion_mnist")}
    assert s["m"]["mean_accuracy"] == 75.0 and s["m"]["gain_over_source"] == 25.0
    # mCE vs source: mean(30/60, 20/40) = 50 %; relative: mean((30-10)/(60-10), (20-10)/(40-10))
    assert s["m"]["mce"] == pytest.approx(50.0)
    assert s["m"]["relative_mce"] == pytest.approx(100 * (20 / 50 + 10 / 30) / 2)
    assert s["m"]["clean_accuracy"] == 90.0
    # on ImageNet-C the baseline is AlexNet's published errors
    s = {x["method"]: x for x in summarize(rows, "imagenet_c")}
    assert s["m"]["mce_baseline"] == "alexnet"
    assert s["m"]["mce"] == pytest.approx(100 * (30 / 81.9324 + 20 / 86.6816) / 2)


def test_load_model_from_a_pickled_module(tmp_path: Path) -> None:
    import torch

    from adaptkit.bench.models import SmallResNet, load_model

    net = SmallResNet(1, 3, width=4)
    torch.save(net, tmp_path / "net.pt")
    loaded = load_model(str(tmp_path / "net.pt"))
    assert isinstance(loaded, SmallResNet) and not loaded.training
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="--checkpoint"):
        load_model(str(tmp_path / "sd.pt"))


def test_bench_trains_caches_and_loads_aux_heads(tmp_path: Path) -> None:
    """NC-TTT in a benchmark: the head is trained on the training split, cached, reused, or loaded by path."""
    from adaptkit.bench import BenchConfig, run_bench
    from adaptkit.bench.heads import needs_head, prepare_head, split_overrides

    assert needs_head("ncttt") and not needs_head("tent")
    assert split_overrides({"lr": 1, "head.embed_dim": 4}) == ({"lr": 1}, {"embed_dim": 4})
    spec = "ncttt:steps=2,lr=1e-3,head.epochs=1,head.embed_dim=4,head.n=64"
    cfg = BenchConfig(dataset="synthetic", corruptions=["gaussian_noise"], severities=[5], methods=["source", spec],
                      batch_size=32, n_samples=64, progress=False, clean=False)  # fmt: skip
    res = run_bench(cfg, write=False)
    acc = {r["method"]: r["accuracy"] for r in res.rows}
    assert set(acc) == {"source", "ncttt(steps=2,lr=0.001,head.epochs=1,head.embed_dim=4,head.n=64)"}
    cached = list((Path(os.environ["ADAPTKIT_CACHE"]) / "heads").glob("ncttt_*.pt"))
    assert len(cached) == 1
    again = run_bench(cfg, write=False)  # the cached head gives the same numbers
    assert {r["method"]: r["accuracy"] for r in again.rows} == acc
    by_path = BenchConfig(**{**cfg.__dict__, "methods": [f"ncttt:steps=2,lr=1e-3,head.path={cached[0]}"]})
    assert run_bench(by_path, write=False).rows[0]["accuracy"] == acc[next(k for k in acc if k != "source")]
    with pytest.raises(ValueError, match="needs a trained head"):
        prepare_head(nn.Linear(2, 2), MethodSpec.parse("ncttt"), None, None, "m", 0, "cpu", False)


def test_bench_multi_layer_head_spec() -> None:
    """``layer=1+2`` gives a method (and its head) several layers, as ClusT3's paper configuration needs."""
    from adaptkit.bench import BenchConfig, run_bench

    assert MethodSpec.parse("clust3:layer=1+2").overrides == {"layer": [1, 2]}
    assert MethodSpec.parse("clust3:layer=1+2").label == "clust3(layer=1+2)"
    spec = "clust3:layer=1+2,steps=1,head.epochs=1,head.n=64,head.num_projectors=2"
    cfg = BenchConfig(dataset="synthetic", corruptions=["gaussian_noise"], severities=[5], methods=[spec],
                      batch_size=32, n_samples=64, progress=False, clean=False)  # fmt: skip
    rows = run_bench(cfg, write=False).rows
    assert [r["method"] for r in rows] == ["clust3(layer=1+2,steps=1,head.epochs=1,head.n=64,head.num_projectors=2)"]
    assert 0.0 <= rows[0]["accuracy"] <= 100.0
    (cached,) = (Path(os.environ["ADAPTKIT_CACHE"]) / "heads").glob("clust3_*.pt")
    assert adaptkit.ClusT3Head.load(cached).binding["layers"] == ["layer1", "layer2"]
