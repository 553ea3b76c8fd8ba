"""TTT++ online: train the contrastive head and store source feature moments, then adapt on a shifted stream.

The model has random weights (nothing is downloaded) and the data are synthetic, so accuracies would mean
nothing; the example shows the mechanics instead:

1. a small BatchNorm CNN stands in for a trained source model (its BN statistics are calibrated on the
   "source" images);
2. ``TTTPlusPlus.train_head`` learns the SimCLR projection head on the frozen encoder and stores the source
   mean / covariance of the pooled features and of the projections (plus the normalisers of the alignment
   losses); the head is saved and loaded back;
3. ``TTTPlusPlus`` adapts online on a shifted stream (lower contrast + noise); the FIFO queue of past test
   features fills up to ``queue_size`` rows;
4. ``reset()`` (queue cleared, weights back), ``adaptation_state_dict()`` (reproduces the adapted model) and the
   model restored bitwise when the ``with`` block ends.

Run: ``python examples/tttpp_online.py`` (about 10-20 s on one CPU core); ``--quick`` (or
``ADAPTKIT_EXAMPLES_QUICK=1``) uses fewer batches.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import torch.nn as nn

from adaptkit.heads.tttpp import TTTPPHead
from adaptkit.methods.tttpp import TTTPlusPlus

SIZE = 32


def images(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` synthetic ``[0, 1]`` images whose colour and contrast vary per image (so features vary too)."""
    lo = 0.5 * torch.rand(n, 3, 1, 1, generator=gen)
    span = (1 - lo) * torch.rand(n, 3, 1, 1, generator=gen)
    blobs = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=(SIZE, SIZE), mode="bilinear")
    return lo + span * (0.7 * blobs + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=gen))


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The test-time shift: contrast halved around 0.5, then gaussian noise."""
    return (0.5 + 0.5 * (x - 0.5) + 0.15 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


class SmallCNN(nn.Module):
    """``features`` (three Conv-BN-ReLU blocks: the encoder TTT++ adapts) -> pool -> linear classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Source BN statistics: a cumulative average over the source batches (what training would leave)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()

    # 1. the "source model" and its source data
    model = SmallCNN().eval()
    source = [images(32, gen) for _ in range(6 if quick else 12)]
    calibrate(model, source)

    # 2. source side, once: the head (frozen encoder) + stored source moments; save and reload it
    head = TTTPlusPlus.train_head(model, layer="features", loader=source, epochs=2, progress=False, lr=3e-3,
                                  proj_dim=32, queue_size=96)  # fmt: skip
    print(f"head trained: NT-Xent {head.history[0]['train_loss']:.3f} -> {head.history[-1]['train_loss']:.3f}; "
          f"source moments from {int(head.src_count)} samples: mean {tuple(head.src_mean_enc.shape)}, "
          f"covariance {tuple(head.src_cov_enc.shape)} (pooled features), {tuple(head.src_cov_proj.shape)} "
          "(projections)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tttpp_head.pt")
        head.save(path)
        head = TTTPPHead.load(path)
    print(f"head reloaded: layers {head.binding['layers'] if head.binding else None}, queue_size {head.queue_size}")

    # 3. test side: online adaptation on a shifted stream
    stream = [shift(images(32, gen), gen) for _ in range(4 if quick else 8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # SGD momentum 0.9, 1 step per batch, online; lr 1e-4 because the head was trained on a frozen encoder (the
    # released 0.01 is for an encoder trained jointly with the head, and warns here)
    with TTTPlusPlus(model, head=head, lr=1e-4) as m:
        for i, x in enumerate(stream):
            logits = m(x)  # adapts on x, then predicts x in eval mode with the updated encoder
            rows = len(m._queues[0])  # past clean-batch features kept for the target moments
            print(f"batch {i}: predictions {tuple(logits.argmax(1).shape)}, queue {rows}/{m.queue_size} rows")
        state = m.adaptation_state_dict()  # adapted encoder + BN buffers + optimizer + queue + RNG state
        changed = sorted(
            {n.rsplit(".", 2)[0] for n, p in m.named_adapted_parameters() if not torch.equal(p, before[n])}
        )
        print(f"adapted: {changed} (the classifier fc is not: {not any(n.startswith('fc') for n in changed)})")
        m.reset()
        print(f"after reset(): queue {len(m._queues[0])} rows, weights back to the source: "
              f"{all(torch.equal(v, before[k]) for k, v in model.state_dict().items())}")  # fmt: skip

    # 4. the adaptation state reproduces the adapted model; leaving the block restored the source model
    restored = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    no_hooks = all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
    adapted = copy.deepcopy(model)
    adapted.load_state_dict({k: v for k, v in state.items() if not k.startswith("_adaptkit.")}, strict=False)
    with torch.no_grad():
        print(f"adaptation state reproduces the last predictions: {torch.equal(adapted(stream[-1]), logits)}")
    print(f"model restored: {restored and no_hooks}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
