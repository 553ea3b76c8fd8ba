"""MEMO on single test images: marginal entropy over AugMix copies, one SGD step, predict the clean image.

1. Train a small BatchNorm CNN for a few seconds on a learnable synthetic task: 4 classes of 32x32 colour images
   (horizontal stripes, vertical stripes, a disc, a square; random colours, frequencies and positions). The classes
   survive MEMO's augmentations (a horizontal flip, small rotations and shifts keep the label), which a task such
   as "a square in the top-left quadrant" would not.
2. Shift the test images (contrast reduced, gaussian noise added) and classify them one at a time (batch size 1,
   MEMO's setting): the source model, ``BNAdapt(N=16)`` and ``MEMO`` (episodic: every image starts from the source
   weights; the BN layers mix source and single-image statistics with MEMO's prior ``N=16``).
3. Check that the model is bitwise unchanged after the ``with`` block.

On a toy network trained for seconds, MEMO roughly matches the source model; the paper's gains are for large
pretrained networks (ResNet-26/50, ViT) on CIFAR-10-C / ImageNet-C. MEMO costs ``n_augmentations`` forward+backward
passes per image: it is the slowest method in adaptkit, meant for one image at a time when nothing else is
available. Run: ``python examples/memo_example.py``; the environment variable ``ADAPTKIT_EXAMPLES_QUICK=1`` (or
``--quick``) trains and evaluates less, for smoke tests.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 32


class SmallCNN(nn.Module):
    """Two Conv-BN-ReLU blocks, global pooling and a linear classifier; takes normalised 3-channel input."""

    def __init__(self, classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, 32, 32)`` in ``[0, 1]`` and labels: stripes (horizontal / vertical), disc, square."""
    y = torch.randint(0, 4, (n,), generator=gen)
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    freq, phase = (2 * math.pi / (5 + 5 * u(n)))[:, None, None], (2 * math.pi * u(n))[:, None, None]
    cx, cy, r = (10 + 12 * u(n))[:, None, None], (10 + 12 * u(n))[:, None, None], (5 + 4 * u(n))[:, None, None]
    masks = torch.stack(
        [
            torch.sin(freq * yy + phase) > 0,
            torch.sin(freq * xx + phase) > 0,
            (xx - cx) ** 2 + (yy - cy) ** 2 < r**2,
            ((xx - cx).abs() < 0.9 * r) & ((yy - cy).abs() < 0.9 * r),
        ],
        dim=1,
    )
    mask = masks[torch.arange(n), y].float()[:, None]
    fg, bg = u(n, 3, 1, 1), u(n, 3, 1, 1)
    bg = torch.where((fg - bg).abs().mean(1, keepdim=True) < 0.3, 1 - fg, bg)  # keep the foreground visible
    x = mask * fg + (1 - mask) * bg + 0.04 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return x.clamp(0, 1), y


def normalize(x: torch.Tensor) -> torch.Tensor:
    """The model's input normalisation."""
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The test-time shift: contrast reduced to 40% around the image mean, then gaussian noise (std 0.1)."""
    m = x.mean((1, 2, 3), keepdim=True)
    return (m + 0.4 * (x - m) + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train(model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x, y = make_batch(64, gen)
        loss = F.cross_entropy(model(normalize(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def accuracy_one_by_one(fn: object, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and seconds per image when ``fn`` sees one image at a time."""
    correct, start = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(len(x)):
            correct += int(fn(x[i : i + 1]).argmax(1).item() == y[i].item())  # type: ignore[operator]
    return correct / len(x), (time.perf_counter() - start) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and test images")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK") == "1"
    torch.manual_seed(0)
    model = SmallCNN()
    train(model, steps=40 if quick else 150)

    n_test, copies = (12, 8) if quick else (200, 32)
    x_clean, y = make_batch(n_test, torch.Generator().manual_seed(1))
    x = normalize(shift(x_clean, torch.Generator().manual_seed(2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    acc, t = accuracy_one_by_one(model, x, y)
    print(f"source model           : accuracy {acc:.3f}  ({t * 1e3:.1f} ms / image)")
    with adaptkit.BNAdapt(model, N=16) as bn:
        acc, t = accuracy_one_by_one(bn, x, y)
    print(f"BNAdapt(N=16), bs=1     : accuracy {acc:.3f}  ({t * 1e3:.1f} ms / image)")
    # the model takes normalised inputs: tell MEMO, so that AugMix works on the true [0, 1] pixels
    with adaptkit.MEMO(model, lr=5e-3, n_augmentations=copies, N=16, normalization=(MEAN, STD)) as memo:
        acc, t = accuracy_one_by_one(memo, x, y)
        last = float(memo.last_loss[0])  # type: ignore[index]
    print(f"MEMO({copies} copies), bs=1  : accuracy {acc:.3f}  ({t * 1e3:.1f} ms / image; last marginal entropy "
          f"{last:.3f})")  # fmt: skip

    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"model unchanged after the with block: {unchanged}")


if __name__ == "__main__":
    main()
