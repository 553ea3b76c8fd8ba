"""NCTTT against an independent hand-truncated reference loop, plus its protocol details."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import assert_model_unchanged, snapshot_model
from torch.nn.modules.batchnorm import _BatchNorm

import adaptkit
from adaptkit import NCTTT, NCTTTHead

SIZE = 32


def _calibrated_resnet() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 3, SIZE, SIZE, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, NCTTTHead]:
    model = _calibrated_resnet()
    g = torch.Generator().manual_seed(2)
    data = [torch.rand(8, 3, SIZE, SIZE, generator=g) for _ in range(3)]
    head = NCTTT.train_head(model, layer=1, loader=data, epochs=2, progress=False, embed_dim=16, lr=1e-2)
    return model, head


def shifted(seed: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.rand(n, 3, SIZE, SIZE, generator=g) * 1.6 - 0.2).clamp(-0.5, 1.5)


def encoder(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Hand-truncated torchvision ResNet up to layer1."""
    return m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))


def upstream_params(m: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in m.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1")]


def reference_ncttt(model: nn.Module, head: NCTTTHead, x: torch.Tensor, steps: int, lr: float, bn_mode: str):
    """The paper's test-time loop written out by hand on copies (official-code structure)."""
    m, h = copy.deepcopy(model), copy.deepcopy(head)
    m.eval()
    up_bn = [
        mod for n, mod in m.named_modules() if n.split(".")[0] in ("bn1", "layer1") and isinstance(mod, _BatchNorm)
    ]
    above_bn = [
        mod
        for n, mod in m.named_modules()
        if n.split(".")[0] in ("layer2", "layer3", "layer4") and isinstance(mod, _BatchNorm)
    ]
    if bn_mode == "refresh":
        for b in up_bn:
            b.train()
    opt = torch.optim.Adam(upstream_params(m), lr=lr, betas=(0.9, 0.999))
    h.train()  # discriminator BN on batch statistics, as model.train() in the official code
    for _ in range(steps):
        logit = h.discriminator(h.projector(encoder(m, x)))
        loss = F.softplus(-logit).mean()  # -log sigmoid(logit)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        if bn_mode == "refresh":
            # the official code refreshes the running stats of every layer on each of its `steps` train-mode
            # full forwards; with the adapted weights held fixed that is `steps` momentum updates of the layers
            # above on inputs normalised with batch statistics (upstream layers: momentum 0 for this pass)
            for b in up_bn:
                b.momentum = 0.0
            feats = encoder(m, x)
            for b in up_bn:
                b.momentum = 0.1
            for b in above_bn:
                b.train()
            for _ in range(steps):
                m.layer4(m.layer3(m.layer2(feats)))
            for b in above_bn:
                b.eval()
        for b in up_bn:
            b.eval()
        return m(x)


@pytest.mark.parametrize("bn_mode", ["source", "refresh"])
def test_matches_hand_truncated_reference(trained, bn_mode: str) -> None:
    model, head = trained
    x = shifted(0)
    ref = reference_ncttt(model, head, x, steps=3, lr=1e-3, bn_mode=bn_mode)
    with NCTTT(model, layer=1, head=head, steps=3, lr=1e-3, bn_mode=bn_mode) as nc:
        got = nc(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_refresh_closed_form_for_layers_above() -> None:
    """Layers above the tap: (1-m)^n * source + (1-(1-m)^n) * batch (unbiased variance), per the reference's
    n momentum updates on a fixed input; checked on one BN layer against torch's own running-stat update."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    net.eval()
    with torch.no_grad():
        net[4].running_mean.uniform_(-1, 1)
        net[4].running_var.uniform_(0.5, 2)
    data = [torch.randn(6, 3, 12, 12) for _ in range(2)]
    head = NCTTT.train_head(net, "2", data, epochs=1, progress=False)
    x = torch.randn(6, 3, 12, 12)
    with NCTTT(net, layer="2", head=head, steps=4, lr=1e-12, bn_mode="refresh") as nc:
        got = nc(x)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for _ in range(4):  # lr ~ 0: weights unchanged; 4 training-form forwards as the reference makes
            ref.train()(x)
        want = ref.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batch_mode_with_zero_step_predicts_with_biased_batch_statistics(trained) -> None:
    """bn_mode="batch" normalises with the biased batch variance while adapting (training-form BN) and when
    predicting: the prediction equals a training-mode forward of the untouched model (lr ~ 0), and differs from
    BNAdapt(N=0), which uses the unbiased variance (the seed paper's PTBN)."""
    model, head = trained
    x = shifted(1)
    with NCTTT(model, layer=1, head=head, steps=1, lr=1e-12, bn_mode="batch") as nc:
        got = nc(x)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        m.training = isinstance(m, nn.modules.batchnorm._BatchNorm)  # batch statistics, biased variance
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with adaptkit.BNAdapt(model, N=0) as bn:
        unbiased = bn(x)
    assert not torch.allclose(got, unbiased, rtol=1e-4, atol=1e-4)


def test_adapts_only_the_encoder_up_to_the_tap(trained) -> None:
    model, head = trained
    with NCTTT(model, layer=1, head=head, steps=2, lr=1e-2, episodic=False) as nc:
        names = {n for n, _ in nc.named_adapted_parameters()}
        assert names == {n for n, _ in model.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1")}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        head_before = {k: v.clone() for k, v in head.state_dict().items()}
        nc(shifted(2))
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= names
        assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())  # head frozen


def test_forward_stops_at_the_tapped_layer(trained) -> None:
    model, head = trained
    calls = {"layer2": 0, "fc": 0}
    hs = [
        getattr(model, k).register_forward_pre_hook(lambda m, i, k=k: calls.__setitem__(k, calls[k] + 1))
        for k in calls
    ]
    try:
        with NCTTT(model, layer=1, head=head, steps=5, bn_mode="source") as nc:
            nc(shifted(3))
        assert calls == {"layer2": 1, "fc": 1}  # the prediction only
        calls.update(layer2=0, fc=0)
        with NCTTT(model, layer=1, head=head, steps=5) as nc:
            nc(shifted(3))
        assert calls == {"layer2": 2, "fc": 2}  # refresh: one statistics pass, then the prediction
        calls.update(layer2=0, fc=0)
        with NCTTT(model, layer=1, head=head, steps=5, truncate=False) as nc:
            nc(shifted(3))
        assert calls == {"layer2": 7, "fc": 7}
    finally:
        for h in hs:
            h.remove()


def test_truncation_does_not_change_results(trained) -> None:
    model, head = trained
    x = shifted(4)
    with NCTTT(model, layer=1, head=head, steps=3, lr=1e-3) as nc:
        a = nc(x)
    with NCTTT(model, layer=1, head=head, steps=3, lr=1e-3, truncate=False) as nc:
        b = nc(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_episodic_default_and_online_mode(trained) -> None:
    model, head = trained
    x = shifted(5)
    with NCTTT(model, layer=1, head=head, steps=2, lr=1e-3) as nc:
        assert nc.episodic
        assert torch.equal(nc(x), nc(x))
    with NCTTT(model, layer=1, head=head, steps=2, lr=1e-3, episodic=False) as nc:
        assert not torch.equal(nc(x), nc(x))


def test_restore_leaves_model_and_head_untouched(trained) -> None:
    model, head = trained
    snap, head_snap = snapshot_model(model), snapshot_model(head)
    nc = NCTTT(model, layer=1, head=head, steps=2, lr=1e-2, episodic=False)
    nc(shifted(6))
    nc(shifted(7))
    assert nc.restore() is model
    assert_model_unchanged(model, snap)
    assert_model_unchanged(head, head_snap)


def test_layer_defaults_to_the_head_binding(trained) -> None:
    model, head = trained
    with NCTTT(model, head=head, steps=1) as nc:
        assert nc.layers == ["layer1"]


def test_head_for_another_layer_or_model_raises(trained) -> None:
    model, head = trained
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match="trained on layer"):
        NCTTT(model, layer=2, head=head)
    with pytest.raises(ValueError, match="trained on layer"):
        NCTTT(torchvision.models.mobilenet_v3_small(num_classes=10), layer="features.1", head=copy.deepcopy(head))
    other_cls = type("OtherNet", (torchvision.models.ResNet,), {})
    other = other_cls(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=10).eval()
    with pytest.raises(ValueError, match="trained on a ResNet, not a OtherNet"):
        NCTTT(other, layer=1, head=copy.deepcopy(head))
    assert_model_unchanged(model, snap)
    with pytest.raises(TypeError, match="train_head"):
        NCTTT(model, layer=1, head=None)
    with pytest.raises(ValueError, match="list_layers"):
        NCTTT(model, layer="layerX", head=head)


def test_unbound_head_with_wrong_channels_raises_clearly() -> None:
    model = _calibrated_resnet()
    with NCTTT(model, layer=1, head=NCTTTHead(64), steps=1) as nc:  # unbound but the right width: fine
        nc(shifted(0))
    with pytest.raises(RuntimeError, match="channels"), NCTTT(model, layer=1, head=NCTTTHead(32), steps=1) as nc:
        nc(shifted(0))


def test_flat_head_needs_its_training_size(trained) -> None:
    model, _ = trained
    data = [torch.rand(8, 3, SIZE, SIZE) for _ in range(2)]
    flat = NCTTT.train_head(model, layer=1, loader=data, epochs=1, progress=False, mode="flat", embed_dim=4)
    assert flat.config["spatial"] == [8, 8]
    with NCTTT(model, layer=1, head=flat, steps=1) as nc:
        assert nc(shifted(0)).shape == (8, 10)
    flat.binding["input_shape"] = None  # no probe at wrap time: the check happens on the first batch
    with pytest.raises(ValueError, match="trained on"), NCTTT(model, layer=1, head=flat, steps=1) as nc:
        nc(torch.rand(8, 3, 64, 64))


def test_pixel_head_works_at_other_input_sizes(trained) -> None:
    model, head = trained
    with NCTTT(model, layer=1, head=head, steps=1) as nc:
        assert nc(torch.rand(4, 3, 48, 48)).shape == (4, 10)


def test_registry_and_repr(trained) -> None:
    model, head = trained
    assert "ncttt" in adaptkit.list_methods()
    with adaptkit.adapt(model, "NC-TTT", layer=1, head=head, steps=1) as nc:
        assert isinstance(nc, NCTTT)
        assert "bn_mode='refresh'" in repr(nc)


def test_nonfinite_loss_skips_the_step_and_warns(trained) -> None:
    model, head = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with NCTTT(model, layer=1, head=head, steps=2, lr=1e-2, bn_mode="source") as nc:
        nc.head.test_loss = lambda feats, t, g: feats[0].sum() * float("nan")  # type: ignore[method-assign]
        with pytest.warns(UserWarning, match="not finite"):
            out = nc(shifted(8))
        assert torch.isfinite(out).all()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
