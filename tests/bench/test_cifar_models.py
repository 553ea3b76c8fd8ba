"""The CIFAR ResNets of the test-time-training papers (torchvision ResNet with a 3x3 stride-1 stem, no max-pool)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adaptkit
from adaptkit.bench.models import CIFAR10_MEAN, CIFAR10_STD, CIFARResNet, cifar_resnet, cifar_resnet50
from adaptkit.core.hooks import HookManager
from adaptkit.core.layers import resolve_layer, stage_names
from adaptkit.core.truncate import ForwardStopper


def test_cifar_resnet50_shapes_and_stages() -> None:
    model = cifar_resnet50(num_classes=7).eval()
    assert isinstance(model, CIFARResNet)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 64
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert model.fc.in_features == 2048 and model.fc.out_features == 7
    assert stage_names(model)[1:] == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layer(model, 2) == "layer2"
    mods = dict(model.named_modules())
    hooks = HookManager()
    try:
        names = [f"layer{i}" for i in range(1, 5)]
        with torch.no_grad():
            out, feats = ForwardStopper({n: mods[n] for n in names}, hooks).capture(model, torch.rand(2, 3, 32, 32))
    finally:
        hooks.remove_all()
    assert out.shape == (2, 7)
    shapes = [tuple(feats[n].shape[1:]) for n in names]
    assert shapes == [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
    assert "mean" not in model.state_dict()  # the normalisation is not a weight


def test_normalisation_inside_and_optional() -> None:
    a = cifar_resnet("resnet10", width=8).eval()
    b = cifar_resnet("resnet10", width=8, mean=None, std=None).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b((x - mean) / std))


@pytest.mark.parametrize(("arch", "width", "last"), [("resnet18", 16, 128), ("resnet26", 8, 256)])
def test_width_and_arch(arch: str, width: int, last: int) -> None:
    model = cifar_resnet(arch, num_classes=3, width=width)
    assert model.conv1.out_channels == width and model.fc.in_features == last
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="resnet50"):
        cifar_resnet("resnet51")


def test_ncttt_on_layer2_int() -> None:
    """``layer=2`` resolves to ``layer2`` and the paper's flat head fits its 16x16 map."""
    model = cifar_resnet("resnet10", width=8).eval()
    data = [(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    head = adaptkit.NCTTT.train_head(model, 2, data, 1, joint=True, progress=False, mode="flat", embed_dim=4)
    assert head.binding is not None and head.binding["layers"] == ["layer2"]
    assert head.binding["feature_shapes"] == [[16, 16, 16]]
    with adaptkit.NCTTT(model, 2, head, steps=1) as nc:
        assert nc(torch.rand(4, 3, 32, 32)).shape == (4, 10)
