"""SAR on a shifted stream: sharpness-aware, reliable entropy minimisation with automatic model recovery.

1. Train a small ResNet-shaped CNN (``layer1``..``layer4`` blocks, so SAR's official rule freezes ``layer4``) for a
   few seconds on ``adaptkit.bench.runner.synthetic_data`` (4 classes: a bright square in one quadrant).
2. Shift the test stream (contrast x0.4, gaussian noise) and compare the source model, batch statistics alone
   (BNAdapt N=0), Tent and SAR, each online inside a ``with`` block. On this tiny stream most of the gain comes
   from the batch statistics; the example shows the mechanics, not SAR's advantage on long or label-shifted
   streams.
3. Print what SAR did (reliable samples per batch, moving average ``e``, recoveries), the layers it left frozen,
   and check that the model is bitwise unchanged afterwards.

Run: ``python examples/sar_example.py``; ``ADAPTKIT_EXAMPLES_QUICK=1`` (or ``--quick``) trains for fewer steps.
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

CLASSES = 4


class MiniResNet(nn.Module):
    """Four Conv-BN-ReLU stages named like torchvision's ResNet, and a linear classifier."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.layer1 = block(1, width, 1)
        self.layer2 = block(width, width, 2)
        self.layer3 = block(width, 2 * width, 2)
        self.layer4 = block(2 * width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + 0.4 * (x - mean) + 0.15 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


@torch.no_grad()
def accuracy(predict: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        correct += (predict(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    ta, tb = a["tensors"], b["tensors"]
    assert isinstance(ta, dict) and isinstance(tb, dict)
    return (
        ta.keys() == tb.keys()
        and all(torch.equal(ta[k], tb[k]) for k in ta)
        and all(a[k] == b[k] for k in ("requires_grad", "training"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    x_train, y_train = synthetic_data(n=512, size=28, classes=CLASSES, seed=0)
    x_train = to_float(x_train)
    model = MiniResNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 30 if quick else 150
    t0 = time.perf_counter()
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (64,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    print(f"trained MiniResNet for {steps} steps in {time.perf_counter() - t0:.1f} s")

    x_test, y_test = synthetic_data(n=192 if quick else 1024, size=28, classes=CLASSES, seed=1)
    perm = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(2))
    x_test, y_test = shift(to_float(x_test[perm]), torch.Generator().manual_seed(3)), y_test[perm]
    stream = list(zip(x_test.split(64), y_test.split(64)))

    before = state(model)
    print(f"{'method':<30} {'shifted acc %':>13}")
    print(f"{'source (no adaptation)':<30} {accuracy(model, stream):>13.1f}")
    with adaptkit.BNAdapt(model, N=0) as bn:  # batch statistics only: the part of the gain that needs no update
        print(f"{'BNAdapt(N=0)':<30} {accuracy(bn, stream):>13.1f}")
    with adaptkit.Tent(model, lr=1e-3, optimizer="sgd") as tent:
        print(f"{'Tent (SGD, lr 1e-3)':<30} {accuracy(tent, stream):>13.1f}")
    with adaptkit.SAR(model, lr=1e-3) as sar:  # defaults: SGD-SAM lr 1e-3, rho 0.05, E0 = 0.4 ln C, e_m = 0.2
        print(f"{'SAR (SGD-SAM, lr 1e-3)':<30} {accuracy(sar, stream):>13.1f}")
        print(f"SAR froze {sar.excluded_layers} (official rule) and adapted {sar.adapted_layers}")
        e = "none" if sar.ema is None else f"{sar.ema:.3f}"
        print(
            f"last batch: {sar.last_selected} reliable samples in the first forward, {sar.last_selected_second} "
            f"after the perturbed one; e = {e}; recoveries: {sar.num_recoveries}"
        )
    print(f"model unchanged after the with block: {same(before, state(model))}")


if __name__ == "__main__":
    main()
