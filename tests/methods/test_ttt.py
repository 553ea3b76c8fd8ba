"""TTT (rotation prediction): the pure functions against independent references, the head, and the wrapper
(adapts encoder and head, reset bitwise, restore exact, an independent re-implementation of the update)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import assert_model_unchanged, snapshot_model

from adaptkit.functional.rotation import rotate_batch, rotation_loss, rotation_targets
from adaptkit.heads.base import AuxHead
from adaptkit.heads.rotation import RotationHead
from adaptkit.methods.ttt import TTT

B, SIZE = 4, 32


class TinyCNN(nn.Module):
    """Two conv stages (``layer1``, ``layer2``), dropout and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.layer2(self.layer1(x)).mean((2, 3))))


def _calibrated(model: nn.Module) -> nn.Module:
    """Non-trivial BN running statistics, then eval mode."""
    g = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE, SIZE, generator=g))
    return model.eval()


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(TinyCNN())


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(torchvision.models.resnet18(weights=None, num_classes=10))


def ramps(n: int, seed: int = 0) -> torch.Tensor:
    """Images with an orientation: a vertical ramp (bright on top) of random contrast, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(1, -1, SIZE).view(1, 1, SIZE, 1).expand(1, 3, SIZE, SIZE)
    return ramp * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)


_HEADS: dict[tuple[str, Any], RotationHead] = {}


def head_for(name: str, layer: Any = "layer1", **kw: Any) -> RotationHead:
    """A head trained (frozen model, a few Adam steps) on ``layer`` of the named model, cached."""
    key = (name, layer, *sorted(kw.items()))
    if key not in _HEADS:
        model = tiny() if name == "tiny" else resnet()
        data = [ramps(B, seed=i) for i in range(2)]
        _HEADS[key] = TTT.train_head(model, layer, data, epochs=1, progress=False, lr=1e-2, **kw)  # type: ignore
    return copy.deepcopy(_HEADS[key])


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ references
def rot_ref(img: torch.Tensor, k: int) -> torch.Tensor:
    """``img`` (C, H, W) rotated by ``k * 90`` degrees counter-clockwise by explicit index arithmetic:
    ``out[i, j] = img[j, W-1-i]`` once, applied ``k`` times."""
    out = img
    for _ in range(k % 4):
        c, h, w = out.shape
        nxt = torch.empty(c, w, h, dtype=out.dtype)
        for i in range(w):
            for j in range(h):
                nxt[:, i, j] = out[:, j, w - 1 - i]
        out = nxt
    return out


def rot_flip(x: torch.Tensor, k: int) -> torch.Tensor:
    """The official TTT code's rotations: flip / transpose (90: flip W then transpose)."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def ce_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of ``log sum_c exp(z_c) - z_label``, in float64 Python arithmetic."""
    total = 0.0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    return total / logits.shape[0]


# ------------------------------------------------------------------------------------------ functional
def test_rotate_batch_matches_index_arithmetic_and_flips() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 5, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 3, 1, 0, 2])
    got = rotate_batch(x, labels)
    for i in range(8):
        k = int(labels[i])
        assert torch.equal(got[i], rot_ref(x[i], k))
        assert torch.equal(got[i], rot_flip(x[i], k))
    assert torch.equal(x, torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(0)))  # input untouched
    # four quarter turns give the image back; 1 then 3 too
    y = x
    for _ in range(4):
        y = rotate_batch(y, torch.ones(8, dtype=torch.long))
    assert torch.equal(y, x)
    assert torch.equal(rotate_batch(rotate_batch(x, labels), (4 - labels) % 4), x)


def test_rotate_batch_shapes_and_errors() -> None:
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(rotate_batch(x, torch.tensor([0, 2])), torch.stack([x[0], rot_flip(x[1], 2)]))
    with pytest.raises(ValueError, match="square"):
        rotate_batch(x, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        rotate_batch(torch.randn(2, 1, 4, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one label per sample"):
        rotate_batch(torch.randn(2, 1, 4, 4), torch.tensor([0]))
    xg = torch.randn(3, 1, 4, 4, requires_grad=True)
    rotate_batch(xg, torch.tensor([1, 2, 3])).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, 2 * xg.detach())


def test_rotation_targets() -> None:
    assert rotation_targets(3, "all").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert rotation_targets(3, "all").dtype == torch.long
    a = rotation_targets(500, "random", torch.Generator().manual_seed(1))
    b = rotation_targets(500, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (500,) and a.dtype == torch.long
    assert set(a.tolist()) == {0, 1, 2, 3}
    assert not torch.equal(a, rotation_targets(500, "random", torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="mode"):
        rotation_targets(3, "expand")
    with pytest.raises(ValueError, match="batch_size"):
        rotation_targets(0, "all")


def test_rotation_loss_matches_explicit_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g) * 3
    labels = torch.randint(0, 4, (7,), generator=g)
    assert rotation_loss(logits, labels).item() == pytest.approx(ce_ref(logits, labels), rel=1e-6)
    assert rotation_loss(torch.zeros(2, 4), torch.tensor([1, 2])).item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="logits"):
        rotation_loss(torch.zeros(2, 4), torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------------------------ head
def test_head_prepare_pairs_images_with_labels() -> None:
    head = RotationHead(8)
    x = ramps(3)
    x_aux, labels = head.prepare(x)
    assert x_aux.shape == (12, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for j in range(12):
        assert torch.equal(x_aux[j], rot_flip(x[j % 3], int(labels[j])))
    x_r, lab_r = head.prepare(x, torch.Generator().manual_seed(0), mode="random")
    assert x_r.shape == x.shape and lab_r.shape == (3,)
    for j in range(3):
        assert torch.equal(x_r[j], rot_flip(x[j], int(lab_r[j])))
    with pytest.raises(ValueError, match="images"):
        head.prepare(torch.randn(2, 3, 8))


def test_head_shapes_tokens_vectors_and_options() -> None:
    head = RotationHead(16, width=8)
    assert head(torch.randn(4, 16, 5, 7)).shape == (4, 4)
    assert head(torch.randn(4, 10, 16)).shape == (4, 4)  # tokens (B, N, C)
    assert head(torch.randn(4, 16)).shape == (4, 4)  # vectors (B, C)
    assert RotationHead(16).conv.out_channels == 16  # width defaults to C
    gn = RotationHead(16, norm="group", groups=4)
    assert isinstance(gn.norm, nn.GroupNorm) and gn(torch.randn(1, 16, 4, 4)).shape == (1, 4)
    with pytest.raises(ValueError, match="norm"):
        RotationHead(16, norm="layer")
    with pytest.raises(ValueError, match="divisible"):
        RotationHead(12, norm="group", groups=8)
    with pytest.raises(ValueError, match="rotations"):
        RotationHead(12, rotations="expand")
    with pytest.raises(ValueError, match="labels"):
        head.train_loss([torch.randn(4, 16, 5, 5)], None)


def test_head_save_load_round_trip(tmp_path: Any) -> None:
    head = head_for("tiny", "layer1", width=12, norm="group", groups=4)
    assert head.binding is not None and head.binding["layers"] == ["layer1"]
    assert head.binding["feature_shapes"] == [[8, SIZE, SIZE]]
    path = tmp_path / "rot.pt"
    head.save(path)
    blob = torch.load(path, weights_only=True)  # no code unpickled
    assert blob["format"].startswith("adaptkit.aux_head")
    for loaded in (RotationHead.load(path), AuxHead.load(path)):
        assert type(loaded) is RotationHead
        assert loaded.config == head.config == {
            "in_channels": 8, "width": 12, "norm": "group", "groups": 4, "rotations": "all"
        }  # fmt: skip
        assert loaded.binding == head.binding
        assert loaded.history == head.history
        assert same_state(state_of(loaded), state_of(head))
        feats = torch.randn(4, 8, 8, 8)
        assert torch.equal(loaded.eval()(feats), head.eval()(feats))
    # the binding survives: the loaded head refuses another layer
    with pytest.raises(ValueError, match="trained on layer"):
        TTT(tiny(), layer="layer2", head=RotationHead.load(path))


def test_train_head_learns_on_oriented_images() -> None:
    """Frozen random tiny CNN: the rotation loss goes down on images whose rotation is recognisable."""
    model = tiny()
    snap = snapshot_model(model)
    data = [ramps(8, seed=i) for i in range(3)]
    head = TTT.train_head(model, "layer1", data, epochs=5, progress=False, lr=1e-2)
    losses = [h["train_loss"] for h in head.history]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses
    assert_model_unchanged(model, snap)  # frozen training leaves the model exactly as it was
    assert isinstance(head, RotationHead) and not head.training


def test_make_head_sizes_from_features() -> None:
    head = TTT.make_head([(24, 4, 4)], width=6)
    assert isinstance(head, RotationHead) and head.conv.in_channels == 24 and head.conv.out_channels == 6


# ------------------------------------------------------------------------------------------ wrapper
@pytest.mark.parametrize("name", ["tiny", "resnet"])
def test_adapts_encoder_and_head(name: str) -> None:
    model = tiny() if name == "tiny" else resnet()
    head = head_for(name)
    x = ramps(B, seed=9) * 1.5 + 0.3
    with torch.no_grad():
        ref = model(x)
    before, head_before = state_of(model), state_of(head)
    w = TTT(model, layer="layer1", head=head, steps=2, lr=1e-2)
    assert w.episodic and w.steps == 2 and w.adapt_head
    assert w.head is not head  # a private copy is adapted
    wrap_head = state_of(w.head)
    assert same_state(wrap_head, head_before)
    opt_ids = {id(p) for g in w.optimizer.param_groups for p in g["params"]}  # type: ignore[union-attr]
    assert {id(p) for p in w.head.parameters()} <= opt_ids
    assert {id(p) for p in w.trainable_parameters()} <= opt_ids
    out = w(x)
    assert out.shape == ref.shape and not out.requires_grad
    assert not torch.allclose(out, ref)
    changed = [n for n, p in w.named_adapted_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.startswith("layer1") or name == "resnet" for n in changed)
    assert not same_state(state_of(w.head), wrap_head), "the head's own parameters were not adapted"
    assert same_state(state_of(head), head_before), "the caller's head was modified"
    # the adapted head is part of the adaptation state
    sd = w.adaptation_state_dict()
    assert any(k.startswith("_adaptkit.state.head.") for k in sd)
    # episodic: the same batch twice gives the same output
    assert torch.equal(w(x), out)
    # reset: model and head bitwise as at wrap time
    w.reset()
    assert same_state(state_of(model), before)
    assert same_state(state_of(w.head), wrap_head)
    assert all(p.grad is None for p in w.head.parameters())
    # loading the adaptation state brings the adapted head back
    w.load_adaptation_state_dict(sd)
    assert not same_state(state_of(w.head), wrap_head)
    w.restore()
    assert same_state(state_of(w.head), wrap_head)


def test_two_live_wrappers_share_one_head() -> None:
    """One trained head serving two wrappers at once: neither sees the other's adaptation."""
    head = head_for("tiny")
    x, x2 = ramps(B, seed=1), ramps(B, seed=2) * 2
    solo = TTT(tiny(), layer="layer1", head=head, steps=2, lr=1e-2)
    want = solo(x2)
    solo.restore()
    wa = TTT(tiny(), layer="layer1", head=head, steps=2, lr=1e-2, episodic=False)
    wa(x)
    wb = TTT(tiny(), layer="layer1", head=head, steps=2, lr=1e-2)  # wrapped while wa holds an adapted head
    wa(x)
    assert torch.equal(wb(x2), want)
    wa.restore()
    wb.restore()


def test_random_rotations_seeded_and_online() -> None:
    model, head = tiny(), head_for("tiny")
    x = ramps(B, seed=4)
    w = TTT(model, layer="layer1", head=head, steps=2, rotations="random", seed=5)
    first = w(x)
    assert torch.equal(w(x), first)  # re-seeded on reset: episodic forwards repeat exactly
    w.restore()
    online = TTT(tiny(), layer="layer1", head=head_for("tiny"), steps=1, episodic=False, lr=1e-2)
    a = online(x)
    assert not torch.equal(online(x), a)  # state carries over
    online.restore()
    with pytest.raises(ValueError, match="rotations"):
        TTT(tiny(), layer="layer1", head=head_for("tiny"), rotations="expand")


def test_restore_leaves_model_and_head_exactly_as_before() -> None:
    model, head = tiny(), head_for("tiny")
    head.eval()
    head.conv.weight.requires_grad_(False)  # unusual flags must come back too
    head.norm.train()
    snap = snapshot_model(model)
    head_snap = snapshot_model(head)
    w = TTT(model, layer="layer1", head=head, steps=2, episodic=False)
    for i in range(3):
        w(ramps(B, seed=i))
    assert w.head.conv.weight.requires_grad and w.head.training  # adapted while wrapped
    assert w.restore() is model
    assert_model_unchanged(model, snap)
    assert_model_unchanged(head, head_snap)
    # the wrapper's copy is back to the caller's head too: values, requires_grad, training flags
    assert same_state(state_of(w.head), head_snap.state)
    assert {n: p.requires_grad for n, p in w.head.named_parameters()} == head_snap.requires_grad
    assert {n: m.training for n, m in w.head.named_modules()} == head_snap.training
    assert all(p.grad is None for p in w.head.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="restore"):
        w(ramps(B))


def test_prediction_is_eval_forward_with_adapted_state() -> None:
    """The output is a plain eval-mode forward of the adapted model; the BN layers above the tap keep their
    source statistics (bn_mode="refresh", as the official code, whose main branch never runs while adapting)."""
    model = resnet()
    w = TTT(model, layer="layer1", head=head_for("resnet"), steps=2, lr=1e-2)
    assert not [n for n in w.targeted_modules if n.startswith(("layer2", "layer3", "layer4", "fc"))]
    x = ramps(B, seed=2)
    out = w(x)
    sd = {k: v for k, v in w.adaptation_state_dict().items() if not k.startswith("_adaptkit.")}
    assert any(k.startswith("layer1") and k.endswith("running_mean") for k in sd)
    w.restore()
    fresh = resnet()
    fresh.load_state_dict(sd, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), out)
    assert same_state(
        {k: v for k, v in state_of(fresh).items() if not k.startswith(("conv1", "bn1", "layer1"))},
        {k: v for k, v in state_of(resnet()).items() if not k.startswith(("conv1", "bn1", "layer1"))},
    )


def test_matches_independent_reimplementation() -> None:
    """Two SGD steps on the rotation CE of the 4B rotated batch over layer1 + head (training-form BN), then an
    eval forward of the clean batch - written out by hand on copies."""
    model, head = tiny(), head_for("tiny")
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(head)
    x = ramps(B, seed=7) + 0.2
    lr, steps = 0.05, 2
    out = TTT(model, layer="layer1", head=head, lr=lr, steps=steps)(x)

    ref_model.eval()
    ref_model.layer1.train()
    ref_head.train()
    params = list(ref_model.layer1.parameters()) + list(ref_head.parameters())
    xr = torch.cat([torch.stack([rot_flip(img, k) for img in x]) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(B)
    for _ in range(steps):
        logp = torch.log_softmax(ref_head(ref_model.layer1(xr)), dim=1)
        loss = -logp[torch.arange(4 * B), labels].mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    with torch.no_grad():
        want = ref_model.eval()(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bn_mode", ["batch", "source"])
def test_other_bn_modes(bn_mode: str) -> None:
    model = tiny()
    snap = snapshot_model(model)
    x = ramps(B, seed=3)
    with TTT(model, layer="layer1", head=head_for("tiny"), steps=2, bn_mode=bn_mode) as w:
        out = w(x)
        assert torch.equal(w(x), out)
        if bn_mode == "source":
            assert w.train_modules() == []
        w.head.eval()  # a user's head.eval() is undone at the next forward, like model.eval()
        assert torch.equal(w(x), out)
    assert_model_unchanged(model, snap)


def test_non_square_or_bad_input_raises() -> None:
    model = tiny()
    snap = snapshot_model(model)
    w = TTT(model, layer="layer1", head=head_for("tiny"), steps=1)
    with pytest.raises(ValueError, match="square"):
        w(torch.rand(B, 3, SIZE, SIZE + 8))
    w(torch.rand(B, 3, SIZE, SIZE))  # still usable
    w.restore()
    assert_model_unchanged(model, snap)


def test_head_for_another_layer_raises() -> None:
    head = head_for("tiny", "layer1")
    model = tiny()
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=r"trained on layer\(s\) \['layer1'\].*layer='layer1'"):
        TTT(model, layer="layer2", head=head)
    with pytest.raises(ValueError, match="trained on a TinyCNN"):
        TTT(resnet(), layer="layer1", head=head)
    assert_model_unchanged(model, snap)
    with pytest.raises(TypeError, match="RotationHead"):
        TTT(model, layer="layer1", head=None)
    # layer=None takes the head's binding
    w = TTT(model, head=head, steps=1)
    assert w.layers == ["layer1"]
    w.restore()
