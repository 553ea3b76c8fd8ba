"""TTT++: losses vs independent references, the batched SimCLR augmentation, the head (source moments, save/load)
and the online wrapper (a hand-written reference loop, queue semantics, reset / restore / memory)."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from helpers import assert_model_unchanged, count_live_tensors, randomize_bn, snapshot_model

from adaptkit.functional.augment import (
    adjust_hue,
    color_jitter,
    random_grayscale,
    random_hflip,
    random_resized_crop,
    sample_crop_boxes,
    simclr_augment,
)
from adaptkit.functional.tttpp import coral_loss, feature_moments, mean_discrepancy, nt_xent_loss
from adaptkit.heads.tttpp import FeatureQueue, TTTPPHead
from adaptkit.methods.tttpp import TTTPlusPlus

# these tests pin the released lr 0.01 on frozen-backbone heads on purpose (reference loop, mechanics); the
# warning that combination raises is tested in test_tttpp_frozen_warning.py
pytestmark = pytest.mark.filterwarnings("ignore:.*trained on a frozen backbone:UserWarning")

SIZE = 16
B = 4


# ---------------------------------------------------------------------------------------------- losses
def nt_xent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """NT-Xent written out: a double loop over anchors and candidates, cosine similarity, float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    n2, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n2):
        pos = (i + b) % n2
        denom = 0.0
        for j in range(n2):
            if j == i:
                continue
            cos = float(z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j])))
            denom += math.exp(cos / t)
        cos_pos = float(z[i] @ z[pos] / (np.linalg.norm(z[i]) * np.linalg.norm(z[pos])))
        total += -math.log(math.exp(cos_pos / t) / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.5, 0.1, 1.0])
def test_nt_xent_matches_double_loop(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = nt_xent_loss(z1 * 3.0, z2, temperature=t)  # scale-free: the projections are normalised
    assert got.item() == pytest.approx(nt_xent_reference(z1.numpy(), z2.numpy(), t), rel=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, t), (z1.requires_grad_(), z2.requires_grad_()))


def test_nt_xent_equals_released_supcon_up_to_its_factor() -> None:
    """The released SupConLoss (labels None) = (T / 0.07) * NT-Xent; written here as in the released code."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    f = nn.functional.normalize(torch.stack([z1, z2], dim=1), dim=2)  # (bsz, n_views, d), ssh output normalised
    bsz, t, base = 6, 0.5, 0.07
    mask = torch.eye(bsz).repeat(2, 2)
    feats = torch.cat(torch.unbind(f, dim=1), dim=0)
    logits = feats @ feats.T / t
    logits = logits - logits.max(dim=1, keepdim=True).values
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(2 * bsz).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    supcon = (-(t / base) * (mask * log_prob).sum(1) / mask.sum(1)).mean()
    assert supcon.item() == pytest.approx((t / base) * nt_xent_loss(z1, z2, t).item(), rel=1e-5)


def test_moments_coral_and_mean_vs_numpy() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, 5, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(30, 5, generator=g, dtype=torch.float64)
    mu, cov = feature_moments(a)
    np.testing.assert_allclose(mu.numpy(), a.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    cs, ct = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    want = ((cs - ct) ** 2).sum() / (4 * 5**2)
    assert coral_loss(torch.from_numpy(cs), torch.from_numpy(ct)).item() == pytest.approx(want, rel=1e-12)
    ms, mt = a.numpy().mean(0), b.numpy().mean(0)
    assert mean_discrepancy(torch.from_numpy(ms), torch.from_numpy(mt)).item() == pytest.approx(
        ((ms - mt) ** 2).mean(), rel=1e-12
    )
    with pytest.raises(ValueError, match="at least 2"):
        feature_moments(a[:1])
    with pytest.raises(ValueError):
        coral_loss(torch.eye(2), torch.eye(3))


# ---------------------------------------------------------------------------------------------- augmentation
def _images(n: int = 6, seed: int = 3, c: int = 3) -> torch.Tensor:
    return torch.rand(n, c, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_augment_shape_range_determinism() -> None:
    x = _images()
    a = simclr_augment(x, torch.Generator().manual_seed(5))
    b = simclr_augment(x, torch.Generator().manual_seed(5))
    c = simclr_augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(simclr_augment(x, g), simclr_augment(x, g))  # the generator advances: new views


def test_augment_is_per_sample() -> None:
    x = _images(1).expand(8, -1, -1, -1).contiguous()  # the same image 8 times
    y = simclr_augment(x, torch.Generator().manual_seed(0))
    flat = y.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))
    boxes = sample_crop_boxes(8, SIZE, SIZE, torch.Generator().manual_seed(0))
    assert len({tuple(b.tolist()) for b in boxes}) == 8


def test_flip_hand_case_and_identity() -> None:
    x = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).view(2, 3, 2, 3) / 36
    kw = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE))  # square, so a full crop fits ratio 1
    assert torch.equal(simclr_augment(x, torch.Generator().manual_seed(0), flip_p=0.0, **kw), x)
    assert torch.equal(simclr_augment(x, torch.Generator().manual_seed(0), flip_p=1.0, **kw), x.flip(-1))
    hand = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])
    assert random_hflip(hand, p=1.0).tolist() == [[[[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]]]
    mixed = random_hflip(torch.cat([hand] * 64), torch.Generator().manual_seed(1), p=0.5)
    flipped = (mixed[:, 0, 0, 0] == 3.0).sum().item()
    assert 10 < flipped < 54 and ((mixed == hand) | (mixed == hand.flip(-1))).flatten(1).all(1).all()


def test_crop_boxes_and_resize() -> None:
    boxes = sample_crop_boxes(2000, 24, 32, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 24).all()
    assert torch.equal(boxes, boxes.round())
    frac = w * h / (24 * 32)
    assert frac.min() > 0.15 and frac.max() <= 1.0 and 0.5 < frac.mean() < 0.65  # U(0.2, 1) area, rounded sides
    # one box, checked against crop + bilinear resize away from the crop's border
    x = _images(1)
    out = random_resized_crop(x, torch.Generator().manual_seed(3), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    box = sample_crop_boxes(1, SIZE, SIZE, torch.Generator().manual_seed(3), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    x1, y1, x2, y2 = (int(v) for v in box[0])
    ref = torch.nn.functional.interpolate(x[:, :, y1:y2, x1:x2], size=(SIZE, SIZE), mode="bilinear")
    torch.testing.assert_close(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=1e-5, atol=1e-5)


def test_color_ops_vs_torchvision() -> None:
    x = _images(5)
    shifts = torch.tensor([-0.1, -0.03, 0.0, 0.07, 0.1])
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(5)])
    torch.testing.assert_close(adjust_hue(x, shifts), ref, rtol=1e-5, atol=1e-5)
    # values in [0.3, 0.6]: no clamping for factors in [0.6, 1.4], so each factor can be read back
    mid = 0.3 + 0.3 * x
    y = color_jitter(mid, torch.Generator().manual_seed(0), 0.4, 0.0, 0.0, 0.0, p=1.0)  # brightness only
    factors = (y.flatten(1) * mid.flatten(1)).sum(1) / mid.flatten(1).pow(2).sum(1)
    assert ((factors >= 0.6) & (factors <= 1.4)).all() and factors.unique().numel() == 5
    torch.testing.assert_close(y, mid * factors.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)
    y = color_jitter(mid, torch.Generator().manual_seed(0), 0.0, 0.0, 0.4, 0.0, p=1.0)  # saturation only
    for i in range(5):
        d = (y[i] - TF.rgb_to_grayscale(mid[i])).flatten()
        e = (mid[i] - TF.rgb_to_grayscale(mid[i])).flatten()
        f = float(d @ e / (e @ e))
        assert 0.6 - 1e-4 <= f <= 1.4 + 1e-4
        torch.testing.assert_close(y[i], TF.adjust_saturation(mid[i], f), rtol=1e-4, atol=1e-5)
    y = color_jitter(mid, torch.Generator().manual_seed(0), 0.0, 0.4, 0.0, 0.0, p=1.0)  # contrast only
    for i in range(5):
        m = TF.rgb_to_grayscale(mid[i]).mean()
        f = float(((y[i] - m) * (mid[i] - m)).sum() / ((mid[i] - m) ** 2).sum())
        torch.testing.assert_close(y[i], TF.adjust_contrast(mid[i], f), rtol=1e-4, atol=1e-5)
    assert torch.equal(color_jitter(x, torch.Generator().manual_seed(0), p=0.0), x)
    g = random_grayscale(x, p=1.0)
    torch.testing.assert_close(g, TF.rgb_to_grayscale(x, 3), rtol=1e-6, atol=1e-6)


def test_augment_runs_on_normalised_and_other_channel_counts() -> None:
    x = (_images() - 0.5) / 0.25  # normalised inputs: not in [0, 1], so no clamping
    y = simclr_augment(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(y).all() and y.min() < 0 and y.max() > 1
    for c in (1, 5):
        y = simclr_augment(_images(c=c), torch.Generator().manual_seed(0))
        assert y.shape == (6, c, SIZE, SIZE) and torch.isfinite(y).all()
    y = simclr_augment(_images(), torch.Generator().manual_seed(0), value_range=(0.2, 0.8), jitter_p=1.0)
    assert y.shape == (6, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="B, C, H, W"):
        simclr_augment(_images()[0])


# ---------------------------------------------------------------------------------------------- head
def test_feature_queue_is_bounded_fifo() -> None:
    q = FeatureQueue(5)
    assert q.recent(3) is None
    for i in range(4):
        q.push(torch.full((2, 1), float(i)))
    assert len(q) == 5 and q.buffer is not None and q.buffer.shape == (5, 1)
    assert q.recent(5).flatten().tolist() == [1.0, 2.0, 2.0, 3.0, 3.0]
    assert q.recent(99).shape == (5, 1) and q.recent(0) is None
    q.push(torch.arange(7.0).view(7, 1))  # more than the capacity: the last 5 rows
    assert q.recent(5).flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    q.clear()
    assert len(q) == 0 and q.buffer is None
    FeatureQueue(0).push(torch.ones(3, 2))  # disabled queue


def _fitted_head(c: int = 6, p: int = 4, qs: int = 1536, n_batches: int = 4, seed: int = 0) -> tuple[TTTPPHead, list]:
    torch.manual_seed(seed)
    head = TTTPPHead(c, proj_dim=p, queue_size=qs).eval()
    g = torch.Generator().manual_seed(seed + 10)
    batches = [[torch.randn(4, c, 3, 3, generator=g) * 2 + 0.5] for _ in range(n_batches)]
    head.fit_end(iter(batches))
    return head, batches


@pytest.mark.parametrize("qs", [4, 1536])
def test_fit_end_moments_vs_numpy(qs: int) -> None:
    head, batches = _fitted_head(qs=qs)
    h = torch.cat([b[0].mean(dim=(2, 3)) for b in batches]).double()
    with torch.no_grad():
        z = head.projector(h.float()).double()
    for rows, mu, cov, i in (
        (h, head.src_mean_enc, head.src_cov_enc, 0),
        (z, head.src_mean_proj, head.src_cov_proj, 1),
    ):
        r = rows.numpy()
        np.testing.assert_allclose(mu.numpy(), r.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cov.numpy(), np.cov(r, rowvar=False), rtol=1e-4, atol=1e-6)
        d = r.shape[1]
        # qs 4: chunks of 4 (the loader batches), chunks 2..4 against the first; else fewer than two full chunks:
        # the two halves
        chunks = [r[k : k + 4] for k in range(0, 16, 4)] if qs == 4 else [r[:8], r[8:]]
        c0, m0 = np.cov(chunks[0], rowvar=False), chunks[0].mean(0)
        corals = [((c0 - np.cov(c, rowvar=False)) ** 2).sum() / (4 * d * d) for c in chunks[1:]]
        means = [((m0 - c.mean(0)) ** 2).mean() for c in chunks[1:]]
        assert head.src_coral[i].item() == pytest.approx(np.mean(corals), rel=1e-4)
        assert head.src_mean_disc[i].item() == pytest.approx(np.mean(means), rel=1e-4)
    assert head.src_count.item() == 16 and head.has_source_moments


def test_test_loss_composition_and_queue() -> None:
    head, _ = _fitted_head()
    g = torch.Generator().manual_seed(4)
    f = torch.randn(3 * B, 6, 3, 3, generator=g)
    past = (torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g))
    h, z = head.embed(f)
    loss = head.test_loss([f], B, queue=past, ssl_weight=2.0, scale_enc=0.3, scale_proj=0.7)
    # independent composition from numpy moments
    want = 2.0 * nt_xent_reference(z[:B].detach().numpy(), z[B : 2 * B].detach().numpy(), 0.5)
    for rows, q, mu_s, cov_s, i, s in (
        (h, past[0], head.src_mean_enc, head.src_cov_enc, 0, 0.3),
        (z, past[1], head.src_mean_proj, head.src_cov_proj, 1, 0.7),
    ):
        t = np.concatenate([rows[2 * B :].detach().numpy(), q.numpy()]).astype(np.float64)
        d = t.shape[1]
        coral = ((cov_s.numpy() - np.cov(t, rowvar=False)) ** 2).sum() / (4 * d * d)
        mean = ((mu_s.numpy() - t.mean(0)) ** 2).mean()
        want += s * (coral / head.src_coral[i].item() + 0.5 * mean / head.src_mean_disc[i].item())
    assert loss.item() == pytest.approx(want, rel=1e-4)
    default = head.test_loss([f], B)  # ssl weight 0.5 / 0.07, CIFAR-10 scales
    manual = (0.5 / 0.07) * nt_xent_loss(z[:B], z[B : 2 * B], 0.5) + head.alignment_loss(h[2 * B :], z[2 * B :])
    assert default.item() == pytest.approx(manual.item(), rel=1e-5)
    with pytest.raises(ValueError, match="3 x"):
        head.test_loss([f[: 2 * B]], B)
    with pytest.raises(ValueError, match="source moments"):
        TTTPPHead(6, proj_dim=4).alignment_loss(h, z)


def test_head_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    head, _ = _fitted_head(qs=8)
    head.bind(["layer"], [(6, 3, 3)])
    path = tmp_path / "tttpp.pt"
    head.save(path)
    loaded = TTTPPHead.load(path)
    assert loaded.config == head.config and loaded.binding == head.binding
    assert loaded.queue_size == 8 and loaded.has_source_moments
    sd, sd2 = head.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and {"src_cov_enc", "src_mean_proj", "src_coral", "src_count"} <= set(sd)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    f = torch.randn(3 * B, 6, 3, 3)
    assert torch.equal(head.test_loss([f], B), loaded.test_loss([f], B))
    blob = torch.load(path, weights_only=True)  # plain tensors + JSON: safe loading
    assert "src_cov_enc" in blob["state_dict"]


# ---------------------------------------------------------------------------------------------- wrapper
class Net(nn.Module):
    """encoder (conv-BN-ReLU x2) -> pool -> dropout -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.encoder(x).mean(dim=(2, 3))))


def images(seed: int, n: int = B, shift: bool = False) -> torch.Tensor:
    """Images in [0, 1] whose statistics vary per image and channel (so pooled features vary between samples);
    ``shift``: lower contrast plus noise, a covariate shift."""
    g = torch.Generator().manual_seed(seed)
    lo = 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    x = lo + (1 - lo) * torch.rand(n, 3, 1, 1, generator=g) * torch.rand(n, 3, SIZE, SIZE, generator=g)
    if shift:
        x = (0.5 + 0.5 * (x - 0.5) + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x


def make_net() -> Net:
    """Random weights, BN running statistics calibrated on the source images (a cumulative average), eval mode."""
    torch.manual_seed(0)
    net = Net()
    for m in net.encoder:
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, bias=0.2)
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for i in range(4):
            net(images(200 + i, 16))
    for m in net.encoder:
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return net.eval()


def batch(i: int, n: int = B) -> torch.Tensor:
    return images(100 + i, n, shift=True)


@pytest.fixture(scope="module")
def head() -> TTTPPHead:
    data = [images(50 + i, 8) for i in range(3)]
    return TTTPlusPlus.train_head(make_net(), "encoder", data, epochs=1, progress=False, proj_dim=4, queue_size=10)


def test_train_head_stores_finite_moments(head: TTTPPHead) -> None:
    assert head.binding is not None and head.binding["layers"] == ["encoder"]
    assert head.src_count.item() == 24 and head.queue_size == 10
    for name in ("src_mean_enc", "src_cov_enc", "src_mean_proj", "src_cov_proj", "src_coral", "src_mean_disc"):
        assert torch.isfinite(getattr(head, name)).all(), name
    assert (head.src_coral > 0).all() and (head.src_mean_disc > 0).all()
    assert head.src_cov_enc.abs().sum() > 0 and head.history and math.isfinite(head.history[0]["train_loss"])


def reference_tttpp(net: Net, head: TTTPPHead, xs: list[torch.Tensor], lr: float, qs: int) -> list[torch.Tensor]:
    """The online TTT++ loop written out on copies: encoder in train mode (BN batch statistics, running stats
    updated), SGD(momentum 0.9) on the encoder, views then clean forward, queue of past clean features, eval-mode
    prediction after every step."""
    m, h = copy.deepcopy(net), copy.deepcopy(head).eval()
    for p in h.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(m.encoder.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    past_h: list[torch.Tensor] = []
    past_z: list[torch.Tensor] = []
    outs = []
    for x in xs:
        m.encoder.train()
        views, n = h.prepare(x, gen)
        fv, fc = m.encoder(views), m.encoder(x)
        queue = None
        if past_h:
            k = qs - n
            queue = (torch.cat(past_h)[-k:], torch.cat(past_z)[-k:])
        loss = h.test_loss([torch.cat([fv, fc])], n, queue=queue)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            hc, zc = h.embed(fc)
        past_h.append(hc)
        past_z.append(zc)
        m.eval()
        with torch.no_grad():
            outs.append(m(x))
    return outs


def test_matches_reference_loop(head: TTTPPHead) -> None:
    net = make_net()
    xs = [batch(i) for i in range(4)]
    want = reference_tttpp(net, head, xs, lr=0.01, qs=10)
    w = TTTPlusPlus(net, head=head)  # layer from the head's binding; queue 10 from the head
    assert w.queue_size == 10 and not w.episodic and w.lr == 0.01
    for i, x in enumerate(xs):
        torch.testing.assert_close(w(x), want[i], rtol=1e-4, atol=1e-5)
        assert len(w._queues[0]) == min(10, (i + 1) * B)
    w.restore()


def test_adapts_resets_and_restores(head: TTTPPHead) -> None:
    net = make_net()
    snap = snapshot_model(net)
    head_state = {k: v.clone() for k, v in head.state_dict().items()}
    head_flags = {n: p.requires_grad for n, p in head.named_parameters()}
    w = TTTPlusPlus(net, head=head)
    assert not w.head.training and not any(p.requires_grad for p in w.head.parameters())
    first = w(batch(0))
    w(batch(1))
    w(batch(2))
    assert len(w._queues[0]) == 10 and len(w._queues[1]) == 10
    changed = [n for n, p in w.named_adapted_parameters() if not torch.equal(p, snap.state[n])]
    assert changed and all(n.startswith("encoder.") for n in changed)
    assert all(torch.equal(v, head_state[k]) for k, v in head.state_dict().items())  # head frozen
    w.reset()
    assert len(w._queues[0]) == 0 and w._queues[0].buffer is None and w._queues[1].buffer is None
    assert all(torch.equal(v, snap.state[k]) for k, v in net.state_dict().items())
    assert w.optimizer is not None and len(w.optimizer.state) == 0
    assert torch.equal(w(batch(0)), first)  # queue cleared and augmentations re-seeded
    assert w.restore() is net
    assert_model_unchanged(net, snap)
    assert {n: p.requires_grad for n, p in head.named_parameters()} == head_flags
    assert all(torch.equal(v, head_state[k]) for k, v in head.state_dict().items())
    assert len(w._queues[0]) == 0


def test_episodic_aligns_each_batch_alone(head: TTTPPHead) -> None:
    w = TTTPlusPlus(make_net(), head=head, episodic=True)
    a = w(batch(0))
    w(batch(1))
    assert len(w._queues[0]) == B  # reset before the batch, then the batch itself was queued
    assert torch.equal(w(batch(0)), a)
    w.restore()


def test_shared_head_two_wrappers_do_not_interfere(head: TTTPPHead) -> None:
    w1, w2 = TTTPlusPlus(make_net(), head=head), TTTPlusPlus(make_net(), head=head)
    a0, a1 = w1(batch(0)), w1(batch(1))
    b0, b1 = w2(batch(0)), w2(batch(1))
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    w1.restore()
    w2.restore()


def test_adaptation_state_round_trip_includes_queue(head: TTTPPHead) -> None:
    wa = TTTPlusPlus(make_net(), head=head)
    wa(batch(0))
    wa(batch(1))
    sd = wa.adaptation_state_dict()
    assert sd["_adaptkit.state.queue.enc"].shape == (2 * B, 8) and "_adaptkit.state.rng" in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    wb = TTTPlusPlus(make_net(), head=head)
    wb(batch(7))
    wb.load_adaptation_state_dict(sd)
    out_a = wa(batch(2))
    assert torch.equal(out_a, wb(batch(2)))
    # wb's steps must not have rewritten sd (torch's optimizer load keeps the given tensors): reloading it into a
    # reset wrapper repeats the same step
    wa.reset()
    wa.load_adaptation_state_dict(sd)
    assert torch.equal(wa(batch(2)), out_a)
    wa.restore()
    wb.restore()


def test_memory_flat_and_queue_bounded(head: TTTPPHead) -> None:
    w = TTTPlusPlus(make_net(), head=head, queue_size=6)
    xs = [batch(i) for i in range(3)]
    for x in xs:
        w(x)
    start = count_live_tensors()
    for i in range(30):
        w(xs[i % 3])
        assert len(w._queues[0]) <= 6 and w._queues[0].buffer.shape == (6, 8)
    assert count_live_tensors() - start <= 2
    w.restore()


def test_bad_arguments(head: TTTPPHead) -> None:
    net = make_net()
    snap = snapshot_model(net)
    with pytest.raises(ValueError, match="source moments"):
        TTTPlusPlus(net, layer="encoder", head=TTTPPHead(8, proj_dim=4))
    with pytest.raises(ValueError, match="queue_size"):
        TTTPlusPlus(net, head=head, queue_size=-1)
    with pytest.raises(TypeError, match="TTTPPHead"):
        TTTPlusPlus(net, layer="encoder", head=None)
    assert_model_unchanged(net, snap)
    w = TTTPlusPlus(net, head=head, queue_size=0, ssl_weight=0.0)  # alignment only, no queue
    w(batch(0))
    assert len(w._queues[0]) == 0
    w.restore()
    assert_model_unchanged(net, snap)
