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
import torch.nn as nn
import torch.nn.functional as F

import adaptkit


def make_data(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` in [0, 1]: class ``k`` is a bright square in quadrant ``k``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.2 + 0.2 * torch.rand(n, 1, size, size, generator=gen)
    h = size // 2
    for k in range(4):
        i, j = (k // 2) * h, (k % 2) * h
        x[y == k, :, i + 3 : i + h - 3, j + 3 : j + h - 3] += 0.5
    return x.expand(-1, 3, -1, -1).clamp(0, 1).contiguous(), y


def shift(x: torch.Tensor, seed: int, contrast: float = 0.5, noise: float = 0.45) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + contrast * (x - mean) + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, 32),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32, classes)  # the final classifier: LAME reads its input features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def train(model: nn.Module, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for s in range(steps):
        x, y = make_data(64, seed=10_000 + s)
        x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(predict: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((predict(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def fingerprint(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], int]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def unchanged(a: tuple, b: tuple) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


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
