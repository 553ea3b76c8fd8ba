"""Every number of a benchmark run checked against an independent evaluation loop written here.

The loop builds each method with the public API, feeds the batches of each protocol in the documented order
(docs/data_and_bench.md, "Streams"), starts a *fresh* wrapper wherever the protocol resets the model (so it
does not even rely on ``reset()``), and counts correct predictions (or a pixel confusion matrix) by hand. The
methods are online ones whose results depend on the resets (BNAdapt pooling statistics since the last reset,
Tent with a large learning rate): a runner that ignores the stream's reset flags, resets too often, or
miscounts, gives other numbers. ``test_the_setup_detects_a_missing_reset`` checks that this is so.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit
from adaptkit.bench.report import summarize
from adaptkit.bench.runner import BenchConfig, BenchResult, run_bench
from adaptkit.data.datasets import corrupt_tensor
from adaptkit.data.streams import dirichlet_order

SEED = 3
N_SAMPLES = 40  # of 48 clean images: a seeded subset; 40 = 16 + 16 + 8 (the last batch is short)
CLASSES = 4
#: bench spec -> (registry name, constructor arguments, row label)
METHODS = {
    "source": ("source", {}, "source"),
    "bn_adapt:N=0,accumulate=true": ("bn_adapt", {"N": 0, "accumulate": True}, "bn_adapt(N=0,accumulate=True)"),
    "tent:lr=0.5": ("tent", {"lr": 0.5}, "tent(lr=0.5)"),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "adaptkit-cache"))


# ---------------------------------------------------------------------------------------------- setup
class TinyCNN(nn.Module):
    """Two conv-BN-ReLU stages, pooling and a linear classifier (1 x 16 x 16 inputs in [0, 1])."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


class TinySeg(nn.Module):
    """Conv-BN-ReLU at half resolution and a 1x1 classifier: ``{"out": logits}`` smaller than the masks (the
    runner upsamples them bilinearly)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, 1, 1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.body(x))}


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> nn.Module:
    """A few full-batch Adam steps on the clean data, then source BN statistics from it (cumulative average): a
    model whose predictions move with the BN statistics and the adapted parameters."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(steps):
        out = model(x.float() / 255.0)
        out = out["out"] if isinstance(out, dict) else out
        if out.dim() == 4:
            out = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(out, y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for b in x.split(16):
            model(b.float() / 255.0)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def _classification_data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a bright square in quadrant k on a noisy background; uint8 1 x 16 x 16."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % CLASSES
    x = 0.2 + 0.2 * torch.rand(n, 1, 16, 16, generator=gen)
    for k in range(CLASSES):
        i, j = (k // 2) * 8, (k % 2) * 8
        x[y == k, :, i + 1 : i + 7, j + 1 : j + 7] += 0.5
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def _segmentation_data(n: int = 48, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """4 x 4 blocks of a random class, tinted by class, with some ignored (255) pixels; uint8 3 x 16 x 16."""
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, classes, (n, 4, 4), generator=gen)
    y = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    tint = torch.tensor([[0.2, 0.3, 0.7], [0.8, 0.3, 0.2], [0.4, 0.8, 0.4]])[:classes]
    x = tint[y].permute(0, 3, 1, 2) + 0.15 * torch.rand(n, 3, 16, 16, generator=gen)
    y = torch.where(torch.rand(n, 16, 16, generator=gen) < 0.05, torch.full_like(y, 255), y)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


# ---------------------------------------------------------------------------------------------- the reference
def _domains(
    x: torch.Tensor, y: torch.Tensor, cfg: BenchConfig
) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor, str, int]], tuple[str, torch.Tensor, torch.Tensor, str, int]]:
    """``(name, images, labels, corruption, severity)`` of each shift (corruptions x severities, in that order)
    and of the clean set, from a seeded subset of ``n_samples`` images."""
    if cfg.n_samples is not None and cfg.n_samples < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_samples]
        x, y = x[idx], y[idx]
    shifted = [
        (f"{c}-{s}", corrupt_tensor(x, c, s, cfg.seed), y, c, s)
        for c, s in itertools.product(cfg.corruptions, cfg.severities)
    ]
    return shifted, ("clean", x, y, "clean", 0)


def _batches(
    domains: list[tuple[str, torch.Tensor, torch.Tensor, str, int]],
    protocol: str,
    batch_size: int,
    seed: int,
    dirichlet: float | None,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    """``(domain, x in [0, 1], y, index in the domain, reset before this batch)`` in protocol order: each shift
    shuffled by one seeded generator (or Dirichlet-ordered), ``gradual`` streaming severities up then down,
    ``mixed`` shuffling all shifts together; resets at every shift (``reset_each_shift``) or only at the start."""
    gen = torch.Generator().manual_seed(seed)

    def order(labels: torch.Tensor) -> torch.Tensor:
        if dirichlet is not None:
            return dirichlet_order(labels, dirichlet, seed)
        return torch.randperm(len(labels), generator=gen)

    if protocol == "mixed":
        xs = torch.cat([d[1] for d in domains])
        ys = torch.cat([d[2] for d in domains])
        names = [d[0] for d in domains for _ in range(len(d[2]))]
        o = order(ys)
        for k, lo in enumerate(range(0, len(o), batch_size)):
            idx = o[lo : lo + batch_size]
            in_batch = {names[i] for i in idx.tolist()}
            name = in_batch.pop() if len(in_batch) == 1 else "mixed"
            yield name, xs[idx].float() / 255.0, ys[idx], idx, k == 0
        return
    seq = domains + domains[-2::-1] if protocol == "gradual" else domains
    for j, (name, x, y, _, _) in enumerate(seq):
        o = order(y)
        for k, lo in enumerate(range(0, len(o), batch_size)):
            idx = o[lo : lo + batch_size]
            yield name, x[idx].float() / 255.0, y[idx], idx, k == 0 and (j == 0 or protocol == "reset_each_shift")


def _evaluate(
    model: nn.Module, method: str, kwargs: dict[str, Any], batches: Iterator[Any], classes: int | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Per domain ``{"correct", "n"}`` (classification) or ``{"cm", "n"}`` (segmentation, ``classes`` given),
    and the last predictions of each domain's images 0..3 (segmentation)."""
    stats: dict[str, dict[str, Any]] = {}
    first: dict[str, torch.Tensor] = {}
    wrapper = None
    torch.manual_seed(SEED)
    try:
        for name, x, y, idx, reset in batches:
            if method == "source":
                with torch.no_grad():
                    out = model(x)
            else:
                if reset:  # a reset is a new wrapper around the model exactly as it was
                    if wrapper is not None:
                        wrapper.restore()
                    wrapper = adaptkit.adapt(model, method, **kwargs)
                assert wrapper is not None, "the protocol must reset before the first batch"
                with torch.no_grad():
                    out = wrapper(x)
            logits = out["out"] if isinstance(out, dict) else out
            s = stats.setdefault(name, {"correct": 0, "n": 0, "cm": None})
            s["n"] += len(y)
            if classes is None:
                s["correct"] += int((logits.argmax(1) == y).sum())
                continue
            pred = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            valid = y != 255
            cm = torch.bincount(y[valid] * classes + pred[valid], minlength=classes * classes).view(classes, classes)
            s["cm"] = cm if s["cm"] is None else s["cm"] + cm
            for i in (idx < 4).nonzero().flatten().tolist():
                first.setdefault(name, torch.zeros(4, *y.shape[-2:], dtype=torch.uint8))[idx[i]] = pred[i]
    finally:
        if wrapper is not None:
            wrapper.restore()
    return stats, first


def _miou(cm: torch.Tensor) -> tuple[float, float, list[float]]:
    """mIoU (%) over classes present in labels or predictions, pixel accuracy (%), IoU per class (%, NaN absent)."""
    ious = []
    for c in range(cm.shape[0]):
        tp, union = int(cm[c, c]), int(cm[c, :].sum() + cm[:, c].sum() - cm[c, c])
        ious.append(100.0 * tp / union if union else math.nan)
    present = [v for v in ious if not math.isnan(v)]
    return sum(present) / len(present), 100.0 * int(cm.trace()) / int(cm.sum()), ious


def _reference(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], cfg: BenchConfig, classes: int | None = None
) -> tuple[dict[tuple[Any, ...], dict[str, Any]], dict[str, float], dict[str, dict[str, torch.Tensor]]]:
    """Rows ``{(point, method label, domain): row}`` of the whole run, shift scores, segmentation examples."""
    shifted, clean = _domains(*data, cfg)
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    examples: dict[str, dict[str, torch.Tensor]] = {}
    keys = list(cfg.sweep)
    for values in itertools.product(*(cfg.sweep[k] for k in keys)):
        point = dict(zip(keys, values))
        bs = int(point.get("batch_size", cfg.batch_size))
        sev = point.get("severity")
        doms = [d for d in shifted if sev is None or d[4] == sev]
        for spec in cfg.methods:
            method, kwargs, label = METHODS[spec]
            kwargs = {**kwargs, **{k.split(".")[1]: v for k, v in point.items() if k.split(".")[0] == method}}
            if method != "source" and kwargs != METHODS[spec][1]:
                label = f"{method}({','.join(f'{k}={v}' for k, v in kwargs.items())})"
            for group in [doms] + ([[clean]] if cfg.clean and sev is None else []):
                batches = _batches(group, cfg.protocol, bs, cfg.seed, cfg.dirichlet)
                stats, first = _evaluate(model, method, kwargs, batches, classes)
                for name, s in stats.items():
                    info = next((d for d in group if d[0] == name), None)
                    row = {
                        "method": label, "base_method": method, "domain": name,
                        "corruption": info[3] if info else name, "severity": info[4] if info else 0,
                        "n": s["n"], "batch_size": bs, "protocol": cfg.protocol, **point,
                    }  # fmt: skip
                    if classes is None:
                        row["accuracy"] = 100.0 * s["correct"] / s["n"]
                        row["error"] = 100.0 - row["accuracy"]
                    else:
                        row["miou"], row["pixel_accuracy"], row["iou"] = _miou(s["cm"])
                        row["error"] = 100.0 - row["miou"]
                    rows[(tuple(values), label, name)] = row
                if classes is not None and not point and cfg.protocol != "mixed":
                    for name, pred in first.items():
                        examples.setdefault(name, {})[label] = pred
    shift = {}
    if cfg.shift_score:
        shift = {name: adaptkit.shift_score(model, x.float() / 255.0).mean for name, x, *_ in shifted}
    return rows, shift, examples


def _reference_summary(rows: list[dict[str, Any]], keys: list[str], score: str) -> list[dict[str, Any]]:
    """Mean over shifts, gain over source, clean score, and for accuracy mCE / relative mCE against the source."""
    out = []
    points = list(dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows))
    for point in points:
        at = [r for r in rows if tuple(r.get(k) for k in keys) == point]
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in at:
            by_method.setdefault(r["method"], []).append(r)
        src = [r for r in by_method.get("source", []) if r["domain"] != "clean"]
        src_clean = next((r for r in by_method.get("source", []) if r["domain"] == "clean"), None)
        for method, rs in by_method.items():
            shifted = [r for r in rs if r["domain"] != "clean"]
            clean = next((r for r in rs if r["domain"] == "clean"), None)
            mean = sum(r[score] for r in shifted) / len(shifted)
            s: dict[str, Any] = {
                "method": method, **dict(zip(keys, point)), f"mean_{score}": mean, "domains": len(shifted),
                "gain_over_source": mean - sum(r[score] for r in src) / len(src) if src else None,
                f"clean_{score}": clean[score] if clean else None,
            }  # fmt: skip
            if score == "accuracy" and src:
                s["mce_baseline"] = "source"
                ce, rel = [], []
                for c in dict.fromkeys(r["corruption"] for r in shifted):
                    e = [r["error"] for r in shifted if r["corruption"] == c]
                    b = [r["error"] for r in src if r["corruption"] == c]
                    ce.append(100.0 * sum(e) / sum(b) if sum(b) > 0 else math.nan)
                    if clean and src_clean:
                        den = sum(v - src_clean["error"] for v in b)
                        rel.append(100.0 * sum(v - clean["error"] for v in e) / den if den else math.nan)
                if all(
                    sum(r["error"] for r in src if r["corruption"] == c) > 0 for c in {r["corruption"] for r in src}
                ):
                    s["mce"] = sum(ce) / len(ce)
                if clean and src_clean:
                    s["relative_mce"] = sum(rel) / len(rel)
            out.append(s)
    return out


def _approx(value: Any) -> Any:
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True)
    if isinstance(value, list):
        return [_approx(v) for v in value]
    return value


def _check_rows(result: BenchResult, expected: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    keys = list(result.config.sweep)
    got = {}
    for r in result.rows:
        key = (tuple(r[k] for k in keys), r["method"], r["domain"])
        assert key not in got, f"duplicate row {key}"
        assert math.isfinite(r["seconds"]) and r["seconds"] >= 0.0
        got[key] = {k: v for k, v in r.items() if k != "seconds"}
    assert sorted(got, key=str) == sorted(expected, key=str)
    for key, want in expected.items():
        if "iou" in want:  # the runner rounds per-class IoUs to 4 decimals
            assert got[key].pop("iou") == pytest.approx(want["iou"], abs=1e-4, nan_ok=True), key
            want = {k: v for k, v in want.items() if k != "iou"}
        assert got[key] == {k: _approx(v) for k, v in want.items()}, key


# ---------------------------------------------------------------------------------------------- classification
CASES = {
    "reset_each_shift": {},
    "continual": {"protocol": "continual"},
    "gradual": {"protocol": "gradual", "corruptions": ["gaussian_noise"], "severities": [1, 3, 5]},
    "mixed": {"protocol": "mixed", "batch_size": 12},
    "mixed_dirichlet": {"protocol": "mixed", "dirichlet": 0.3},
    "reset_each_shift_dirichlet": {"dirichlet": 0.1},
    "continual_dirichlet": {"protocol": "continual", "dirichlet": 0.1},
    "sweep": {"severities": [2, 5], "sweep": {"batch_size": [8, 16], "severity": [2, 5], "tent.lr": [0.01, 0.1]}},
}


def _config(**kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "model": "tiny", "dataset": "user", "methods": list(METHODS), "corruptions": ["gaussian_noise", "contrast"],
        "severities": [5], "batch_size": 16, "n_samples": N_SAMPLES, "seed": SEED, "progress": False,
    }  # fmt: skip
    return BenchConfig(**{**base, **kw})


def _classifier(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return _trained(TinyCNN(), x, y)


@pytest.mark.parametrize("case", list(CASES))
def test_classification_rows_match_the_reference_loop(case: str) -> None:
    data = _classification_data()
    model = _classifier(*data)
    frozen = copy.deepcopy(model)  # the reference runs on its own copy: a runner that leaks state cannot hide it
    cfg = _config(**CASES[case])
    result = run_bench(cfg, write=False, model=model, data=data)
    rows, shift, _ = _reference(frozen, data, cfg)
    _check_rows(result, rows)
    assert result.shift.keys() == shift.keys()
    for name, value in shift.items():
        assert result.shift[name] == pytest.approx(value, rel=1e-5), name
    keys = list(cfg.sweep)
    want = _reference_summary(list(rows.values()), keys, "accuracy")
    got = summarize(result.rows, cfg.dataset, keys)
    assert [{k: _approx(v) for k, v in s.items()} for s in want] == got
    assert result.env["adaptkit"] == adaptkit.__version__ and result.env["device"] == "cpu"
    assert result.config is cfg and result.examples == {}


def test_report_files_hold_the_reference_numbers(tmp_path: Path) -> None:
    """``results.json``, ``results.csv`` and ``report.md`` of a run carry the reference rows and summaries."""
    data = _classification_data()
    model = _classifier(*data)
    frozen = copy.deepcopy(model)
    cfg = _config(out_dir=str(tmp_path / "rep"), shift_score=False)
    result = run_bench(cfg, write=True, model=model, data=data)
    rows, _, _ = _reference(frozen, data, cfg)
    out = tmp_path / "rep"
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["protocol"] == "reset_each_shift" and saved["config"]["n_samples"] == N_SAMPLES
    _check_rows(BenchResult(cfg, saved["rows"], {}, {}), rows)
    want = _reference_summary(list(rows.values()), [], "accuracy")
    assert saved["summary"] == [{k: _approx(v) for k, v in s.items()} for s in want]
    with open(out / "results.csv", newline="") as f:
        saved_csv = list(csv.DictReader(f))
    assert len(saved_csv) == len(rows)
    for r in saved_csv:
        want_row = rows[((), r["method"], r["domain"])]
        assert (float(r["accuracy"]), int(r["n"])) == (pytest.approx(want_row["accuracy"]), want_row["n"])
    md = (out / "report.md").read_text().splitlines()
    table = next(i for i, line in enumerate(md) if line.startswith("| shift |"))
    methods = [c.strip() for c in md[table].strip("|").split("|")[1:]]
    by_label = {line.strip("|").split("|")[0].strip(): line for line in md[table + 2 :] if line.startswith("|")}
    for domain in ("gaussian_noise-5", "contrast-5"):
        cells = [c.strip() for c in by_label[domain].strip("|").split("|")[1:]]
        assert cells == [f"{rows[((), m, domain)]['accuracy']:.1f}" for m in methods], domain
    means = [float(c) for c in by_label["**mean**"].strip("|").split("|")[1:]]
    summ = {s["method"]: s for s in want}
    assert means == pytest.approx([summ[m]["mean_accuracy"] for m in methods], abs=0.051)
    assert result.out_dir == out


def test_the_setup_detects_a_missing_reset() -> None:
    """The chosen methods depend on the resets: the same stream without them gives other numbers (for both
    adapting methods), so a runner that ignores the stream's reset flags fails the tests above."""
    data = _classification_data()
    model = _classifier(*data)
    cfg = _config(corruptions=["contrast", "gaussian_noise"])
    shifted, _ = _domains(*data, cfg)
    for spec in ("bn_adapt:N=0,accumulate=true", "tent:lr=0.5"):
        method, kwargs, _ = METHODS[spec]
        with_reset, _ = _evaluate(model, method, kwargs, _batches(shifted, "reset_each_shift", 16, SEED, None))
        without, _ = _evaluate(model, method, kwargs, _batches(shifted, "continual", 16, SEED, None))
        assert with_reset["contrast-5"] == without["contrast-5"]  # the first shift is the same either way
        assert with_reset["gaussian_noise-5"]["correct"] != without["gaussian_noise-5"]["correct"], spec


# ---------------------------------------------------------------------------------------------- segmentation
SEG_CLASSES = 3


def _segmenter(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return _trained(TinySeg(SEG_CLASSES), x, y)


@pytest.mark.parametrize("protocol", ["reset_each_shift", "continual", "mixed"])
def test_segmentation_rows_match_a_hand_computed_miou(protocol: str) -> None:
    data = _segmentation_data(classes=SEG_CLASSES)
    model = _segmenter(*data)
    frozen = copy.deepcopy(model)
    cfg = _config(task="segmentation", protocol=protocol, shift_score=False)
    result = run_bench(cfg, write=False, model=model, data=data)
    rows, _, examples = _reference(frozen, data, cfg, SEG_CLASSES)
    _check_rows(result, rows)
    want = _reference_summary(list(rows.values()), [], "miou")
    assert summarize(result.rows, cfg.dataset, [], "miou") == [{k: _approx(v) for k, v in s.items()} for s in want]
    if protocol == "mixed":
        assert result.examples == {}
        return
    assert result.examples.keys() == examples.keys()
    shifted, clean = _domains(*data, cfg)
    for name, x, y, *_ in [*shifted, clean]:
        ex = result.examples[name]
        assert torch.equal(ex["image"], x[:4]) and torch.equal(ex["target"], y[:4])
        for label, pred in examples[name].items():
            assert torch.equal(ex[label], pred), (name, label)


def test_segmentation_setup_detects_a_missing_reset() -> None:
    data = _segmentation_data(classes=SEG_CLASSES)
    model = _segmenter(*data)
    shifted, _ = _domains(*data, _config(task="segmentation", corruptions=["contrast", "gaussian_noise"]))
    for spec in ("bn_adapt:N=0,accumulate=true", "tent:lr=0.5"):
        method, kwargs, _ = METHODS[spec]
        runs = [
            _evaluate(model, method, kwargs, _batches(shifted, p, 16, SEED, None), SEG_CLASSES)[0]["gaussian_noise-5"]
            for p in ("reset_each_shift", "continual")
        ]
        assert not torch.equal(runs[0]["cm"], runs[1]["cm"]), spec
