"""Wrap your own CNN: inspect it with ``adaptkit.list_layers``, choose layers with ``include`` / ``exclude``,
save and reload the adaptation state, and see the errors adaptkit gives for a bad selection.

Run: ``python examples/wrap_custom_cnn.py`` (a few seconds; ``--quick`` / ``ADAPTKIT_EXAMPLES_QUICK=1``
is accepted for symmetry with the other examples).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

import adaptkit
from adaptkit.core.layers import format_layers


class MyCNN(nn.Module):
    """A user-defined model: two BatchNorm blocks, a GroupNorm block, dropout and a linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU())
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(self.dropout(x.mean(dim=(2, 3))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry; this example is always quick")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MyCNN().eval()
    x = torch.rand(8, 3, 32, 32)

    # 1. What is in the model? Norm layers, their kind, and the stage indices accepted by layer=.
    print(format_layers(adaptkit.list_layers(model, norm_only=True)))
    print("stages for layer=:", [(r.stage, r.name) for r in adaptkit.list_layers(model) if r.stage is not None])

    # 2. BNAdapt on every BatchNorm layer (GroupNorm has no running statistics: never selected by BNAdapt).
    with adaptkit.BNAdapt(model, N=16) as m:
        print("\nBNAdapt default selection:    ", m.targeted_modules)
    # ... only some layers: a regex must match the whole name; a list holds exact names or dotted suffixes.
    with adaptkit.BNAdapt(model, N=16, include=r"block1\..*") as m:
        print("BNAdapt include=r'block1\\..*':", m.targeted_modules)
    with adaptkit.BNAdapt(model, N=16, exclude=["stem.1"]) as m:
        print("BNAdapt exclude=['stem.1']:   ", m.targeted_modules)

    # 3. Tent on BatchNorm by default; norm= picks other kinds, e.g. the GroupNorm too.
    with adaptkit.Tent(model, lr=1e-3) as m:
        print("Tent default (norm='auto'):   ", m.targeted_modules)
    with adaptkit.Tent(model, lr=1e-3, norm=["batch", "group"], exclude=r"stem\..*") as m:
        print("Tent norm=['batch','group'], exclude=r'stem\\..*':", m.targeted_modules)
        for _ in range(1 if quick else 3):
            m(x)
        state = m.adaptation_state_dict()  # adapted params + norm buffers + optimizer state, unprefixed keys
        with torch.no_grad():
            adapted_out = m.model(x)  # the adapted model's output (no further update)
    print("adaptation_state_dict keys:", [k for k in state if not k.startswith("_adaptkit.")][:3], "...")

    # 4. Load the adapted state into a fresh wrapper: the same adapted model.
    with adaptkit.Tent(model, lr=1e-3, norm=["batch", "group"], exclude=r"stem\..*") as m2:
        m2.load_adaptation_state_dict(state)
        with torch.no_grad():
            print("reloaded state reproduces the adapted outputs:", torch.equal(m2.model(x), adapted_out))

    # 5. A wrong name raises a ValueError naming close matches, and leaves the model untouched.
    try:
        adaptkit.BNAdapt(model, include=["block1.2"])
    except ValueError as e:
        print("\nbad selection ->", e)
    try:
        adaptkit.Tent(model, include=["blok1.1"])
    except ValueError as e:
        print("typo          ->", e)
    hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())
    print("model still in eval mode:", not any(mod.training for mod in model.modules()), "| hooks left:", hooks)


if __name__ == "__main__":
    main()
