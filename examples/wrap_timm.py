"""Wrap timm models (``pretrained=False``: nothing is downloaded): BNAdapt on a BatchNorm network and Tent on
a LayerNorm network (ConvNeXt), where Tent adapts the LayerNorm affine parameters.

Run: ``python examples/wrap_timm.py`` (a few seconds; ``--quick`` or ``ADAPTKIT_EXAMPLES_QUICK=1`` uses
fewer batches). With real weights, use ``pretrained=True`` and the model's own preprocessing.
"""

from __future__ import annotations

import argparse
import os

import timm
import torch

import adaptkit
from adaptkit.functional import softmax_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (smoke test)")
    parser.add_argument("--bn-model", default="resnet10t", help="a timm model with BatchNorm layers")
    parser.add_argument("--ln-model", default="convnext_atto", help="a timm model with LayerNorm layers")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    n_batches = 2 if quick else 5
    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    batches = [(0.3 + 0.4 * torch.rand(8, 3, 64, 64, generator=gen)) for _ in range(n_batches)]

    # --- a BatchNorm network: BNAdapt --------------------------------------------------------------------
    bn_net = timm.create_model(args.bn_model, pretrained=False, num_classes=10).eval()
    rows = adaptkit.list_layers(bn_net, norm_only=True)
    print(f"{args.bn_model}: {len(rows)} norm layers ({sorted({r.type for r in rows})})")
    with torch.no_grad():
        source = [bn_net(x) for x in batches]
    score = adaptkit.shift_score(bn_net, batches)
    print(f"  shift score of the batches vs the source BN statistics: {score.mean:.3f}")
    with adaptkit.BNAdapt(bn_net, N=16) as bn, torch.inference_mode():
        adapted = [bn(x) for x in batches]
    diff = max((a - s).abs().max().item() for a, s in zip(adapted, source))
    print(f"  BNAdapt(N=16) on {len(bn.targeted_modules)} BN layers: max |logit change| {diff:.3f}")
    with torch.no_grad():
        print(f"  restored, outputs identical to the source: {torch.equal(bn_net(batches[0]), source[0])}")

    # BNAdapt needs BatchNorm: on a LayerNorm-only network it refuses, with the model untouched.
    ln_net = timm.create_model(args.ln_model, pretrained=False, num_classes=10).eval()
    try:
        adaptkit.BNAdapt(ln_net)
    except ValueError as e:
        print(f"\n{args.ln_model}: BNAdapt refuses: {e}")

    # --- a LayerNorm network: Tent adapts LayerNorm weight/bias --------------------------------------------
    with adaptkit.Tent(ln_net, lr=1e-3) as tent, torch.no_grad():
        modules = dict(ln_net.named_modules())
        kinds = sorted({type(modules[name]).__name__ for name in tent.targeted_modules})
        print(f"  Tent adapts {len(tent.targeted_modules)} layers of type {kinds}")
        entropies = [softmax_entropy(tent(x)).mean().item() for x in batches]
        print("  entropy per batch: " + " ".join(f"{e:.4f}" for e in entropies))
    grads = {p.requires_grad for p in ln_net.parameters()}
    print(f"  restored: every parameter requires grad again: {grads == {True}}")

    # The same by registry name, as used by benchmarks and configs.
    with adaptkit.adapt(ln_net, "tent", lr=1e-3, steps=2) as m:
        print(f"  adaptkit.adapt(model, 'tent', steps=2) -> {type(m).__name__}, output {tuple(m(batches[0]).shape)}")


if __name__ == "__main__":
    main()
