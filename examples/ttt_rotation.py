"""TTT (test-time training with rotation prediction, Sun et al. 2020) on a small CNN, no download needed.

1. Train a small BatchNorm CNN *jointly* with a rotation head on a synthetic task (the paper's protocol,
   ``TTT.train_head(..., joint=True)``): 4 classes (the colour of a disc or square on a grey background), lit
   from above (a vertical brightness gradient, so an image has an "up" and its rotation can be predicted).
2. Show the premise of TTT: under a covariate shift (contrast reduced, strong noise) the rotation head gets
   worse too, so its loss carries a signal about the shift.
3. Adapt with ``adaptkit.TTT`` inside a ``with`` block (episodic: every batch starts from the source weights;
   SGD on the rotation loss of the batch's four rotations, updating the encoder up to the tapped layer and
   the head), compare with the source model and with BN statistics adaptation alone (much of TTT's gain on
   such a shift comes from the encoder's refreshed BatchNorm statistics), and check that the model is bitwise
   unchanged afterwards.

Run: ``python examples/ttt_rotation.py`` (about 10-25 s on one CPU core); ``--quick`` (or the environment
variable ``ADAPTKIT_EXAMPLES_QUICK=1``) trains for fewer steps, for smoke tests. The numbers of this toy
task are not the paper's (see docs/methods/ttt.md for those).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn as nn

import adaptkit
from adaptkit.functional.rotation import rotate_batch, rotation_loss, rotation_targets
from adaptkit.heads.rotation import RotationHead
from adaptkit.methods.ttt import TTT

NUM_CLASSES = 4
SIZE = 32


class SmallNet(nn.Module):
    """Three conv stages (``layer1..layer3``) with BatchNorm, global pooling and a linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.layer1 = stage(3, 16, 1)
        self.layer2 = stage(16, 32, 2)
        self.layer3 = stage(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer3(self.layer2(self.layer1(x))).mean(dim=(2, 3)))


COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.25, 0.3, 0.95], [0.9, 0.85, 0.2]])


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, 32, 32)`` in ``[0, 1]`` and their labels: the colour of a disc or square (red, green,
    blue, yellow) on a grey background, lit from above."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    cx, cy, r = (10 + 12 * u(n))[:, None, None], (10 + 12 * u(n))[:, None, None], (5 + 4 * u(n))[:, None, None]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    square = ((xx - cx).abs() < 0.85 * r) & ((yy - cy).abs() < 0.85 * r)
    mask = torch.where(u(n, 1, 1) < 0.5, disc, square).float()[:, None]
    fg = (COLOURS[y] * (0.8 + 0.4 * u(n, 1)))[:, :, None, None]
    bg = (0.2 + 0.6 * u(n, 1, 1, 1)).expand(n, 3, 1, 1)
    light = torch.linspace(1.3, 0.5, SIZE).view(1, 1, SIZE, 1)  # lit from above: the images have an "up"
    x = (mask * fg + (1 - mask) * bg) * light + 0.04 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return x.clamp(0, 1), y


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The test-time shift: contrast reduced to 40% around the image mean, then gaussian noise (std 0.15)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + 0.4 * (x - mean) + 0.15 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


@torch.no_grad()
def rotation_accuracy(model: nn.Module, head: RotationHead, layer: nn.Module, xs: list[torch.Tensor]) -> float:
    """How often the (eval-mode) head names the rotation of each image in its four rotations."""
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: feats.append(o))
    head.eval()
    correct = total = 0
    try:
        for x in xs:
            labels = rotation_targets(len(x), "all")
            model(rotate_batch(x.repeat(4, 1, 1, 1), labels))
            correct += int((head(feats.pop()).argmax(1) == labels).sum())
            total += len(labels)
    finally:
        handle.remove()
    return correct / total


@torch.no_grad()
def rotation_loss_train_form(model: nn.Module, head: RotationHead, x: torch.Tensor) -> float:
    """The loss TTT minimises on ``x``: rotation CE of its four rotations, with the encoder (layer1, layer2) and
    the head normalising with batch statistics. Computed on copies, so nothing is changed."""
    model, head = copy.deepcopy(model).eval(), copy.deepcopy(head).train()
    model.layer1.train()
    model.layer2.train()
    labels = rotation_targets(len(x), "all")
    feats = model.layer2(model.layer1(rotate_batch(x.repeat(4, 1, 1, 1), labels)))
    return float(rotation_loss(head(feats), labels))


def accuracy(predict: object, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int((predict(x).argmax(1) == y).sum()) for x, y in data)  # type: ignore[operator]
    return correct / sum(len(y) for _, y in data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    train = [make_batch(32, gen) for _ in range(6 if quick else 12)]
    clean = [make_batch(32, gen) for _ in range(2 if quick else 4)]
    shifted = [(shift(x, gen), y) for x, y in clean]

    # 1. joint training: CE on the classes + CE of the rotation head on layer2's features (paper: both branches)
    model = SmallNet()
    head = TTT.train_head(
        model, layer="layer2", loader=train, epochs=3 if quick else 4, joint=True, optimizer="adam", lr=3e-3,
        progress=False,
    )  # fmt: skip
    model.eval()
    losses = [f"{h['train_loss']:.2f}" for h in head.history]
    print(
        f"joint training (CE + rotation CE) per epoch: {' -> '.join(losses)}; head bound to {head.binding['layers']}"
    )

    # 2. the premise: the self-supervised task degrades under the shift as well
    with torch.no_grad():
        acc_clean, acc_source = accuracy(model, clean), accuracy(model, shifted)
    rot_clean = rotation_accuracy(model, head, model.layer2, [x for x, _ in clean])
    rot_shift = rotation_accuracy(model, head, model.layer2, [x for x, _ in shifted])
    print(f"source model: class accuracy clean {acc_clean:.1%}, shifted {acc_source:.1%}")
    print(f"rotation head: rotation accuracy clean {rot_clean:.1%}, shifted {rot_shift:.1%}")

    # 3. test-time training, batch by batch (episodic, the paper's standard protocol: SGD without momentum). The
    #    paper's lr=1e-3 suits its SGD-trained ResNet-26; this tiny Adam-trained net is sharper, so a smaller lr
    #    is needed for the rotation loss to go down (check it on your model the same way).
    before = {k: v.clone() for k, v in model.state_dict().items()}
    correct, loss_before, loss_after = 0, [], []
    with TTT(model, head=head, steps=3 if quick else 10, lr=1e-4) as ttt:  # layer: the head's binding (layer2)
        print(f"TTT: {len(ttt.trainable_parameters())} encoder tensors + the head adapted, layers={ttt.layers}, "
              f"steps={ttt.steps}, rotations={ttt.rotations!r}")  # fmt: skip
        for x, y in shifted:
            loss_before.append(rotation_loss_train_form(model, head, x))
            correct += int((ttt(x).argmax(1) == y).sum())
            # the adapted state stays in place until the next batch resets it: measure it on copies
            loss_after.append(rotation_loss_train_form(model, ttt.head, x))
    acc_ttt = correct / sum(len(y) for _, y in shifted)
    print(f"rotation loss on the shifted batches (what TTT minimises): {sum(loss_before) / len(loss_before):.3f} "
          f"-> {sum(loss_after) / len(loss_after):.3f} after adaptation")  # fmt: skip
    with adaptkit.BNAdapt(model, N=0) as bn:  # for reference: batch statistics alone, no gradient
        acc_bn = accuracy(bn, shifted)
    print(f"{'source':<12} class accuracy on the shifted data {acc_source:6.1%}")
    print(f"{'BNAdapt(N=0)':<12} class accuracy on the shifted data {acc_bn:6.1%}")
    print(f"{'TTT':<12} class accuracy on the shifted data {acc_ttt:6.1%}")
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    print("model restored:", unchanged and not any(m.training for m in model.modules()))
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
