"""Models for ``adaptkit bench``: the built-in Fashion-MNIST source model (trained once, cached) and
torchvision / timm / checkpoint loading."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as _tv_resnet

from adaptkit._progress import progress as _progress  # (it, total, desc, enabled); also used by benchmarks/
from adaptkit.core.unwrap import strip_prefix
from adaptkit.data.datasets import as_unit_float
from adaptkit.models import build_model  # the one name -> model resolver (also behind `adaptkit layers`)


def cache_dir() -> Path:
    """``$ADAPTKIT_CACHE`` or ``~/.cache/adaptkit``."""
    return Path(os.environ.get("ADAPTKIT_CACHE") or Path.home() / ".cache" / "adaptkit")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small BN ResNet for 28-32 px images: stem, ``layer1..3`` (one basic block each, each halving the
    resolution), pool, fc.

    Inputs are images in ``[0, 1]``; the normalisation is part of the model (``mean``/``std`` buffers).

    Example:
        >>> import torch
        >>> from adaptkit.bench.models import SmallResNet
        >>> SmallResNet(in_channels=1, num_classes=10)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, mean: float = 0.286, std: float = 0.353
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = _Block(width, width, 2)
        self.layer2 = _Block(width, 2 * width, 2)
        self.layer3 = _Block(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the normalisation of the NC-TTT / ClusT3 / TTT++ CIFAR code
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR_RESNETS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet26": [2, 2, 2, 2],
                 "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}  # fmt: skip


class CIFARResNet(_tv_resnet.ResNet):
    """torchvision's :class:`~torchvision.models.ResNet` with the CIFAR stem of the TTT literature (NC-TTT,
    ClusT3, TTT++): a 3x3 stride-1 conv + BN + ReLU, no max-pool (``maxpool`` is an ``Identity``), so at 32 px
    ``layer1..layer4`` give 32, 16, 8 and 4 px maps; then global average pooling (the 4x4 pool) and ``fc``.

    Inputs are images in ``[0, 1]``: the normalisation is part of the model (``mean``/``std`` buffers, not
    in the state dict), so corruptions and released corrupted sets go in raw. Stage names are torchvision's,
    so adaptkit's ``layer=2`` is ``layer2``. Build it with :func:`cifar_resnet` / :func:`cifar_resnet50`.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        num_classes: classifier outputs.
        width: channels of the stem and ``layer1`` (64 = the standard ResNet; stages double it). Smaller
            values give cheap models for smoke tests.
        mean / std: per-channel normalisation (``None``: none).
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: list[int],
        num_classes: int = 10,
        width: int = 64,
        mean: tuple[float, ...] | None = CIFAR10_MEAN,
        std: tuple[float, ...] | None = CIFAR10_STD,
    ) -> None:
        object.__setattr__(self, "_width", int(width))  # read by _make_layer during super().__init__
        super().__init__(block, layers, num_classes=num_classes)  # type: ignore[arg-type]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity()
        self.fc = nn.Linear(8 * width * getattr(block, "expansion", 1), num_classes)
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), False)

    def _make_layer(self, block: Any, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> Any:
        if planes == 64:  # the first stage: its input is the (resized) stem
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return super()._forward_impl(x)


def cifar_resnet(
    arch: str = "resnet50",
    num_classes: int = 10,
    width: int = 64,
    mean: tuple[float, ...] | None = CIFAR10_MEAN,
    std: tuple[float, ...] | None = CIFAR10_STD,
) -> CIFARResNet:
    """A randomly initialised :class:`CIFARResNet`: ``arch`` in :data:`CIFAR_RESNETS` (``resnet18/34``: basic
    blocks, ``resnet26/50/101``: bottlenecks; ``resnet10``: one basic block per stage, for smoke tests).

    Example:
        >>> import torch
        >>> from adaptkit.bench.models import cifar_resnet
        >>> cifar_resnet("resnet10", num_classes=10, width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if arch not in CIFAR_RESNETS:
        raise ValueError(f"cifar_resnet: unknown arch {arch!r}; choose from {sorted(CIFAR_RESNETS)}")
    basic = arch in ("resnet10", "resnet18", "resnet34")
    block = _tv_resnet.BasicBlock if basic else _tv_resnet.Bottleneck
    return CIFARResNet(block, CIFAR_RESNETS[arch], num_classes, width, mean, std)


def cifar_resnet50(num_classes: int = 10, **kwargs: Any) -> CIFARResNet:
    """The CIFAR ResNet-50 of NC-TTT / ClusT3 (spec ncttt.md 1.1): Bottleneck ``[3, 4, 6, 3]``, 3x3 stride-1
    stem (64) + BN + ReLU, no max-pool, pool, ``fc(2048 -> num_classes)``; at 32 px ``layer2`` is 512x16x16.
    ``kwargs`` go to :class:`CIFARResNet` (``width``, ``mean``, ``std``).

    Example:
        >>> import torch
        >>> from adaptkit.bench.models import cifar_resnet50
        >>> cifar_resnet50(10)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return cifar_resnet("resnet50", num_classes, **kwargs)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temp file of this process (concurrent runs never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
    pct_start: float = 0.15,
) -> dict[str, Any]:
    """The training loop of the built-in source models: seeded shuffles, a one-cycle schedule peaking at the
    optimizer's lr, ``batch_loss(model, x, y, generator)`` per batch (augmentation + loss; ``x`` in [0, 1]).

    Returns a history dict (``loss`` per epoch, ``seconds``); the model is left in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    lr = optimizer.param_groups[0]["lr"]
    steps = epochs * ((len(targets) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=pct_start)
    history: dict[str, Any] = {"loss": []}
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(targets), generator=gen)
        total, count = 0.0, 0
        batches = range(0, len(perm), batch_size)
        for lo in _progress(batches, len(batches), f"{desc}, epoch {ep + 1}/{epochs}", progress):
            idx = perm[lo : lo + batch_size]
            loss = batch_loss(model, as_unit_float(images[idx].to(device)), targets[idx].to(device), gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history["loss"].append(total / max(count, 1))
    history["seconds"] = time.perf_counter() - t0
    model.eval()
    return history


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm layer's running statistics to the average of the statistics of ``batches`` (inputs,
    uint8 or floats; the mean over all their samples when the batches have equal sizes), keeping each layer's
    momentum; returns the model in eval mode.

    A short training leaves running statistics with a small momentum (0.01 in torchvision's MobileNetV3
    models) far from the final weights' statistics, so the eval-mode model predicts poorly; this fixes them.
    It also gives random-weight models source statistics that match some data.

    Example:
        >>> import torch
        >>> from adaptkit.bench.models import recalibrate_bn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2, momentum=0.01))
        >>> x = torch.rand(8, 3, 4, 4)
        >>> bn = recalibrate_bn(net, x.split(4))[1]
        >>> torch.allclose(bn.running_mean, net[0](x).mean((0, 2, 3)), atol=1e-6), bn.momentum
        (True, 0.01)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x in batches:
            model(as_unit_float(x))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


def shift_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The built-in classifiers' training augmentation: one random shift of up to 2 pixels (replicate padding)
    and a horizontal flip with probability 1/2, drawn from ``gen`` for the whole batch."""
    pad = F.pad(x, (2, 2, 2, 2), mode="replicate")
    i, j = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = pad[..., i : i + x.shape[-2], j : j + x.shape[-1]]
    return x.flip(-1) if torch.rand((), generator=gen) < 0.5 else x


def _classifier_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy after :func:`shift_flip`."""
    return F.cross_entropy(model(shift_flip(x, gen)), y)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with SGD (momentum 0.9, one-cycle schedule, light crop/flip augmentation).

    Returns a history dict (``loss`` per epoch, ``seconds``).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return fit(
        model, images, targets, opt, _classifier_loss, epochs, batch_size, seed, device, progress,
        "train source model",
    )  # fmt: skip


def fmnist_source_model(
    epochs: int = 3, seed: int = 0, width: int = 16, device: str | torch.device = "cpu", progress: bool = True
) -> nn.Module:
    """The built-in Fashion-MNIST source model: a :class:`SmallResNet` trained on the 60k training images,
    cached under :func:`cache_dir` after the first call (weights-only checkpoint)."""
    from adaptkit.data.datasets import FashionMNIST

    path = cache_dir() / "models" / f"fmnist_smallresnet_v2_w{width}_e{epochs}_s{seed}.pt"
    model = SmallResNet(1, 10, width)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train = FashionMNIST(train=True)
    if progress:
        print(f"training the built-in Fashion-MNIST source model ({epochs} epochs, cached at {path}) ...")
    train_classifier(
        model,
        train.images,
        train.targets,
        epochs=epochs,
        batch_size=256,
        lr=0.1,
        seed=seed,
        device=device,
        progress=progress,
    )
    save_atomic(model.cpu().state_dict(), path)
    return model.eval()


def load_model(name: str, num_classes: int | None = None, checkpoint: str | None = None, **kw: Any) -> nn.Module:
    """A model by name: ``fmnist_resnet`` (built-in), a torchvision name, ``timm:<name>`` / a timm name, or the
    path of a whole pickled model (``torch.save(model, path)``; unpickling runs code, so only load your own files).

    Random weights unless ``checkpoint`` (a state dict file, loaded with ``weights_only=True``) is given.

    Raises:
        adaptkit.models.ModelLookupError: an unknown name (a ``ValueError``; the message lists close matches).
    """
    if name in ("fmnist_resnet", "fmnist-resnet"):
        return fmnist_source_model(**kw)
    if Path(name).is_file():
        obj = torch.load(name, map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise ValueError(
                f"{name} holds a {type(obj).__name__}, not a model; pass a state dict with --checkpoint and the "
                "architecture's name with --model"
            )
        return obj.eval()
    timm_only = name.startswith("timm:")
    model, _ = build_model(name.removeprefix("timm:"), "timm" if timm_only else "auto", num_classes)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict({strip_prefix(k): v for k, v in state.items()})
    return model.eval()
