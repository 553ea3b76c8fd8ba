"""Cost of the wrapper's input checks (``check_inputs=True``: dtype, device, finiteness, stem rank/channels) as a
ratio to the same wrapper with ``check_inputs=False``, measured in one process, rounds interleaved.

Usage::

    .venv/bin/python benchmarks/input_checks.py --model resnet50 --batch-size 16 --size 160 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
import torchvision

import adaptkit


def median_time(f: Callable[[], object], n: int) -> float:
    f()  # warm-up
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--method", default="bn_adapt")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = getattr(torchvision.models, args.model)(num_classes=10).eval()
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for checks in (False, True):
            w = adaptkit.adapt(model, args.method, check_inputs=checks)
            with torch.no_grad():
                times[checks].append(median_time(lambda: w(x), args.reps))  # noqa: B023 (called inside the loop)
            w.restore()
    ratio = min(times[True]) / min(times[False])
    # the up-front checks alone (dtype, device, empty, finite sum), timed without the model: a direct measure that the
    # noise of whole forwards on a shared machine cannot hide
    w = adaptkit.adapt(model, args.method)
    check = median_time(lambda: w._guard.check(x), 50)
    with torch.no_grad():
        plain = median_time(lambda: model(x), args.reps)
    w.restore()
    print(
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), {args.method} on {args.model}, "
        f"bs {args.batch_size} at {args.size} px"
    )
    print(f"check_inputs=False: {[round(t, 4) for t in times[False]]} s")
    print(f"check_inputs=True:  {[round(t, 4) for t in times[True]]} s")
    print(f"ratio (best of rounds): {ratio:.3f}")
    print(f"up-front checks alone: {check * 1e3:.3f} ms = {check / plain:.5f} x a plain forward ({plain:.4f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
