"""Speed and fidelity of ``adaptkit.data.corruptions`` against the reference ``imagecorruptions`` package.

Two modes, both in one process on this machine:

* **speed** (default): images per second of adaptkit (one batched call on ``--batch-size`` images) and of the
  reference (``imagecorruptions.corruptions.<name>`` on PIL images, one at a time, as it is used), per
  corruption and severity. Both sides run with the same number of CPU threads (``--threads``, default 1: the
  reference is single-threaded NumPy / SciPy / OpenCV; torch, OpenCV and the BLAS pools are limited to it).
  Timings interleave the two sides (``--repeats`` rounds) and report medians, because shared machines are noisy.
  The table also gives output statistics on the same synthetic scenes (mean, std, mean abs difference to clean).
  The reference always applies its ImageNet constants; adaptkit uses ``--preset`` (``auto``: CIFAR constants up
  to 64 px). Input: float ``(B, 3, S, S)`` tensors in ``[0, 1]`` for adaptkit, ``uint8`` PIL images for the
  reference.
* **fidelity** (``--fidelity``): accuracy of the built-in Fashion-MNIST source model on ``--n`` test images
  corrupted at ``--severity`` (5) by the reference and by adaptkit with the *same* constants
  (``preset="imagenet"``). imagecorruptions needs RGB images of at least 32 px, so the 28 px gray images are
  resized to 32 px (bilinear), quantised to 8 bits and replicated to 3 channels; both versions corrupt these
  same images, the results are averaged over the channels and resized back to 28 px for the model. The check
  of the issue: the two accuracies agree within 3 points. ``elastic_transform[ic]`` is adaptkit's elastic
  transform with the imagecorruptions parameterisation (no affine step; ``alpha = 0.15 S``, ``sigma = 0.01 S``
  at severity 5), ``elastic_transform`` uses the Hendrycks (ImageNet-C) constants.

Usage::

    pip install imagecorruptions-imaug   # reference (import name ``imagecorruptions``)
    python benchmarks/corruptions.py --size 224 --batch-size 64 --json benchmarks/results/corruptions_speed.json
    python benchmarks/corruptions.py --size 32 --batch-size 256 --preset cifar
    python benchmarks/corruptions.py --fidelity --json benchmarks/results/corruptions_fidelity.json
"""

from __future__ import annotations

import os
import sys


def _early_threads(argv: list[str]) -> int:
    """``--threads`` from the command line, applied to the BLAS / OpenMP pools before NumPy is imported."""
    n = 1
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    return n


if __name__ == "__main__":
    _early_threads(sys.argv[1:])

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adaptkit.data.corruptions import corrupt, list_corruptions  # noqa: E402


def scenes(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish RGB images: smooth random background, flat rectangles, mild noise; quantised to 8 bits."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, 6, 6, generator=g), size=size, mode="bicubic", align_corners=False)
    x = 0.1 + 0.8 * x.clamp(0, 1)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(b):
        for _ in range(6):
            r0, c0 = torch.randint(0, max(1, size - 8), (2,), generator=g).tolist()
            h, w = torch.randint(max(2, size // 16), max(3, size // 2), (2,), generator=g).tolist()
            inside = (ys >= r0) & (ys < r0 + h) & (xs >= c0) & (xs < c0 + w)
            x[i] = torch.where(inside, torch.rand(3, 1, 1, generator=g), x[i])
    x = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


def stats(y: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation and mean absolute difference to the clean ``x`` of the outputs ``y``."""
    return {"mean": y.mean().item(), "std": y.std().item(), "mad": (y - x).abs().mean().item()}


def _import_reference() -> Any:
    try:
        import imagecorruptions.corruptions as ic
    except ImportError:
        return None
    return ic


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------------ speed
def _time_adaptkit(x: torch.Tensor, name: str, severity: int, preset: str, device: str, seed: int) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    corrupt(x, name, severity, generator=seed, preset=preset)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_reference(imgs: list[Any], name: str, severity: int, ic: Any) -> float:
    fn = getattr(ic, name)
    t0 = time.perf_counter()
    for im in imgs:
        fn(im, severity)
    return time.perf_counter() - t0


def _reference_outputs(imgs: list[Any], name: str, severity: int, ic: Any) -> torch.Tensor:
    import numpy as np

    np.random.seed(0)
    outs = [np.clip(np.asarray(getattr(ic, name)(im, severity), dtype=np.float64), 0, 255) / 255 for im in imgs]
    return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).float()


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timing of both implementations; prints the table and returns the JSON record."""
    import numpy as np
    from PIL import Image

    ic = None if args.no_reference else _import_reference()
    if ic is None and not args.no_reference:
        print("imagecorruptions not installed (pip install imagecorruptions-imaug): timing adaptkit only")
    x = scenes(args.batch_size, args.size)
    xd = x.to(args.device)
    n_ref = min(args.ref_images, args.batch_size)
    imgs = [Image.fromarray((xi.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for xi in x[:n_ref]]
    rows: list[dict[str, Any]] = []
    header = (
        f"{'corruption':18s} sev | {'adaptkit img/s':>14s} {'ref img/s':>9s} {'ratio':>7s} | "
        f"{'mean ak/ref':>13s} {'std ak/ref':>13s} {'mad ak/ref':>13s}"
    )
    print(
        f"speed: {args.size} px, adaptkit batch {args.batch_size} (preset {args.preset!r}, {args.device}), "
        f"reference {n_ref} images one by one (ImageNet constants), {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats} interleaved rounds"
    )
    print(header)
    print("-" * len(header))
    for name in args.corruptions:
        for s in args.severities:
            y = corrupt(xd, name, s, generator=0, preset=args.preset).float().cpu()  # warm-up, lazy imports
            row: dict[str, Any] = {"corruption": name, "severity": s, "adaptkit": stats(y, x)}
            ak_t, ref_t = [], []
            if ic is not None:
                yr = _reference_outputs(imgs, name, s, ic)  # warm-up (numba compilation of glass_blur)
                row["reference"] = stats(yr, x[:n_ref])
            for r in range(args.repeats):
                ak_t.append(_time_adaptkit(xd, name, s, args.preset, args.device, r + 1))
                if ic is not None:
                    ref_t.append(_time_reference(imgs, name, s, ic))
            row["adaptkit_ips"] = args.batch_size / statistics.median(ak_t)
            row["adaptkit_times_s"] = ak_t
            line = f"{name:18s} {s:3d} | {row['adaptkit_ips']:14.1f} "
            if ic is not None:
                row["reference_ips"] = n_ref / statistics.median(ref_t)
                row["reference_times_s"] = ref_t
                row["ratio"] = row["adaptkit_ips"] / row["reference_ips"]
                a, rr = row["adaptkit"], row["reference"]
                line += (
                    f"{row['reference_ips']:9.1f} {row['ratio']:7.1f} | {a['mean']:6.3f}/{rr['mean']:6.3f} "
                    f"{a['std']:6.3f}/{rr['std']:6.3f} {a['mad']:6.3f}/{rr['mad']:6.3f}"
                )
            print(line, flush=True)
            rows.append(row)
    if ic is not None:
        ratios = [r["ratio"] for r in rows]
        below = sorted({(r["corruption"], r["severity"], round(r["ratio"], 1)) for r in rows if r["ratio"] < 10})
        print(f"ratio: min {min(ratios):.1f}, median {statistics.median(ratios):.1f}; below 10x: {below or 'none'}")
    return {
        "mode": "speed",
        "size": args.size,
        "batch_size": args.batch_size,
        "reference_images": n_ref,
        "preset": args.preset,
        "repeats": args.repeats,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clean": stats(x, x),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------- fidelity
def _wait_for_model(timeout_s: float = 1800.0) -> torch.nn.Module:
    from adaptkit.bench.models import cache_dir, fmnist_source_model

    folder = cache_dir() / "models"

    def cached() -> bool:  # the file name carries a version tag, e.g. fmnist_smallresnet_v2_w16_e3_s0.pt
        return any(folder.glob("fmnist_smallresnet*_w16_e3_s0.pt"))

    if not cached():
        print(f"waiting for the Fashion-MNIST source model in {folder} (another process may be training it) ...")
    t0 = time.time()
    while not cached() and time.time() - t0 < timeout_s:
        time.sleep(10)
    return fmnist_source_model(progress=False)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return 100.0 * (pred == y).float().mean().item()


def run_fidelity(args: argparse.Namespace) -> dict[str, Any]:
    """Model accuracy on reference- vs adaptkit-corrupted Fashion-MNIST test images at one severity."""
    import numpy as np

    from adaptkit.data.datasets import FashionMNIST

    ic = _import_reference()
    if ic is None:
        raise SystemExit("--fidelity needs the reference: pip install imagecorruptions-imaug")
    import imagecorruptions

    model = _wait_for_model()
    xs, ys = FashionMNIST().tensors()
    idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))[: args.n]
    x28, y = xs[idx], ys[idx]
    side = args.fidelity_size
    x_up = F.interpolate(x28, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
    x_up = torch.round(x_up.clamp(0, 1) * 255) / 255  # the 8-bit images both versions corrupt
    x3 = x_up.expand(-1, 3, -1, -1).contiguous()
    imgs = (x3.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    def to_model(z3: torch.Tensor) -> torch.Tensor:
        g = z3.mean(dim=1, keepdim=True)
        return F.interpolate(g, size=(28, 28), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)

    acc_clean28 = _accuracy(model, x28, y)
    acc_clean = _accuracy(model, to_model(x3), y)
    print(
        f"fidelity: {args.n} Fashion-MNIST test images, 28 -> {side} px (bilinear, 8 bits, gray replicated to RGB) "
        f"-> corrupt (severity {args.severity}, ImageNet constants) -> channel mean -> 28 px; "
        f"clean accuracy {acc_clean28:.1f} % (28 px), {acc_clean:.1f} % (after the 28 -> {side} -> 28 round trip)"
    )
    header = (
        f"{'corruption':22s} | {'acc ref':>7s} {'acc ak':>7s} {'diff':>6s} | {'mean ref/ak':>13s} "
        f"{'std ref/ak':>13s} {'mad ref/ak':>13s} | flag"
    )
    print(header)
    print("-" * len(header))
    names = [*args.corruptions, "elastic_transform[ic]"]
    rows = []
    for name in names:
        base = name.split("[")[0]
        np.random.seed(0)
        ref = np.stack([imagecorruptions.corrupt(im, args.severity, base) for im in imgs])
        x_ref = torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255
        kw: dict[str, Any] = {}
        if name == "elastic_transform[ic]":  # imagecorruptions' parameters as fractions of 244 * S / 224
            scale = 224.0 / 244.0
            alpha = [0.05, 0.065, 0.085, 0.1, 0.12][args.severity - 1] * 250 * 0.005
            kw = {"alpha": alpha * scale, "sigma": 0.01 * scale, "affine": 0.0}
        x_ak = torch.cat(
            [
                corrupt(x3[i : i + 250], base, args.severity, generator=i, preset="imagenet", **kw)
                for i in range(0, len(x3), 250)
            ]
        )
        acc_ref = _accuracy(model, to_model(x_ref), y)
        acc_ak = _accuracy(model, to_model(x_ak), y)
        sr, sa = stats(x_ref, x3), stats(x_ak, x3)
        diff = acc_ak - acc_ref
        flag = "> 3 points" if abs(diff) > 3 else ""
        print(
            f"{name:22s} | {acc_ref:7.1f} {acc_ak:7.1f} {diff:+6.1f} | {sr['mean']:6.3f}/{sa['mean']:6.3f} "
            f"{sr['std']:6.3f}/{sa['std']:6.3f} {sr['mad']:6.3f}/{sa['mad']:6.3f} | {flag}",
            flush=True,
        )
        rows.append(
            {"corruption": name, "acc_reference": acc_ref, "acc_adaptkit": acc_ak, "diff": diff, "reference": sr,
             "adaptkit": sa, "within_3": abs(diff) <= 3}
        )  # fmt: skip
    bad = [r["corruption"] for r in rows if not r["within_3"]]
    print(f"within 3 points: {len(rows) - len(bad)}/{len(rows)}; differing: {bad or 'none'}")
    return {
        "mode": "fidelity",
        "n": args.n,
        "severity": args.severity,
        "size": side,
        "preset": "imagenet",
        "acc_clean_28": acc_clean28,
        "acc_clean_roundtrip": acc_clean,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--fidelity", action="store_true", help="accuracy check on Fashion-MNIST instead of speed")
    p.add_argument("--size", type=int, default=224, help="image side (speed)")
    p.add_argument("--batch-size", type=int, default=64, help="adaptkit batch (speed)")
    p.add_argument("--ref-images", type=int, default=8, help="images the reference corrupts per round (speed)")
    p.add_argument("--preset", default="auto", help="adaptkit constants: auto, cifar or imagenet (speed)")
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--corruptions", nargs="+", default=list_corruptions(extra=True))
    p.add_argument("--device", default="cpu", help="device for adaptkit (the reference always runs on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (torch, OpenCV, BLAS)")
    p.add_argument("--no-reference", action="store_true", help="time adaptkit only")
    p.add_argument("--n", type=int, default=1000, help="test images (fidelity)")
    p.add_argument("--severity", type=int, default=5, help="severity (fidelity)")
    p.add_argument("--fidelity-size", type=int, default=32, help="side the reference corrupts at (fidelity)")
    p.add_argument("--json", default=None, help="output JSON path")
    args = p.parse_args(argv)
    _early_threads(["--threads", str(args.threads)])
    _set_threads(args.threads)
    warnings.filterwarnings("ignore")
    result = run_fidelity(args) if args.fidelity else run_speed(args)
    result.update(torch=torch.__version__, python=platform.python_version(), machine=platform.machine())
    try:
        import imagecorruptions

        result["reference_version"] = getattr(imagecorruptions, "__version__", "imagecorruptions-imaug")
    except ImportError:
        pass
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
