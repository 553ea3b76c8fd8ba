"""The built-in segmentation source model: torchvision's LR-ASPP MobileNetV3-Large (random init, no
download) trained on Fashion-MNIST scenes (:mod:`adaptkit.data.scenes`), cached after the first run."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptkit.bench.models import cache_dir, fit, recalibrate_bn, save_atomic
from adaptkit.data.scenes import SCENE_CLASSES, fashion_scenes

#: name of the built-in segmentation source model in ``adaptkit bench --task segmentation``
BUILTIN_SEG_MODEL = "fmnist_lraspp"


def lraspp(num_classes: int = len(SCENE_CLASSES)) -> nn.Module:
    """torchvision ``lraspp_mobilenet_v3_large`` with random weights (backbone included), ``num_classes`` outputs.

    It takes images in ``[0, 1]`` as they are (the first BatchNorm absorbs the input scale).
    """
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)


def train_segmenter(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    ignore_index: int = 255,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a segmentation model (output tensor or torchvision dict with ``out``) with per-pixel cross-entropy.

    AdamW with a one-cycle schedule; horizontal flips as augmentation (images and masks together).
    Returns a history dict (``loss`` per epoch, ``seconds``).

    Example:
        >>> import torch
        >>> from adaptkit.bench.seg_models import lraspp, train_segmenter
        >>> model = lraspp(3)
        >>> x, m = torch.rand(8, 3, 32, 32), torch.randint(0, 3, (8, 32, 32))
        >>> h = train_segmenter(model, x, m, epochs=1, batch_size=4, progress=False)
        >>> len(h["loss"]), model.training
        (1, False)
    """

    def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        out = model(x)
        return F.cross_entropy(out["out"] if isinstance(out, dict) else out, y, ignore_index=ignore_index)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    return fit(
        model, images, masks, opt, batch_loss, epochs, batch_size, seed, device, progress,
        "train segmentation model", pct_start=0.1,
    )  # fmt: skip


def fmnist_seg_model(
    n_train: int = 8000,
    epochs: int = 6,
    size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """The built-in segmentation source model: :func:`lraspp` trained on ``n_train`` Fashion-MNIST scenes made
    from the training split (:func:`adaptkit.data.scenes.fashion_scenes`), cached under the adaptkit cache
    folder (weights-only checkpoint) after the first call (10-20 minutes on 2 CPU cores)."""
    path = cache_dir() / "models" / f"fmnist_lraspp_v1_n{n_train}_e{epochs}_px{size}_s{seed}.pt"
    model = lraspp()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    if progress:
        print(f"training the built-in segmentation model ({epochs} epochs on {n_train} scenes, cached at {path}) ...")
    x, m = fashion_scenes(n_train, train=True, size=size, seed=seed)
    train_segmenter(model, x, m, epochs=epochs, seed=seed, device=device, progress=progress)
    save_atomic(model.cpu().state_dict(), path)
    return model.eval()


def synthetic_seg_model(images: torch.Tensor, masks: torch.Tensor, seed: int = 0) -> nn.Module:
    """A quickly trained :func:`lraspp` on tiny generated scenes (``dataset="synthetic_scenes"``, for tests),
    cached like the built-in model."""
    classes = int(masks.max()) + 1
    path = cache_dir() / "models" / f"synthetic_lraspp_v2_c{classes}_n{len(masks)}_s{seed}.pt"
    model = lraspp(classes)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train_segmenter(model, images, masks, epochs=4, batch_size=16, lr=3e-3, seed=seed, progress=False)
    recalibrate_bn(model, images.split(32))
    save_atomic(model.state_dict(), path)
    return model.eval()
