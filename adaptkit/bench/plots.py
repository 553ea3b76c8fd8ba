"""Figures for bench reports (matplotlib, imported lazily: ``pip install adaptkit[bench]``)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from adaptkit.bench.tasks import score_key


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation (``nan`` with fewer than 2 points or zero variance).

    Example:
        >>> from adaptkit.bench.plots import pearson
        >>> round(pearson([1, 2, 3], [2, 4, 6.5]), 3)
        0.998
    """
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def make_plots(result: Any, out: Path) -> list[Path]:
    """Per-corruption bars, accuracy vs severity, shift score vs source error (with correlation), and for
    sweeps accuracy vs the swept method parameter per batch size / severity."""
    plt = _plt()
    rows = [r for r in result.rows if r["domain"] != "clean"]
    cfg = result.config
    key, label = score_key(cfg.task)
    paths: list[Path] = []
    if not rows:
        return paths
    if cfg.sweep:
        paths += _sweep_plots(plt, rows, cfg, out, key, label)
        return paths
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # per-corruption bars (mean over severities)
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["method"], r["corruption"])].append(r[key])
    corrs = list(dict.fromkeys(r["corruption"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(corrs) * max(1, len(methods) / 2)), 4))
    w = 0.8 / len(methods)
    for k, m in enumerate(methods):
        vals = [sum(acc[(m, c)]) / len(acc[(m, c)]) if acc[(m, c)] else 0 for c in corrs]
        ax.bar([i + k * w for i in range(len(corrs))], vals, w, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(corrs))])
    ax.set_xticklabels(corrs, rotation=45, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"{cfg.dataset}, {cfg.protocol}, batch {cfg.batch_size}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over the bars
    fig.tight_layout()
    paths.append(_save(fig, out / "corruption_bars.png", plt))
    # accuracy vs severity
    sevs = sorted({r["severity"] for r in rows})
    if len(sevs) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        for m in methods:
            ys = [_mean([r[key] for r in rows if r["method"] == m and r["severity"] == s]) for s in sevs]
            ax.plot(sevs, ys, marker="o", label=m)
        ax.set_xlabel("severity")
        ax.set_ylabel(f"mean {label}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, out / "accuracy_vs_severity.png", plt))
    # shift score vs error
    if result.shift:
        fig, ax = plt.subplots(figsize=(5, 4))
        for m in methods:
            pts = [
                (result.shift[r["domain"]], r["error"])
                for r in rows
                if r["method"] == m and r["domain"] in result.shift
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=14, label=f"{m} (r={pearson(list(xs), list(ys)):.2f})")
        ax.set_xlabel("shift score (W2 between source and test BN statistics)")
        ax.set_ylabel("error (%)" if key == "accuracy" else f"100 - {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "shift_vs_error.png", plt))
    if getattr(result, "examples", None):
        paths.append(_segmentation_examples(plt, result.examples, out / "segmentation_examples.png"))
    return paths


def _segmentation_examples(plt: Any, examples: dict[str, dict[str, Any]], path: Path, rows: int = 6) -> Path:
    """One row per domain (clean first, then up to ``rows - 1`` shifts): the first image, its labels and each
    method's prediction (background black, classes in tab20 colours)."""
    from matplotlib.colors import ListedColormap

    from adaptkit.data.datasets import as_unit_float

    names = sorted(examples, key=lambda d: (d != "clean", list(examples).index(d)))[:rows]
    methods = [k for k in examples[names[0]] if k not in ("image", "target")]
    cols = 2 + len(methods)
    colors = [(0.0, 0.0, 0.0, 1.0), *plt.get_cmap("tab20").colors]
    cmap = ListedColormap(colors[:256])
    fig, axes = plt.subplots(len(names), cols, figsize=(1.7 * cols, 1.8 * len(names)), squeeze=False)
    for i, d in enumerate(names):
        ex = examples[d]
        img = as_unit_float(ex["image"][0]).float()
        panels = [("image", img.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), None)]
        panels.append(("labels", ex["target"][0].numpy(), cmap))
        panels += [(m, ex[m][0].numpy(), cmap) for m in methods if m in ex]
        for j, (title, arr, cm) in enumerate(panels):
            ax = axes[i][j]
            if cm is None:
                ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            else:
                ax.imshow(arr, cmap=cm, vmin=0, vmax=len(colors) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(d, fontsize=7)
    fig.tight_layout()
    return _save(fig, path, plt)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else math.nan


def _sweep_plots(
    plt: Any, rows: list[dict[str, Any]], cfg: Any, out: Path, key: str = "accuracy", label: str = "accuracy (%)"
) -> list[Path]:
    paths = []
    param_keys = [k for k in cfg.sweep if "." in k]
    other = [k for k in cfg.sweep if "." not in k]
    for pk in param_keys:
        meth = pk.split(".")[0]
        sub = [r for r in rows if r["base_method"] == meth]
        panels = sorted({tuple(r.get(k) for k in other if k != "batch_size") for r in sub}, key=str)
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.8), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            keep = [r for r in sub if tuple(r.get(k) for k in other if k != "batch_size") == panel]
            for bs in sorted({r["batch_size"] for r in keep}):
                pts = defaultdict(list)
                for r in keep:
                    if r["batch_size"] == bs:
                        pts[r[pk]].append(r[key])
                xs = sorted(pts, key=lambda v: float(v))
                labels = ["inf" if math.isinf(float(v)) else str(v) for v in xs]
                ax.plot(range(len(xs)), [_mean(pts[v]) for v in xs], marker="o", label=f"batch {bs}")
                ax.set_xticks(range(len(xs)))
                ax.set_xticklabels(labels)
            title = ", ".join(f"{k}={v}" for k, v in zip([k for k in other if k != "batch_size"], panel))
            ax.set_title(title or meth)
            ax.set_xlabel(pk)
            ax.set_ylabel(f"mean {label}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / f"sweep_{pk.replace('.', '_')}.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
