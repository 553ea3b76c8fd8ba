"""ClusT3 on two layers of a torchvision ResNet-18: train clustering heads on layer1 + layer2, then adapt.

1. Give a random-weight ResNet-18 source BatchNorm statistics on synthetic "source" images (smooth colour
   fields), then train ClusT3's clustering projectors (5 per layer, 10 clusters) on layer1 and layer2 with the
   backbone frozen.
2. On a shifted batch (lower contrast plus gaussian noise), compare the information-maximisation loss
   ``L_IM = H(Z|X) - H(Z)`` of the projectors on the source model's features and on the features ClusT3
   predicts with: adaptation pulls the clustering back towards confident, balanced clusters.
3. Show that the adaptation forwards stop after layer2 (layer3 never runs while adapting) and that leaving the
   ``with`` block restores the model bitwise.

The weights are random (nothing is downloaded), so the example shows the mechanics, not accuracy. With a real
model, train the heads jointly with the classifier (``joint=True``, the paper's protocol) on real data.

Run: ``python examples/clust3_two_layers.py`` (about 10 s on one CPU core); ``--quick`` (or
``ADAPTKIT_EXAMPLES_QUICK=1``) trains the heads for fewer steps.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from adaptkit.functional.clust3 import information_maximization_terms
from adaptkit.heads.clust3 import ClusT3Head
from adaptkit.methods.clust3 import ClusT3


def source_batch(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` smooth random colour fields ``(n, 3, 32, 32)`` in ``[0, 1]``: a 4x4 grid upsampled, a little noise."""
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    x = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The test-time shift: contrast halved around the image mean, then gaussian noise (sigma 0.25)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + 0.5 * (x - mean) + 0.25 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Source BatchNorm statistics: a cumulative average over ``batches`` (weights untouched), then eval()."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()


def im_report(head: ClusT3Head, feats: list[torch.Tensor]) -> str:
    """Mean over the projectors of L_IM and its two terms, as one line."""
    with torch.no_grad():
        terms = [information_maximization_terms(z) for zs in head.cluster_logits(feats) for z in zs]
    mean = [sum(t[i].item() for t in terms) / len(terms) for i in range(3)]
    return f"L_IM {mean[0]:+.3f} = H(Z|X) {mean[1]:.3f} - H(Z) {mean[2]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train the heads for fewer steps (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    calibrate(model, [source_batch(32, gen) for _ in range(4)])
    source = [source_batch(16, gen) for _ in range(6)]

    # 1. Heads on layer1 (64 x 8 x 8) and layer2 (128 x 4 x 4): 5 projectors each, 10 clusters.
    t0 = time.perf_counter()
    epochs = 2 if quick else 6
    head = ClusT3.train_head(model, layer=[1, 2], loader=source, epochs=epochs, lr=1e-2, progress=False)
    assert isinstance(head, ClusT3Head)
    losses = ", ".join(f"{row['train_loss']:+.3f}" for row in head.history)
    print(f"trained {sum(len(p) for p in head.projectors)} projectors on {head.binding['layers']} "
          f"in {time.perf_counter() - t0:.1f} s; summed L_IM per epoch: {losses}")  # fmt: skip

    # the features every forward through layer1/layer2 produces (the last forward's are kept)
    feats: dict[str, torch.Tensor] = {}
    calls = {"adapt": 0}
    handles = [
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o.detach()))
        for n in ("layer1", "layer2")
    ]
    # layer3 runs with gradients on only if an adaptation forward goes past the tapped layers
    handles.append(model.layer3.register_forward_pre_hook(lambda m, i: calls.__setitem__(
        "adapt", calls["adapt"] + int(torch.is_grad_enabled()))))  # fmt: skip

    x_src, x_shift = source_batch(16, gen), shifted(source_batch(16, gen), gen)
    print(f"\nmean over the 10 projectors (K = 10 clusters: L_IM >= -log K = {-math.log(10):.3f})")
    with torch.no_grad():
        model(x_src)
        print(f"source model, source batch : {im_report(head, [feats['layer1'], feats['layer2']])}")
        source_preds = model(x_shift).argmax(1)
        print(f"source model, shifted batch: {im_report(head, [feats['layer1'], feats['layer2']])}")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # 2. Adapt (episodic: every batch starts from the source weights). The defaults are the official code's
    # (Adam lr 1e-5, 20 iterations); the second run uses a larger lr to make the weight updates visible.
    for lr in (1e-5, 1e-3):
        with ClusT3(model, layer=[1, 2], head=head, lr=lr, steps=20) as ct:
            preds = ct(x_shift).argmax(1)  # the last forward is the eval-mode prediction pass
            report = im_report(head, [feats["layer1"], feats["layer2"]])
        changed = int((preds != source_preds).sum())
        print(f"ClusT3(lr={lr:g}), shifted : {report}  ({changed}/{len(preds)} predictions changed)")

    # 3. Truncation and restoration.
    print(f"\nlayer3 forwards during adaptation: {calls['adapt']}")
    for h in handles:
        h.remove()
    now = model.state_dict()
    no_hooks = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    same = all(torch.equal(now[k], before[k]) for k in now) and no_hooks and not model.training
    print(f"model restored bitwise after the with blocks: {same}")


if __name__ == "__main__":
    main()
