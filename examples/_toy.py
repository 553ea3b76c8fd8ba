"""Toy set-up shared by the LAME and T3A examples: a 4-class quadrant task, its shift, a small BN CNN, an accuracy
loop and a check that a model came back unchanged."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self.fc = nn.Linear(32, classes)  # the final classifier (LAME reads its input, T3A replaces it)

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
