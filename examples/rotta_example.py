"""RoTTA on a practical test-time stream: corruptions that change over time *and* temporally correlated labels.

1. Train a small BatchNorm CNN for a few seconds on a synthetic 6-class texture task (horizontal stripes,
   vertical stripes, checkerboard, disc, square, dots; random colours, scales and positions). The classes survive
   RoTTA's strong augmentation (flips, small rotations, colour jitter), and the model takes ``[0, 1]`` pixels.
2. Stream the test set through several corruptions one after another without resetting, with the labels in a
   Dirichlet order (``adaptkit.data.streams.dirichlet_order``, alpha 0.1: long runs of one class, RoTTA's PTTA
   setting). Compare the source model, test-batch BatchNorm (``BNAdapt(N=0)``), Tent and RoTTA.
3. Check that the model is bitwise unchanged after the ``with`` blocks.

Batch statistics follow the label runs (a batch of mostly one class normalises that class away), which hurts
BNAdapt(N=0) and Tent; RoTTA's Robust BN moves its statistics slowly and its category-balanced memory keeps the
update batch mixed. Run: ``python examples/rotta_example.py`` (about 30 s on one CPU core); ``--quick`` (or the
environment variable ``ADAPTKIT_EXAMPLES_QUICK=1``) trains and streams less, for smoke tests.
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
from adaptkit.data.corruptions import corrupt
from adaptkit.data.streams import dirichlet_order

NUM_CLASSES = 6
SIZE = 32
CORRUPTIONS = ("gaussian_noise", "contrast", "defocus_blur", "brightness")


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, 32, 32)`` in ``[0, 1]`` and their labels (6 texture / shape classes)."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    freq = (2 * math.pi / (5 + 5 * u(n)))[:, None, None]
    phase = (2 * math.pi * u(n))[:, None, None]
    cx, cy, r = (10 + 12 * u(n))[:, None, None], (10 + 12 * u(n))[:, None, None], (5 + 4 * u(n))[:, None, None]
    masks = torch.stack(
        [
            torch.sin(freq * yy + phase) > 0,  # horizontal stripes
            torch.sin(freq * xx + phase) > 0,  # vertical stripes
            torch.sin(freq * xx + phase) * torch.sin(freq * yy + phase) > 0,  # checkerboard
            (xx - cx) ** 2 + (yy - cy) ** 2 < r**2,  # disc
            ((xx - cx).abs() < r * 0.9) & ((yy - cy).abs() < r * 0.9),  # square
            (torch.sin(freq * xx + phase) > 0.7) & (torch.sin(freq * yy + phase) > 0.7),  # dots
        ],
        1,
    )
    mask = masks[torch.arange(n), y].float()[:, None]
    fg, bg = u(n, 3, 1, 1), u(n, 3, 1, 1)
    bg = torch.where((fg - bg).abs().mean(1, keepdim=True) < 0.3, 1 - fg, bg)
    x = mask * fg + (1 - mask) * bg + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return x.clamp(0, 1), y


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


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


def make_stream(n_per_domain: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each corruption in turn (severity 4), the labels of each domain in a Dirichlet order, batches of 64."""
    batches = []
    for d, name in enumerate(CORRUPTIONS):
        x, y = make_batch(n_per_domain, gen)
        order = dirichlet_order(y, alpha=0.1, seed=d, slots=n_per_domain // 64)  # runs of about a batch
        x = corrupt(x[order], name, severity=4, generator=d)
        batches += [(x[i : i + 64], y[order][i : i + 64]) for i in range(0, n_per_domain, 64)]
    return batches


@torch.no_grad()
def accuracy(predict: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int((predict(x).argmax(1) == y).sum()) for x, y in batches)
    return 100.0 * correct / sum(len(y) for _, y in batches)


def fingerprint(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    ta, tb = a["tensors"], b["tensors"]
    assert isinstance(ta, dict) and isinstance(tb, dict)
    equal = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return equal and a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less training and a shorter stream (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SmallCNN()
    train(model, 40 if quick else 250, gen)

    stream = make_stream(128 if quick else 768, torch.Generator().manual_seed(1))
    print(f"stream: {len(CORRUPTIONS)} corruptions, {sum(len(y) for _, y in stream)} images, Dirichlet-ordered labels")
    print(f"source model:    {accuracy(model, stream):5.1f} %")
    before = fingerprint(model)
    unchanged = True
    for name, make in [
        ("BNAdapt(N=0)", lambda: adaptkit.BNAdapt(model, N=0)),
        ("Tent", lambda: adaptkit.Tent(model, lr=1e-3)),
        ("RoTTA", lambda: adaptkit.RoTTA(model)),  # official defaults: memory 64, update every 64 samples
    ]:
        start = time.perf_counter()
        with make() as m:
            acc = accuracy(m, stream)  # online and continual: adapts batch after batch, never reset
            extra = (
                f" | {m.num_updates} updates, memory per class {m.memory.class_counts()}" if name == "RoTTA" else ""
            )
        unchanged &= same(before, fingerprint(model))
        print(f"{name + ':':16s} {acc:5.1f} % ({time.perf_counter() - start:.1f} s){extra}")
    print(f"model unchanged after the with block: {unchanged}")


if __name__ == "__main__":
    main()
