"""OCL on a torchvision DeepLabV3: adapt a segmentation model to foggy scenes inside a ``with`` block.

1. Train ``deeplabv3_mobilenet_v3_large`` (random init, nothing downloaded) on clean scenes: Fashion-MNIST items
   on textured canvases with per-pixel labels (``adaptkit.data.scenes``); it stands in for your trained model.
2. Corrupt the test scenes with fog (severity 5) and score mIoU with ``adaptkit.metrics.SegmentationMeter``.
3. Adapt online with ``with adaptkit.OCL(model, ...) as ocl:`` (the prediction for each batch comes before the
   update on it, as in the paper) and compare with the source model and BNAdapt; the model is unchanged
   afterwards.

Full run on 2 CPU cores (5 minutes): ``trained 6 epochs on 3000 scenes: loss 0.992 -> 0.558`` then
``mIoU clean 18.9; on fog-5: source 10.2  BNAdapt(N=0) 15.2  OCL 15.2`` - a short training from scratch gives a
weak model; the benchmark (``adaptkit bench --task segmentation``, docs/benchmarks.md) has the full comparison.

Run: ``python examples/ocl_deeplabv3.py`` (about 5 minutes on 2 CPU cores; ``--quick`` or
``ADAPTKIT_EXAMPLES_QUICK=1``: tiny sizes, under a minute). Without the Fashion-MNIST files (Debian package
``dataset-fashion-mnist``) the scenes are made of generated squares.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

import adaptkit
from adaptkit.bench.models import recalibrate_bn
from adaptkit.bench.runner import synthetic_data
from adaptkit.bench.seg_models import train_segmenter
from adaptkit.data.corruptions import corrupt
from adaptkit.data.datasets import as_unit_float
from adaptkit.data.scenes import make_scenes
from adaptkit.metrics import SegmentationMeter


def items(train: bool, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST items when installed (and not --quick), else generated squares (4 classes)."""
    if not quick:
        try:
            from adaptkit.data.datasets import FashionMNIST

            ds = FashionMNIST(train=train)
            return ds.images, ds.targets
        except FileNotFoundError:
            pass
    return synthetic_data(n=256, seed=0 if train else 1)


def miou(fn: Callable[[torch.Tensor], dict], x: torch.Tensor, masks: torch.Tensor, classes: int, bs: int) -> float:
    meter = SegmentationMeter(num_classes=classes)
    for i in range(0, len(x), bs):
        meter.update(fn(x[i : i + bs])["out"].argmax(1), masks[i : i + bs])
    return 100.0 * float(meter.compute()["miou"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    n_train, n_test, size, epochs = (64, 32, 48, 1) if quick else (3000, 512, 64, 6)

    # 1. a segmentation model trained on clean scenes
    train_items, train_labels = items(True, quick)
    classes = int(train_labels.max()) + 2  # background + item classes
    x_train, m_train = make_scenes(train_items, train_labels, n_train, size=size, seed=0)
    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes)
    hist = train_segmenter(model, x_train, m_train, epochs=epochs, batch_size=32, lr=5e-3, progress=not quick)
    recalibrate_bn(model, x_train[:1024].split(32))  # MobileNetV3's BN momentum (0.01) lags a short training
    print(f"trained {epochs} epochs on {n_train} scenes: loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f}")

    # 2. shifted test data: fog, severity 5
    test_items, test_labels = items(False, quick)
    x_test, m_test = make_scenes(test_items, test_labels, n_test, size=size, seed=1)
    x_test = as_unit_float(x_test)
    foggy = corrupt(x_test, "fog", severity=5, generator=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        src = miou(model, foggy, m_test, classes, bs=16)
        clean = miou(model, x_test, m_test, classes, bs=16)

    # 3. BNAdapt, then OCL (online: continual over the stream, predict-then-update on each batch)
    with adaptkit.BNAdapt(model, N=0) as bn:
        acc_bn = miou(bn, foggy, m_test, classes, bs=16)
    with adaptkit.OCL(model, lr=5e-4, bn_prior=0.01) as ocl:  # tuned on the scene benchmark (docs)
        acc_ocl = miou(ocl, foggy, m_test, classes, bs=16)
    print(f"mIoU clean {clean:.1f}; on fog-5: source {src:.1f}  BNAdapt(N=0) {acc_bn:.1f}  OCL {acc_ocl:.1f}")
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"model unchanged after the with blocks: {unchanged}")


if __name__ == "__main__":
    main()
