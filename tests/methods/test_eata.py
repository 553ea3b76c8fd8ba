"""EATA / ETA against a hand-written reference step (the official recipe of mr-eggplant/EATA ``eata.py`` and
``main.py``, written out here with explicit formulas), plus the Fisher estimate, the regulariser, the sample
filters' edge cases and the method state."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, randomize_bn, snapshot_model

from adaptkit import EATA, ETA
from adaptkit.functional.fisher import diagonal_fisher, fisher_penalty
from adaptkit.methods.eata import per_sample_entropy_and_probs

TOL = dict(rtol=1e-5, atol=1e-6)
C = 5


class ConvNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Dropout-Linear, 5 classes, logits scaled so that entropies spread."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return 4.0 * self.fc(self.drop(h.mean((2, 3))))


def make_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet()
    for bn in (net.bn1, net.bn2):
        randomize_bn(bn, bias=0.3, mean=0.5, tracked=3)
    return net.eval()


def _x(b: int = 12, seed: int = 1, hw: int = 6) -> torch.Tensor:
    return torch.randn(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


BN_PARAMS = ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]


# ---------------------------------------------------------------------------------------------- the reference
class Ref:
    """The official recipe on a deep copy: BN in training mode without running statistics (deleted, as the official
    ``configure_model``), only BN affine parameters trainable. Every quantity is written out by hand."""

    def __init__(self, model: nn.Module, logits: Any = lambda o: o) -> None:
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.logits = logits
        self.m: torch.Tensor | None = None  # moving average of probabilities
        self.velocity: dict[str, torch.Tensor] = {}  # SGD momentum buffers
        self.adam: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.t = 0

    @staticmethod
    def entropy_and_probs(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.exp(z - z.max(1, keepdim=True).values)
        p = p / p.sum(1, keepdim=True)
        h = -(p * torch.log(p)).sum(1)
        if z.dim() > 2:  # per image: mean over pixels
            h, p = h.flatten(1).mean(1), p.flatten(2).mean(2)
        return h, p

    def filters(self, z: torch.Tensor, e0: float, d_margin: float) -> tuple[list[int], list[int]]:
        h, p = self.entropy_and_probs(z.detach())
        s1 = [i for i in range(len(h)) if h[i].item() < e0]
        if self.m is None:
            return s1, s1
        s2 = []
        for i in s1:
            cos = (p[i] * self.m).sum() / (p[i].norm() * self.m.norm())
            if abs(cos.item()) < d_margin:
                s2.append(i)
        return s1, s2

    def step(
        self,
        x: torch.Tensor,
        e0: float,
        d_margin: float,
        lr: float,
        opt: str = "sgd",
        momentum: float = 0.9,
        fisher: dict[str, torch.Tensor] | None = None,
        anchor: dict[str, torch.Tensor] | None = None,
        alpha: float = 0.0,
    ) -> tuple[Any, list[int], list[int]]:
        out = self.model(x)
        z = self.logits(out)
        s1, s2 = self.filters(z, e0, d_margin)
        h, p = self.entropy_and_probs(z)
        # moving average: first time the mean over S1 (= S2), then 0.9 m + 0.1 mean over S2; unchanged if empty
        if s2:
            mean = p.detach()[s2].mean(0)
            self.m = mean if self.m is None else 0.9 * self.m + 0.1 * mean
        if not s2:
            return out, s1, s2
        loss = sum(h[i] * math.exp(e0 - h[i].item()) for i in s2) / len(s2)
        if fisher is not None and anchor is not None:
            for n, theta in self.params.items():
                loss = loss + alpha * (fisher[n] * (theta - anchor[n]) ** 2).sum()
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names])
        self.t += 1
        with torch.no_grad():
            for n, g in zip(names, grads):
                theta = self.params[n]
                if opt == "sgd":  # torch.optim.SGD: buf = g (first), then buf = momentum * buf + g
                    buf = g.clone() if n not in self.velocity else momentum * self.velocity[n] + g
                    self.velocity[n] = buf
                    theta -= lr * buf
                else:  # Adam, betas (0.9, 0.999), eps 1e-8, bias-corrected
                    m1, v1 = self.adam.get(n, (torch.zeros_like(g), torch.zeros_like(g)))
                    m1 = 0.9 * m1 + 0.1 * g
                    v1 = 0.999 * v1 + 0.001 * g * g
                    self.adam[n] = (m1, v1)
                    m_hat, v_hat = m1 / (1 - 0.9**self.t), v1 / (1 - 0.999**self.t)
                    theta -= lr * m_hat / (v_hat.sqrt() + 1e-8)
        return out, s1, s2

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.entropy_and_probs(self.logits(self.model(x)))


def _assert_params_match(model: nn.Module, ref: Ref) -> None:
    rp = dict(ref.model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), rp[n].detach(), **TOL, msg=n)


def _split(values: torch.Tensor) -> float:
    """A threshold strictly inside the range of ``values`` (between the two middle ones)."""
    v = sorted(values.tolist())
    k = len(v) // 2
    return (v[k - 1] + v[k]) / 2


def _fisher_by_hand(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official loop (main.py): CE against the own argmax, squared batch gradient, summed, / #batches."""
    ref = Ref(model)
    total: dict[str, torch.Tensor] = {}
    for x in batches:
        z = ref.model(x)
        target = z.detach().argmax(1)
        log_p = z - torch.logsumexp(z, 1, keepdim=True)
        loss = -log_p[torch.arange(len(x)), target].mean()
        loss.backward()
        for n, p in ref.params.items():
            total[n] = total.get(n, 0) + p.grad.detach() ** 2
            p.grad = None
    return {n: t / len(batches) for n, t in total.items()}


# ---------------------------------------------------------------------------------------------- functional pieces
def test_per_sample_entropy_and_probs_match_explicit_formula() -> None:
    z = torch.randn(6, C) * 3
    h, p = per_sample_entropy_and_probs(z)
    h_ref, p_ref = Ref.entropy_and_probs(z)
    torch.testing.assert_close(h, h_ref, **TOL)
    torch.testing.assert_close(p, p_ref, **TOL)
    dense = torch.randn(3, C, 4, 2) * 3
    h, p = per_sample_entropy_and_probs(dense)
    for i in range(3):  # per image: mean of the pixels' entropies and of their probability vectors
        pix = dense[i].permute(1, 2, 0).reshape(-1, C)
        hp, pp = Ref.entropy_and_probs(pix)
        torch.testing.assert_close(h[i], hp.mean(), **TOL)
        torch.testing.assert_close(p[i], pp.mean(0), **TOL)
    with pytest.raises(ValueError, match="dim 1"):
        per_sample_entropy_and_probs(torch.randn(4))


def test_fisher_penalty_formula_and_gradient_points_back_to_anchor() -> None:
    g = torch.Generator().manual_seed(0)
    theta = {
        "a": torch.randn(3, generator=g, requires_grad=True),
        "b": torch.randn(2, 2, generator=g).requires_grad_(),
    }
    anchor = {k: torch.randn(v.shape, generator=g) for k, v in theta.items()}
    fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in theta.items()}
    pen = fisher_penalty(theta, fisher, anchor, alpha=7.0)
    by_hand = 7.0 * sum(float((fisher[k] * (theta[k].detach() - anchor[k]) ** 2).sum()) for k in theta)
    assert pen.item() == pytest.approx(by_hand, rel=1e-6)
    pen.backward()
    for k in theta:  # d/dtheta = 2 alpha F (theta - theta0): a descent step moves every element towards theta0
        torch.testing.assert_close(theta[k].grad, 14.0 * fisher[k] * (theta[k] - anchor[k]).detach(), **TOL)
        stepped = theta[k].detach() - 1e-3 * theta[k].grad
        assert ((stepped - anchor[k]).abs() < (theta[k].detach() - anchor[k]).abs()).all()


def test_fisher_estimate_matches_the_official_loop_and_caps_samples() -> None:
    net = make_net()
    batches = [_x(6, seed=50 + i) for i in range(4)]
    # fisher_samples=15 uses 6 + 6 + the first 3 of the third batch, as the official fixed-size Fisher set does
    w = EATA(net, fisher_data=[(b, torch.zeros(6)) for b in batches], fisher_samples=15)
    want = _fisher_by_hand(net, [batches[0], batches[1], batches[2][:3]])
    assert w.fisher is not None and set(w.fisher) == set(BN_PARAMS) and w.fisher_samples_used == 15
    for n in BN_PARAMS:
        torch.testing.assert_close(w.fisher[n], want[n], **TOL)
        assert (w.fisher[n] > 0).any()
    assert w.anchor is not None
    for n, p in net.named_parameters():
        if n in BN_PARAMS:
            assert torch.equal(w.anchor[n], p) and w.anchor[n] is not p
    w.restore()


def test_fisher_pass_leaves_no_trace_on_the_model() -> None:
    net = make_net()
    for p in net.parameters():
        p.grad = torch.full_like(p, 3.0)  # the user's own gradients
    grads = {n: p.grad for n, p in net.named_parameters()}
    snap = snapshot_model(net)
    w = EATA(net, fisher_data=[_x(6, seed=60), _x(6, seed=61)])
    # wrapped: BN running statistics and counters untouched (batch-statistics form), no .grad written anywhere
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = make_net().state_dict()
    assert all(torch.equal(state[k], fresh[k]) for k in state)
    assert all(p.grad is None for n, p in net.named_parameters() if n in BN_PARAMS)
    w.restore()
    assert_model_unchanged(net, snap)
    assert all(p.grad is grads[n] for n, p in net.named_parameters())


def test_fisher_skips_a_single_sample_batch_with_batchnorm() -> None:
    net = make_net()
    w = EATA(net, fisher_data=[_x(6, seed=70), _x(6, seed=71), _x(6, seed=72)], fisher_samples=13)
    assert w.fisher_samples_used == 12  # 6 + 6; the 1-sample remainder cannot go through batch-statistics BN
    assert w.fisher is not None
    want = _fisher_by_hand(net, [_x(6, seed=70), _x(6, seed=71)])
    torch.testing.assert_close(w.fisher["bn1.weight"], want["bn1.weight"], **TOL)
    w.restore()
    snap = snapshot_model(net)
    with pytest.raises(ValueError, match="no usable sample"):
        EATA(net, fisher_data=[])
    assert_model_unchanged(net, snap)


def test_fisher_data_one_tensor_is_one_batch_and_diagonal_fisher_counts() -> None:
    net = make_net()
    x = _x(6, seed=80)
    w = EATA(net, fisher_data=x)
    assert w.fisher_samples_used == 6
    want = _fisher_by_hand(net, [x])
    torch.testing.assert_close(w.fisher["bn2.bias"], want["bn2.bias"], **TOL)  # type: ignore[index]
    w.restore()
    lin = nn.Linear(3, 2)
    f, n = diagonal_fisher(lin, dict(lin.named_parameters()), [torch.randn(4, 3)] * 5, max_samples=None)
    assert n == 20 and set(f) == {"weight", "bias"}


# ---------------------------------------------------------------------------------------------- one step vs hand
def test_one_and_two_steps_sgd_with_fisher_match_the_hand_reference() -> None:
    """Official ImageNet optimiser (SGD, momentum 0.9; larger lr to see it): filters, weights, moving average,
    Fisher penalty (active from step 2, when theta != theta0) and the update, all against the hand-written step."""
    net = make_net()
    fisher_batches = [_x(6, seed=90), _x(6, seed=91)]
    ref = Ref(net)
    fisher = _fisher_by_hand(net, fisher_batches)
    fisher = {n: 1.0 + f for n, f in fisher.items()}  # well away from 0: a visible penalty
    anchor = {n: p.detach().clone() for n, p in ref.params.items()}
    x1, x2 = _x(12, seed=2), _x(12, seed=3)
    h1, _ = ref.probe(x1)
    e0 = _split(h1)  # half of the first batch is reliable
    lr, alpha = 0.05, 50.0
    w = EATA(net, lr=lr, optimizer="sgd", momentum=0.9, fisher=fisher, fisher_alpha=alpha, e_margin=e0, d_margin=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}

    out1 = w(x1)
    r1, s1, s2 = ref.step(x1, e0, 0.5, lr, fisher=fisher, anchor=anchor, alpha=alpha)
    torch.testing.assert_close(out1, r1.detach(), **TOL)  # logits of the forward before the update
    assert s1 == s2 and 0 < len(s1) < 12  # first batch: S2 = S1
    assert (w.last_reliable, w.last_selected, w.num_updates) == (len(s1), len(s2), 1)
    assert w.average is not None and ref.m is not None
    torch.testing.assert_close(w.average, ref.m, **TOL)  # m = mean of the reliable samples' probabilities
    _assert_params_match(net, ref)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(BN_PARAMS)

    # second batch: a d_margin that keeps part of the reliable set
    h2, p2 = ref.probe(x2)
    s1_2 = [i for i in range(12) if h2[i] < e0]
    assert len(s1_2) >= 2, "test data: the second batch needs two reliable samples"
    cos = torch.stack([(p2[i] * ref.m).sum() / (p2[i].norm() * ref.m.norm()) for i in s1_2]).abs()
    w.d_margin = d2 = _split(cos)
    out2 = w(x2)
    r2, s1b, s2b = ref.step(x2, e0, d2, lr, fisher=fisher, anchor=anchor, alpha=alpha)
    torch.testing.assert_close(out2, r2.detach(), **TOL)
    assert 0 < len(s2b) < len(s1b) == len(s1_2)
    assert (w.last_reliable, w.last_selected, w.num_updates) == (len(s1b), len(s2b), 2)
    assert (w.num_reliable, w.num_selected) == (len(s1) + len(s1b), len(s2) + len(s2b))
    torch.testing.assert_close(w.average, ref.m, **TOL)  # 0.9 m + 0.1 mean over S2
    _assert_params_match(net, ref)
    w.restore()


def test_adam_default_matches_the_hand_reference() -> None:
    """CIFAR setting (default): Adam 1e-3, d_margin 0.4, three batches, no Fisher (ETA)."""
    net = make_net(1)
    ref = Ref(net)
    xs = [_x(12, seed=10 + i) for i in range(3)]
    e0 = _split(ref.probe(xs[0])[0])
    w = ETA(net, e_margin=e0)
    assert isinstance(w.optimizer, torch.optim.Adam) and w.d_margin == 0.4 and w.lr == 1e-3
    for x in xs:
        out = w(x)
        r, s1, s2 = ref.step(x, e0, 0.4, 1e-3, opt="adam")
        torch.testing.assert_close(out, r.detach(), **TOL)
        assert (w.last_reliable, w.last_selected) == (len(s1), len(s2))
        _assert_params_match(net, ref)
    assert w.num_updates == ref.t >= 1
    w.restore()


def test_default_margin_is_0_4_ln_c() -> None:
    net = make_net()
    w = ETA(net)
    assert w.margin(C) == pytest.approx(0.4 * math.log(C))
    ref = Ref(net)
    x = _x(12, seed=4)
    out = w(x)
    r, s1, _ = ref.step(x, 0.4 * math.log(C), 0.4, 1e-3, opt="adam")
    torch.testing.assert_close(out, r.detach(), **TOL)
    assert w.last_reliable == len(s1)
    _assert_params_match(net, ref)
    w.restore()


def test_predict_after_returns_the_post_update_forward() -> None:
    net = make_net()
    ref = Ref(net)
    x = _x(12, seed=5)
    e0 = _split(ref.probe(x)[0])
    out = ETA(net, e_margin=e0, predict="after")(x)
    pre, _, _ = ref.step(x, e0, 0.4, 1e-3, opt="adam")
    post = ref.model(x).detach()
    torch.testing.assert_close(out, post, **TOL)
    assert not torch.allclose(out, pre.detach(), atol=1e-7)


# ---------------------------------------------------------------------------------------------- degenerate cases
def test_empty_selection_takes_no_step_and_leaves_adam_state_untouched() -> None:
    net = make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    w = ETA(net, e_margin=1e-9)  # nothing is that confident: S1 = S2 = {}
    out = w(_x(12, seed=6))
    assert torch.isfinite(out).all()
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert len(w.optimizer.state) == 0  # type: ignore[union-attr]
    assert (w.last_reliable, w.last_selected, w.num_updates, w.average) == (0, 0, 0, None)
    assert all(p.grad is None for p in net.parameters())
    # after a real step, an empty batch leaves the Adam moments and step count exactly as they were
    w.e_margin = 10.0
    w(_x(12, seed=7))
    state = {k: {kk: vv.clone() for kk, vv in s.items()} for k, s in w.optimizer.state.items()}  # type: ignore[union-attr]
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    avg = w.average.clone()  # type: ignore[union-attr]
    w.e_margin = 1e-9
    w(_x(12, seed=8))
    assert w.num_updates == 1 and w.last_selected == 0
    for k, s in w.optimizer.state.items():  # type: ignore[union-attr]
        assert all(torch.equal(v, state[k][kk]) for kk, v in s.items())
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert torch.equal(w.average, avg)  # type: ignore[arg-type]
    w.restore()


def test_all_redundant_after_the_first_batch_takes_no_step() -> None:
    """A tiny d_margin: the first batch (no history) keeps every reliable sample and sets m; later batches keep none
    (every |cos| >= d_margin): no step, m unchanged."""
    net = make_net()
    ref = Ref(net)
    x = _x(12, seed=9)
    w = ETA(net, e_margin=10.0, d_margin=1e-6)
    w(x)
    _, p = ref.probe(x)
    assert w.last_selected == 12 and w.num_updates == 1
    torch.testing.assert_close(w.average, p.mean(0), **TOL)  # type: ignore[arg-type]
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    avg = w.average.clone()  # type: ignore[union-attr]
    w(_x(12, seed=10))
    assert (w.last_reliable, w.last_selected, w.num_updates) == (12, 0, 1)
    assert torch.equal(w.average, avg)  # type: ignore[arg-type]
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    w.restore()


def test_d_margin_above_one_keeps_every_reliable_sample() -> None:
    w = ETA(make_net(), e_margin=10.0, d_margin=1.01)
    for i in range(3):
        w(_x(8, seed=20 + i))
        assert w.last_selected == w.last_reliable == 8
    w.restore()


def test_batch_of_one() -> None:
    net = make_net()
    ref = Ref(net)
    x = _x(1, seed=11)
    w = ETA(net, e_margin=10.0, optimizer="sgd", lr=1e-3)  # one image: BN normalises over its pixels only
    out = w(x)
    r, _, s2 = ref.step(x, 10.0, 0.4, 1e-3)
    assert s2 == [0]
    torch.testing.assert_close(out, r.detach(), **TOL)
    _assert_params_match(net, ref)
    w.restore()


# ---------------------------------------------------------------------------------------------- regulariser
def test_fisher_regulariser_holds_parameters_closer_to_the_source() -> None:
    """Same stream, same filters: EATA with a strong penalty ends nearer theta0 than ETA (which it equals at
    alpha = 0)."""
    xs = [_x(12, seed=30 + i) for i in range(4)]
    ones = {n: torch.ones_like(p) for n, p in make_net().named_parameters() if n in BN_PARAMS}
    runs = {}
    for label, kw in [("eta", {}), ("eata0", {"fisher": ones, "fisher_alpha": 0.0}), ("eata", {"fisher": ones})]:
        net = make_net()
        src = {n: p.detach().clone() for n, p in net.named_parameters()}
        cls = ETA if label == "eta" else EATA
        w = cls(net, lr=0.05, optimizer="sgd", momentum=0.0, e_margin=10.0, d_margin=1.01, **kw)
        if label == "eata":
            w.fisher_alpha = 5.0  # lr * 2 * alpha * F = 0.5: a contraction towards theta0
        for x in xs:
            w(x)
        runs[label] = sum(float((p.detach() - src[n]).pow(2).sum()) for n, p in net.named_parameters())
        w.restore()
    assert runs["eata0"] == pytest.approx(runs["eta"], rel=1e-6)
    assert runs["eata"] < 0.5 * runs["eta"]


def test_no_fisher_warns_and_runs_as_eta() -> None:
    with pytest.warns(UserWarning, match="runs as ETA"):
        w = EATA(make_net())
    assert w.fisher is None and w.anchor is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ETA(make_net()).restore()
        EATA(make_net(), fisher_alpha=0.0).restore()
        EATA(make_net(), fisher_data=[_x(4)]).restore()
    nets = [make_net(), make_net()]
    other = ETA(nets[1], e_margin=10.0)
    w.restore()
    with pytest.warns(UserWarning):
        w = EATA(nets[0], e_margin=10.0)
    for i in range(2):
        torch.testing.assert_close(w(_x(8, seed=40 + i)), other(_x(8, seed=40 + i)), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_precomputed_fisher_equals_fisher_data_and_is_checked() -> None:
    data = [_x(6, seed=100), _x(6, seed=101)]
    a = EATA(make_net(), fisher_data=data, e_margin=10.0)
    b = EATA(make_net(), fisher=a.fisher, e_margin=10.0)
    assert a.fisher is not None and b.fisher is not None and b.fisher["bn1.weight"] is not a.fisher["bn1.weight"]
    for i in range(2):
        assert torch.equal(a(_x(8, seed=110 + i)), b(_x(8, seed=110 + i)))
    assert all(torch.equal(p, q) for p, q in zip(a.trainable_parameters(), b.trainable_parameters()))
    fisher = dict(a.fisher)
    net = make_net()
    snap = snapshot_model(net)
    with pytest.raises(ValueError, match="missing"):
        EATA(net, fisher={k: v for k, v in fisher.items() if k != "bn1.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        EATA(net, fisher={**fisher, "fc.weight": torch.ones(C, 6)})
    with pytest.raises(ValueError, match="shape"):
        EATA(net, fisher={**fisher, "bn1.bias": torch.ones(3)})
    with pytest.raises(ValueError, match="not both"):
        EATA(net, fisher=fisher, fisher_data=data)
    with pytest.raises(TypeError, match="dict"):
        EATA(net, fisher=[1, 2])  # type: ignore[arg-type]
    assert_model_unchanged(net, snap)


# ---------------------------------------------------------------------------------------------- state
def test_reset_clears_the_moving_average_and_counters() -> None:
    net = make_net()
    w = EATA(net, fisher_data=[_x(6, seed=120)], e_margin=10.0)
    fisher = {k: v.clone() for k, v in w.fisher.items()}  # type: ignore[union-attr]
    first = w(_x(8, seed=121))
    w(_x(8, seed=122))
    assert w.average is not None and w.num_updates >= 1
    w.reset()
    assert (w.average, w.num_reliable, w.num_selected, w.num_updates, w.last_selected) == (None, 0, 0, 0, 0)
    assert all(torch.equal(fisher[k], v) for k, v in w.fisher.items())  # type: ignore[union-attr]  # kept
    assert torch.equal(w(_x(8, seed=121)), first)
    w.restore()


def test_episodic_resets_before_each_batch() -> None:
    net = make_net()
    x = _x(12, seed=130)
    e0 = _split(Ref(net).probe(x)[0])
    w = ETA(net, e_margin=e0, episodic=True)
    w(_x(12, seed=131))
    out = w(x)
    ref = Ref(make_net())
    torch.testing.assert_close(out, ref.step(x, e0, 0.4, 1e-3, opt="adam")[0].detach(), **TOL)
    _assert_params_match(net, ref)
    torch.testing.assert_close(w.average, ref.m, **TOL)  # type: ignore[arg-type]
    assert w.num_updates == 1
    w.restore()


def test_adaptation_state_round_trip_carries_average_and_fisher() -> None:
    a = EATA(make_net(), fisher_data=[_x(6, seed=140)], e_margin=10.0)
    for i in range(2):
        a(_x(8, seed=141 + i))
    sd = a.adaptation_state_dict()
    assert isinstance(sd["_adaptkit.state.average"], torch.Tensor)
    assert sd["_adaptkit.state.num_updates"] == a.num_updates
    assert any(k.startswith("_adaptkit.state.fisher.") for k in sd)
    with pytest.warns(UserWarning):
        b = EATA(make_net(), e_margin=10.0)  # no Fisher of its own: loading brings it
    b(_x(8, seed=150))
    b.load_adaptation_state_dict(sd)
    assert b.fisher is not None and torch.equal(b.average, a.average)  # type: ignore[arg-type]
    for i in range(2):
        assert torch.equal(a(_x(8, seed=160 + i)), b(_x(8, seed=160 + i)))
    assert all(torch.equal(p, q) for p, q in zip(a.trainable_parameters(), b.trainable_parameters()))
    assert (a.num_selected, a.num_updates) == (b.num_selected, b.num_updates)
    sd["_adaptkit.state.average"].add_(1.0)  # the loaded copy is not the caller's tensor
    assert not torch.equal(b.average, sd["_adaptkit.state.average"])  # type: ignore[arg-type]
    # an ETA state (no Fisher) loaded into an ETA: m restored, no regulariser
    e = ETA(make_net(), e_margin=10.0)
    e(_x(8, seed=170))
    f = ETA(make_net(), e_margin=10.0)
    f.load_adaptation_state_dict(e.adaptation_state_dict())
    assert f.fisher is None and torch.equal(f.average, e.average)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- models / outputs
class SegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.cls = nn.Conv2d(4, C, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": 3.0 * self.cls(torch.relu(self.bn(self.conv(x))))}


def test_dense_outputs_are_filtered_per_image() -> None:
    net = SegNet().eval()
    ref = Ref(net, logits=lambda o: o["out"])
    x = _x(8, seed=180, hw=5)
    e0 = _split(ref.probe(x)[0])
    w = ETA(net, e_margin=e0, optimizer="sgd", lr=0.1)
    out = w(x)
    r, s1, s2 = ref.step(x, e0, 0.4, 0.1)
    assert isinstance(out, dict) and out["out"].shape == (8, C, 5, 5)
    torch.testing.assert_close(out["out"], r["out"].detach(), **TOL)
    assert w.last_selected == len(s2) == len(s1) == 4 and w.average.shape == (C,)  # type: ignore[union-attr]
    _assert_params_match(net, ref)
    w.restore()


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = nn.Linear(6, 8)
        self.ln1 = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * self.head(torch.nn.functional.gelu(self.ln1(self.fc1(x))))


def test_layernorm_model_adapts_ln_affine_only_with_fisher() -> None:
    net = LNNet().eval()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    data = [torch.randn(1, 6), torch.randn(5, 6)]  # no BatchNorm: a one-sample batch is fine
    with EATA(net, fisher_data=data, e_margin=10.0) as w:
        assert w.targeted_modules == ["ln1"] and w.fisher_samples_used == 6
        w(torch.randn(8, 6))
        changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {"ln1.weight", "ln1.bias"}
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_wrapping_under_no_grad_and_inference_mode() -> None:
    want = EATA(make_net(), fisher_data=[_x(6, seed=190)])
    with torch.no_grad():
        a = EATA(make_net(), fisher_data=[_x(6, seed=190)])
    net = make_net()  # the user's model exists before; the wrap and its data are inside inference_mode
    with torch.inference_mode():
        data = [_x(6, seed=190)]
        b = EATA(net, fisher_data=data)
    for w in (a, b):
        assert not any(t.is_inference() for t in w.fisher.values())  # type: ignore[union-attr]
        assert not any(t.is_inference() for t in w.anchor.values())  # type: ignore[union-attr]
        assert all(torch.equal(w.fisher[k], v) for k, v in want.fisher.items())  # type: ignore[index,union-attr]
    x = _x(8, seed=191)
    with torch.inference_mode():
        xi = x.clone()
        out_b = b(xi)
    assert torch.equal(out_b, want(x))
    assert all(torch.equal(p, q) for p, q in zip(b.trainable_parameters(), want.trainable_parameters()))


def test_running_statistics_never_written() -> None:
    net = make_net()
    bufs = {n: b.clone() for n, b in net.named_buffers()}
    with EATA(net, fisher_data=[_x(6, seed=200)], e_margin=10.0) as w:
        for i in range(3):
            w(_x(8, seed=201 + i))
        assert all(torch.equal(b, bufs[n]) for n, b in net.named_buffers())
        assert not net.bn1.track_running_stats and net.bn1.training and not net.drop.training
    assert net.bn1.track_running_stats and not net.bn1.training


def test_bad_hyperparameters_raise_with_the_model_untouched() -> None:
    net = make_net()
    snap = snapshot_model(net)
    for kw, match in [
        ({"lr": 0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"e_margin": -1.0}, "e_margin"),
        ({"e_margin": float("inf")}, "e_margin"),
        ({"d_margin": 0.0}, "d_margin"),
        ({"fisher_alpha": -1.0}, "fisher_alpha"),
        ({"fisher_samples": 0}, "fisher_samples"),
        ({"predict": "during"}, "predict"),
    ]:
        with pytest.raises(ValueError, match=match):
            EATA(net, fisher_alpha=kw.pop("fisher_alpha", 0.0), **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list_layers"):
        ETA(net, include=["no_such_layer"])
    with pytest.raises(TypeError, match="tuple"):
        EATA(net, fisher_data=["not a tensor"])
    assert_model_unchanged(net, snap)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ETA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))(torch.randn(4, 3))
