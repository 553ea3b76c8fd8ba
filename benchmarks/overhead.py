"""Overhead of adaptkit against in-run baselines, all in one process.

Measures, with warm-up, interleaved A/B timings (``time.perf_counter``) and the median of the repeats:

1. ``BNAdapt(N=16)`` forward vs the plain eval forward of the same torchvision model (goal <= 1.10x);
   also the same wrapper with the previous ``torch.var_mean`` moments ("before"), and a micro-benchmark
   of the per-channel moment computation on the model's actual BatchNorm input shapes.
2. An ``adaptkit.Tent`` step vs a reference Tent step written here (the DequanWang/tent recipe on a
   deepcopy of the model) (goal <= 1.0x, reported with the band of the per-pair ratios).
3. ``Tent.reset()`` vs one Tent step (goal <= 5 %).
4. Memory over 1,000 online Tent batches on a small model: RSS and the live tensor count (``gc``) at
   batches 10, 500 and 1,000 (goal: flat).

Models use random weights (``weights=None``); nothing is downloaded.

Usage::

    python benchmarks/overhead.py --json /tmp/overhead.json          # default run (~10 min on 1 core)
    python benchmarks/overhead.py --quick --json /tmp/overhead.json  # smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
import torchvision

import adaptkit
import adaptkit.core.bn as core_bn
from adaptkit.functional.moments import Moments, batch_moments

GOALS = {"bnadapt": 1.10, "tent": 1.0, "reset": 0.05}


# ---------------------------------------------------------------------------------------------- helpers
def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A torchvision classifier with random weights, in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, alternating them (order rotated each round) to cancel drift."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            times[n].append(timed(fns[n]))
    return times


def ratio_summary(base: list[float], other: list[float]) -> dict[str, float]:
    """Ratio of medians and the band (min, max) of the per-round ratios."""
    pairs = [o / b for o, b in zip(other, base)]
    return {
        "ratio": statistics.median(other) / statistics.median(base),
        "band_lo": min(pairs),
        "band_hi": max(pairs),
        "base_median_s": statistics.median(base),
        "median_s": statistics.median(other),
    }


def rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``; falls back to the peak from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensors() -> int:
    """Number of live ``torch.Tensor`` objects tracked by the garbage collector."""
    gc.collect()
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module attributes warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    count += 1
            except Exception:  # exotic objects may fail isinstance through __class__
                pass
    return count


def cpu_name() -> str:
    """The CPU model string from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------- moments
def var_mean_moments(x: torch.Tensor, dtype: torch.dtype | None = None) -> Moments:
    """The previous ``batch_moments``: one ``torch.var_mean`` over every dim but 1 (the "before" path)."""
    dtype = dtype or (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    x = x.to(dtype)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=1)
    return Moments(mean, var, x.numel() // x.shape[1], x.shape[0])


def raw_sums_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares in one go (fast but cancels catastrophically when ``|mean| >> std``)."""
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    s, ss = x.sum(dim=dims), x.square().sum(dim=dims)
    mean = s / n
    return (ss - s * mean) / (n - 1), mean


def transpose_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.transpose(0, 1).reshape(C, -1).var_mean(1)`` (a full copy, then a contiguous reduction)."""
    return torch.var_mean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1, correction=1)


@contextlib.contextmanager
def patched_moments(fn: Callable[..., Moments]) -> Iterator[None]:
    """Make ``adaptkit.core.bn`` use ``fn`` as its ``batch_moments`` for the duration."""
    saved = core_bn.batch_moments
    core_bn.batch_moments = fn  # type: ignore[assignment]
    try:
        yield
    finally:
        core_bn.batch_moments = saved  # type: ignore[assignment]


def bn_input_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the inputs of every BatchNorm layer for one forward of ``x``."""
    shapes: list[tuple[int, ...]] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, inp: shapes.append(tuple(inp[0].shape)))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def moments_micro(shapes: list[tuple[int, ...]], repeats: int) -> dict[str, Any]:
    """Total time over the model's BN inputs of each moment computation, and its error vs float64."""
    cands: dict[str, Callable[[torch.Tensor], Any]] = {
        "var_mean (before)": lambda t: var_mean_moments(t),
        "batch_moments (now)": lambda t: batch_moments(t),
        "transpose+var_mean": transpose_moments,
        "raw sum/sumsq": raw_sums_moments,
    }
    totals = dict.fromkeys(cands, 0.0)
    errors = dict.fromkeys(cands, 0.0)
    counts: dict[tuple[int, ...], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    g = torch.Generator().manual_seed(0)
    for shape, n in counts.items():
        c = shape[1]
        # channel means up to 30 std away from zero: the regime where naive sums lose precision
        x = torch.randn(*shape, generator=g) * (0.1 + torch.rand(c, generator=g)).view(1, c, *[1] * (len(shape) - 2))
        x += (30 * torch.randn(c, generator=g)).view(1, c, *[1] * (len(shape) - 2))
        ref_var = torch.var(x.double(), dim=[0, *range(2, x.dim())])
        for name, fn in cands.items():
            out = fn(x)
            var = out.var if isinstance(out, Moments) else out[0]
            errors[name] = max(errors[name], float(((var.double() - ref_var).abs() / ref_var).max()))
        times = interleaved({k: partial(f, x) for k, f in cands.items()}, repeats, warmup=1)
        for name in cands:
            totals[name] += min(times[name]) * n
        del x
    return {"total_s": totals, "max_rel_err_vs_float64": errors, "layers": len(shapes)}


# ---------------------------------------------------------------------------------------------- parts
def part_bnadapt(args: argparse.Namespace) -> dict[str, Any]:
    """BNAdapt(N=16) forward vs the plain eval forward (and the var_mean "before" path)."""
    base = build_model(args.model)
    wrapped = adaptkit.BNAdapt(copy.deepcopy(base), N=16)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))

    def plain() -> None:
        with torch.no_grad():
            base(x)

    def before() -> None:
        with patched_moments(var_mean_moments):
            wrapped(x)

    fns: dict[str, Callable[[], Any]] = {"plain": plain, "bnadapt": lambda: wrapped(x)}
    if args.before:
        fns["bnadapt_var_mean"] = before
    times = interleaved(fns, args.repeats)
    out: dict[str, Any] = {"times_s": times, "bnadapt": ratio_summary(times["plain"], times["bnadapt"])}
    if args.before:
        out["bnadapt_var_mean"] = ratio_summary(times["plain"], times["bnadapt_var_mean"])
    if args.micro:
        out["moments_micro"] = moments_micro(bn_input_shapes(base, x), repeats=3)
        out["moments_micro"]["plain_forward_s"] = statistics.median(times["plain"])
    wrapped.restore()
    return out


def reference_tent(model: nn.Module, lr: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """The DequanWang/tent recipe: train mode, BN affine only, batch statistics (buffers deleted), Adam."""
    model.train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            params += [m.weight, m.bias]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @torch.enable_grad()
    def step(x: torch.Tensor) -> torch.Tensor:
        outputs = model(x)
        loss = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return outputs

    return step


def part_tent(args: argparse.Namespace) -> dict[str, Any]:
    """adaptkit.Tent step vs the reference step, then ``reset()`` vs one step."""
    base = build_model(args.model)
    tent = adaptkit.Tent(copy.deepcopy(base), lr=1e-3)
    ref = reference_tent(copy.deepcopy(base), lr=1e-3)
    bs = args.tent_batch_size
    x = torch.randn(bs, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(2))
    times = interleaved({"reference": lambda: ref(x), "adaptkit": lambda: tent(x)}, args.tent_repeats)
    tent_summary = ratio_summary(times["reference"], times["adaptkit"])
    step_s = statistics.median(times["adaptkit"])
    tent.reset()  # warm-up
    reset_times = [timed(tent.reset) for _ in range(args.reset_repeats)]
    reset_s = statistics.median(reset_times)
    tent.restore()
    return {
        "times_s": times,
        "tent": tent_summary,
        "reset": {"reset_s": reset_s, "step_s": step_s, "ratio": reset_s / step_s, "times_s": reset_times},
    }


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    """RSS and live tensor count over online Tent batches on a small model."""
    model = build_model(args.memory_model, num_classes=10)
    tent = adaptkit.Tent(model, lr=1e-3)
    n = args.memory_batches
    checkpoints = sorted({10, n // 2, n})
    g = torch.Generator().manual_seed(3)
    records = []
    start = time.perf_counter()
    for i in range(1, n + 1):
        x = torch.randn(args.memory_batch_size, 3, args.memory_image_size, args.memory_image_size, generator=g)
        tent(x)
        if i in checkpoints:
            records.append({"batch": i, "rss_mib": rss_bytes() / 2**20, "tensors": live_tensors()})
    elapsed = time.perf_counter() - start
    tent.restore()
    first, mid, last = records[0], records[len(records) // 2], records[-1]
    rss_growth = last["rss_mib"] - mid["rss_mib"]
    tensor_growth = last["tensors"] - mid["tensors"]
    return {
        "records": records,
        "elapsed_s": elapsed,
        "rss_growth_mib_first_to_last": last["rss_mib"] - first["rss_mib"],
        "rss_growth_mib_mid_to_last": rss_growth,
        "tensor_growth_first_to_last": last["tensors"] - first["tensors"],
        "tensor_growth_mid_to_last": tensor_growth,
        "flat": tensor_growth <= 0 and rss_growth < 8.0,
    }


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks everything for a smoke run)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="torchvision model for parts 1-3")
    p.add_argument("--batch-size", type=int, default=64, help="batch for the BNAdapt forward")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds for the forwards (after 1 warm-up)")
    p.add_argument("--tent-batch-size", type=int, default=16, help="batch for the Tent step (parts 2-3)")
    p.add_argument("--tent-repeats", type=int, default=5, help="timed rounds for the Tent steps")
    p.add_argument("--reset-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--memory-model", default="resnet18")
    p.add_argument("--memory-batches", type=int, default=1000)
    p.add_argument("--memory-batch-size", type=int, default=16)
    p.add_argument("--memory-image-size", type=int, default=32)
    p.add_argument("--no-before", dest="before", action="store_false", help="skip the var_mean 'before' path")
    p.add_argument("--no-micro", dest="micro", action="store_false", help="skip the moments micro-benchmark")
    p.add_argument("--parts", default="1,2,3,4", help="comma list of parts to run (3 needs 2)")
    p.add_argument("--quick", action="store_true", help="resnet18, bs 8, 64 px, 100 memory batches")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.image_size = "resnet18", 8, 64
        args.tent_batch_size, args.repeats, args.tent_repeats, args.reset_repeats = 8, 3, 3, 10
        args.memory_batches = 100
    return args


def fmt_ratio(r: dict[str, float]) -> str:
    """``1.05x [0.98-1.10]``."""
    return f"{r['ratio']:.3f}x [{r['band_lo']:.3f}-{r['band_hi']:.3f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts, print a table and write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = {int(p) for p in args.parts.split(",") if p}
    res: dict[str, Any] = {
        "config": vars(args),
        "machine": {
            "cpu": cpu_name(),
            "cpus_visible": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": sys.version.split()[0],
            "adaptkit": adaptkit.__version__,
            "loadavg_start": os.getloadavg(),
        },
    }
    t0 = time.perf_counter()
    if 1 in parts:
        print(f"[1] BNAdapt vs plain: {args.model} bs {args.batch_size} @ {args.image_size}px", flush=True)
        res["bnadapt"] = part_bnadapt(args)
    if parts & {2, 3}:
        print(
            f"[2,3] Tent vs reference, reset: {args.model} bs {args.tent_batch_size} @ {args.image_size}px", flush=True
        )
        res["tent"] = part_tent(args)
    if 4 in parts:
        print(
            f"[4] memory: Tent online, {args.memory_model} bs {args.memory_batch_size} @ {args.memory_image_size}px, "
            f"{args.memory_batches} batches",
            flush=True,
        )
        res["memory"] = part_memory(args)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_s"] = time.perf_counter() - t0

    rows: list[tuple[str, str, str, str]] = []
    if "bnadapt" in res:
        b = res["bnadapt"]
        ok = b["bnadapt"]["ratio"] <= GOALS["bnadapt"]
        rows.append(("BNAdapt(N=16) / plain eval forward", fmt_ratio(b["bnadapt"]), "<= 1.10x", "yes" if ok else "NO"))
        if "bnadapt_var_mean" in b:
            rows.append(("  same, var_mean moments (before)", fmt_ratio(b["bnadapt_var_mean"]), "-", "-"))
    if "tent" in res:
        t = res["tent"]
        ok = t["tent"]["ratio"] <= GOALS["tent"]
        band_ok = t["tent"]["band_lo"] <= GOALS["tent"]
        verdict = "yes" if ok else ("within noise" if band_ok else "NO")
        rows.append(("adaptkit.Tent step / reference step", fmt_ratio(t["tent"]), "<= 1.0x", verdict))
        r = t["reset"]
        rows.append(
            ("Tent.reset() / Tent step", f"{100 * r['ratio']:.3f} %", "<= 5 %", "yes" if r["ratio"] <= 0.05 else "NO")
        )
    if "memory" in res:
        m = res["memory"]
        desc = ", ".join(f"#{r['batch']}: {r['rss_mib']:.0f} MiB / {r['tensors']} tensors" for r in m["records"])
        rows.append(("memory over online Tent batches", desc, "flat", "yes" if m["flat"] else "NO"))
    width = max(len(r[0]) for r in rows) if rows else 10
    print()
    print(f"{'measure':<{width}}  {'result':<40}  {'goal':<9}  met")
    for name, val, goal, met in rows:
        print(f"{name:<{width}}  {val:<40}  {goal:<9}  {met}")
    if "bnadapt" in res and "moments_micro" in res["bnadapt"]:
        mm = res["bnadapt"]["moments_micro"]
        print(
            f"\nmoments over the {mm['layers']} BN inputs (sum of per-layer best; "
            f"plain forward {mm['plain_forward_s']:.2f} s):"
        )
        for k, v in mm["total_s"].items():
            print(f"  {k:<22} {v:8.3f} s   max rel err vs float64 {mm['max_rel_err_vs_float64'][k]:.1e}")
    print(
        f"\nwall {res['wall_s']:.0f} s, load average "
        f"{res['machine']['loadavg_start']} -> {res['machine']['loadavg_end']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
