"""LAME on a class-correlated (non-i.i.d.) test stream: output-only correction, the model never changes.

1. Train a small BatchNorm CNN for a few seconds on a synthetic 4-class task (a bright square in one of the four
   quadrants on a textured background).
2. Shift the test images (contrast reduced, strong gaussian noise) and feed them in two orders: shuffled (i.i.d.)
   and sorted by class, batches of 32 (the non-i.i.d. streams LAME was built for: a batch holds few classes).
3. Compare the source model with LAME's three affinities (``rbf`` default, ``knn``, ``linear``), each inside a
   ``with`` block; LAME returns ``log Y`` (argmax = its prediction) and changes no parameter or buffer.

Run: ``python examples/lame_example.py`` (about 10-20 s on one CPU core); ``--quick`` (or the environment variable
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
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    iid = perm
    sorted_ = torch.argsort(y, stable=True)
    streams = {
        name: [(x[idx[i : i + args.batch]], y[idx[i : i + args.batch]]) for i in range(0, len(y), args.batch)]
        for name, idx in [("i.i.d.", iid), ("class-sorted", sorted_)]
    }

    before = fingerprint(model)
    rows = [("source", {k: accuracy(model, v) for k, v in streams.items()})]
    for affinity in ("rbf", "knn", "linear"):
        accs = {}
        for name, batches in streams.items():
            with adaptkit.LAME(model, affinity=affinity) as lame:
                accs[name] = accuracy(lame, batches)
        rows.append((f"LAME(affinity={affinity!r})", accs))

    print(f"\nshifted test set: {len(y)} images, batches of {args.batch}; accuracy %")
    print(f"{'method':<28} {'i.i.d.':>8} {'class-sorted':>13}")
    for label, accs in rows:
        print(f"{label:<28} {accs['i.i.d.']:>8.1f} {accs['class-sorted']:>13.1f}")
    print(f"model unchanged after the with block: {unchanged(before, fingerprint(model))}")


if __name__ == "__main__":
    main()
