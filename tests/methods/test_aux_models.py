"""The test-time-training methods on the architectures the issue names: torchvision ResNet-50, MobileNetV3,
EfficientNet, ConvNeXt; timm ResNet / ConvNeXt through ``feature_info``; a custom CNN by layer name. ``layer`` as
an int and as a name resolve to the same module and give the same result. On torchvision segmentation models
``layer`` is a backbone stage: adaptation stops there and adapts only the backbone below it."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torchvision
import torchvision.models.segmentation as seg
from helpers import assert_model_unchanged, calibrate_bn, snapshot_model

import adaptkit
from adaptkit.core import resolve_layer

METHODS = {"ncttt": adaptkit.NCTTT, "ttt": adaptkit.TTT, "clust3": adaptkit.ClusT3, "ttt_pp": adaptkit.TTTPlusPlus}
HEAD_KW: dict[str, dict[str, Any]] = {"ncttt": {"embed_dim": 64}, "ttt_pp": {"queue_size": 16}}


class CustomCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.top = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.top(self.body(self.stem(x))).mean((2, 3)))


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=5)

    return make


MODELS: dict[str, tuple[Callable[[], nn.Module], int | str, str]] = {
    # name: (factory, layer as given, the module it must resolve to)
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=5), 1, "layer1"),
    "tv_mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(num_classes=5), 2, "features.2"),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=5), 2, "features.2"),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=5), 1, "features.1"),
    "timm_resnet18": (_timm("resnet18"), 1, "layer1"),
    "timm_convnext": (_timm("test_convnext"), 1, "stages.1"),
    "custom_by_name": (CustomCNN, "body", "body"),
}


def _calibrated(make: Callable[[], nn.Module]) -> nn.Module:
    """Random weights with source BN statistics that match the data (cumulative average over 3 batches)."""
    torch.manual_seed(0)
    return calibrate_bn(make(), (torch.rand(8, 3, 32, 32) for _ in range(3)))


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_train_head_and_adapt(method: str, model_name: str) -> None:
    make, layer, resolved = MODELS[model_name]
    model = _calibrated(make)
    assert resolve_layer(model, layer) == resolved
    cls = METHODS[method]
    data = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    snap = snapshot_model(model)
    head = cls.train_head(model, layer, data, epochs=1, progress=False, max_steps=2, **HEAD_KW.get(method, {}))
    assert_model_unchanged(model, snap)  # frozen head training leaves the model as it was
    assert head.binding["layers"] == [resolved]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    kw: dict[str, Any] = {"steps": 1, "lr": 1e-4}
    with cls(model, layer=layer, head=head, **kw) as w:
        out = w(x)
        names = {n.split(".")[0] for n, _ in w.named_adapted_parameters()}
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert_model_unchanged(model, snap)
    with cls(model, layer=resolved, head=head, **kw) as w2:  # the name gives the same wrapper
        torch.testing.assert_close(w2(x), out)
    assert names  # something upstream of the tap is adapted, nothing after it
    assert "fc" not in names and "classifier" not in names and "head" not in names


SEG_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], str]] = {
    # name: (factory, parameter-name prefixes that run up to and including stage 1, a module above the tap)
    "fcn_resnet50": (
        lambda: seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True),
        ("backbone.conv1.", "backbone.bn1.", "backbone.layer1."),
        "backbone.layer2",
    ),
    "deeplabv3_mobilenet_v3_large": (
        lambda: seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4, aux_loss=True),
        ("backbone.0.", "backbone.1."),
        "backbone.2",
    ),
}


@pytest.mark.parametrize("model_name", list(SEG_MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_segmentation_layer_is_a_backbone_stage(method: str, model_name: str) -> None:
    """``layer=1`` on FCN / DeepLabV3 is backbone stage 1: the head is bound there, each adaptation step runs the
    model only up to it (the decoder heads and later stages run just for the prediction), only the backbone
    below it adapts, and the prediction is the model's own dict."""
    make, prefixes, above = SEG_MODELS[model_name]
    torch.manual_seed(0)
    model = calibrate_bn(make(), (torch.rand(4, 3, 32, 32) for _ in range(2)))
    cls = METHODS[method]
    data = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    head = cls.train_head(model, 1, data, epochs=1, progress=False, max_steps=1, **HEAD_KW.get(method, {}))
    assert head.binding["layers"] == [prefixes[-1][:-1]]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    modules = dict(model.named_modules())
    calls = {n: 0 for n in (prefixes[-1][:-1], above, "classifier", "aux_classifier")}
    handles = [
        modules[n].register_forward_pre_hook(lambda m, i, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls
    ]
    snap = snapshot_model(model)  # with the counting hooks
    steps = 3
    per_step = 2 if method == "ttt_pp" else 1  # TTT++ runs the augmented views and the clean batch apart
    full = 1 if method == "ttt" else 2  # refresh: a statistics pass above the tap, then the prediction (TTT
    # keeps the source statistics above the tap, as its official code: the prediction only)
    for truncate in (True, False):
        with cls(model, layer=1, head=head, steps=steps, lr=1e-4, truncate=truncate) as w:
            calls.update(dict.fromkeys(calls, 0))  # after the wrap-time probe (a truncated forward)
            out = w(x)
            adapted = [n for n, _ in w.named_adapted_parameters()]
        assert calls[prefixes[-1][:-1]] == steps * per_step + full  # the tapped stage runs in every step
        for n in (above, "classifier", "aux_classifier"):
            assert calls[n] == (full if truncate else steps * per_step + full), (truncate, n, calls)
        assert adapted and all(n.startswith(prefixes) for n in adapted), adapted
        assert type(out) is type(ref) and list(out) == ["out", "aux"]
        assert all(out[k].shape == ref[k].shape and torch.isfinite(out[k]).all() for k in ref)
        assert_model_unchanged(model, snap)
    for h in handles:
        h.remove()
