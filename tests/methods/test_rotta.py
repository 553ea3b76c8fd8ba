"""RoTTA against a hand-written reference run transcribed from the official code (BIT-DA/RoTTA
``core/adapter/rotta.py``, ``core/utils/memory.py``, ``core/utils/bn_layers.py``, commit 67e34c9): teacher
predictions, the per-sample memory and its mid-batch updates, timeliness weights, soft-label cross-entropy, Adam,
the EMA teacher and both models' Robust BN statistics; then reset, episodic mode, degenerate inputs and errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from adaptkit.functional.augment import cotta_augment
from adaptkit.methods.rotta import RoTTA, rotta_loss, rotta_pseudo_labels


# ---------------------------------------------------------------------------------------------- models
class Net(nn.Module):
    """Conv + BN2d, conv + GroupNorm, linear + BN1d: all three norm kinds RoTTA adapts."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.fc1 = nn.Linear(6, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x))).mean((2, 3))
        return self.fc2(torch.relu(self.bn2(self.fc1(x))))


def _images(g: torch.Generator, n: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Images in [0, 1] with a per-image colour (what the tiny net's predictions depend on) and some texture."""
    colour = torch.rand(n, 3, 1, 1, generator=g, dtype=dtype)
    return (colour + 0.2 * torch.rand(n, 3, size, size, generator=g, dtype=dtype)).clamp(0, 1)


def make_net(classes: int = 3, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Random weights, BN statistics calibrated on such images (so predictions spread over the classes), random
    norm-layer affine parameters."""
    torch.manual_seed(3)
    net = Net(classes).to(dtype)
    for m in (net.bn1, net.bn2):
        m.momentum = None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        net.train()(_images(g, 64, 16, dtype))
        for m in (net.bn1, net.bn2, net.gn):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=dtype) * 0.4 + 0.8)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=dtype) * 0.1)
        net.fc2.weight.mul_(4.0)
        net.fc2.bias.zero_()
    return net.eval()


def batches(n: int, b: int = 5, size: int = 16, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return [_images(g, b, size, dtype) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- official transcription
class OfficialRobustBN(nn.Module):
    """``RobustBN2d`` / ``RobustBN1d``, transcribed."""

    def __init__(self, bn: nn.Module, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("source_mean", copy.deepcopy(bn.running_mean))
        self.register_buffer("source_var", copy.deepcopy(bn.running_var))
        self.weight = copy.deepcopy(bn.weight)
        self.bias = copy.deepcopy(bn.bias)
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            b_var, b_mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            mean = (1 - self.momentum) * self.source_mean + self.momentum * b_mean
            var = (1 - self.momentum) * self.source_var + self.momentum * b_var
            self.source_mean, self.source_var = copy.deepcopy(mean.detach()), copy.deepcopy(var.detach())
            mean, var = mean.view(shape), var.view(shape)
        else:
            mean, var = self.source_mean.view(shape), self.source_var.view(shape)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


class OfficialCSTU:
    """``CSTU``, transcribed (items are [data, uncertainty, age] lists)."""

    def __init__(self, capacity: int, num_class: int) -> None:
        self.capacity, self.num_class, self.per_class = capacity, num_class, capacity / num_class
        self.data: list[list[list]] = [[] for _ in range(num_class)]

    def score(self, age: float, u: float) -> float:
        return 1.0 * 1 / (1 + math.exp(-age / self.capacity)) + 1.0 * u / math.log(self.num_class)

    def add_instance(self, x: torch.Tensor, cls: int, u: float) -> None:
        if self.remove_instance(cls, self.score(0, u)):
            self.data[cls].append([x, u, 0])
        for c in self.data:
            for item in c:
                item[2] += 1

    def remove_instance(self, cls: int, score: float) -> bool:
        if len(self.data[cls]) < self.per_class:
            if sum(len(c) for c in self.data) < self.capacity:
                return True
            dist = [len(c) for c in self.data]
            return self.remove_from_classes([i for i, n in enumerate(dist) if n == max(dist)], score)
        return self.remove_from_classes([cls], score)

    def remove_from_classes(self, classes: list[int], base: float) -> bool:
        best = None
        for c in classes:
            for i, item in enumerate(self.data[c]):
                s = self.score(item[2], item[1])
                if best is None or s >= best[0]:
                    best = (s, c, i)
        if best is None:
            return True
        if best[0] > base:
            self.data[best[1]].pop(best[2])
            return True
        return False

    def get_memory(self) -> tuple[list[torch.Tensor], list[float]]:
        return [it[0] for c in self.data for it in c], [it[2] / self.capacity for c in self.data for it in c]


ADAPTED = ["bn1.weight", "bn1.bias", "gn.weight", "gn.bias", "bn2.weight", "bn2.bias"]


class Reference:
    """The official RoTTA loop with the transcribed pieces; Adam and the EMA written out by hand."""

    def __init__(self, net: nn.Module, capacity: int, uf: int, nu: float, lr: float, seed: int) -> None:
        self.student = copy.deepcopy(net)
        self.student.bn1 = OfficialRobustBN(self.student.bn1, 0.05)
        self.student.bn2 = OfficialRobustBN(self.student.bn2, 0.05)
        self.student.requires_grad_(False)
        self.params = {n: p for n, p in self.student.named_parameters() if n in ADAPTED}
        for p in self.params.values():
            p.requires_grad_(True)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.mem = OfficialCSTU(capacity, 3)
        self.uf, self.nu, self.lr = uf, nu, lr
        self.count, self.t = 0, 0
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.gen = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.student.eval()
            self.teacher.eval()
            ema_out = self.teacher(x)
            p = torch.softmax(ema_out, dim=1)
            labels = torch.argmax(p, dim=1)
            entropy = torch.sum(-p * torch.log(p + 1e-6), dim=1)
        for i, data in enumerate(x):
            self.mem.add_instance(data, labels[i].item(), entropy[i].item())
            self.count += 1
            if self.count % self.uf == 0:
                self.update()
        return ema_out

    def update(self) -> None:
        self.student.train()
        self.teacher.train()
        data, ages = self.mem.get_memory()
        data = torch.stack(data)
        strong = cotta_augment(data, self.gen)
        with torch.no_grad():
            t_out = self.teacher(data)
        s_out = self.student(strong)
        a = torch.tensor(ages).float()
        w = torch.exp(-a) / (1 + torch.exp(-a))
        ce = torch.stack([-(t_out[i].softmax(0) * s_out[i].log_softmax(0)).sum() for i in range(len(data))])
        loss = (ce * w).mean()
        self.losses.append(loss.item())
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names])
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        with torch.no_grad():
            for n, g in zip(names, grads):
                self.m[n] = b1 * self.m[n] + (1 - b1) * g
                self.v[n] = b2 * self.v[n] + (1 - b2) * g * g
                m_hat = self.m[n] / (1 - b1**self.t)
                v_hat = self.v[n] / (1 - b2**self.t)
                self.params[n] -= self.lr * m_hat / (v_hat.sqrt() + eps)
            t_params = dict(self.teacher.named_parameters())
            for n in names:
                t_params[n].copy_((1 - self.nu) * t_params[n] + self.nu * self.params[n])


def _rotta(net: nn.Module, **kw: object) -> RoTTA:
    args = {"memory_size": 6, "update_frequency": 4, "nu": 0.05, "lr": 1e-2, "seed": 3, **kw}
    return RoTTA(net, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- formulas
def test_pseudo_labels_and_uncertainty_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    labels, unc = rotta_pseudo_labels(logits)
    for i in range(2):
        p = [math.exp(v) for v in logits[i].tolist()]
        p = [v / sum(p) for v in p]
        assert labels[i].item() == max(range(3), key=lambda c: p[c])
        assert unc[i].item() == pytest.approx(sum(-q * math.log(q + 1e-6) for q in p), abs=1e-12)
    # dense: the most frequent pixel label (ties: the smaller class), the mean pixel entropy
    dense = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    dense[0, 2, :, :1] = 5.0  # two pixels class 2, two pixels class 0 (uniform ties -> argmax 0): tie -> 0
    dense[1, 1] = 5.0
    dense[1, 2, 0, 0] = 9.0
    labels, unc = rotta_pseudo_labels(dense)
    assert labels.tolist() == [0, 1]
    per_pixel = rotta_pseudo_labels(dense.permute(0, 2, 3, 1).reshape(-1, 3))[1].view(2, 4)
    torch.testing.assert_close(unc, per_pixel.mean(1))


def test_loss_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 0.1, 0.3, 0.0], dtype=torch.float64)
    want = 0.0
    for i in range(4):
        pt = [math.exp(v) for v in t[i].tolist()]
        pt = [v / sum(pt) for v in pt]
        lse = math.log(sum(math.exp(v) for v in s[i].tolist()))
        want += w[i].item() * -sum(pt[c] * (s[i, c].item() - lse) for c in range(5))
    assert rotta_loss(s, t, w).item() == pytest.approx(want / 4, abs=1e-12)
    # dense: the per-pixel CE averaged over pixels, then weighted
    sd, td = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    wd = torch.tensor([0.2, 0.7])
    ce = -(td.softmax(1) * sd.log_softmax(1)).sum(1).mean((1, 2))
    torch.testing.assert_close(rotta_loss(sd, td, wd), (ce * wd).mean())


# ---------------------------------------------------------------------------------------------- the reference run
def test_matches_the_official_loop() -> None:
    net = make_net()
    pristine = copy.deepcopy(net)
    ref = Reference(net, capacity=4, uf=4, nu=0.05, lr=1e-2, seed=3)
    w = _rotta(net, memory_size=4)
    # 30 samples of 3 classes (class 2 rare): within-class and majority-class evictions, rejected newcomers (both
    # kinds); updates every 4 samples, mostly mid-batch (batch size 5)
    xs = batches(6)
    for k, x in enumerate(xs):
        out = w(x)
        want = ref.forward(x)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=f"prediction of batch {k}")
        assert w.num_updates == (5 * (k + 1)) // 4
    assert len(ref.losses) == 7
    assert w.last_loss is not None and w.last_loss.item() == pytest.approx(ref.losses[-1], rel=1e-9)
    live = dict(net.named_parameters())
    for n in ADAPTED:
        torch.testing.assert_close(live[n], ref.params[n], rtol=1e-9, atol=1e-12, msg=n)
        assert not torch.equal(live[n], dict(pristine.named_parameters())[n]), f"{n} did not move"
    t_live, t_ref = dict(w.teacher.named_parameters()), dict(ref.teacher.named_parameters())
    for n in t_live:
        torch.testing.assert_close(t_live[n], t_ref[n], rtol=1e-9, atol=1e-12, msg=f"teacher {n}")
    # Robust BN statistics: both models' moved in their own update forwards, and only there
    for name in ("bn1", "bn2"):
        torch.testing.assert_close(w._rbn.mean[name], getattr(ref.student, name).source_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(w._rbn.var[name], getattr(ref.student, name).source_var, rtol=1e-9, atol=1e-12)
        t_rbn = w._teacher_rbn
        torch.testing.assert_close(t_rbn.mean[name], getattr(ref.teacher, name).source_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(t_rbn.var[name], getattr(ref.teacher, name).source_var, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(w._rbn.mean[name], t_rbn.mean[name])  # augmented vs clean memory
    # memory: same samples, same class-major order, same ages
    data, ages = ref.mem.get_memory()
    got = w.memory.get()
    assert torch.equal(got.data, torch.stack(data))
    torch.testing.assert_close(got.ages, torch.tensor(ages).float(), rtol=0, atol=0)
    # nothing else moved: frozen weights and the BN running buffers bitwise as before
    before = pristine.state_dict()
    for k, v in net.state_dict().items():
        if k not in ADAPTED:
            assert torch.equal(v, before[k]), k
    w.restore()


def test_reset_restores_everything_bitwise() -> None:
    net = make_net()
    w = _rotta(net)
    source = {k: v.clone() for k, v in net.state_dict().items()}
    t_source = {k: v.clone() for k, v in w.teacher.state_dict().items()}
    rbn_source, t_rbn_source = w._rbn.state(), w._teacher_rbn.state()
    xs = batches(3)
    first = [w(x) for x in xs]
    first_state = {k: v for k, v in w.method_state().items()}
    w.reset()
    assert w.memory is None and w.num_samples == 0 and w.num_updates == 0 and w.last_loss is None
    assert all(torch.equal(v, source[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, t_source[k]) for k, v in w.teacher.state_dict().items())
    assert all(torch.equal(v, rbn_source[k]) for k, v in w._rbn.state().items())
    assert all(torch.equal(v, t_rbn_source[k]) for k, v in w._teacher_rbn.state().items())
    assert len(w.optimizer.state) == 0
    again = [w(x) for x in xs]  # the generators are re-seeded: the same augmentations, bitwise the same run
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for k, v in w.method_state().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, first_state[k]), k
        else:
            assert v == first_state[k], k
    w.restore()


def test_state_of_another_memory_size_raises_before_anything_is_written() -> None:
    """A state saved with ``memory_size=6`` does not fit a wrapper with ``memory_size=9``: the load raises, and
    the model, the optimizer and the wrapper's own state (teacher, memory, counters) are left as they were."""
    saved = _rotta(make_net())
    for x in batches(2):
        saved(x)
    state = saved.adaptation_state_dict()
    net = make_net()
    w = _rotta(net, memory_size=9)
    w(batches(1)[0])
    model_before = {k: v.clone() for k, v in net.state_dict().items()}
    opt_before = copy.deepcopy(w.optimizer.state_dict())
    method_before = w.method_state()
    with pytest.raises(ValueError, match="capacity"):
        w.load_adaptation_state_dict(state)
    assert all(torch.equal(v, model_before[k]) for k, v in net.state_dict().items())
    assert str(w.optimizer.state_dict()) == str(opt_before)
    after = w.method_state()
    assert set(after) == set(method_before)
    for k, v in after.items():
        assert torch.equal(v, method_before[k]) if isinstance(v, torch.Tensor) else v == method_before[k], k
    w.restore()


def test_teacher_is_not_a_registered_child_and_is_released_on_restore() -> None:
    net = make_net()
    w = _rotta(net)
    assert set(w.state_dict()) == {f"model.{k}" for k in net.state_dict()}
    assert all(not p.requires_grad for p in w.teacher.parameters())
    assert w.teacher is not net and not any(m._forward_pre_hooks for m in [w.teacher.conv1, w.teacher.fc1])
    w(batches(1)[0])
    assert w.restore() is net
    assert w.teacher is None and w.memory is None and w.num_updates == 1  # counters stay readable


def test_no_update_before_update_frequency_samples_and_stats_fixed_in_eval() -> None:
    net = make_net()
    w = _rotta(net, update_frequency=7)
    rbn, t_rbn = w._rbn.state(), w._teacher_rbn.state()
    w(batches(1)[0])  # 5 samples < 7: predictions only
    assert w.num_updates == 0 and w.num_samples == 5 and len(w.memory) > 0
    assert all(torch.equal(v, rbn[k]) for k, v in w._rbn.state().items())
    assert all(torch.equal(v, t_rbn[k]) for k, v in w._teacher_rbn.state().items())
    w(batches(2)[1])  # the 7th sample triggers an update mid-batch
    assert w.num_updates == 1
    w.restore()


def test_default_is_continual_and_episodic_resets_each_batch() -> None:
    assert RoTTA.default_episodic is False
    net = make_net()
    w = _rotta(net)
    assert w.episodic is False
    w.restore()
    w = _rotta(net, episodic=True)
    x = batches(1)[0]
    a, b = w(x), w(x)
    assert torch.equal(a, b)  # each batch starts from the source teacher and an empty memory
    assert w.num_updates == 1 and w.num_samples == 5
    w.restore()


# ---------------------------------------------------------------------------------------------- options
def test_layer_norm_model_adapts_affine_parameters() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    w = RoTTA(net, memory_size=4, update_frequency=4, augment=None)
    assert w.targeted_modules == ["1"] and w._rbn is None
    before = net[1].weight.clone()
    w(torch.randn(8, 8))
    assert w.num_updates == 2 and not torch.equal(net[1].weight, before)
    w.restore()


def test_augment_callable_gets_the_seeded_generator() -> None:
    seen: list[torch.Generator] = []

    def aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seen.append(g)
        return x + 0.01 * torch.randn(x.shape, generator=g, dtype=x.dtype)

    w = _rotta(make_net(), augment=aug)
    w(batches(1)[0])
    assert len(seen) == 1 and isinstance(seen[0], torch.Generator)
    w.restore()


def test_batch_size_one_and_tiny_memory() -> None:
    net = make_net()
    w = _rotta(net, memory_size=1, update_frequency=1)
    before = net.bn1.weight.clone()
    for x in batches(3, b=1):
        out = w(x)
        assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert w.num_updates == 3 and len(w.memory) == 1
    assert not torch.equal(net.bn1.weight, before)
    w.restore()


def test_degenerate_models_and_inputs_raise_clearly() -> None:
    one_class = make_net(classes=1)
    w = _rotta(one_class)
    with pytest.raises(ValueError, match="at least 2"):
        w(batches(1)[0])
    w.restore()
    w = _rotta(make_net(), num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        w(batches(1)[0])
    w.restore()
    w = _rotta(make_net())
    w(batches(1)[0])
    state = w.method_state()
    with pytest.raises(ValueError, match="reset"):
        w(batches(1, size=8)[0])  # another image size: the memory cannot hold both
    assert w.method_state()["num_samples"] == state["num_samples"]
    w.reset()
    w(batches(1, size=8)[0])
    w.restore()
    with pytest.raises(ValueError, match="list_layers"):
        RoTTA(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="image batches"):
        RoTTA(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)))(torch.randn(2, 4))


def test_non_finite_predictions_are_not_stored() -> None:
    net = make_net()
    w = _rotta(net, update_frequency=100)
    x = batches(1)[0]
    x[0] *= 1e300  # float64 overflow in the teacher: NaN logits for sample 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w(x)
    assert any("non-finite" in str(c.message) for c in caught)
    assert len(w.memory) <= 4 and not any(torch.equal(d, x[0]) for d in w.memory.get().data)
    w.restore()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lr": 0.0}, "lr"),
        ({"memory_size": 0}, "memory_size"),
        ({"update_frequency": 1.5}, "update_frequency"),
        ({"nu": 1.5}, "nu"),
        ({"alpha": -0.1}, "alpha"),
        ({"lambda_t": float("inf")}, "lambda_t"),
        ({"num_classes": 1}, "num_classes"),
        ({"augment": "autoaugment"}, "augment"),
        ({"value_range": (1.0, 0.0)}, "value_range"),
        ({"norm": ["instance"]}, "norm"),
    ],
)
def test_argument_validation(kw: dict, match: str) -> None:
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=match):
        RoTTA(net, **kw)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not hasattr(net, "_adaptkit_wrapped_by")


def test_inputs_outside_the_value_range_warn_once() -> None:
    w = _rotta(make_net())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w(batches(1)[0])  # [0, 1] pixels: no warning
        assert not caught
        w(batches(1)[0] * 3 - 1)
        w(batches(1)[0] * 3 - 1)
    assert sum("value_range" in str(c.message) for c in caught) == 1
    w.restore()
    w = _rotta(make_net(), value_range=(-1.0, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(batches(1)[0] * 3 - 1)
    w.restore()
