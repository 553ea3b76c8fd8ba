"""OCL: the loss against an explicit-Gram reference, and the method's semantics on a tiny segmentation CNN and on
torchvision's LR-ASPP (dict output)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_model_unchanged, count_live_tensors, randomize_bn, snapshot_model

from adaptkit.functional.ocl import (
    output_contrastive_loss,
    output_contrastive_terms,
    split_views,
    two_view_batch,
)
from adaptkit.methods.ocl import OCL

C = 4
SIZE = 16


# ---------------------------------------------------------------------------------------------- models
class TinySeg(nn.Module):
    """Conv(stride 2) + BN + ReLU -> 1x1 conv to C classes, bilinearly upsampled to the input size."""

    def __init__(self, num_classes: int = C, aux: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1) if aux else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))

    def forward(self, x: torch.Tensor) -> Any:
        f = self.features(x)
        out = F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.aux is None:
            return out
        aux = F.interpolate(self.aux(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "aux": aux}


def tiny(seed: int = 0, aux: bool = False) -> TinySeg:
    torch.manual_seed(seed)
    net = TinySeg(aux=aux)
    randomize_bn(net.bn, bias=0.3, mean=0.5, tracked=5)
    with torch.no_grad():
        net.head.weight.mul_(4.0)  # confident-ish predictions: non-trivial loss terms
    return net.eval()


def batch(i: int, n: int = 2, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 3, size, size, generator=g) * 1.3 + 0.2


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- the loss
def gram_reference(la: torch.Tensor, lb: torch.Tensor, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative terms as in the official code: explicit M x M Gram matrix per view, float64."""
    la, lb = la.double(), lb.double()

    def z(t: torch.Tensor) -> torch.Tensor:
        p = torch.exp(t - t.max(dim=1, keepdim=True).values)
        p = p / p.sum(dim=1, keepdim=True)
        return p / torch.sqrt((p * p).sum(dim=1, keepdim=True))

    za, zb = z(la), z(lb)
    pos = -(za * zb).sum(dim=1).mean()
    negs = []
    for k in range(la.shape[0]):
        per_view = []
        for zv in (za[k], zb[k]):
            sub = zv[:, ::stride, ::stride].reshape(zv.shape[0], -1).T  # (M, C)
            gram = sub @ sub.T  # (M, M)
            per_view.append(gram.sum() / gram.shape[0] ** 2)
        negs.append(sum(per_view) / 2)
    return pos, torch.stack(negs).mean()


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_loss_matches_explicit_gram(stride: int) -> None:
    g = torch.Generator().manual_seed(0)
    la = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) * 3
    lb = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) * 3
    pos_ref, neg_ref = gram_reference(la, lb, stride)
    terms = output_contrastive_terms(la, lb, lambda_pos=3.0, lambda_neg=1.0, stride=stride)
    torch.testing.assert_close(terms.positive, pos_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.negative, neg_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.loss, 3.0 * pos_ref + neg_ref, rtol=1e-12, atol=1e-12)
    loss = output_contrastive_loss(la, lb, lambda_pos=2.0, lambda_neg=0.5, stride=stride)
    torch.testing.assert_close(loss, 2.0 * pos_ref + 0.5 * neg_ref, rtol=1e-12, atol=1e-12)
    # float32 agrees with the float64 reference too
    t32 = output_contrastive_terms(la.float(), lb.float(), stride=stride)
    assert abs(float(t32.negative) - float(neg_ref)) < 1e-5


def test_loss_bounds_and_extremes() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        la, lb = torch.randn(2, 2, C, 5, 5, generator=g) * 5
        t = output_contrastive_terms(la, lb)
        assert -1.0 - 1e-6 <= float(t.positive) <= 0.0
        assert 1.0 / C - 1e-6 <= float(t.negative) <= 1.0 + 1e-6
    uniform = torch.zeros(1, C, 3, 4)
    t = output_contrastive_terms(uniform, uniform)
    assert float(t.positive) == pytest.approx(-1.0) and float(t.negative) == pytest.approx(1.0)
    # confident pixels spread evenly over the classes: ||mean z||^2 -> 1/C
    onehot = F.one_hot(torch.arange(C).repeat(3), C).T.reshape(1, C, 3, C).float() * 50
    assert float(output_contrastive_terms(onehot, onehot).negative) == pytest.approx(1.0 / C, abs=1e-6)


def test_loss_on_classifier_logits() -> None:
    """(B, C) logits: one "pixel" per image, so the negative term is the constant 1 and L_pos is -cos."""
    la, lb = torch.randn(3, C, dtype=torch.float64), torch.randn(3, C, dtype=torch.float64)
    t = output_contrastive_terms(la, lb)
    assert float(t.negative) == pytest.approx(1.0)
    torch.testing.assert_close(t.positive, -F.cosine_similarity(la.softmax(1), lb.softmax(1)).mean())
    a, b = split_views(torch.cat([la, lb]), 3)
    assert torch.equal(a, la) and torch.equal(b, lb)  # nothing to flip back


def test_loss_runs_in_fp32_for_half_inputs() -> None:
    la = torch.randn(1, C, 4, 4).half()
    assert output_contrastive_loss(la, la).dtype == torch.float32


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    la = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: output_contrastive_loss(a, b), (la, lb))
    assert torch.autograd.gradcheck(lambda a, b: output_contrastive_loss(a, b, 1.5, 2.0, stride=2), (la, lb))


def test_flip_alignment_hand_case() -> None:
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]])  # (1, 1, 1, 3)
    views = two_view_batch(x)
    assert views.flatten().tolist() == [1.0, 2.0, 3.0, 3.0, 2.0, 1.0]
    # a model output on the two views: view b is mirrored; split_views mirrors it back pixel by pixel
    out = torch.tensor([[[[10.0, 20.0, 30.0]]], [[[31.0, 21.0, 11.0]]]])
    a, b = split_views(out, 1)
    assert a.flatten().tolist() == [10.0, 20.0, 30.0]
    assert b.flatten().tolist() == [11.0, 21.0, 31.0]
    with pytest.raises(ValueError, match="two-view"):
        split_views(out, 2)
    # a flip-equivariant model (1x1 conv): after the flip-back both views agree exactly, so L_pos = -1
    conv = nn.Conv2d(3, C, 1)
    xb = batch(0)
    with torch.no_grad():
        la, lb = split_views(conv(two_view_batch(xb)), xb.shape[0])
    torch.testing.assert_close(la, lb)
    assert float(output_contrastive_terms(la, lb).positive) == pytest.approx(-1.0)


def test_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        output_contrastive_loss(torch.zeros(1, C, 2, 2), torch.zeros(1, C, 2, 3))
    with pytest.raises(ValueError, match="stride"):
        output_contrastive_loss(torch.zeros(1, C, 2, 2), torch.zeros(1, C, 2, 2), stride=0)


# ---------------------------------------------------------------------------------------------- the method
@pytest.mark.parametrize("aux", [False, True])
def test_output_type_shape_and_weights_change(aux: bool) -> None:
    model = tiny(aux=aux)
    x = batch(0)
    with torch.no_grad():
        ref = model(x)
    before = params_of(model)
    w = OCL(model, lr=1e-2)
    out = w(x)
    assert type(out) is type(ref)
    if aux:
        assert set(out) == {"out", "aux"}
        assert out["aux"].shape == ref["aux"].shape
    for o, r in [(out, ref)] if not aux else [(out["out"], ref["out"])]:
        assert o.shape == r.shape and o.dtype == r.dtype and not o.requires_grad
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert {"conv.weight", "bn.weight", "head.weight"} <= set(changed)
    if aux:
        assert "aux.weight" not in changed  # no gradient reaches the aux head, so SGD skips it (as in OCL)
    assert w.last_terms is not None and -1.0 <= float(w.last_terms.positive) <= 0.0
    w.restore()


def test_predict_then_update() -> None:
    """The prediction comes from the forward that produced the loss: it reflects the earlier updates only."""
    model, twin = tiny(), tiny()
    w = OCL(model, lr=5e-2, restore_prob=0.0)
    frozen = OCL(twin, lr=0.0, weight_decay=0.0, restore_prob=0.0)  # same forward, never updates
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    x1, x2 = batch(1), batch(2)
    torch.testing.assert_close(w(x1), frozen(x1), rtol=0, atol=0)
    assert calls == [2 * x1.shape[0]]  # one forward on the two views per step, nothing else
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)
    out2 = w(x2)
    torch.testing.assert_close(out2, frozen(x2), rtol=0, atol=0)
    source = OCL(tiny(), lr=0.0, weight_decay=0.0)
    assert not torch.equal(out2, source(x2))  # ...and it is not the source model's
    source.restore()
    w.restore()
    frozen.restore()


def test_prediction_modes_and_flip_average() -> None:
    model = tiny()
    x = batch(3)
    with torch.no_grad():
        ref_a, ref_b = model(x), model(x.flip(-1)).flip(-1)
    # bn_prior=0: plain eval BatchNorm, so with lr=0 the predictions are the source model's
    first = OCL(model, lr=0.0, weight_decay=0.0, bn_prior=0, prediction="first")
    torch.testing.assert_close(first(x), ref_a, rtol=1e-5, atol=1e-5)
    first.restore()
    mean = OCL(model, lr=0.0, weight_decay=0.0, bn_prior=None)  # None is the same as 0
    torch.testing.assert_close(mean(x), (ref_a + ref_b) / 2, rtol=1e-5, atol=1e-5)
    mean.restore()


@pytest.mark.parametrize("prior", [0.7, "batch"])
def test_bn_prior_rule(prior: float | str) -> None:
    """BN normalises with pi * source + (1 - pi) * two-view batch statistics (unbiased var); buffers untouched.
    ``"batch"`` is pi = 0 (batch statistics alone), unlike the number 0 (plain eval BN)."""
    pi = 0.0 if prior == "batch" else float(prior)
    model = tiny()
    x = batch(4)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    w = OCL(model, lr=0.0, weight_decay=0.0, bn_prior=prior, prediction="first", restore_prob=0.0)
    out = w(x)
    with torch.no_grad():
        h = model.conv(torch.cat([x, x.flip(-1)]))
        var_b, mean_b = torch.var_mean(h, dim=(0, 2, 3), correction=1)
        mean = pi * model.bn.running_mean + (1 - pi) * mean_b
        var = pi * model.bn.running_var + (1 - pi) * var_b
        f = F.batch_norm(h, mean, var, model.bn.weight, model.bn.bias, False, 0.0, model.bn.eps).relu()
        logits = F.interpolate(model.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, logits[: x.shape[0]], rtol=1e-5, atol=1e-5)
    w(batch(5))
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    w.restore()


def test_batch_size_one() -> None:
    model = tiny()
    with OCL(model, lr=1e-2) as w:
        out = w(batch(0, n=1))
    assert out.shape == (1, C, SIZE, SIZE)


def _run(seed: int, restore_prob: float, n: int = 3, lr: float = 0.5) -> dict[str, torch.Tensor]:
    model = tiny()
    w = OCL(model, lr=lr, restore_prob=restore_prob, seed=seed)
    for i in range(n):
        w(batch(i))
    after = params_of(model)
    w.restore()
    return after


def test_stochastic_restoration_seeded_and_fraction() -> None:
    a, b, c = _run(0, 0.3), _run(0, 0.3), _run(1, 0.3)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: bitwise the same
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed: other masks

    # one step: elements that the update moved are back at the source with probability restore_prob
    p_r = 0.25
    src = params_of(tiny())
    plain, restored = _run(0, 0.0, n=1), _run(0, p_r, n=1)
    moved = back = 0
    for k in src:
        m = plain[k] != src[k]
        assert torch.equal(restored[k][~m], plain[k][~m])
        is_src = restored[k][m] == src[k][m]
        assert torch.equal(restored[k][m][~is_src], plain[k][m][~is_src])  # otherwise the plain update
        moved += int(m.sum())
        back += int(is_src.sum())
    assert moved > 200
    frac = back / moved
    assert abs(frac - p_r) < 4 * (p_r * (1 - p_r) / moved) ** 0.5, frac


def test_reset_bitwise_and_reseeds() -> None:
    model = tiny()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    w = OCL(model, lr=0.5, restore_prob=0.2, seed=3)
    first = [w(batch(i)) for i in range(3)]
    adapted = params_of(model)
    assert any(not torch.equal(adapted[k], source[k]) for k in adapted)
    assert len(w.optimizer.state) > 0  # type: ignore[union-attr]
    w.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert len(w.optimizer.state) == 0  # type: ignore[union-attr]
    assert all(p.grad is None for p in w.trainable_parameters())
    again = [w(batch(i)) for i in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert all(torch.equal(v, adapted[k]) for k, v in params_of(model).items())  # same masks after re-seeding
    w.restore()


def test_restore_exact_and_flags() -> None:
    model = tiny(aux=True)
    model.aux.weight.requires_grad_(False)  # frozen at wrap time: not adapted, flag kept
    snap = snapshot_model(model)
    w = OCL(model, lr=1e-2)
    assert all(p is not model.aux.weight for p in w.trainable_parameters())
    assert len(w.trainable_parameters()) == len([p for p in model.parameters() if p.requires_grad])
    for i in range(3):
        w(batch(i))
    assert w.restore() is model
    assert_model_unchanged(model, snap)
    with pytest.raises(RuntimeError, match="restore"):
        w(batch(0))


def test_episodic_and_continual() -> None:
    x = batch(6)
    ep = OCL(tiny(), lr=0.5, episodic=True)
    o1, o2 = ep(x), ep(x)
    assert torch.equal(o1, o2)  # every batch starts from the source
    ep.restore()
    cont = OCL(tiny(), lr=0.5)
    c1, c2 = cont(x), cont(x)
    assert torch.equal(c1, o1) and not torch.equal(c2, c1)  # updates carry over
    cont.restore()


def test_adaptation_state_round_trip_includes_rng() -> None:
    wa, wb = OCL(tiny(), lr=0.5, restore_prob=0.3), OCL(tiny(), lr=0.5, restore_prob=0.3)
    wa(batch(0))
    wa(batch(1))
    wb(batch(7))
    wb.load_adaptation_state_dict(wa.adaptation_state_dict())
    wa(batch(2))
    wb(batch(2))
    pa, pb = params_of(wa.inner), params_of(wb.inner)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    wa.restore()
    wb.restore()


def test_memory_flat_over_20_steps() -> None:
    w = OCL(tiny(), lr=1e-2)
    xs = [batch(i) for i in range(4)]
    for x in xs:
        w(x)
    del x
    start = count_live_tensors()
    for i in range(20):
        w(xs[i % 4])
    assert count_live_tensors() - start <= 3
    w.restore()


def test_selection_options_and_errors() -> None:
    model = tiny()
    snap = snapshot_model(model)
    norm = OCL(model, params="norm")
    assert {id(p) for p in norm.trainable_parameters()} == {id(model.bn.weight), id(model.bn.bias)}
    norm.restore()
    head = OCL(model, include=["head"])
    assert {id(p) for p in head.trainable_parameters()} == {id(model.head.weight), id(model.head.bias)}
    head.restore()
    assert_model_unchanged(model, snap)
    with pytest.raises(ValueError, match="list_layers"):
        OCL(model, include=["no_such_layer"])
    bads = [dict(lr=-1.0), dict(restore_prob=1.5), dict(bn_prior=2.0), dict(bn_prior="source"), dict(stride=0),
            dict(params="x")]  # fmt: skip
    for bad in bads:
        with pytest.raises(ValueError):
            OCL(model, **bad)  # type: ignore[arg-type]
    frozen = tiny()
    for p in frozen.parameters():
        p.requires_grad_(False)
    fsnap = snapshot_model(frozen)
    with pytest.raises(ValueError, match="requires_grad"):
        OCL(frozen)
    assert_model_unchanged(frozen, fsnap)
    assert_model_unchanged(model, snap)


def test_registered() -> None:
    import adaptkit

    assert adaptkit.get_method("ocl") is OCL


# ---------------------------------------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def lraspp() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5
    )
    return model.eval()


def test_lraspp_dict_output_restoration_and_restore(lraspp: nn.Module) -> None:
    model = copy.deepcopy(lraspp)
    x = batch(0, n=2, size=64)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot_model(model)
    src = params_of(model)
    plain_model = copy.deepcopy(lraspp)
    plain = OCL(plain_model, lr=1e-2, restore_prob=0.0)
    w = OCL(model, lr=1e-2)  # default restore_prob 0.01
    out = w(x)
    plain(x)
    assert type(out) is type(ref) and set(out) == set(ref)
    assert out["out"].shape == ref["out"].shape == (2, 5, 64, 64)
    assert out["out"].dtype == ref["out"].dtype and not out["out"].requires_grad
    moved = back = 0
    for n, p in model.named_parameters():
        q = dict(plain_model.named_parameters())[n].detach()
        m = q != src[n]
        moved += int(m.sum())
        back += int((p.detach()[m] == src[n][m]).sum())
    assert moved > 100_000, "one step should move most weights"
    assert abs(back / moved - 0.01) < 0.002
    assert w.restore() is model
    assert_model_unchanged(model, snap)
    plain.restore()
