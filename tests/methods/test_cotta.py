"""CoTTA against a reference written here from the official code (qinenergy/cotta ``cifar/cotta.py``): the student,
teacher and anchor forwards as explicit float64 formulas (conv, batch-statistic BN, ReLU, pooling, linear), the CIFAR
loss, Adam, the EMA and the restoration masks by hand."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_model_unchanged, randomize_bn, snapshot_model

import adaptkit
from adaptkit import CoTTA
from adaptkit.functional.augment import cotta_augment

TOL = dict(rtol=1e-9, atol=1e-10)
NAMES = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"]  # the student's param order


class Net(nn.Module):
    """Conv-BN-ReLU-pool-Dropout-Linear; ``dense=True``: a 1x1 conv head, output ``{"out": (B, K, H, W)}``."""

    def __init__(self, k: int = 5, dense: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Conv2d(4, k, 1) if dense else nn.Linear(4, k)
        self.dense, self.scale = dense, scale

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.bn(self.conv(x)))
        if self.dense:
            return {"out": self.scale * self.fc(self.drop(h))}
        return self.scale * self.fc(self.drop(h.mean((2, 3))))


def make_net(k: int = 5, dense: bool = False, scale: float = 1.0, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(k, dense, scale)
    randomize_bn(net.bn, bias=0.3, mean=0.5, tracked=3)
    return net.double().eval()


def _x(b: int = 6, seed: int = 1, hw: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_forward(p: dict[str, torch.Tensor], x: torch.Tensor, dense: bool = False, scale: float = 1.0) -> torch.Tensor:
    """The network by hand: batch-statistic BN (biased variance), no dropout."""
    h = F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1)
    mean = h.mean((0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)
    h = (h - mean) / torch.sqrt(var + 1e-5) * p["bn.weight"].view(1, -1, 1, 1) + p["bn.bias"].view(1, -1, 1, 1)
    h = torch.relu(h)
    if dense:
        return scale * (torch.einsum("bchw,kc->bkhw", h, p["fc.weight"].flatten(1)) + p["fc.bias"].view(1, -1, 1, 1))
    return scale * (h.mean((2, 3)) @ p["fc.weight"].T + p["fc.bias"])


def ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Official CIFAR loss: mean over samples (and pixels) of -sum_k softmax(t)_k log softmax(s)_k."""
    pt = torch.exp(teacher - torch.logsumexp(teacher, 1, keepdim=True))
    ls = student - torch.logsumexp(student, 1, keepdim=True)
    return -(pt * ls).sum(1).mean()


class RefCoTTA:
    """The official loop, written out: anchor confidence gate, teacher average over augmented copies, CE, Adam
    (betas 0.9/0.999, eps 1e-8), EMA of the parameters, restoration masks ``rand < p`` per parameter in order."""

    def __init__(self, net: Net, lr: float, alpha: float, p: float, p_th: float, n: int, seed: int) -> None:
        self.src = {k: v.detach().clone() for k, v in net.named_parameters()}
        self.student = {k: v.clone() for k, v in self.src.items()}
        self.teacher = {k: v.clone() for k, v in self.src.items()}
        self.m = {k: torch.zeros_like(v) for k, v in self.src.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.src.items()}
        self.t = 0
        self.lr, self.alpha, self.p, self.p_th, self.n = lr, alpha, p, p_th, n
        self.g = torch.Generator().manual_seed(seed)
        self.dense, self.scale = net.dense, net.scale

    def fwd(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return ref_forward(params, x, self.dense, self.scale)

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        anchor = self.fwd(self.src, x)
        conf = torch.softmax(anchor, 1).amax(1).mean()
        augmented = bool(conf < self.p_th)
        if augmented:
            geo = {"degrees": (0.0, 0.0), "translate": 0.0, "scale": (1.0, 1.0), "flip_p": 0.0} if self.dense else {}
            outs = [self.fwd(self.teacher, cotta_augment(x, self.g, **geo)) for _ in range(self.n)]
            t = torch.stack(outs).mean(0)
        else:
            t = self.fwd(self.teacher, x)
        leaves = {k: v.clone().requires_grad_(True) for k, v in self.student.items()}
        loss = ce(self.fwd(leaves, x), t.detach())
        grads = torch.autograd.grad(loss, [leaves[k] for k in NAMES])
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for k, g in zip(NAMES, grads):
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            denom = self.v[k].sqrt() / math.sqrt(1 - b2**self.t) + eps
            self.student[k] = self.student[k] - self.lr / (1 - b1**self.t) * self.m[k] / denom
        for k in NAMES:
            self.teacher[k] = self.alpha * self.teacher[k] + (1 - self.alpha) * self.student[k]
        for k in NAMES:
            mask = torch.rand(self.student[k].shape, generator=self.g, dtype=torch.float32) < self.p
            self.student[k] = torch.where(mask, self.src[k], self.student[k])
        return t, augmented


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


# ------------------------------------------------------------------------------------------------ reference steps
def test_steps_match_the_official_recipe() -> None:
    """Four steps, both branches of the gate (augmented average, teacher(x), teacher(x), augmented average)."""
    net = make_net()
    ref = RefCoTTA(copy.deepcopy(net), lr=1e-2, alpha=0.9, p=0.2, p_th=1.1, n=3, seed=5)
    w = CoTTA(net, lr=1e-2, alpha=0.9, restore_prob=0.2, aug_threshold=1.1, n_augmentations=3, seed=5)
    source = {k: v.clone() for k, v in _params(net).items()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    for i, threshold in enumerate([1.1, 0.0, 0.0, 1.1]):  # above 1: always augment; 0: never
        w.aug_threshold = ref.p_th = threshold
        x = _x(seed=10 + i)
        out = w(x)
        want, was_aug = ref.step(x)
        assert was_aug is (threshold > 1) and w.last_augmented is was_aug
        torch.testing.assert_close(out, want, **TOL)  # prediction = the teacher output before the step
        for k in NAMES:
            torch.testing.assert_close(_params(net)[k], ref.student[k], **TOL, msg=f"student {k} step {i}")
            torch.testing.assert_close(_params(w.teacher)[k], ref.teacher[k], **TOL, msg=f"teacher {k} step {i}")
            assert torch.equal(_params(w.anchor)[k], source[k])  # the anchor never moves
    # every weight and bias moved, some elements were restored exactly, BN buffers never written
    for k in NAMES:
        assert not torch.equal(_params(net)[k], source[k]), k
    restored = sum(int((_params(net)[k] == source[k]).sum()) for k in NAMES)
    assert restored > 0
    assert all(torch.equal(b, buffers[k]) for k, b in net.named_buffers())
    w.restore()


def test_without_augmentation_a_fresh_student_gets_no_signal() -> None:
    """Official behaviour: the teacher starts as a copy of the student and both use batch statistics, so on a
    confident batch (no augmentation) the pseudo-label equals the student's own softmax and the CE gradient
    softmax(s) - softmax(t) vanishes; nothing moves (restoring to the source is then a no-op too)."""
    net = make_net()
    source = {k: v.clone() for k, v in _params(net).items()}
    w = CoTTA(net, lr=1e-2, optimizer="sgd", momentum=0.0, aug_threshold=0.0, restore_prob=0.5)
    for i in range(3):
        out = w(_x(seed=40 + i))
        torch.testing.assert_close(out, ref_forward(source, _x(seed=40 + i)), **TOL)
    for k in NAMES:
        torch.testing.assert_close(_params(net)[k], source[k], rtol=0, atol=1e-15)
        torch.testing.assert_close(_params(w.teacher)[k], source[k], rtol=0, atol=1e-15)
    w.restore()


def test_dense_outputs_per_pixel_loss_and_photometric_augmentation() -> None:
    net = make_net(k=3, dense=True)
    ref = RefCoTTA(copy.deepcopy(net), lr=1e-2, alpha=0.9, p=0.1, p_th=1.1, n=2, seed=1)
    w = CoTTA(net, lr=1e-2, alpha=0.9, restore_prob=0.1, aug_threshold=1.1, n_augmentations=2, seed=1)
    for i in range(2):
        x = _x(b=2, seed=20 + i)
        out = w(x)
        want, _ = ref.step(x)
        assert isinstance(out, dict) and list(out) == ["out"]
        torch.testing.assert_close(out["out"], want, **TOL)
        for k in NAMES:
            torch.testing.assert_close(_params(net)[k], ref.student[k], **TOL)
    w.restore()


def test_loss_formulas() -> None:
    w = CoTTA(make_net(), n_augmentations=1)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.loss(s, t), ce(s, t))
    w.loss_kind = "symmetric"  # official ImageNet: -1/2 sum p_t log p_s - 1/2 sum p_s log p_t
    torch.testing.assert_close(w.loss(s, t), 0.5 * ce(s, t) + 0.5 * ce(t, s))
    dense_s, dense_t = s.view(1, 5, 2, 2), t.view(1, 5, 2, 2)  # per pixel, averaged over pixels
    w.loss_kind = "ce"
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    torch.testing.assert_close(w.loss(dense_s, dense_t), ce(flat(dense_s), flat(dense_t)))
    # no gradient reaches the teacher's logits
    t_req = t.clone().requires_grad_(True)
    w.loss_kind = "symmetric"
    w.loss(s.clone().requires_grad_(True), t_req).backward()
    assert t_req.grad is None
    w.restore()


def test_symmetric_loss_step_matches_the_imagenet_recipe() -> None:
    net = make_net()
    x = _x()
    src = {k: v.clone() for k, v in _params(net).items()}
    w = CoTTA(net, lr=0.01, optimizer="sgd", momentum=0.0, loss="symmetric", aug_threshold=0.0, restore_prob=0.0)
    out = w(x)
    leaves = {k: v.clone().requires_grad_(True) for k, v in src.items()}
    t = ref_forward(src, x)
    s = ref_forward(leaves, x)
    loss = 0.5 * ce(s, t) + 0.5 * ce(t, s)  # t detached: the second term's gradient flows through softmax(s)
    grads = dict(zip(NAMES, torch.autograd.grad(loss, [leaves[k] for k in NAMES])))
    torch.testing.assert_close(out, t, **TOL)
    for k in NAMES:
        torch.testing.assert_close(_params(net)[k], src[k] - 0.01 * grads[k], **TOL)
    w.restore()


# ------------------------------------------------------------------------------------------------ gating
def test_confidence_gate_both_ways() -> None:
    net = make_net()
    x = _x()
    conf = float(torch.softmax(ref_forward(_params(net), x), 1).amax(1).mean())
    calls: list[int] = []
    for threshold, augmented in [(conf + 1e-6, True), (conf - 1e-6, False)]:
        w = CoTTA(copy.deepcopy(net), aug_threshold=threshold, n_augmentations=4)
        h = w.teacher.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
        calls.clear()
        w(x)
        assert w.last_augmented is augmented
        assert w.last_confidence == pytest.approx(conf, rel=1e-12)
        assert len(calls) == (4 if augmented else 1)  # N augmented teacher forwards, or teacher(x) alone
        h.remove()
        w.restore()


def test_confident_anchor_skips_augmentation_and_uniform_one_augments() -> None:
    sharp = make_net(scale=200.0)  # huge logits: the anchor is ~100% confident
    w = CoTTA(sharp, n_augmentations=2)
    w(_x())
    assert w.last_augmented is False and w.last_confidence > 0.92
    w.restore()
    flat = make_net(scale=1e-3)  # near-uniform over 5 classes: confidence ~0.2 < 0.92
    w = CoTTA(flat, n_augmentations=2)
    w(_x())
    assert w.last_augmented is True and w.last_confidence < 0.25
    w.restore()


# ------------------------------------------------------------------------------------------------ state
def test_reset_rebuilds_teacher_and_replays_generators() -> None:
    net = make_net()
    w = CoTTA(net, lr=1e-2, restore_prob=0.2, aug_threshold=1.1, n_augmentations=2, seed=3)
    xs = [_x(seed=30 + i) for i in range(3)]
    first = [w(x) for x in xs]
    assert not all(torch.equal(a, b) for a, b in zip(_params(w.teacher).values(), _params(w.anchor).values()))
    w.reset()
    t_state = {k: v.clone() for k, v in w.teacher.state_dict().items()}
    a_state = w.anchor.state_dict()
    assert all(torch.equal(t_state[k], a_state[k]) for k in a_state)  # teacher bitwise back at the source
    assert w.last_confidence is None and len(w.optimizer.state) == 0
    again = [w(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    w.restore()


def test_episodic_forwards_agree() -> None:
    w = CoTTA(make_net(), episodic=True, aug_threshold=1.1, n_augmentations=2, restore_prob=0.3)
    x = _x()
    assert torch.equal(w(x), w(x))
    w.restore()


def test_state_dict_holds_teacher_and_rng_and_reloads_exactly() -> None:
    a, b = make_net(), make_net()
    wa = CoTTA(a, lr=1e-2, aug_threshold=1.1, n_augmentations=2, restore_prob=0.2)
    wb = CoTTA(b, lr=1e-2, aug_threshold=1.1, n_augmentations=2, restore_prob=0.2)
    wa(_x(seed=1))
    wa(_x(seed=2))
    sd = wa.adaptation_state_dict()
    assert {"_adaptkit.state.rng.cpu", *(f"_adaptkit.state.teacher.{k}" for k in NAMES)} <= set(sd)
    assert "_adaptkit.state.teacher.bn.running_mean" in sd
    wb.load_adaptation_state_dict(sd)
    for _ in range(2):
        x = _x(seed=7)
        assert torch.equal(wa(x), wb(x))
    # a teacher entry of the wrong shape is refused before anything is written
    snap = snapshot_model(b)
    t_before = {k: v.clone() for k, v in wb.teacher.state_dict().items()}
    bad = {**sd, "_adaptkit.state.teacher.fc.bias": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="another model"):
        wb.load_adaptation_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "_adaptkit.state.teacher.fc.bias"}
    with pytest.raises(KeyError, match="teacher"):
        wb.load_adaptation_state_dict(missing)
    assert_model_unchanged(b, snap)
    assert all(torch.equal(v, t_before[k]) for k, v in wb.teacher.state_dict().items())
    wa.restore()
    wb.restore()


def test_failed_batch_draws_nothing() -> None:
    """An error in a teacher forward (after the student's) leaves the generators as they were: the stream goes on
    exactly as a wrapper that never saw the failed batch."""
    net, twin = make_net(), make_net()
    w = CoTTA(net, aug_threshold=1.1, n_augmentations=3, restore_prob=0.2)
    w_twin = CoTTA(twin, aug_threshold=1.1, n_augmentations=3, restore_prob=0.2)
    calls = [0]

    def flaky(m: nn.Module, i: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")

    h = w.teacher.register_forward_pre_hook(flaky)
    with pytest.raises(RuntimeError, match="boom"):
        w(_x(seed=1))
    h.remove()
    x = _x(seed=2)
    assert torch.equal(w(x), w_twin(x))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    w.restore()
    w_twin.restore()


# ------------------------------------------------------------------------------------------------ models, edge cases
def test_user_model_untouched_except_the_student_and_copies_private() -> None:
    net = make_net()
    snap = snapshot_model(net)
    with CoTTA(net, n_augmentations=2) as w:
        assert w.teacher is not net and w.anchor is not net
        assert not any(p.requires_grad for p in w.teacher.parameters())
        assert not any(p.requires_grad for p in w.anchor.parameters())
        assert {id(p) for p in w.teacher.parameters()}.isdisjoint(id(p) for p in net.parameters())
        assert w.teacher.bn.training and not w.teacher.bn.track_running_stats  # configured copies: BN-batch
        assert not w.teacher.drop.training  # dropout off
        assert [n for n, _ in w.named_adapted_parameters()] == NAMES
        assert w.train_modules() == ["bn"]
        w(_x())
    assert_model_unchanged(net, snap)
    assert isinstance(w.teacher, nn.Identity)  # the copies are freed on restore


def test_layernorm_model_adapts_every_weight_and_bias() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).eval()
    snap = snapshot_model(net)
    before = {k: v.clone() for k, v in net.named_parameters()}
    w = CoTTA(net, lr=1e-2, n_augmentations=2)
    assert w.train_modules() == []
    out = w(torch.rand(4, 3, 4, 4))
    assert out.shape == (4, 4)
    assert all(not torch.equal(p, before[k]) for k, p in net.named_parameters())
    w.restore()
    assert_model_unchanged(net, snap)


def test_only_parameters_named_weight_or_bias_adapt() -> None:
    """As the official collect_params: a parameter like a ViT cls token stays at its value."""

    class WithToken(Net):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 4, 1, 1))

        def forward(self, x: torch.Tensor) -> Any:
            h = torch.relu(self.bn(self.conv(x)) + self.token)
            return self.fc(h.mean((2, 3)))

    net = WithToken().eval()
    w = CoTTA(net, lr=1e-2, n_augmentations=1)
    assert "token" not in dict(w.named_adapted_parameters())
    w(torch.rand(4, 3, 8, 8))
    assert torch.equal(net.token, torch.zeros(1, 4, 1, 1))
    w.restore()


def test_batch_size_one_and_one_class() -> None:
    w = CoTTA(make_net(), n_augmentations=2)  # BN2d has H*W values per channel: batch statistics exist for B = 1
    assert w(_x(b=1)).shape == (1, 5)
    w.restore()
    net = make_net(k=1)  # one class: softmax 1, confidence 1 (no augmentation), loss 0, nothing moves but restore
    before = {k: v.clone() for k, v in net.named_parameters()}
    w = CoTTA(net, restore_prob=0.0, n_augmentations=2)
    out = w(_x())
    assert w.last_augmented is False and out.shape == (6, 1)
    assert all(torch.equal(p, before[k]) for k, p in net.named_parameters())
    w.restore()


def test_include_exclude_and_bad_arguments() -> None:
    net = make_net()
    w = CoTTA(net, include=["fc"], n_augmentations=1)
    assert [n for n, _ in w.named_adapted_parameters()] == ["fc.weight", "fc.bias"]
    assert set(w.targeted_modules) == {"fc", "bn"}  # BN runs on batch statistics whatever the selection
    w.restore()
    w = CoTTA(net, exclude=["conv", "bn"], n_augmentations=1)
    assert [n for n, _ in w.named_adapted_parameters()] == ["fc.weight", "fc.bias"]
    w.restore()
    snap = snapshot_model(net)
    with pytest.raises(ValueError, match="list_layers"):
        CoTTA(net, include=["nope"])
    with pytest.raises(ValueError, match="list_layers"):
        CoTTA(net, include="nothing_matches")
    for kw, match in [
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"alpha": 1.5}, "alpha"),
        ({"restore_prob": -0.1}, "restore_prob"),
        ({"aug_threshold": -1.0}, "aug_threshold"),
        ({"aug_threshold": float("nan")}, "aug_threshold"),
        ({"n_augmentations": 0}, "n_augmentations"),
        ({"loss": "kl"}, "loss"),
        ({"augment_kwargs": {"generator": None}}, "generator"),
        ({"augment_kwargs": {"brightnes": (0.5, 1.5)}}, "brightnes"),
    ]:
        with pytest.raises(ValueError, match=match):
            CoTTA(net, **kw)
    assert_model_unchanged(net, snap)
    w = CoTTA(net, n_augmentations=1)
    wrapped = snapshot_model(net)
    with pytest.raises((TypeError, ValueError)):
        w(torch.rand(6, 48, dtype=torch.float64))  # not an image batch: refused before the model runs
    assert_model_unchanged(net, wrapped)
    w.restore()
    assert_model_unchanged(net, snap)


def test_out_of_range_inputs_warn_once() -> None:
    w = CoTTA(make_net(), aug_threshold=1.1, n_augmentations=1)
    with pytest.warns(UserWarning, match="value_range"):
        w(_x() * 4 - 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(_x() * 4 - 2)  # once per wrapper
        w(_x())
    w.restore()


def test_registered_and_adapt_by_name() -> None:
    assert "cotta" in adaptkit.list_methods()
    w = adaptkit.adapt(make_net(), "cotta", n_augmentations=1)
    assert isinstance(w, CoTTA) and w.name == "cotta" and not w.episodic
    w.restore()
