"""Wrap a torchvision ResNet-18 with BNAdapt and Tent, then show the model is exactly as before.

The weights are random (``weights=None``: nothing is downloaded), so accuracies would mean nothing; the
example shows the mechanics instead: how the outputs move under a shift, how Tent lowers the prediction
entropy batch after batch, and that leaving each ``with`` block restores the model bitwise. With real
weights, swap in ``torchvision.models.resnet18(weights="IMAGENET1K_V1")`` and real shifted data.

Run: ``python examples/wrap_torchvision.py`` (a few seconds; ``--quick`` or ``ADAPTKIT_EXAMPLES_QUICK=1``
uses fewer batches).
"""

from __future__ import annotations

import argparse
import os

import torch
import torchvision

import adaptkit
from adaptkit.functional import softmax_entropy


def shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A covariate shift of a batch: brighter, lower contrast, plus gaussian noise."""
    return (0.4 + 0.5 * x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    no_hooks = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now) and no_hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    n_batches = 3 if quick else 6
    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    batches = [shifted(torch.rand(8, 3, 64, 64, generator=gen), gen) for _ in range(n_batches)]
    before = snapshot(model)
    with torch.no_grad():
        source_logits = model(batches[0])
    print(f"resnet18 (random weights), {n_batches} shifted batches of 8 x 3 x 64 x 64")
    print(f"source model: mean prediction entropy {softmax_entropy(source_logits).mean():.3f}")

    # BNAdapt is statistics-only: it also runs inside torch.inference_mode(), like timm's validate loop.
    with adaptkit.BNAdapt(model, N=16) as bn, torch.inference_mode():
        bn_logits = bn(batches[0])
    print(
        f"BNAdapt(N=16): {len(bn.targeted_modules)} BN layers re-normalised, "
        f"max |logit change| vs source {(bn_logits - source_logits).abs().max():.3f}"
    )
    print(f"  model unchanged after the with block: {unchanged(model, before)}")

    # Tent updates BN affine parameters by entropy minimisation; it works inside the user's no_grad().
    with adaptkit.Tent(model, lr=1e-3) as tent, torch.no_grad():
        entropies = [softmax_entropy(tent(x)).mean().item() for x in batches * 2]
        adapted = sum(p.numel() for p in tent.trainable_parameters())
    print(f"Tent(lr=1e-3): {adapted} affine parameters adapted online over {len(entropies)} batches")
    print("  entropy per batch: " + " ".join(f"{e:.3f}" for e in entropies))
    print(f"  model unchanged after the with block: {unchanged(model, before)}")

    with torch.no_grad():
        same = torch.equal(model(batches[0]), source_logits)
    print(f"source outputs identical after both wrappers: {same}")


if __name__ == "__main__":
    main()
