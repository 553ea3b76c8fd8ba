"""Speed and fidelity of ``adaptkit.data.corruptions`` against the reference ``imagecorruptions`` package.

Runs both implementations on the same synthetic 224 px scenes, on this machine, in one process:

* speed: images per second (adaptkit: one batched call; reference: a Python loop over PIL images, as it is used);
* fidelity: per corruption and severity, the mean, the standard deviation and the mean absolute difference to the
  clean image of the outputs (in ``[0, 1]``), both at the ImageNet constants.

Random corruptions cannot match pixel for pixel (different random streams), so compare the statistics; the
deterministic ones should agree to 8-bit rounding. ``elastic_transform`` differs by design: imagecorruptions
re-parameterised it (see ``adaptkit/data/corruptions/elastic.py``); ``frost`` uses procedural textures.

Usage::

    pip install imagecorruptions-imaug   # reference (import name ``imagecorruptions``)
    python benchmarks/corruptions.py --images 8 --severities 1 3 5 --json corruptions_bench.json
    python benchmarks/corruptions.py --device cuda --images 64   # adaptkit on GPU, reference on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from adaptkit.data.corruptions import corrupt, list_corruptions


def scenes(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish RGB images: smooth random background, flat rectangles, mild noise; quantised to 8 bits."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, 6, 6, generator=g), size=size, mode="bicubic", align_corners=False)
    x = 0.1 + 0.8 * x.clamp(0, 1)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(b):
        for _ in range(6):
            r0, c0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
            h, w = torch.randint(6, size // 2, (2,), generator=g).tolist()
            inside = (ys >= r0) & (ys < r0 + h) & (xs >= c0) & (xs < c0 + w)
            x[i] = torch.where(inside, torch.rand(3, 1, 1, generator=g), x[i])
    x = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


def stats(y: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    return {"mean": y.mean().item(), "std": y.std().item(), "mad": (y - x).abs().mean().item()}


def run_adaptkit(x: torch.Tensor, name: str, severity: int, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    xd = x.to(device)
    y = corrupt(xd, name, severity, generator=0, preset="imagenet")  # warm-up (and lazy imports)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for r in range(repeats):
        y = corrupt(xd, name, severity, generator=r, preset="imagenet")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    return x.shape[0] / dt, y.float().cpu()


def run_reference(x: torch.Tensor, name: str, severity: int, ic: Any) -> tuple[float, torch.Tensor]:
    import numpy as np
    from PIL import Image

    imgs = [Image.fromarray((xi.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for xi in x]
    fn = getattr(ic, name)
    np.random.seed(0)
    fn(imgs[0], severity)  # warm-up (numba compilation of glass_blur)
    outs = []
    t0 = time.perf_counter()
    for im in imgs:
        outs.append(np.clip(np.asarray(fn(im, severity), dtype=np.float64), 0, 255) / 255)
    dt = time.perf_counter() - t0
    y = torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).float()
    return len(imgs) / dt, y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8, help="images per corruption and severity")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--corruptions", nargs="+", default=list_corruptions(extra=True))
    p.add_argument("--device", default="cpu", help="device for adaptkit (the reference always runs on the CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed adaptkit calls per cell")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    p.add_argument("--no-reference", action="store_true", help="time adaptkit only")
    p.add_argument("--json", default="corruptions_bench.json", help="output JSON path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    ic = None
    if not args.no_reference:
        try:
            import imagecorruptions.corruptions as ic
        except ImportError:
            print("imagecorruptions not installed (pip install imagecorruptions-imaug): timing adaptkit only")
    x = scenes(args.images, args.size)
    rows = []
    header = (
        f"{'corruption':18s} sev | {'adaptkit img/s':>14s} {'ref img/s':>9s} {'speedup':>7s} | "
        f"{'mean ak/ref':>13s} {'std ak/ref':>13s} {'mad ak/ref':>13s}"
    )
    print(header)
    print("-" * len(header))
    for name in args.corruptions:
        for s in args.severities:
            ak_ips, y = run_adaptkit(x, name, s, args.device, args.repeats)
            row: dict[str, Any] = {"corruption": name, "severity": s, "adaptkit_ips": ak_ips, "adaptkit": stats(y, x)}
            line = f"{name:18s} {s:3d} | {ak_ips:14.1f} "
            if ic is not None:
                ref_ips, yr = run_reference(x, name, s, ic)
                row.update(reference_ips=ref_ips, reference=stats(yr, x), speedup=ak_ips / ref_ips)
                a, r = row["adaptkit"], row["reference"]
                line += (
                    f"{ref_ips:9.1f} {ak_ips / ref_ips:7.1f} | {a['mean']:6.3f}/{r['mean']:6.3f} "
                    f"{a['std']:6.3f}/{r['std']:6.3f} {a['mad']:6.3f}/{r['mad']:6.3f}"
                )
            print(line, flush=True)
            rows.append(row)
    result = {
        "images": args.images,
        "size": args.size,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "clean": stats(x, x),
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
