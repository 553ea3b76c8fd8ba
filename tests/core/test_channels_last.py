"""Tapped features come back channels-first on channels-last (Swin-style) stages, untouched elsewhere."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import adaptkit
from adaptkit.core.hooks import HookManager
from adaptkit.core.layers import resolve_layer
from adaptkit.core.truncate import ForwardStopper, channels_last_output


def _raw_and_tapped(model: nn.Module, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    name = resolve_layer(model, layer)
    module = dict(model.named_modules())[name]
    raw: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: raw.append(o))
    hooks = HookManager()
    try:
        with torch.no_grad():
            tapped = ForwardStopper({name: module}, hooks).run(model, x)[name]
    finally:
        hooks.remove_all()
        handle.remove()
    return raw[0], tapped


SWINS = {
    "tv_swin_t": lambda: torchvision.models.swin_t(num_classes=5),
    "timm_swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=64, window_size=2),
}
CHANNELS_FIRST = {
    "tv_convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=5),  # LayerNorm2d, permuted blocks
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=5),
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=5),
}


@pytest.mark.parametrize("name", list(SWINS))
def test_swin_stages_are_returned_channels_first(name: str) -> None:
    torch.manual_seed(0)
    model = SWINS[name]().eval()
    raw, tapped = _raw_and_tapped(model, 1, torch.rand(2, 3, 64, 64))
    assert raw.dim() == 4 and raw.shape[-1] != raw.shape[1]  # (B, H, W, C) from the model itself
    assert torch.equal(tapped, raw.permute(0, 3, 1, 2))


@pytest.mark.parametrize("name", list(CHANNELS_FIRST))
def test_channels_first_stages_are_untouched(name: str) -> None:
    torch.manual_seed(0)
    model = CHANNELS_FIRST[name]().eval()
    raw, tapped = _raw_and_tapped(model, 1, torch.rand(2, 3, 64, 64))
    assert tapped is raw


def test_detection_rule() -> None:
    tokens = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))
    assert channels_last_output(tokens, torch.zeros(2, 7, 5, 32))
    assert not channels_last_output(tokens, torch.zeros(2, 32, 7, 5))  # normalised axis is not last
    assert not channels_last_output(tokens, torch.zeros(2, 32, 7, 32))  # H == C: cannot tell, channels-first
    assert not channels_last_output(tokens, torch.zeros(2, 49, 32))  # tokens: handled by the heads
    assert not channels_last_output(nn.Conv2d(3, 32, 1), torch.zeros(2, 7, 5, 32))  # no channel norm at all


def test_a_head_on_a_swin_stage_sees_channels_and_adapts() -> None:
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=5).eval()
    x = torch.rand(4, 3, 64, 64)
    head = adaptkit.NCTTT.train_head(model, 1, [x], 1, progress=False, embed_dim=8)
    assert head.binding is not None and head.binding["feature_shapes"] == [[96, 16, 16]]
    assert head.projector.in_channels == 96  # the embedding width, not the map height
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with adaptkit.NCTTT(model, layer=1, head=head, steps=1, lr=1e-3) as nc:
        out = nc(x)
    assert out.shape == (4, 5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
