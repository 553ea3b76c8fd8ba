"""T3A against the official algorithm written here (matsuolab/T3A ``adapt_algorithms.py``, float64, one-hot labels,
one class at a time) over several batches; warm-up, reset, state, filter, degenerate cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_model_unchanged, randomize_bn, snapshot_model

from adaptkit import T3A
from adaptkit.functional.t3a import Supports, append_supports, prototypes, select_supports, warmup_supports


class Net(nn.Module):
    def __init__(self, c: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.proj = nn.Linear(6, 8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, c, bias=bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.drop(torch.relu(self.proj(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_net(c: int = 4, seed: int = 0, bias: bool = True) -> Net:
    torch.manual_seed(seed)
    net = Net(c, bias)
    randomize_bn(net.bn, bias=0.3, mean=0.5, tracked=3)
    return net.eval()


def _x(b: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 6, 6, generator=g) * 2


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class RefT3A:
    """The official T3A in float64: supports/one-hot labels/entropies; per batch append, then per class sort by
    entropy and keep filter_K (all for -1), then logits = z @ normalize(normalize(S)^T L, dim=0)."""

    def __init__(self, net: Net, filter_k: int) -> None:
        self.net = net
        self.c = net.fc.out_features
        w = net.fc.weight.detach().double()
        b = None if net.fc.bias is None else net.fc.bias.detach().double()
        p = F.linear(w, w, b)
        self.supports = w.clone()
        self.labels = F.one_hot(p.argmax(1), self.c).double()
        self.ent = entropy(p)
        self.filter_k = filter_k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net.double()
        with torch.no_grad():
            z = net.features(x.double())
            p = net.fc(z)
        self.net.float()
        self.supports = torch.cat([self.supports, z])
        self.labels = torch.cat([self.labels, F.one_hot(p.argmax(1), self.c).double()])
        self.ent = torch.cat([self.ent, entropy(p)])
        y_hat = self.labels.argmax(1)
        keep = []
        for k in range(self.c):
            idx = [i for i in range(len(self.ent)) if int(y_hat[i]) == k]
            idx.sort(key=lambda i: (float(self.ent[i]), i))
            keep += idx if self.filter_k == -1 else idx[: self.filter_k]
        self.supports, self.labels, self.ent = self.supports[keep], self.labels[keep], self.ent[keep]
        weights = F.normalize(self.supports, dim=1).T @ self.labels
        return z @ F.normalize(weights, dim=0)


@pytest.mark.parametrize("filter_k", [1, 2, 5, -1])
def test_three_batches_match_the_official_algorithm(filter_k: int) -> None:
    net = make_net()
    ref = RefT3A(make_net(), filter_k)
    w = T3A(net, filter_K=filter_k)
    for s in range(3):
        x = _x(seed=s)
        out = w(x)
        want = ref(x)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert w.num_supports == len(ref.ent)
        torch.testing.assert_close(w.supports.feats.double(), ref.supports, rtol=1e-5, atol=1e-6)
        assert w.supports.labels.tolist() == ref.labels.argmax(1).tolist()
        torch.testing.assert_close(w.supports.ent.double(), ref.ent, rtol=1e-5, atol=1e-6)
    w.restore()


def test_warm_up_supports_are_the_classifier_rows() -> None:
    net = make_net()
    w = T3A(net)
    s = w.supports
    assert torch.equal(s.feats, net.fc.weight)
    with torch.no_grad():
        p = net.fc(net.fc.weight)
    assert s.labels.tolist() == p.argmax(1).tolist()
    torch.testing.assert_close(s.ent, entropy(p))
    assert s.feats.data_ptr() != net.fc.weight.data_ptr()  # a copy, not the live weight
    w.restore()


def test_adapts_first_then_predicts_the_same_batch() -> None:
    """The batch's own supports are in the prototypes of its prediction."""
    net = make_net()
    w = T3A(net, filter_K=-1)
    x = _x()
    before = w.prototypes()
    out = w(x)
    with torch.no_grad():
        z = net.features(x)
    torch.testing.assert_close(out, z @ w.prototypes().T)
    assert not torch.allclose(out, z @ before.T)
    w.restore()


def test_reset_restores_the_warm_up_bitwise_and_episodic() -> None:
    net = make_net()
    w = T3A(net, filter_K=2)
    warm = tuple(t.clone() for t in w.supports)
    first = w(_x(seed=0))
    w(_x(seed=1))
    assert w.num_supports != len(warm[0]) or not torch.equal(w.supports.feats, warm[0])
    w.reset()
    assert all(torch.equal(a, b) for a, b in zip(w.supports, warm))
    assert torch.equal(w(_x(seed=0)), first)
    w.restore()

    ep = T3A(net, filter_K=2, episodic=True)
    a = ep(_x(seed=0))
    ep(_x(seed=1))
    assert torch.equal(ep(_x(seed=0)), a) and torch.equal(a, first)
    ep.restore()


def test_state_round_trip_and_refusal() -> None:
    net = make_net()
    w = T3A(net, filter_K=3)
    w(_x(seed=0))
    w(_x(seed=1))
    sd = w.adaptation_state_dict()
    assert {"_adaptkit.state.supports", "_adaptkit.state.labels", "_adaptkit.state.ent"} <= set(sd)
    out = w(_x(seed=2))
    w.reset()
    w.load_adaptation_state_dict(sd)
    assert torch.equal(w(_x(seed=2)), out)
    bad = dict(sd)
    bad["_adaptkit.state.supports"] = sd["_adaptkit.state.supports"][:, :-1]
    with pytest.raises(ValueError, match="another model"):
        w.load_adaptation_state_dict(bad)
    bad = dict(sd)
    bad["_adaptkit.state.labels"] = sd["_adaptkit.state.labels"] + 10
    with pytest.raises(ValueError, match="another model"):
        w.load_adaptation_state_dict(bad)
    w.restore()


def test_filter_bounds_memory_and_minus_one_keeps_all() -> None:
    net = make_net()
    w = T3A(net, filter_K=3)
    for s in range(8):
        w(_x(seed=s))
        assert int(torch.bincount(w.supports.labels, minlength=4).max()) <= 3
    w.restore()
    w = T3A(net, filter_K=-1)
    for s in range(4):
        w(_x(seed=s))
    assert w.num_supports == 4 + 4 * 6  # every support kept (the official [:-1] would drop one per class)
    w.restore()


def test_featurizer_frozen_and_in_eval_mode() -> None:
    net = make_net()
    snap = snapshot_model(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w = T3A(net)
    seen: list[bool] = []
    handles = [m.register_forward_pre_hook(lambda m, i: seen.append(m.training)) for m in (net.drop, net.bn)]
    net.train()
    for s in range(3):
        w(_x(seed=s))
    assert seen and not any(seen)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    for h in handles:
        h.remove()
    w.restore()
    assert_model_unchanged(net, snap)


def test_inference_mode() -> None:
    a, b = T3A(make_net(), filter_K=2), T3A(make_net(), filter_K=2)
    with torch.inference_mode():
        outs = [a(_x(seed=s)) for s in range(3)]
    assert not any(t.is_inference() for t in a.supports)
    assert all(torch.equal(o, b(_x(seed=s))) for s, o in enumerate(outs))
    a(_x(seed=4))  # plain forwards still work
    a.restore()
    b.restore()


def test_degenerate_cases() -> None:
    # batch of one
    net = make_net()
    ref = RefT3A(make_net(), 2)
    with T3A(net, filter_K=2) as w:
        torch.testing.assert_close(w(_x(1)).double(), ref(_x(1)), rtol=1e-5, atol=1e-5)
    # one class: a single prototype; no bias
    for c, bias in [(1, True), (3, False)]:
        net = make_net(c=c, bias=bias)
        ref = RefT3A(make_net(c=c, bias=bias), 2)
        with T3A(net, filter_K=2) as w:
            for s in range(2):
                torch.testing.assert_close(w(_x(seed=s)).double(), ref(_x(seed=s)), rtol=1e-5, atol=1e-5)


def test_a_class_without_supports_scores_zero() -> None:
    s = Supports(torch.randn(3, 4), torch.tensor([0, 0, 2]), torch.rand(3))
    protos = prototypes(s, 3)
    assert torch.equal(protos[1], torch.zeros(4))
    torch.testing.assert_close(protos.norm(dim=1), torch.tensor([1.0, 0.0, 1.0]))


def test_functional_pieces_against_explicit_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    s = warmup_supports(w, b)
    logits = w @ w.T + b
    assert s.labels.tolist() == logits.argmax(1).tolist()
    z, lz = torch.randn(7, 5, generator=g), torch.randn(7, 3, generator=g)
    s = append_supports(s, z, lz)
    assert s.feats.shape == (10, 5) and s.labels[3:].tolist() == lz.argmax(1).tolist()
    kept = select_supports(s, 2, 3)
    for k in range(3):
        cls = [i for i in range(10) if int(s.labels[i]) == k]
        best = sorted(cls, key=lambda i: float(s.ent[i]))[:2]
        got = kept.feats[kept.labels == k]
        assert torch.equal(got, s.feats[best])
    protos = prototypes(kept, 3)
    for k in range(3):
        members = kept.feats[kept.labels == k]
        if len(members):
            v = (members / members.norm(dim=1, keepdim=True)).sum(0)
            torch.testing.assert_close(protos[k], v / v.norm())


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_filter_k(bad: object) -> None:
    net = make_net()
    snap = snapshot_model(net)
    with pytest.raises(ValueError, match="filter_K"):
        T3A(net, filter_K=bad)  # type: ignore[arg-type]
    assert_model_unchanged(net, snap)
