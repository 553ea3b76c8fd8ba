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
        self.fc = nn.Linear(32, classes)  # the final classifier: T3A replaces it by prototypes

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
