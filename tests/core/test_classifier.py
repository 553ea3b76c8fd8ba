"""core/classifier.py: finding the final classifier, capturing its input, the checked forward, logits put back."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import assert_model_unchanged, snapshot_model

import adaptkit
from adaptkit.core import HookManager
from adaptkit.core.classifier import ClassifierTap, find_classifier, replace_logits


class Net(nn.Module):
    def __init__(self, c: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 6)
        self.fc = nn.Linear(6, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(torch.relu(self.proj(h)))


class HeadFirst(Net):
    """The classifier is registered before a later Linear that is not the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(6, 3)  # registered last, never run


class TwiceNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(torch.relu(self.proj(h))) + self.fc(torch.relu(self.proj(h * 0.5)))


class TokenNet(nn.Module):
    """A Linear applied per token, logits (B, T, C): no (B, C) class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(2).transpose(1, 2))


class PooledAfterNet(nn.Module):
    """The Linear runs on (B, T, d) tokens and the logits are pooled after it: its input is not (B, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(2).transpose(1, 2)).mean(1)


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(torch.relu(self.bn(self.conv(x))))}


def _x(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- find_classifier
@pytest.mark.parametrize(
    "make,want",
    [
        (lambda: torchvision.models.resnet18(num_classes=10), "fc"),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), "classifier.3"),
        (lambda: torchvision.models.efficientnet_b0(num_classes=10), "classifier.1"),
        (lambda: torchvision.models.densenet121(num_classes=10), "classifier"),
        (Net, "fc"),
    ],
    ids=["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "net"],
)
def test_found_automatically_torchvision(make: Any, want: str) -> None:
    model = make()
    name, layer = find_classifier(model)
    assert name == want and layer is dict(model.named_modules())[want]


@pytest.mark.parametrize(
    "arch,kw,want",
    [
        ("resnet18", {}, "fc"),
        ("test_efficientnet", {}, "classifier"),
        ("test_convnext", {}, "head.fc"),
        ("test_vit", {"img_size": 32}, "head"),
    ],
)
def test_found_automatically_timm(arch: str, kw: dict[str, Any], want: str) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kw).eval()
    assert find_classifier(model)[0] == want
    with adaptkit.T3A(model) as w, torch.no_grad():  # and the forward check accepts it
        out = w(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_by_name() -> None:
    model = Net()
    assert find_classifier(model, "fc") == ("fc", model.fc)
    assert find_classifier(model, "module.fc") == ("fc", model.fc)  # DataParallel-style prefix stripped
    eff = torchvision.models.efficientnet_b0(num_classes=10)
    assert find_classifier(eff, "classifier")[0] == "classifier.1"  # a container: its last nn.Linear
    with pytest.raises(ValueError, match=r"Did you mean 'fc'.*list_layers"):
        find_classifier(model, "fcc")
    with pytest.raises(ValueError, match=r"Conv2d with no nn.Linear.*list_layers"):
        find_classifier(model, "conv")
    with pytest.raises(TypeError, match="classifier must be"):
        find_classifier(model, 3)  # type: ignore[arg-type]


def test_no_linear_raises_at_wrap_time_with_the_model_untouched() -> None:
    model = ConvOnly().eval()
    snap = snapshot_model(model)
    for cls in (adaptkit.LAME, adaptkit.T3A):
        with pytest.raises(ValueError, match=r"no nn\.Linear.*list_layers.*classifier="):
            cls(model)
        assert_model_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- tap
def test_tap_captures_the_input_and_is_removed() -> None:
    model = Net().eval()
    hooks = HookManager()
    tap = ClassifierTap(model.fc, hooks)
    x = _x()
    with torch.no_grad():
        model(x)
        model(x)
        h = torch.relu(model.proj(torch.relu(model.bn(model.conv(x))).mean((2, 3))))
    caps = tap.pop()
    assert list(caps) == [torch.device("cpu")] and len(caps[torch.device("cpu")]) == 2
    assert torch.equal(caps[torch.device("cpu")][0], h)
    assert tap.pop() == {}
    with torch.no_grad():
        model(x)
    tap.clear()
    assert tap.pop() == {}
    hooks.remove_all()
    assert not model.fc._forward_pre_hooks


# ---------------------------------------------------------------------------------------------- replace_logits
def test_replace_logits_keeps_the_structure() -> None:
    old, new = torch.zeros(2, 3), torch.ones(2, 3)
    assert replace_logits(old, new) is new
    d = {"out": old, "aux": old}
    got = replace_logits(d, new)
    assert got["out"] is new and got["aux"] is old and d["out"] is old and list(got) == ["out", "aux"]
    assert replace_logits({"logits": old, "z": 1}, new)["logits"] is new
    t = replace_logits((old, 5), new)
    assert isinstance(t, tuple) and t[0] is new and t[1] == 5
    assert replace_logits([old], new)[0] is new
    Pair = namedtuple("Pair", "logits feats")
    nt = replace_logits(Pair(old, old), new)
    assert type(nt) is Pair and nt.logits is new and nt.feats is old

    class HF:
        def __init__(self) -> None:
            self.logits = old

    obj = HF()
    assert replace_logits(obj, new).logits is new and obj.logits is old
    with pytest.raises(TypeError):
        replace_logits("nope", new)


# ---------------------------------------------------------------------------------------------- the checked forward
@pytest.mark.parametrize("method", ["lame", "t3a"])
def test_wrong_layer_is_refused_before_anything_changes(method: str) -> None:
    model = HeadFirst().eval()
    snap = snapshot_model(model)
    for kw, match in [
        ({}, r"'unused' did not run.*classifier="),
        ({"classifier": "proj"}, r"'proj'.*not the final classifier.*classifier="),  # 6 outputs, 5 classes
    ]:
        w = adaptkit.adapt(model, method, **kw)
        with pytest.raises(ValueError, match=match):
            w(_x())
        w.restore()
        assert_model_unchanged(model, snap)
    w = adaptkit.adapt(model, method, classifier="fc")  # naming it works
    assert w(_x()).shape == (4, 5)
    w.restore()


@pytest.mark.parametrize("method", ["lame", "t3a"])
@pytest.mark.parametrize(
    "make,match",
    [(TwiceNet, "ran 2 times"), (TokenNet, r"logits of shape \(4, 64, 5\)"), (PooledAfterNet, r"input of shape")],
)
def test_unsuitable_models_raise_clearly(method: str, make: Any, match: str) -> None:
    model = make().eval()
    snap = snapshot_model(model)
    w = adaptkit.adapt(model, method)
    with pytest.raises(ValueError, match=match):
        w(_x())
    w.restore()
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("method", ["lame", "t3a"])
def test_include_is_the_classifier_keyword(method: str) -> None:
    model = HeadFirst().eval()
    w = adaptkit.adapt(model, method, include=["fc"])
    assert w.classifier_name == "fc" and w.classifier is model.fc
    w.restore()
    with pytest.raises(ValueError, match="one name"):
        adaptkit.adapt(model, method, include=["fc", "proj"])
    with pytest.raises(ValueError, match="disagree"):
        adaptkit.adapt(model, method, include="fc", classifier="proj")


@pytest.mark.parametrize("method", ["lame", "t3a"])
def test_targets_and_state(method: str) -> None:
    """Targets: the classifier and the BN layers with source statistics; state: their tensors, nothing else."""
    model = Net().eval()
    w = adaptkit.adapt(model, method)
    assert w.targeted_modules == ["fc", "bn"]
    assert not w.trainable_parameters() and not w.train_modules() and w.optimizer is None
    sd = w.adaptation_state_dict()
    tensors = sorted(k for k in sd if not k.startswith("_adaptkit."))
    assert tensors == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "fc.bias", "fc.weight"]
    assert all(not p.requires_grad for p in model.parameters())
    w.restore()
    assert all(p.requires_grad for p in model.parameters())
