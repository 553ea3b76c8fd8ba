"""T3A on a shifted test stream: the linear classifier replaced by prototypes of confident test features.

1. Train a small BatchNorm CNN for a few seconds on a synthetic 4-class task (a bright square in one of the four
   quadrants on a textured background).
2. Shift the test images (contrast reduced, strong gaussian noise) and stream them in batches of 32.
3. Compare the source model with T3A for a few ``filter_K`` values (supports kept per class), each inside a
   ``with`` block: T3A appends each batch's penultimate features to its supports, keeps the lowest-entropy ones
   per class and predicts the same batch with ``z @ prototypes.T``. The supports persist across batches;
   ``reset()`` goes back to the warm-up supports (the classifier's weight rows). No parameter or buffer changes.

Run: ``python examples/t3a_example.py`` (about 10-20 s on one CPU core); ``--quick`` (or the environment variable
``ADAPTKIT_EXAMPLES_QUICK=1``) trains for fewer steps.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _toy import SmallCNN, accuracy, fingerprint, make_data, shift, train, unchanged

import adaptkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and test samples")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = SmallCNN()
    t0 = time.perf_counter()
    train(model, 35 if quick else 150)
    print(f"trained SmallCNN in {time.perf_counter() - t0:.1f} s")

    x, y = make_data(256 if quick else 1024, seed=1)
    x = shift(x, seed=2)
    batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, len(y), args.batch)]

    before = fingerprint(model)
    rows = [("source", accuracy(model, batches), "")]
    for k in (1, 20, 100, -1):
        with adaptkit.T3A(model, filter_K=k) as t3a:
            acc = accuracy(t3a, batches)
            held = t3a.num_supports
            t3a.reset()  # back to the warm-up supports: one per class
            rows.append((f"T3A(filter_K={k})", acc, f"{held} -> {t3a.num_supports} after reset()"))

    print(f"\nshifted test stream: {len(y)} images, batches of {args.batch}")
    print(f"{'method':<20} {'accuracy %':>10}  supports held")
    for label, acc, held in rows:
        print(f"{label:<20} {acc:>10.1f}  {held}")
    print(f"model unchanged after the with block: {unchanged(before, fingerprint(model))}")


if __name__ == "__main__":
    main()
