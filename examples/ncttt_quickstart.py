"""NC-TTT end to end: train the head on a source model's layer, save and reload it, adapt on shifted data.

1. Train a small classifier on clean data (stands in for your trained model).
2. ``adaptkit.NCTTT.train_head``: learn the projector + noise discriminator on the frozen model's ``layer1``.
3. ``head.save`` / ``NCTTTHead.load`` (weights + config + layer binding, ``weights_only=True`` loadable).
4. Adapt on Gaussian-noise-corrupted test data inside a ``with adaptkit.NCTTT(...)`` block and compare
   with the source model and BN adaptation; the model is unchanged afterwards.

Run: ``python examples/ncttt_quickstart.py`` (about a minute on one CPU core; ``--quick`` or
``ADAPTKIT_EXAMPLES_QUICK=1``: a few seconds).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import adaptkit
from adaptkit.bench.models import SmallResNet, train_classifier
from adaptkit.bench.runner import synthetic_data
from adaptkit.data.corruptions import gaussian_noise


def accuracy(fn, x: torch.Tensor, y: torch.Tensor, bs: int = 64) -> float:
    correct = sum(int((fn(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum()) for i in range(0, len(y), bs))
    return 100.0 * correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ADAPTKIT_EXAMPLES_QUICK", "") not in ("", "0")
    n, epochs = (256, 1) if quick else (2048, 3)

    # 1. a source model trained on clean data (4 classes, 28 px, grayscale)
    x_u8, y = synthetic_data(n=n, seed=0)
    x = x_u8.float() / 255
    model = SmallResNet(in_channels=1, num_classes=4, width=8, mean=0.4, std=0.25)
    train_classifier(model, x_u8, y, epochs=epochs, batch_size=64, lr=0.05, progress=False)
    model.eval()

    # 2. the NC-TTT head on layer1 of the frozen model (the model is left exactly as it was)
    loader = [x[i : i + 64] for i in range(0, n, 64)]
    head = adaptkit.NCTTT.train_head(model, layer=1, loader=loader, epochs=epochs, embed_dim=128, progress=False)
    print(f"head trained on {head.binding['layers']}: final loss {head.history[-1]['train_loss']:.3f}")

    # 3. save / load: the file records the layer binding, feature shape and config
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ncttt_head.pt")
        head.save(path)
        head = adaptkit.NCTTTHead.load(path)
    print(f"reloaded head: mode={head.config['mode']}, embed_dim={head.config['embed_dim']}")

    # 4. adapt on shifted test data
    x_test_u8, y_test = synthetic_data(n=n // 2, seed=1)
    shifted = gaussian_noise(x_test_u8.float() / 255, severity=5, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        src = accuracy(model, shifted, y_test)
    with adaptkit.BNAdapt(model, N=0) as bn:
        acc_bn = accuracy(bn, shifted, y_test)
    with adaptkit.NCTTT(model, layer=1, head=head, lr=1e-3, steps=5 if quick else 20) as nc:
        acc_nc = accuracy(nc, shifted, y_test)
    print(f"accuracy on gaussian_noise-5: source {src:.1f}  BNAdapt(N=0) {acc_bn:.1f}  NC-TTT {acc_nc:.1f}")
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"model unchanged after the with block: {unchanged}")


if __name__ == "__main__":
    main()
