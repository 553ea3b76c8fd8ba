"""OCL: one adaptation step against a hand-written reference (forward on the two views with prior-mixed
BatchNorm, the loss written out from the card's formula with an explicit Gram matrix, autograd, SGD by hand),
and the stochastic restoration against seeded Bernoulli masks.

The reference never calls ``adaptkit.functional.ocl``: a flipped loss sign, swapped ``lambda_pos`` /
``lambda_neg``, a wrong BN mixing or a wrong set of updated parameters all fail here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn

from adaptkit.methods.ocl import OCL

C, SIZE, B = 4, 12, 2
LR, MOMENTUM, WD = 0.2, 0.9, 0.05
LAMBDA_POS, LAMBDA_NEG = 2.5, 0.7  # distinct: a swap changes the update


class Seg(nn.Module):
    """conv(stride 2) + BN + ReLU -> conv + BN + ReLU -> 1x1 classifier (+ an aux classifier), upsampled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, C, 1)
        self.aux = nn.Conv2d(6, C, 1)  # on the first block: the loss never reaches it

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = torch.relu(self.bn1(self.conv1(x)))
        f2 = torch.relu(self.bn2(self.conv2(f1)))
        up = dict(size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": F.interpolate(self.head(f2), **up), "aux": F.interpolate(self.aux(f1), **up)}


def make_model() -> Seg:
    torch.manual_seed(0)
    m = Seg()
    randomize_bn(m.bn1, bias=0.3, mean=0.4, tracked=5)
    randomize_bn(m.bn2, bias=0.3, mean=0.4, tracked=5)
    with torch.no_grad():
        m.head.weight.mul_(3.0)  # confident-ish predictions: both terms have sizeable gradients
    return m.eval()


def images(seed: int = 0, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g) * 1.2 + 0.3


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- the reference
def mixed_bn(h: torch.Tensor, bn: nn.BatchNorm2d, prior: float | str | None) -> torch.Tensor:
    """BatchNorm with ``pi * source + (1 - pi) * batch`` statistics (unbiased batch variance, no gradient through
    the batch statistics); ``0`` / ``None``: plain eval BN; ``"batch"``: ``pi = 0``."""
    if prior is None or prior == 0:
        mean, var = bn.running_mean, bn.running_var
    else:
        pi = 0.0 if prior == "batch" else float(prior)
        hd = h.detach()
        mu_b = hd.mean(dim=(0, 2, 3))
        var_b = ((hd - mu_b.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (hd.numel() / hd.shape[1] - 1)
        mean = pi * bn.running_mean + (1 - pi) * mu_b
        var = pi * bn.running_var + (1 - pi) * var_b
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return (h - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def forward_ref(m: Seg, x: torch.Tensor, prior: float | str | None) -> torch.Tensor:
    """The main logits of ``m`` on ``x``, every BN prior-mixed over ``x`` (the two-view batch)."""
    f1 = torch.relu(mixed_bn(m.conv1(x), m.bn1, prior))
    f2 = torch.relu(mixed_bn(m.conv2(f1), m.bn2, prior))
    return F.interpolate(m.head(f2), size=x.shape[-2:], mode="bilinear", align_corners=False)


def ocl_loss_ref(
    la: torch.Tensor, lb: torch.Tensor, lambda_pos: float, lambda_neg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The card's formula: z = softmax / ||softmax||_2 per pixel; L_pos = -(1/N) sum_i <z_a,i, z_b,i>;
    L_neg = 1/2 sum_v (1/M^2) sum_ij <z_v,i, z_v,j> (explicit Gram matrix, diagonal included); per image, then
    averaged over images."""
    n = la.shape[0]
    pos, neg = [], []
    for k in range(n):
        za = la[k].flatten(1).softmax(dim=0)  # (C, N)
        zb = lb[k].flatten(1).softmax(dim=0)
        za = za / za.pow(2).sum(dim=0, keepdim=True).sqrt()
        zb = zb / zb.pow(2).sum(dim=0, keepdim=True).sqrt()
        npix = za.shape[1]
        pos.append(-(za * zb).sum() / npix)
        grams = [(z.t() @ z).sum() / npix**2 for z in (za, zb)]
        neg.append(0.5 * (grams[0] + grams[1]))
    lp, ln = torch.stack(pos).mean(), torch.stack(neg).mean()
    return lambda_pos * lp + lambda_neg * ln, lp, ln


def reference_step(model: Seg, x: torch.Tensor, prior: float | str | None) -> dict[str, Any]:
    """One OCL step on a deep copy: forward cat([x, flip(x)]), loss, autograd, SGD (momentum buffer = first
    gradient, weight decay added to the gradient) written by hand; parameters without a gradient are skipped."""
    m = copy.deepcopy(model)
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    logits = forward_ref(m, torch.cat([x, x.flip(-1)]), prior)
    la, lb = logits[: x.shape[0]], logits[x.shape[0] :].flip(-1)
    loss, lp, ln = ocl_loss_ref(la, lb, LAMBDA_POS, LAMBDA_NEG)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    new = {}
    with torch.no_grad():
        for n, p, g in zip(names, params, grads):
            new[n] = p.detach().clone() if g is None else p - LR * (g + WD * p)
    return {
        "params": new,
        "no_grad": {n for n, g in zip(names, grads) if g is None},
        "terms": (loss.detach(), lp.detach(), ln.detach()),
        "pred": ((la + lb) / 2).detach(),
    }


def wrap(model: nn.Module, prior: float | str | None, **kw: Any) -> OCL:
    kw.setdefault("restore_prob", 0.0)
    return OCL(
        model, lr=LR, momentum=MOMENTUM, weight_decay=WD, lambda_pos=LAMBDA_POS, lambda_neg=LAMBDA_NEG,
        bn_prior=prior, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- one SGD step
@pytest.mark.parametrize("prior", [0.6, "batch", 0])
def test_one_step_matches_hand_written_sgd(prior: float | str) -> None:
    model, x = make_model(), images(1)
    src = params_of(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    want = reference_step(model, x, prior)
    w = wrap(model, prior)
    out = w(x)
    got = params_of(model)

    assert want["no_grad"] == {"aux.weight", "aux.bias"}
    moved = 0.0
    for n in src:
        if n in want["no_grad"]:
            assert torch.equal(got[n], src[n]), n  # no gradient: SGD skips it, weight decay included
        else:
            torch.testing.assert_close(got[n], want["params"][n], rtol=0, atol=1e-6, msg=n)
            assert not torch.equal(got[n], src[n]), n
            moved = max(moved, float((want["params"][n] - src[n]).abs().max()))
    assert moved > 1e-2  # the step is large next to the tolerance: a wrong direction or scale cannot pass
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k  # running statistics are never written
    assert w.last_terms is not None
    for t, r in zip(w.last_terms, want["terms"]):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["out"], want["pred"], rtol=1e-5, atol=1e-5)  # from the pre-update forward
    w.restore()
    assert all(torch.equal(v, src[k]) for k, v in params_of(model).items())


def test_two_steps_match_fresh_torch_sgd() -> None:
    """``steps=2``: the second step uses the momentum buffer of the first (a fresh torch.optim.SGD on a copy,
    the gradient from the hand-written forward and loss)."""
    model, x, prior = make_model(), images(2), 0.85
    m = copy.deepcopy(model)
    params = [p for n, p in m.named_parameters() if not n.startswith("aux.")]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for _ in range(2):
        logits = forward_ref(m, torch.cat([x, x.flip(-1)]), prior)
        loss = ocl_loss_ref(logits[:B], logits[B:].flip(-1), LAMBDA_POS, LAMBDA_NEG)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with wrap(model, prior, steps=2) as w:
        w(x)
        for (n, p), q in zip(model.named_parameters(), m.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=2e-6, msg=n)


def test_prediction_first_and_plain_tensor_output() -> None:
    """``prediction="first"`` on a model returning a plain tensor: the un-flipped view's pre-update logits; the
    update is the same."""
    model, x = make_model(), images(3)

    class Plain(nn.Module):
        def __init__(self, inner: Seg) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t)["out"]

    want = reference_step(model, x, 0.5)
    with torch.no_grad():
        first = forward_ref(model, torch.cat([x, x.flip(-1)]), 0.5)[:B]
    with wrap(Plain(model), 0.5, prediction="first") as w:
        out = w(x)
        torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want["params"][n], rtol=0, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------- restoration
@pytest.mark.parametrize("seed", [0, 5])
def test_stochastic_restoration_masks(seed: int) -> None:
    """After the step each adapted element is reset to its wrap-time value where an independent Bernoulli(p) mask
    drawn from ``torch.Generator().manual_seed(seed)`` is set (one ``torch.rand`` per adapted parameter, in the
    model's parameter order); elsewhere it keeps the plain SGD update."""
    p_r, x = 0.3, images(4)
    src = params_of(make_model())
    plain_w = wrap(make_model(), 0.6, restore_prob=0.0)
    plain_w(x)
    plain = params_of(plain_w.inner)
    plain_w.restore()
    model = make_model()
    with wrap(model, 0.6, restore_prob=p_r, seed=seed) as w:
        w(x)
        got = params_of(model)
    g = torch.Generator().manual_seed(seed)
    restored = total = 0
    for n, p in make_model().named_parameters():  # every parameter requires grad: all are adapted
        mask = torch.rand(p.shape, generator=g) < p_r
        assert torch.equal(got[n], torch.where(mask, src[n], plain[n])), n
        restored += int(mask.sum())
        total += mask.numel()
    frac = restored / total
    assert total > 500 and abs(frac - p_r) < 4 * (p_r * (1 - p_r) / total) ** 0.5, frac
    # non-trivial: some moved elements were put back, others kept the update
    moved = {n: plain[n] != src[n] for n in src}
    assert any(bool((moved[n] & (got[n] == src[n])).any()) for n in src)
    assert any(bool((moved[n] & (got[n] != src[n])).any()) for n in src)


def test_restore_prob_one_resets_everything_and_zero_nothing() -> None:
    x = images(5)
    model = make_model()
    src = params_of(model)
    with wrap(model, 0.6, restore_prob=1.0) as w:
        w(x)
        assert all(torch.equal(p, src[n]) for n, p in params_of(model).items())
        w(x)  # the momentum buffers are untouched, yet every element goes back to the source
        assert all(torch.equal(p, src[n]) for n, p in params_of(model).items())
