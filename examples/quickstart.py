"""Quickstart: a real before/after of test-time adaptation, with no download and no pretrained weights.

1. Train a small BatchNorm CNN for a few seconds on a synthetic but learnable task: 6 classes of
   procedurally generated 32x32 textures and shapes (stripes in three orientations, checkerboard, disc,
   square) with random colours, frequencies, phases and positions.
2. Evaluate it on a clean test set and on a *shifted* one (contrast reduced to 30% plus strong gaussian
   noise): the covariate shift that BN adaptation targets.
3. Compare the source model with ``BNAdapt(N=0)`` (pure test-batch statistics), ``BNAdapt(N=16)`` (source
   prior of 16 pseudo-samples) and ``Tent`` (online entropy minimisation), each inside a ``with`` block,
   and check that the model is bitwise unchanged afterwards.

Run: ``python examples/quickstart.py`` (about 15-40 s on one CPU core); ``--quick`` (or the environment
variable ``ADAPTKIT_EXAMPLES_QUICK=1``) trains for fewer steps, for smoke tests.
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

NUM_CLASSES = 6
SIZE = 32


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images ``(n, 3, 32, 32)`` in ``[0, 1]`` and their labels (6 texture/shape classes)."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    freq = (2 * math.pi / (4 + 6 * u(n)))[:, None, None]  # period 4..10 px
    phase = (2 * math.pi * u(n))[:, None, None]
    cx, cy = (8 + 16 * u(n))[:, None, None], (8 + 16 * u(n))[:, None, None]
    radius = (5 + 5 * u(n))[:, None, None]
    stripes_h = torch.sin(freq * yy + phase) > 0
    stripes_v = torch.sin(freq * xx + phase) > 0
    stripes_d = torch.sin(freq * (xx + yy) / math.sqrt(2) + phase) > 0
    checker = (torch.sin(freq * xx + phase) * torch.sin(freq * yy + phase)) > 0
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    square = ((xx - cx).abs() < radius * 0.9) & ((yy - cy).abs() < radius * 0.9)
    masks = torch.stack([stripes_h, stripes_v, stripes_d, checker, disc, square], 1)  # (n, 6, S, S)
    mask = masks[torch.arange(n), y].float()[:, None]  # (n, 1, S, S)
    fg, bg = u(n, 3, 1, 1), u(n, 3, 1, 1)
    bg = torch.where((fg - bg).abs().mean(1, keepdim=True) < 0.25, 1 - fg, bg)  # keep foreground visible
    x = mask * fg + (1 - mask) * bg + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return x.clamp(0, 1), y


def shift(x: torch.Tensor, gen: torch.Generator, contrast: float = 0.3, noise: float = 0.2) -> torch.Tensor:
    """The test-time shift: contrast reduced around the image mean, then strong gaussian noise."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + contrast * (x - mean)
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU blocks and a linear classifier (about 23k parameters at ``width=16``)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def train(model: nn.Module, steps: int, batch: int, gen: torch.Generator) -> None:
    """Plain supervised training on freshly generated batches."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        x, y = make_batch(batch, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(predict: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (%) of ``predict`` over the batches, in order (online methods adapt as they go)."""
    correct = total = 0
    for x, y in batches:
        correct += (predict(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def model_fingerprint(model: nn.Module) -> dict[str, object]:
    """Everything a wrapper could change: tensors, requires_grad, training flags, hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def same_fingerprint(a: dict[str, object], b: dict[str, object]) -> bool:
    ta, tb = a["tensors"], b["tensors"]
    assert isinstance(ta, dict) and isinstance(tb, dict)
    tensors_equal = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return tensors_equal and all(a[k] == b[k] for k in ("requires_grad", "training", "hooks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train for fewer steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 250, quick 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny CNN)")
    parser.add_argument("--batch", type=int, default=64, help="test batch size = samples per BN estimate")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    steps = args.steps or (60 if quick else 250)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SmallCNN()
    t0 = time.perf_counter()
    train(model, steps, 64, gen)
    print(f"trained SmallCNN for {steps} steps in {time.perf_counter() - t0:.1f} s")

    test_gen = torch.Generator().manual_seed(1)
    n_batches = 8 if quick else 16
    clean = [make_batch(args.batch, test_gen) for _ in range(n_batches)]
    shifted = [(shift(x, test_gen), y) for x, y in clean]

    before = model_fingerprint(model)
    rows = [("source (no adaptation)", accuracy(model, clean), accuracy(model, shifted))]
    for label, make in [
        ("BNAdapt(N=0)  [test statistics]", lambda: adaptkit.BNAdapt(model, N=0)),
        ("BNAdapt(N=16) [source prior]", lambda: adaptkit.BNAdapt(model, N=16)),
        ("Tent(lr=1e-3) [online]", lambda: adaptkit.Tent(model, lr=1e-3)),
    ]:
        accs = []
        for data in (clean, shifted):
            with make() as m:  # a fresh wrapper per domain; leaving the block restores the model
                accs.append(accuracy(m, data))
        rows.append((label, *accs))
    score = float(adaptkit.shift_score(model, [x for x, _ in shifted]))
    clean_score = float(adaptkit.shift_score(model, [x for x, _ in clean]))

    print(f"\ntest: {n_batches} batches of {args.batch}; shift = contrast x0.3 + gaussian noise (sigma 0.2)")
    print(f"{'method':<34} {'clean acc %':>11} {'shifted acc %':>13}")
    for label, acc_clean, acc_shift in rows:
        print(f"{label:<34} {acc_clean:>11.1f} {acc_shift:>13.1f}")
    print(f"shift score (normalised W2 of BN statistics): clean {clean_score:.3f}, shifted {score:.3f}")
    print(f"model restored: {same_fingerprint(before, model_fingerprint(model))}")


if __name__ == "__main__":
    main()
