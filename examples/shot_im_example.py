"""SHOT-IM next to Tent on a corrupted stream, no download needed.

1. Train a small BatchNorm CNN for a few seconds on a synthetic 10-class task (a coloured square at one of ten
   positions on a noisy background).
2. Adapt online on a corrupted stream (contrast + gaussian noise from ``adaptkit.data.corruptions``) with ``Tent``
   and ``SHOTIM`` (confident *and* diverse predictions), each in a ``with`` block, and print the accuracy and how
   many classes the predictions still cover.
3. Check that the model is bitwise unchanged after each ``with`` block.

Run: ``python examples/shot_im_example.py`` (about 20 s on one CPU core); ``--quick`` (or the environment variable
``ADAPTKIT_EXAMPLES_QUICK=1``) trains and adapts on less data.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit
from adaptkit.data.corruptions import corrupt

NUM_CLASSES = 10
SIZE = 32


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in ``[0, 1]``: class ``k`` is a coloured 8x8 square at the ``k``-th of ten positions."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = 0.3 + 0.15 * torch.rand(n, 3, SIZE, SIZE, generator=gen)
    colour = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=gen)
    for i in range(n):
        k = int(y[i])
        r, c = 2 + 10 * (k // 4), 2 + 7 * (k % 4)  # a 3 x 4 grid, first ten cells
        x[i, :, r : r + 8, c : c + 8] = colour[i]
    return x.clamp(0, 1), y


def shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The test-time shift: CIFAR-10-C contrast (severity 5), then gaussian noise (severity 5)."""
    return corrupt(corrupt(x, "contrast", severity=5, generator=seed), "gaussian_noise", severity=5, generator=seed)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(16 * 8 * 8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def train(model: nn.Module, steps: int, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x, y = make_batch(64, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def evaluate(predict: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """Accuracy (%) over the stream, in order, and the number of classes predicted at least once."""
    preds = torch.cat([predict(x).argmax(1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return 100.0 * float((preds == labels).float().mean()), int(preds.unique().numel())


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less training and a shorter stream (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SmallCNN()
    train(model, 80 if quick else 200, gen)

    test_gen = torch.Generator().manual_seed(1)
    stream = [make_batch(64, test_gen) for _ in range(8 if quick else 20)]
    stream = [(shift(x, seed=i), y) for i, (x, y) in enumerate(stream)]

    acc, classes = evaluate(model, stream)
    print(f"{'source':22s}: corrupted stream {acc:5.1f} %, {classes} classes predicted")
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    unchanged = True
    for name, make in [
        ("Tent (Adam 1e-3)", lambda: adaptkit.Tent(model)),
        ("SHOT-IM (SGD 1e-3)", lambda: adaptkit.SHOTIM(model)),
        ("SHOT-IM (Adam 1e-3)", lambda: adaptkit.SHOTIM(model, optimizer="adam", weight_decay=0.0)),
    ]:
        with make() as m:
            acc, classes = evaluate(m, stream)  # online: adapts batch after batch
        after = state(model)
        unchanged &= all(torch.equal(after[k], v) for k, v in before.items())
        unchanged &= flags == {n: p.requires_grad for n, p in model.named_parameters()}
        print(f"{name:22s}: corrupted stream {acc:5.1f} %, {classes} classes predicted")
    print(f"model unchanged after the with block: {unchanged}")


if __name__ == "__main__":
    main()
