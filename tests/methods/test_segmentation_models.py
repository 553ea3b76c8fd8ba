"""BNAdapt, Tent and OCL on torchvision segmentation models (dict outputs ``out`` / ``aux``; per-pixel losses):
output type and shapes as the model's, the model adapts, reset is bitwise and restore exact (issue 6, point 2)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torchvision.models.segmentation as seg
from helpers import assert_model_unchanged, calibrate_bn, snapshot_model

import adaptkit

MODELS: dict[str, Callable[[], nn.Module]] = {
    "fcn_resnet50": lambda: seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True),
    "deeplabv3_mobilenet_v3_large": lambda: seg.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4, aux_loss=True
    ),
    "lraspp_mobilenet_v3_large": lambda: seg.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4
    ),
}
METHODS: dict[str, dict[str, Any]] = {"bn_adapt": {"N": 16}, "tent": {"lr": 1e-3}, "ocl": {"lr": 1e-3}}
_CACHE: dict[str, nn.Module] = {}


def calibrated(name: str) -> nn.Module:
    """Random weights with BN statistics that match the data (cumulative average over 2 batches), eval mode."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = calibrate_bn(MODELS[name](), (torch.rand(4, 3, 64, 64) for _ in range(2)))
    model = MODELS[name]()
    model.load_state_dict(_CACHE[name].state_dict())
    return model.eval()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_segmentation_model_contract(method: str, model_name: str) -> None:
    model = calibrated(model_name)
    snap = snapshot_model(model)
    x = torch.rand(2, 3, 64, 64) * 1.5
    with torch.no_grad():
        ref = model(x)
    w = adaptkit.adapt(model, method, episodic=False, **METHODS[method])
    out = w(x)
    assert isinstance(out, dict) and set(out) == set(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape and torch.isfinite(out[k]).all()
    assert not torch.equal(out["out"], ref["out"])  # statistics or weights moved
    first = {k: v.clone() for k, v in out.items()}
    w(x)
    if w.trainable_parameters():
        assert any(not torch.equal(p, snap.state[n]) for n, p in model.named_parameters() if n in snap.state), (
            "a gradient method left every weight unchanged"
        )
    w.reset()
    again = w(x)
    assert all(torch.equal(again[k], first[k]) for k in first), "reset is not bitwise"
    assert w.restore() is model
    assert_model_unchanged(model, snap)
