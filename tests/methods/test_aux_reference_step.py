"""One adaptation step of the aux-head methods (NC-TTT, TTT, ClusT3, TTT++) against hand-written references.

Each reference runs on deep copies of the model and the head: the forward up to the tapped layer(s) by hand, the
test-time loss written out from the paper's / card's formula (never ``adaptkit.functional.*`` nor the head's own
``test_loss`` / ``train_loss``), ``torch.autograd.grad`` and the optimizer update by hand (SGD) or a fresh
``torch.optim`` on the copies (Adam). The head's modules (projector, discriminator, classifier) are called as
plain forwards; ``head.prepare`` (data preparation with the seeded generator) reproduces the random draws.

Checked after one wrapped forward: the adapted parameters equal the reference's (atol 1e-6, with an update that
is large next to that), every parameter above the tapped layer(s) is bitwise unchanged, the head is bitwise
unchanged (or, for TTT, the wrapper's private copy carries the reference update while the caller's head is
untouched), and the BatchNorm buffers follow the ``bn_mode``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn

from adaptkit import NCTTT, NCTTTHead
from adaptkit.heads.clust3 import ClusT3Head
from adaptkit.heads.rotation import RotationHead
from adaptkit.heads.tttpp import TTTPPHead
from adaptkit.methods.clust3 import ClusT3
from adaptkit.methods.ttt import TTT
from adaptkit.methods.tttpp import TTTPlusPlus

B, SIZE = 6, 16
ATOL = 1e-6
UP = ("stem.", "layer1.")  # the modules up to and including the tapped layer1


class Net(nn.Module):
    """stem -> layer1 (tapped) -> layer2 -> pool -> fc; conv (no bias: BN follows) + BN + ReLU stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


def make_model() -> Net:
    torch.manual_seed(0)
    m = Net()
    for bn in (m.stem[1], m.layer1[1], m.layer2[1]):
        randomize_bn(bn, bias=0.2, mean=0.3, var=(0.2, 0.6), tracked=7)
    return m.eval()


def images(seed: int, n: int = B) -> torch.Tensor:
    """Images in [0, 1] whose brightness and contrast vary per image and channel."""
    g = torch.Generator().manual_seed(seed)
    lo = 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    return lo + (1 - lo) * torch.rand(n, 3, 1, 1, generator=g) * torch.rand(n, 3, SIZE, SIZE, generator=g)


def source_data() -> list[torch.Tensor]:
    return [images(50 + i, 8) for i in range(3)]


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- shared machinery
def ref_copy(model: Net, bn_mode: str) -> Net:
    """A deep copy in eval mode; with ``bn_mode="refresh"`` or ``"batch"`` the BN layers up to the tap run in
    training form (batch statistics, biased variance; the copy's running statistics are written, which only
    ``"refresh"`` compares)."""
    m = copy.deepcopy(model).eval()
    if bn_mode in ("refresh", "batch"):
        m.stem[1].train()
        m.layer1[1].train()
    return m


def upstream(m: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in m.named_parameters() if n.startswith(UP)]
    return [n for n, _ in named], [p for _, p in named]


def fresh_adam(lr: float) -> Callable[[Sequence[nn.Parameter], Sequence[torch.Tensor]], None]:
    """One step of a fresh ``torch.optim.Adam`` (default betas) on ``params`` with the given gradients."""

    def step(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
        opt = torch.optim.Adam(params, lr=lr)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def sgd_by_hand(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor], lr: float) -> None:
    """First SGD step (the momentum buffer starts as the gradient, so any momentum gives the same step)."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


def check_step(model: Net, src: dict[str, torch.Tensor], ref: Net, bn_mode: str, min_move: float = 100 * ATOL) -> None:
    """Adapted parameters (``stem``, ``layer1``) equal the reference's and moved; the rest bitwise unchanged;
    buffers: all bitwise unchanged (``"source"``, ``"batch"``) or those up to the tap equal the reference's
    (``"refresh"``)."""
    got, want = state(model), state(ref)
    names = {n for n, _ in model.named_parameters()}
    moved = 0.0
    for n in names:
        if n.startswith(UP):
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=ATOL, msg=n)
            assert not torch.equal(got[n], src[n]), n
            moved = max(moved, float((want[n] - src[n]).abs().max()))
        else:
            assert torch.equal(got[n], src[n]), n  # above the tap: never updated
    assert moved > min_move, moved  # a wrong sign or scale cannot hide under the tolerance
    for n in set(got) - names:  # buffers
        if bn_mode in ("source", "batch"):
            assert torch.equal(got[n], src[n]), n
        elif n.startswith(UP):
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
            assert not torch.equal(got[n], src[n]), n  # running-stat updates of the training-form forward(s)


def check_prediction(out: torch.Tensor, ref: Net, x: torch.Tensor, bn_mode: str) -> None:
    """``"source"``: an eval forward of the updated copy; ``"batch"``: a training-mode forward (batch statistics,
    biased variance, in every BN layer; the model has no dropout)."""
    with torch.no_grad():
        want = copy.deepcopy(ref).train(bn_mode == "batch")(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- NC-TTT
@pytest.fixture(scope="module")
def nc_head() -> NCTTTHead:
    head = NCTTT.train_head(make_model(), "layer1", source_data(), epochs=1, progress=False, embed_dim=16, lr=1e-2)
    assert isinstance(head, NCTTTHead)
    return head


def ncttt_reference(model: Net, head: NCTTTHead, x: torch.Tensor, bn_mode: str, step: Callable) -> Net:
    """-mean log sigmoid(discriminator(projector(f))), the discriminator's BN on batch statistics."""
    m, h = ref_copy(model, bn_mode), copy.deepcopy(head).train()
    _, params = upstream(m)
    logit = h.discriminator(h.projector(m.layer1(m.stem(x))))
    loss = -F.logsigmoid(logit).mean()
    step(params, torch.autograd.grad(loss, params))
    return m


@pytest.mark.parametrize("bn_mode", ["source", "refresh", "batch"])
def test_ncttt_one_sgd_step(nc_head: NCTTTHead, bn_mode: str) -> None:
    model, x, lr = make_model(), images(1), 0.5
    src, head_before = state(model), state(nc_head)
    ref = ncttt_reference(model, nc_head, x, bn_mode, lambda p, g: sgd_by_hand(p, g, lr))
    with NCTTT(model, "layer1", nc_head, lr=lr, steps=1, optimizer="sgd", bn_mode=bn_mode) as w:
        out = w(x)
        check_step(model, src, ref, bn_mode)
        if bn_mode != "refresh":
            check_prediction(out, ref, x, bn_mode)
        assert all(torch.equal(v, head_before[k]) for k, v in state(w.head).items())  # not adapted, not written
    assert all(torch.equal(v, head_before[k]) for k, v in state(nc_head).items())


def test_ncttt_one_default_adam_step(nc_head: NCTTTHead) -> None:
    """Default optimizer (Adam, betas 0.9/0.999) and bn_mode ("refresh"): a fresh torch.optim.Adam on the copy."""
    model, x, lr = make_model(), images(2), 1e-3
    src = state(model)

    ref = ncttt_reference(model, nc_head, x, "refresh", fresh_adam(lr))
    with NCTTT(model, "layer1", nc_head, lr=lr, steps=1) as w:
        w(x)
        check_step(model, src, ref, "refresh", min_move=0.5 * lr)


# ---------------------------------------------------------------------------------------------- TTT
@pytest.fixture(scope="module")
def rot_head() -> RotationHead:
    head = TTT.train_head(make_model(), "layer1", source_data(), epochs=1, progress=False, lr=1e-2)
    assert isinstance(head, RotationHead)
    return head


def rotation_batch(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sample ``i`` of ``x`` (repeated to ``len(labels)``) rotated by ``labels[i] * 90`` degrees."""
    src = x.repeat(len(labels) // x.shape[0], 1, 1, 1)
    return torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(src, labels)])


def ttt_reference(
    model: Net, head: RotationHead, x_aux: torch.Tensor, labels: torch.Tensor, bn_mode: str, lr: float
) -> tuple[Net, RotationHead]:
    """Rotation cross-entropy, -mean log softmax(head(f))[label], over layer1 and the head (head BN in training
    form), one SGD step (TTT's default, momentum 0)."""
    m, h = ref_copy(model, bn_mode), copy.deepcopy(head).train()
    _, params = upstream(m)
    params = params + list(h.parameters())
    logp = torch.log_softmax(h(m.layer1(m.stem(x_aux))), dim=1)
    loss = -logp[torch.arange(len(labels)), labels].mean()
    sgd_by_hand(params, torch.autograd.grad(loss, params), lr)
    return m, h


@pytest.mark.parametrize(("bn_mode", "rotations"), [("source", "all"), ("refresh", "all"), ("source", "random")])
def test_ttt_one_sgd_step(rot_head: RotationHead, bn_mode: str, rotations: str) -> None:
    model, x, lr, seed = make_model(), images(3), 0.5, 3
    src, head_before = state(model), state(rot_head)
    if rotations == "all":
        labels = torch.arange(4).repeat_interleave(B)
    else:  # the wrapper's draws: its generator seeded with `seed`, first used by prepare
        _, labels = copy.deepcopy(rot_head).prepare(x, torch.Generator().manual_seed(seed), mode="random")
        assert labels.shape == (B,) and len(set(labels.tolist())) > 1
    ref, ref_head = ttt_reference(model, rot_head, rotation_batch(x, labels), labels, bn_mode, lr)
    with TTT(model, "layer1", rot_head, lr=lr, steps=1, bn_mode=bn_mode, rotations=rotations, seed=seed) as w:
        out = w(x)
        check_step(model, src, ref, bn_mode)
        if bn_mode != "refresh":
            check_prediction(out, ref, x, bn_mode)
        got_head, want_head = state(w.head), state(ref_head)
        for k in want_head:  # the private copy: the same SGD step (and running statistics of the head's BN)
            torch.testing.assert_close(got_head[k], want_head[k], rtol=0, atol=ATOL, msg=k)
        assert not torch.equal(got_head["fc.weight"], head_before["fc.weight"])
    assert all(torch.equal(v, head_before[k]) for k, v in state(rot_head).items())  # the caller's head


# ---------------------------------------------------------------------------------------------- ClusT3
@pytest.fixture(scope="module")
def clu_head() -> ClusT3Head:
    head = ClusT3.train_head(
        make_model(), ["stem", "layer1"], source_data(), epochs=1, progress=False, num_clusters=4, num_projectors=2
    )
    assert isinstance(head, ClusT3Head)
    return head


def clust3_reference(model: Net, head: ClusT3Head, x: torch.Tensor, bn_mode: str, step: Callable) -> Net:
    """Sum over layers and projectors of H(Z|X) - H(Z): every location of every image one point with a softmax
    over the K clusters; H(Z|X) the mean per-point entropy, H(Z) the entropy of the mean assignment."""
    m, h = ref_copy(model, bn_mode), copy.deepcopy(head)
    _, params = upstream(m)
    f0 = m.stem(x)
    f1 = m.layer1(f0)
    loss = x.new_zeros(())
    for f, projs in zip((f0, f1), h.projectors):
        for proj in projs:
            logits = proj(f)
            p = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).softmax(dim=1)
            cond = -(p * p.log()).sum(dim=1).mean()
            pbar = p.mean(dim=0)
            loss = loss + cond - (-(pbar * pbar.log()).sum())
    step(params, torch.autograd.grad(loss, params))
    return m


@pytest.mark.parametrize("bn_mode", ["source", "refresh", "batch"])
def test_clust3_one_sgd_step(clu_head: ClusT3Head, bn_mode: str) -> None:
    model, x, lr = make_model(), images(4), 0.5
    src, head_before = state(model), state(clu_head)
    ref = clust3_reference(model, clu_head, x, bn_mode, lambda p, g: sgd_by_hand(p, g, lr))
    with ClusT3(model, ["stem", "layer1"], clu_head, lr=lr, steps=1, optimizer="sgd", bn_mode=bn_mode) as w:
        out = w(x)
        check_step(model, src, ref, bn_mode)
        if bn_mode != "refresh":
            check_prediction(out, ref, x, bn_mode)
        assert all(torch.equal(v, head_before[k]) for k, v in state(w.head).items())
    assert all(torch.equal(v, head_before[k]) for k, v in state(clu_head).items())


def test_clust3_one_default_adam_step(clu_head: ClusT3Head) -> None:
    model, x, lr = make_model(), images(5), 1e-3
    src = state(model)

    ref = clust3_reference(model, clu_head, x, "refresh", fresh_adam(lr))
    with ClusT3(model, ["stem", "layer1"], clu_head, lr=lr, steps=1) as w:
        w(x)
        check_step(model, src, ref, "refresh", min_move=0.5 * lr)


# ---------------------------------------------------------------------------------------------- TTT++
@pytest.fixture(scope="module")
def pp_head() -> TTTPPHead:
    head = TTTPlusPlus.train_head(
        make_model(), "layer1", source_data(), epochs=1, progress=False, proj_dim=4, queue_size=8
    )
    assert isinstance(head, TTTPPHead) and head.has_source_moments
    return head


#: large lr on a frozen-backbone head, on purpose (the update must stand far above the tolerance)
FROZEN_OK = "ignore:.*frozen backbone:UserWarning"


def nt_xent_ref(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR: each of the 2B views is an anchor, its positive the other view of its image, the denominator every
    other view (cosine similarities / t)."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    sim = z @ z.t() / t
    n = z1.shape[0]
    terms = []
    for i in range(2 * n):
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        terms.append(torch.logsumexp(others, dim=0) - sim[i, (i + n) % (2 * n)])
    return torch.stack(terms).mean()


def alignment_ref(rows: torch.Tensor, mu_s: torch.Tensor, cov_s: torch.Tensor, coral_src: Any, mean_src: Any) -> Any:
    """CORAL ||S_s - S_t||_F^2 / (4 d^2) over the unbiased target covariance, normalised by the source average,
    plus 0.5 x the mean discrepancy mean((mu_s - mu_t)^2), normalised likewise."""
    d = rows.shape[1]
    mu_t = rows.mean(dim=0)
    cov_t = (rows - mu_t).t() @ (rows - mu_t) / (rows.shape[0] - 1)
    coral = (cov_s - cov_t).pow(2).sum() / (4 * d * d)
    return coral / coral_src + 0.5 * (mu_s - mu_t).pow(2).mean() / mean_src


def tttpp_reference(model: Net, head: TTTPPHead, x: torch.Tensor, bn_mode: str, seed: int, step: Callable) -> Net:
    """TTT++'s online loss on the first batch (empty queue): (T / 0.07) * NT-Xent of the two SimCLR views'
    projections + 0.05 * align(pooled clean features) + 0.2 * align(clean projections); views and clean batch
    in two forwards."""
    m, h = ref_copy(model, bn_mode), copy.deepcopy(head).eval()
    _, params = upstream(m)
    views, n = h.prepare(x, torch.Generator().manual_seed(seed))  # the wrapper's augmentation draws
    fv, fc = m.layer1(m.stem(views)), m.layer1(m.stem(x))
    hv, hc = fv.mean(dim=(2, 3)), fc.mean(dim=(2, 3))
    zv, zc = h.projector(hv), h.projector(hc)
    t = h.temperature
    loss = (t / 0.07) * nt_xent_ref(zv[:n], zv[n:], t)
    loss = loss + 0.05 * alignment_ref(hc, h.src_mean_enc, h.src_cov_enc, h.src_coral[0], h.src_mean_disc[0])
    loss = loss + 0.2 * alignment_ref(zc, h.src_mean_proj, h.src_cov_proj, h.src_coral[1], h.src_mean_disc[1])
    step(params, torch.autograd.grad(loss, params))
    return m


# "refresh": the clean batch's features are batch-normalised, far from the source moments; the alignment
# gradients are ~1e3, hence the small lr (the step is still ~0.3 at most)
@pytest.mark.parametrize(("bn_mode", "lr"), [("source", 0.5), ("refresh", 2e-4)])
@pytest.mark.filterwarnings(FROZEN_OK)
def test_tttpp_one_sgd_step(pp_head: TTTPPHead, bn_mode: str, lr: float) -> None:
    """Default optimizer (SGD, momentum 0.9: the first step is lr * grad), one step on the first batch."""
    model, x, seed = make_model(), images(6), 2
    src, head_before = state(model), state(pp_head)
    ref = tttpp_reference(model, pp_head, x, bn_mode, seed, lambda p, g: sgd_by_hand(p, g, lr))
    w = TTTPlusPlus(model, "layer1", pp_head, lr=lr, bn_mode=bn_mode, seed=seed)
    assert w.steps == 1 and w.momentum == 0.9 and w._opt_spec == "sgd"
    with w:
        out = w(x)
        check_step(model, src, ref, bn_mode)
        if bn_mode != "refresh":
            check_prediction(out, ref, x, bn_mode)
        assert all(torch.equal(v, head_before[k]) for k, v in state(w.head).items())
    assert all(torch.equal(v, head_before[k]) for k, v in state(pp_head).items())


@pytest.mark.filterwarnings(FROZEN_OK)
def test_tttpp_second_step_uses_momentum(pp_head: TTTPPHead) -> None:
    """``steps=2`` (bn_mode "source", queue empty for both: the batch enters it after its last step): a fresh
    torch.optim.SGD(momentum 0.9) on the copy, fed the hand-written loss's gradients, with the second step's
    augmentations the next draws of the same generator."""
    model, x, lr, seed = make_model(), images(7), 0.2, 4
    src = state(model)
    m, h = ref_copy(model, "source"), copy.deepcopy(pp_head).eval()
    _, params = upstream(m)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    t = h.temperature
    for _ in range(2):
        views, n = h.prepare(x, gen)
        zv, fc = h.projector(m.layer1(m.stem(views)).mean(dim=(2, 3))), m.layer1(m.stem(x))
        hc = fc.mean(dim=(2, 3))
        loss = (t / 0.07) * nt_xent_ref(zv[:n], zv[n:], t)
        loss = loss + 0.05 * alignment_ref(hc, h.src_mean_enc, h.src_cov_enc, h.src_coral[0], h.src_mean_disc[0])
        loss = loss + 0.2 * alignment_ref(
            h.projector(hc), h.src_mean_proj, h.src_cov_proj, h.src_coral[1], h.src_mean_disc[1]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with TTTPlusPlus(model, "layer1", pp_head, lr=lr, steps=2, bn_mode="source", seed=seed) as w:
        w(x)
        check_step(model, src, m, "source")


def test_references_are_not_trivial() -> None:
    """Sanity of the written-out formulas on hand cases (so a reference cannot silently be a no-op)."""
    # NT-Xent of identical views, two orthogonal images, T = 0.5: -log(e^2 / (e^2 + 2))
    z = torch.eye(2)
    assert float(nt_xent_ref(z, z, 0.5)) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)
    # alignment: identical moments give 0
    rows = torch.randn(10, 3)
    mu, cov = rows.mean(0), torch.cov(rows.t())
    assert float(alignment_ref(rows, mu, cov, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
