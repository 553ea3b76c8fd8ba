"""Report writing: markdown table, JSON, CSV and plots for a :class:`~adaptkit.bench.runner.BenchResult`."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from adaptkit.bench.tasks import score_key
from adaptkit.metrics import ALEXNET_CLEAN_ERR, ALEXNET_IMAGENET_C_ERR, mce, relative_mce

__all__ = ["markdown", "score_key", "summarize", "write_report"]


def _point_key(row: dict[str, Any], sweep_keys: list[str]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in sweep_keys)


def summarize(
    rows: list[dict[str, Any]], dataset: str, sweep_keys: list[str] | None = None, key: str = "accuracy"
) -> list[dict[str, Any]]:
    """One summary per (sweep point, method): mean score over shifted domains, gain over source, and for
    classification mCE and relative mCE (AlexNet-normalised on ImageNet-C, source-normalised otherwise); the
    clean score. ``key`` is the row's score (``accuracy``, or ``miou`` for segmentation): summary fields are
    ``mean_<key>``, ``clean_<key>`` and ``gain_over_source``."""
    sweep_keys = sweep_keys or []
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[_point_key(r, sweep_keys)][r["method"]].append(r)
    out = []
    for point, by_method in groups.items():
        src = next((v for k, v in by_method.items() if k == "source"), None)
        src_shift = [r for r in src if r["domain"] != "clean"] if src else []
        src_mean = sum(r[key] for r in src_shift) / len(src_shift) if src_shift else math.nan
        src_clean = next((r["error"] for r in src or [] if r["domain"] == "clean"), None)
        for method, rs in by_method.items():
            shifted = [r for r in rs if r["domain"] != "clean"]
            if not shifted:
                continue
            mean_acc = sum(r[key] for r in shifted) / len(shifted)
            err = _errors_by_corruption(shifted)
            clean = next((r[key] for r in rs if r["domain"] == "clean"), None)
            clean_err = next((r["error"] for r in rs if r["domain"] == "clean"), None)
            summary: dict[str, Any] = {
                "method": method, **dict(zip(sweep_keys, point)), f"mean_{key}": mean_acc,
                "gain_over_source": mean_acc - src_mean if src_shift else None,
                f"clean_{key}": clean, "domains": len(shifted),
            }  # fmt: skip
            if key != "accuracy":  # corruption errors (mCE) are a classification measure
                out.append(summary)
                continue
            if dataset == "imagenet_c" and set(err) <= set(ALEXNET_IMAGENET_C_ERR):
                summary["mce_baseline"] = "alexnet"
                summary["mce"] = mce(err, ALEXNET_IMAGENET_C_ERR)
                if clean_err is not None:
                    summary["relative_mce"] = relative_mce(err, clean_err, ALEXNET_IMAGENET_C_ERR, ALEXNET_CLEAN_ERR)
            elif src_shift:
                base = _errors_by_corruption(src_shift)
                summary["mce_baseline"] = "source"
                if all(sum(v) > 0 for v in base.values()):
                    summary["mce"] = mce(err, base)
                if clean_err is not None and src_clean is not None:
                    summary["relative_mce"] = relative_mce(err, clean_err, base, src_clean)
            out.append(summary)
    return out


def _errors_by_corruption(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    err: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        err[r["corruption"]].append((r["severity"], r["error"]))
    return {c: [e for _, e in sorted(v)] for c, v in err.items()}


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:+.1f}" if signed else f"{v:.1f}"
    return str(v)


def markdown(result: Any) -> str:
    """The report's markdown: settings, per-domain accuracy table (domains x methods) and summary rows."""
    cfg = result.config
    sweep_keys = list(cfg.sweep)
    rows = result.rows
    key, label = score_key(cfg.task)
    name = label.split(" ")[0]  # accuracy / mIoU
    summaries = summarize(rows, cfg.dataset, sweep_keys, key)
    lines = [
        "# adaptkit bench report",
        "",
        f"- model: `{cfg.model}`; dataset: `{cfg.dataset}`; corruptions: {len(cfg.corruptions)}; "
        f"severities: {cfg.severities}",
        f"- protocol: **{cfg.protocol}**; batch size {cfg.batch_size}; images per domain: "
        f"{rows[0]['n'] if rows else 0}; seed {cfg.seed}; device {cfg.device}; amp {cfg.amp}"
        + (f"; dirichlet {cfg.dirichlet}" if cfg.dirichlet is not None else ""),
        f"- adaptkit {result.env['adaptkit']}, torch {result.env['torch']}, {result.env['threads']} threads, "
        f"{result.env['date']}",
        "",
    ]
    if not sweep_keys:
        methods = list(dict.fromkeys(r["method"] for r in rows))
        domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != "clean"))
        acc = {(r["method"], r["domain"]): r[key] for r in rows}
        lines += [f"{'Accuracy (%)' if key == 'accuracy' else label} per shift:", ""]
        shift_col = bool(result.shift)
        lines.append("| shift | " + " | ".join(methods) + (" | shift score |" if shift_col else " |"))
        lines.append("|---" * (len(methods) + 1 + shift_col) + "|")
        for d in domains:
            cells = [_fmt(acc.get((m, d))) for m in methods]
            extra = [f"{result.shift[d]:.3f}" if d in result.shift else "-"] if shift_col else []
            lines.append(f"| {d} | " + " | ".join(cells + extra) + " |")
        by = {s["method"]: s for s in summaries}
        pad = [""] if shift_col else []
        for row_label, field, signed in [
            ("**mean**", f"mean_{key}", False),
            ("gain over source", "gain_over_source", True),
            ("mCE", "mce", False),
            ("relative mCE", "relative_mce", False),
            ("clean", f"clean_{key}", False),
        ]:
            vals = [by.get(m, {}).get(field) for m in methods]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {row_label} | " + " | ".join([_fmt(v, signed) for v in vals] + pad) + " |")
        base = next((s.get("mce_baseline") for s in summaries if s.get("mce_baseline")), None)
        if base:
            lines += ["", f"mCE and relative mCE are normalised by the {base} model's errors (100 = {base})."]
        lines += cost_lines(result)
    else:
        lines += [f"Sweep over {', '.join(sweep_keys)}: mean {name} (%) over the shifts of each point.", ""]
        lines.append("| method | " + " | ".join(sweep_keys) + f" | mean {name} | gain over source |")
        lines.append("|---" * (len(sweep_keys) + 3) + "|")
        for s in summaries:
            keys = " | ".join(_fmt(s.get(k)) for k in sweep_keys)
            lines.append(
                f"| {s['method']} | {keys} | {_fmt(s[f'mean_{key}'])} | {_fmt(s['gain_over_source'], True)} |"
            )
    return "\n".join(lines) + "\n"


def cost_table(result: Any) -> list[dict[str, Any]]:
    """Per method: seconds per batch over the shifted domains and, with ``result.costs``, tensor memory; each as
    a ratio to the plain forward (``source``) of the same run when it was run."""
    per: dict[str, list[float]] = {}
    bs = result.config.batch_size
    for r in result.rows:
        if r["domain"] == "clean":
            continue
        acc = per.setdefault(r["method"], [0.0, 0.0])
        acc[0] += r["seconds"]
        acc[1] += math.ceil(r["n"] / r.get("batch_size", bs))
    costs = getattr(result, "costs", {}) or {}
    src_t = per["source"][0] / per["source"][1] if "source" in per and per["source"][1] else None
    src_m = costs.get("source", {}).get("peak_bytes")
    out = []
    for m, (sec, nb) in per.items():
        t = sec / nb if nb else float("nan")
        c = costs.get(m, {})
        out.append({
            "method": m, "seconds_per_batch": t, "time_ratio": t / src_t if src_t else None,
            "peak_bytes": c.get("peak_bytes"),
            "peak_ratio": c["peak_bytes"] / src_m if src_m and "peak_bytes" in c else None,
            "state_ratio": c["state_bytes"] / c["model_bytes"] if c.get("model_bytes") else None,
        })  # fmt: skip
    return out


def cost_lines(result: Any) -> list[str]:
    """The report's cost table (markdown lines; empty when nothing was measured)."""
    rows = cost_table(result)
    if not rows:
        return []
    lines = [
        "",
        "Cost per batch: time = mean seconds per batch over the shifts (x the plain forward of `source` in this "
        "run); peak = most tensor memory alive during one batch (x the plain forward); state = tensors the wrapper "
        "keeps between batches (x the model's parameters and buffers). Memory is counted op by op "
        "(`adaptkit.bench.memory.TensorMemory`), so it is the same on any machine.",
        "",
        "| method | s / batch | time (x forward) | peak memory MiB | peak (x forward) | state (x model) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else None
        lines.append(
            f"| {r['method']} | {r['seconds_per_batch']:.3f} | {_fmt(r['time_ratio'])} | {_fmt(mib)} | "
            f"{_fmt(r['peak_ratio'])} | {_fmt(r['state_ratio'])} |"
        )
    return lines


def write_report(result: Any, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``results.json``, ``results.csv`` and plots (when matplotlib is available)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    data = result.to_dict()
    data["summary"] = summarize(result.rows, cfg.dataset, list(cfg.sweep), score_key(cfg.task)[0])
    (out / "results.json").write_text(json.dumps(data, indent=2, default=_json_default))
    if result.rows:
        keys = list(dict.fromkeys(k for r in result.rows for k in r))
        with open(out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(result.rows)
    md = markdown(result)
    try:
        from adaptkit.bench.plots import make_plots

        figs = make_plots(result, out)
        if figs:
            md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figs) + "\n"
    except ImportError:
        md += "\n(plots skipped: install adaptkit[bench] for matplotlib)\n"
    (out / "report.md").write_text(md)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    if isinstance(o, Path):
        return str(o)
    return str(o)
