"""CoTTA on a continual stream of corruptions: mean teacher, augmentation-averaged pseudo-labels, stochastic restore.

1. Train a small BatchNorm CNN for a few seconds on a learnable synthetic task (``adaptkit.bench.runner.
   synthetic_data``: a bright square in one quadrant of 28x28 grey images shown as 3 channels; the label is *top or
   bottom half*, which CoTTA's flips, small rotations and shifts preserve). The model normalises its input
   itself, so it takes ``[0, 1]`` pixels: what CoTTA's augmentation expects.
2. Stream the test set through several corruptions one after another, **without resetting** (CoTTA's continual
   setting), and compare the source model, Tent and CoTTA (batch-statistic BatchNorm in both).
3. Check that the model is bitwise unchanged after the ``with`` blocks.

CoTTA runs the student, the anchor and the teacher on every batch, plus ``n_augmentations`` augmented teacher forwards
when the anchor is unsure (mean confidence below ``aug_threshold``). Run: ``python examples/cotta_example.py``; the
environment variable ``ADAPTKIT_EXAMPLES_QUICK=1`` (or ``--quick``) trains and evaluates less, for smoke tests.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit
from adaptkit.bench.runner import synthetic_data
from adaptkit.data.corruptions import corrupt

CORRUPTIONS = ("gaussian_noise", "contrast", "defocus_blur", "fog")


class SmallCNN(nn.Module):
    """Normalisation inside, two Conv-BN-ReLU blocks, global pooling and a linear classifier; [0, 1] input."""

    def __init__(self, classes: int = 2, width: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features((x - self.mean) / self.std).mean((2, 3)))


def pixels(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 grey images ``(n, 1, H, W)`` -> 3-channel float pixels in ``[0, 1]``."""
    return x_uint8.float().div(255).expand(-1, 3, -1, -1).contiguous()


def train(model: nn.Module, steps: int) -> None:
    x, y = synthetic_data(n=512, seed=0)
    y = y // 2  # quadrants 0, 1: top; 2, 3: bottom (a horizontal flip keeps the label)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(pixels(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def stream_accuracy(fn: object, stream: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Accuracy over the whole stream (no reset in between) and seconds per batch."""
    correct = total = 0
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in stream:
            correct += int((fn(x).argmax(1) == y).sum())  # type: ignore[operator]
            total += len(y)
    return correct / total, (time.perf_counter() - start) / len(stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps, test images and augmentations")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK") == "1"
    torch.manual_seed(0)
    model = SmallCNN()
    train(model, steps=40 if quick else 200)

    n_test, batch, n_augmentations = (32, 16, 4) if quick else (512, 64, 32)
    x_clean, y = synthetic_data(n=n_test, seed=1)
    y = y // 2
    stream = []
    for i, name in enumerate(CORRUPTIONS):  # one domain after the other: a continual stream
        x = corrupt(pixels(x_clean), name, severity=5, generator=10 + i)
        stream += [(x[j : j + batch], y[j : j + batch]) for j in range(0, n_test, batch)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    acc, t = stream_accuracy(model, stream)
    print(f"source model              : accuracy {acc:.3f}  ({t * 1e3:.1f} ms / batch)")
    with adaptkit.Tent(model, lr=1e-3) as tent:
        acc, t = stream_accuracy(tent, stream)
    print(f"Tent (lr 1e-3, online)    : accuracy {acc:.3f}  ({t * 1e3:.1f} ms / batch)")
    # official CIFAR-10 settings (Adam 1e-3, alpha 0.999, restore 0.01, p_th 0.92), fewer augmentations in --quick
    with adaptkit.CoTTA(model, n_augmentations=n_augmentations) as cotta:
        acc, t = stream_accuracy(cotta, stream)
        conf, augmented = cotta.last_confidence, cotta.last_augmented
    print(f"CoTTA ({n_augmentations} augmentations) : accuracy {acc:.3f}  ({t * 1e3:.1f} ms / batch; last anchor "
          f"confidence {conf:.3f}, augmented: {augmented})")  # fmt: skip

    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"model unchanged after the with block: {unchanged}")


if __name__ == "__main__":
    main()
