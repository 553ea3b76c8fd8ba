"""LAME: the affinities and the fixed-point solver (``adaptkit.functional.lame``) and the wrapper, against an
independent float64 implementation written here from the paper and the official code (fiveai/LAME
``src/adaptation/lame.py``); the energy-decrease property; no parameter ever changes; degenerate batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, randomize_bn, snapshot_model

from adaptkit import LAME
from adaptkit.functional.lame import (
    affinity_matrix,
    knn_affinity,
    lame,
    laplacian_fixed_point,
    linear_affinity,
    rbf_affinity,
)


# ---------------------------------------------------------------------------------------------- reference
def ref_distances(f: torch.Tensor) -> torch.Tensor:
    n = f.shape[0]
    return torch.tensor(
        [[math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(f[i], f[j]))) for j in range(n)] for i in range(n)],
        dtype=torch.float64,
    )


def ref_affinity(f: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """The three affinities, one entry at a time (f already L2-normalised)."""
    n = f.shape[0]
    d = ref_distances(f)
    w = torch.zeros(n, n, dtype=torch.float64)
    if kind == "knn":  # the k nearest *other* samples get 1 (not symmetrised)
        for i in range(n):
            others = sorted((float(d[i, j]), j) for j in range(n) if j != i)
            for _, j in others[: min(k, n - 1)]:
                w[i, j] = 1.0
    elif kind == "rbf":  # sigma: mean over i of the k-th smallest distance of row i, d_ii = 0 included
        kth = [sorted(float(v) for v in d[i])[min(k, n) - 1] for i in range(n)]
        sigma = sum(kth) / n
        for i in range(n):
            for j in range(n):
                w[i, j] = math.exp(-(float(d[i, j]) ** 2) / (2 * sigma**2))
    else:  # linear
        for i in range(n):
            for j in range(n):
                w[i, j] = sum(float(a) * float(b) for a, b in zip(f[i], f[j]))
    return w


def ref_solve(p: torch.Tensor, w: torch.Tensor, lam: float = 1.0, max_steps: int = 100, tol: float = 1e-8):
    """The official loop: Y = p; Y <- p * exp(lam W Y) / Z; energy with the pairwise term of the previous Y;
    stop when |E - E_old| <= tol |E_old| for i > 1 (0-based)."""
    y = p.clone()
    old = float("inf")
    it = 0
    for i in range(max_steps):
        it = i + 1
        pairwise = lam * (w @ y)
        u = p * torch.exp(pairwise)
        y = u / u.sum(1, keepdim=True)
        e = float((-y * p.log() - y * pairwise + y * y.log()).sum())
        if i > 1 and abs(e - old) <= tol * abs(old):
            break
        old = e
    return y, it


def objective(y: torch.Tensor, p: torch.Tensor, w: torch.Tensor, lam: float = 1.0) -> float:
    """sum_i KL(y_i || p_i) - lam/2 sum_ij W_ij y_i.y_j: what each bound step decreases for a symmetric PSD W."""
    kl = (y * (y.log() - p.log())).sum()
    return float(kl - lam / 2 * (w * (y @ y.T)).sum())


def _data(n: int = 12, c: int = 4, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g, dtype=torch.float64) * 2
    labels = torch.arange(n) % c
    feats = centers[labels] + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 1.5
    return logits, feats


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / f.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------- affinities
@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_knn_affinity_matches_reference(k: int) -> None:
    _, f = _data()
    f = _unit(f)
    w = knn_affinity(f, k)
    assert torch.equal(w, ref_affinity(f, "knn", k))
    assert torch.all(w.diagonal() == 0)
    assert torch.all(w.sum(1) == min(k, f.shape[0] - 1))  # k >= N is clamped to N - 1


@pytest.mark.parametrize("k", [2, 3, 5, 12, 40])
def test_rbf_affinity_matches_reference(k: int) -> None:
    _, f = _data()
    f = _unit(f)
    torch.testing.assert_close(rbf_affinity(f, k), ref_affinity(f, "rbf", k), rtol=1e-10, atol=1e-12)
    assert torch.all(rbf_affinity(f, k).diagonal() == 1)  # self-affinity kept, as the official code


def test_linear_affinity_matches_reference() -> None:
    _, f = _data()
    f = _unit(f)
    torch.testing.assert_close(linear_affinity(f), ref_affinity(f, "linear", 0), rtol=1e-12, atol=1e-12)


def test_force_symmetry_and_unknown_kind() -> None:
    _, f = _data()
    w = affinity_matrix(f, "knn", 3, force_symmetry=True)
    assert torch.equal(w, w.T)
    assert torch.equal(w, (knn_affinity(f, 3) + knn_affinity(f, 3).T) / 2)
    assert not torch.equal(knn_affinity(f, 3), knn_affinity(f, 3).T)  # the default kNN graph is not symmetric
    assert torch.equal(affinity_matrix(f, "kNN", 3), knn_affinity(f, 3))  # the official spelling works
    with pytest.raises(ValueError, match="affinity must be one of"):
        affinity_matrix(f, "cosine")


def test_rbf_degenerate_sigma() -> None:
    with pytest.raises(ValueError, match="knn must be >= 2"):
        rbf_affinity(torch.randn(4, 3), 1)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # every sample has one exact duplicate
    w = rbf_affinity(f, 2)  # sigma = 0: the kernel's limit, 1 on identical features, 0 elsewhere
    assert torch.equal(w, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]))


# ---------------------------------------------------------------------------------------------- solver
@pytest.mark.parametrize("kind,k", [("knn", 3), ("knn", 5), ("rbf", 5), ("rbf", 3), ("linear", 5)])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_lame_matches_reference_float64(kind: str, k: int, lam: float) -> None:
    logits, feats = _data(seed=1)
    p = logits.softmax(1)
    w_ref = ref_affinity(_unit(feats), kind, k)
    y_ref, it_ref = ref_solve(p, w_ref, lam)
    res = lame(logits, feats, kind, k, lam=lam)
    torch.testing.assert_close(res.log_y.exp(), y_ref, rtol=1e-9, atol=1e-11)
    assert res.iterations == it_ref
    assert 3 <= res.iterations < 100
    assert torch.isfinite(res.log_y).all()


def test_lame_float32_close_to_float64_reference() -> None:
    logits, feats = _data(n=16, seed=2)
    y_ref, _ = ref_solve(logits.softmax(1), ref_affinity(_unit(feats), "rbf", 5))
    res = lame(logits.float(), feats.float())
    assert res.log_y.dtype == torch.float32
    torch.testing.assert_close(res.log_y.exp().double(), y_ref, rtol=1e-4, atol=1e-5)


def test_lame_changes_predictions_towards_neighbours() -> None:
    """Two tight clusters with noisy source predictions: LAME's assignments agree within each cluster."""
    g = torch.Generator().manual_seed(3)
    feats = torch.cat([torch.randn(6, 5, generator=g) * 0.05 + 3, torch.randn(6, 5, generator=g) * 0.05 - 3])
    feats[:, 1] = torch.linspace(-1, 1, 12)
    logits = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)
    logits[0], logits[7] = torch.tensor([0.0, 0.6]), torch.tensor([0.6, 0.0])  # one wrong sample per cluster
    y = lame(logits, feats, "knn", 5, lam=1.0).log_y.exp()
    assert y[:6].argmax(1).tolist() == [0] * 6 and y[6:].argmax(1).tolist() == [1] * 6


@pytest.mark.parametrize("kind", ["rbf", "linear"])
def test_objective_never_increases(kind: str) -> None:
    """Symmetric PSD affinities: every update lowers sum KL(y||p) - lam/2 sum W y.y (concave-convex bound)."""
    logits, feats = _data(n=10, seed=4)
    p = logits.softmax(1)
    w = affinity_matrix(_unit(feats), kind, 5)
    values = [objective(p, p, w)]
    for n in range(1, 15):
        y = laplacian_fixed_point(p.log(), w, 1.0, max_iters=n, tol=0.0).log_y.exp()
        values.append(objective(y, p, w))
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), values
    assert values[-1] < values[0] - 1e-3  # and it does move


def test_solution_is_a_fixed_point_and_official_energy_reported() -> None:
    logits, feats = _data(seed=5)
    p = logits.softmax(1)
    w = affinity_matrix(_unit(feats), "rbf", 5)
    res = laplacian_fixed_point(p.log(), w, max_iters=500, tol=1e-14)
    y = res.log_y.exp()
    torch.testing.assert_close(y, torch.softmax(p.log() + w @ y, 1), rtol=1e-6, atol=1e-8)
    # the reported energy is the official one, with the pairwise term of the previous iterate
    prev = laplacian_fixed_point(p.log(), w, max_iters=res.iterations - 1, tol=0.0).log_y.exp()
    pair = w @ prev
    want = float((-y * p.log() - y * pair + y * y.log()).sum())
    assert res.energy == pytest.approx(want, rel=1e-10)


def test_stopping_rule_matches_the_official_test() -> None:
    """tol=inf stops at the third update (official ``i > 1``); tol=0 runs max_iters."""
    logits, feats = _data(seed=6)
    p = logits.softmax(1)
    w = affinity_matrix(_unit(feats), "knn", 3)
    assert laplacian_fixed_point(p.log(), w, tol=math.inf).iterations == 3
    assert laplacian_fixed_point(p.log(), w, max_iters=7, tol=0.0).iterations == 7


# ---------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("kind", ["knn", "rbf", "linear"])
def test_single_sample_returns_the_source_prediction(kind: str) -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0]])
    res = lame(logits, torch.randn(1, 4), kind, 5)
    torch.testing.assert_close(res.log_y, logits.log_softmax(1))
    assert res.iterations == 0


def test_two_samples_knn_clamped() -> None:
    logits, feats = _data(n=2, seed=7)
    res = lame(logits, feats, "knn", 5)  # k clamped to N - 1 = 1
    y_ref, _ = ref_solve(logits.softmax(1), ref_affinity(_unit(feats), "knn", 1))
    torch.testing.assert_close(res.log_y.exp(), y_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["knn", "rbf", "linear"])
def test_one_class(kind: str) -> None:
    res = lame(torch.randn(5, 1), torch.randn(5, 3), kind, 3)
    assert torch.equal(res.log_y, torch.zeros(5, 1))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same N"):
        lame(torch.randn(4, 3), torch.randn(5, 2))


# ---------------------------------------------------------------------------------------------- the wrapper
class Net(nn.Module):
    """Conv-BN-ReLU-pool-Linear-ReLU-Dropout-Linear; ``features`` is everything before ``fc``."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.proj = nn.Linear(6, 8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, c)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.drop(torch.relu(self.proj(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_net(c: int = 4, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(c)
    randomize_bn(net.bn, bias=0.3, mean=0.5, tracked=3)
    return net.eval()


def _x(b: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 6, 6, generator=g) * 2


def ref_lame(net: Net, x: torch.Tensor, kind: str = "rbf", k: int = 5, lam: float = 1.0) -> torch.Tensor:
    """LAME in float64 from the model's own layers: p = softmax(fc(z)), f = z / |z|, W, then the official loop."""
    net = net.double()
    with torch.no_grad():
        z = net.features(x.double())
        p = net.fc(z).softmax(1)
    net.float()
    return ref_solve(p, ref_affinity(_unit(z), kind, k), lam)[0]


@pytest.mark.parametrize("kind,k", [("rbf", 5), ("knn", 3), ("linear", 5), ("knn", 20)])
def test_matches_reference(kind: str, k: int) -> None:
    net = make_net()
    x = _x()
    want = ref_lame(net, x, kind, k)
    with LAME(net, affinity=kind, knn=k) as w:
        out = w(x)
    torch.testing.assert_close(out.softmax(1).double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(10))  # log Y: exp sums to one
    assert out.argmax(1).tolist() == want.argmax(1).tolist()
    with torch.no_grad():
        source = net(x)
    assert not torch.allclose(out, source.log_softmax(1), atol=1e-3)  # it did change the predictions


def test_lam_zero_returns_source_log_probabilities() -> None:
    net = make_net()
    x = _x()
    with LAME(net, lam=0.0) as w:
        out = w(x)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x).log_softmax(1))


def test_nothing_changes_and_every_layer_is_in_eval_mode() -> None:
    net = make_net()
    snap = snapshot_model(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w = LAME(net)
    modes: list[bool] = []
    handles = [m.register_forward_pre_hook(lambda m, i: modes.append(m.training)) for m in (net.drop, net.bn)]
    net.train()
    first = w(_x())
    for s in range(2, 5):
        w(_x(seed=s))
    assert not any(modes)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(w(_x()), first)  # stateless: the same batch gives the same output
    for h in handles:
        h.remove()
    assert w.restore() is net
    assert_model_unchanged(net, snap)  # the wrap-time state, eval mode included


def test_inference_mode_and_no_grad_agree() -> None:
    net = make_net()
    x = _x()
    w = LAME(net)
    with torch.no_grad():
        a = w(x)
    with torch.inference_mode():
        b = w(x)
    assert torch.equal(a, b) and not a.requires_grad
    w.restore()


def test_batch_of_one_is_the_source_prediction() -> None:
    net = make_net()
    x = _x(1)
    with LAME(net) as w:
        out = w(x)
        assert w.last_iterations == 0
    with torch.no_grad():
        torch.testing.assert_close(out, net(x).log_softmax(1))


def test_one_class_model() -> None:
    net = make_net(c=1)
    with LAME(net, affinity="knn") as w:
        out = w(_x())
    assert torch.equal(out, torch.zeros(10, 1))


def test_dict_output_keeps_other_entries() -> None:
    class DictNet(Net):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            z = self.features(x)
            return {"logits": self.fc(z), "embedding": z}

    torch.manual_seed(0)
    net = DictNet().eval()
    x = _x()
    with torch.no_grad():
        ref = net(x)
    with LAME(net) as w:
        out = w(x)
    assert list(out) == ["logits", "embedding"]
    assert torch.equal(out["embedding"], ref["embedding"])
    want = ref_lame(net, x)
    torch.testing.assert_close(out["logits"].softmax(1).double(), want, rtol=1e-4, atol=1e-5)


def test_iterations_reported_and_capped() -> None:
    net = make_net()
    with LAME(net, max_iters=4, tol=0.0) as w:
        w(_x())
        assert w.last_iterations == 4 and math.isfinite(w.last_energy)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"affinity": "cosine"}, "affinity"),
        ({"knn": 0}, "knn"),
        ({"knn": 2.5}, "knn"),
        ({"affinity": "rbf", "knn": 1}, "knn >= 2"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"max_iters": 0}, "max_iters"),
        ({"tol": -1.0}, "tol"),
    ],
)
def test_bad_arguments_raise_with_the_model_untouched(kw: dict, match: str) -> None:
    net = make_net()
    snap = snapshot_model(net)
    with pytest.raises(ValueError, match=match):
        LAME(net, **kw)
    assert_model_unchanged(net, snap)
