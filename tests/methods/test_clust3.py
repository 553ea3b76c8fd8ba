"""ClusT3: the information-maximisation loss against explicit loops, the multi-layer head, and the wrapper on two
tapped layers (truncation, reference protocol, reset, restore, errors)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import assert_model_unchanged, snapshot_model

from adaptkit.functional.clust3 import (
    cluster_log_probs,
    information_maximization_loss,
    information_maximization_terms,
)
from adaptkit.heads.base import AuxHead
from adaptkit.heads.clust3 import ClusT3Head
from adaptkit.methods.clust3 import ClusT3


# ---------------------------------------------------------------------------------------------- references
def ref_im(logits: torch.Tensor) -> tuple[float, float, float]:
    """``(L_IM, H(Z|X), H(Z))`` of ``(B, K, H, W)`` logits with plain Python loops and math (float64)."""
    b_, k_, h_, w_ = logits.shape
    vals = logits.tolist()
    ents: list[float] = []
    sums = [0.0] * k_
    for b in range(b_):
        for h in range(h_):
            for w in range(w_):
                z = [vals[b][k][h][w] for k in range(k_)]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                s = sum(e)
                p = [v / s for v in e]
                ents.append(-sum(q * math.log(q) for q in p if q > 0))
                for k in range(k_):
                    sums[k] += p[k]
    n = len(ents)
    cond = sum(ents) / n
    marg = -sum((s / n) * math.log(s / n) for s in sums if s > 0)
    return cond - marg, cond, marg


def buggy_view_im(logits: torch.Tensor) -> torch.Tensor:
    """The paper's loss on the official code's grouping: ``(B, K, H, W)`` viewed as ``(K, B*H*W)`` (no permute)."""
    return information_maximization_loss(logits.reshape(logits.shape[1], -1), dim=0)


# ---------------------------------------------------------------------------------------------- the loss
def test_im_loss_matches_explicit_loops() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64) * 2
    loss, cond, marg = ref_im(z)
    t = information_maximization_terms(z)
    assert t.conditional_entropy.item() == pytest.approx(cond, rel=1e-12, abs=1e-12)
    assert t.marginal_entropy.item() == pytest.approx(marg, rel=1e-12, abs=1e-12)
    assert t.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert information_maximization_loss(z).item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert -math.log(4) <= t.loss.item() <= math.log(4)


def test_im_loss_float32_close_to_float64() -> None:
    z = torch.randn(4, 10, 5, 5, dtype=torch.float64) * 3
    assert information_maximization_loss(z.float()).item() == pytest.approx(
        information_maximization_loss(z).item(), abs=1e-5
    )


def test_vectors_tokens_and_dim() -> None:
    """``(N, K)`` points, the cluster axis elsewhere (``dim``), and a ``(B, K, L)`` layout all agree."""
    z = torch.randn(12, 5, dtype=torch.float64)
    ref = information_maximization_loss(z)
    assert information_maximization_loss(z.t(), dim=0).item() == pytest.approx(ref.item(), abs=1e-12)
    maps = z.reshape(3, 4, 5).permute(0, 2, 1)  # (B=3, K=5, L=4): the same 12 points
    assert information_maximization_loss(maps).item() == pytest.approx(ref.item(), abs=1e-12)
    assert information_maximization_loss(z.t().reshape(5, 3, 4), dim=0).item() == pytest.approx(ref.item(), abs=1e-12)
    assert cluster_log_probs(torch.zeros(2, 3, 4, 5)).shape == (40, 3)
    with pytest.raises(ValueError, match="point axis"):
        information_maximization_loss(torch.zeros(5))
    with pytest.raises(ValueError, match="no point"):
        information_maximization_loss(torch.zeros(0, 5))


def test_no_batch_layout_dependence() -> None:
    """Permuting images (or locations) leaves the loss unchanged; the official code's view does not."""
    z = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 2
    ours = information_maximization_loss(z)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(information_maximization_loss(z[perm]), ours, rtol=0, atol=1e-12)
    assert torch.allclose(information_maximization_loss(z.transpose(2, 3)), ours, rtol=0, atol=1e-12)
    assert torch.allclose(information_maximization_loss(z.flip(3)), ours, rtol=0, atol=1e-12)
    # the buggy grouping mixes images and channels, so the order of the batch changes its value
    assert abs(buggy_view_im(z[perm]).item() - buggy_view_im(z).item()) > 1e-3


def test_hand_made_case_where_the_reshape_bug_differs() -> None:
    """Two images, K = 2, two locations each: location 0 confidently in cluster 0, location 1 in cluster 1.

    Per location (the paper): four confident points, balanced clusters, so ``L_IM = -log 2``. The official
    ``(K, B*H*W)`` view groups (image 0, channel 0) with (image 1, channel 0) etc.: every group is a pair of
    *equal* logits, i.e. a uniform "point", and the loss is ``log 2 - log 2 = 0``.
    """
    one = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]], dtype=torch.float64)  # (1, K=2, H=1, W=2)
    z = torch.cat([one, one])  # (B=2, 2, 1, 2)
    t = information_maximization_terms(z)
    assert t.conditional_entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert t.marginal_entropy.item() == pytest.approx(math.log(2), abs=1e-12)
    assert t.loss.item() == pytest.approx(-math.log(2), abs=1e-6)
    assert t.loss.item() == pytest.approx(ref_im(z)[0], abs=1e-12)
    assert buggy_view_im(z).item() == pytest.approx(0.0, abs=1e-12)


def test_saturated_logits_stay_finite() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    t = information_maximization_terms(z)
    t.loss.backward()
    assert all(torch.isfinite(v) for v in t)
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert t.marginal_entropy.item() == pytest.approx(math.log(2), abs=1e-5)


def test_gradcheck_float64() -> None:
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(information_maximization_loss, (z,))
    assert torch.autograd.gradcheck(lambda x: information_maximization_terms(x).marginal_entropy, (z,))
    assert torch.autograd.gradgradcheck(information_maximization_loss, (z,))


# ---------------------------------------------------------------------------------------------- the head
class TinyNet(nn.Module):
    """stem -> block1 -> block2 -> pool -> fc (stages 0, 1, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def _data(n: int = 2, b: int = 8, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, size, size, generator=g) for _ in range(n)]


def test_head_structure_and_losses() -> None:
    head = ClusT3Head([6, 8], num_clusters=3, num_projectors=2)
    assert [[type(p) for p in ps] for ps in head.projectors] == [[nn.Conv2d] * 2] * 2
    assert head.projectors[1][0].weight.shape == (3, 8, 1, 1) and head.projectors[1][0].bias is not None
    f = [torch.randn(4, 6, 5, 5), torch.randn(4, 8, 3, 3)]
    want = sum(information_maximization_loss(p(m)) for m, ps in zip(f, head.projectors) for p in ps)
    assert torch.allclose(head.train_loss(f), want)  # summed over layers and projectors, not averaged
    assert torch.equal(head.test_loss(f, None), head.train_loss(f))
    large = ClusT3Head(8, num_clusters=4, num_projectors=1, projector="large")
    (seq,) = large.projectors[0]
    assert [type(m) for m in seq] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert seq[0].weight.shape == (4, 8, 1, 1) and seq[2].weight.shape == (4, 4, 1, 1)
    # tokens (B, N, C) and vectors (B, C) through as_feature_map
    one = ClusT3Head(8, num_clusters=4, num_projectors=2)
    assert torch.isfinite(one.train_loss([torch.randn(3, 7, 8)]))
    assert torch.isfinite(one.train_loss([torch.randn(6, 8)]))
    with pytest.raises(ValueError, match=r"1 layer.*projectors for 2"):
        head.train_loss([f[0]])
    with pytest.raises(ValueError, match="channels"):
        head.train_loss([f[1], f[0]])
    for bad in ({"num_clusters": 1}, {"num_projectors": 0}, {"projector": "mlp"}):
        with pytest.raises(ValueError):
            ClusT3Head(8, **bad)  # type: ignore[arg-type]


def test_train_head_two_layers_tiny_cnn() -> None:
    net = TinyNet().eval()
    snap = snapshot_model(net)
    head = ClusT3.train_head(
        net, layer=[1, 2], loader=_data(2), epochs=4, lr=1e-2, progress=False, num_clusters=4, num_projectors=2
    )
    assert isinstance(head, ClusT3Head) and head.in_channels == [12, 16]
    assert head.binding is not None and head.binding["layers"] == ["block1", "block2"]
    assert head.binding["feature_shapes"] == [[12, 16, 16], [16, 8, 8]]
    losses = [row["train_loss"] for row in head.history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # the projectors learn to cluster the source features
    assert_model_unchanged(net, snap)  # frozen training leaves the model exactly as it was


def test_head_save_load_round_trip(tmp_path: Path) -> None:
    net = TinyNet().eval()
    head = ClusT3.train_head(net, layer=[1, 2], loader=_data(1), epochs=1, progress=False, projector="large",
                             num_projectors=1)  # fmt: skip
    path = tmp_path / "clust3.pt"
    head.save(path)
    for loader in (ClusT3Head.load, AuxHead.load):
        back = loader(path)
        assert type(back) is ClusT3Head
        assert back.config == head.config == {
            "in_channels": [12, 16], "num_clusters": 10, "num_projectors": 1, "projector": "large",
        }  # fmt: skip
        assert back.binding == head.binding and back.history == head.history
        sd, sd2 = head.state_dict(), back.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        feats = [torch.randn(2, 12, 4, 4), torch.randn(2, 16, 2, 2)]
        assert torch.equal(back.train_loss(feats), head.train_loss(feats))
    with ClusT3(net, head=ClusT3Head.load(path), steps=1) as ct:  # layer=None: the saved binding
        assert ct.layers == ["block1", "block2"]
        ct(_data(1)[0])


# ---------------------------------------------------------------------------------------------- the wrapper
@pytest.fixture(scope="module")
def resnet_and_head() -> tuple[nn.Module, ClusT3Head]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    head = ClusT3.train_head(model, layer=[1, 2], loader=_data(2, seed=1), epochs=1, progress=False)
    assert isinstance(head, ClusT3Head)
    return model, head


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_wrapper_adapts_two_layers_and_truncates(resnet_and_head: tuple[nn.Module, ClusT3Head]) -> None:
    model, head = copy.deepcopy(resnet_and_head[0]), resnet_and_head[1]
    before = _state(model)
    # adaptation forwards run with gradients on; the prediction pass(es) run under no_grad
    adapt_calls = {"layer1": 0, "layer2": 0, "layer3": 0}
    all_calls = dict(adapt_calls)

    def counter(name: str) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, inputs: object) -> None:
            all_calls[name] += 1
            adapt_calls[name] += int(torch.is_grad_enabled())

        return hook

    handles = [getattr(model, n).register_forward_pre_hook(counter(n)) for n in adapt_calls]
    steps, x = 3, _data(1, seed=5)[0]
    w = ClusT3(model, layer=[1, 2], head=head, lr=1e-3, steps=steps)
    assert w.layers == ["layer1", "layer2"]
    assert all_calls["layer3"] == 0  # wrapping probes the upstream modules with a forward truncated at layer2
    out = w(x)
    assert out.shape == (8, 10) and not out.requires_grad
    # every adaptation forward stopped right after layer2: layer3 never ran while adapting, only to predict
    assert adapt_calls == {"layer1": steps, "layer2": steps, "layer3": 0}
    assert all_calls["layer3"] >= 1
    w(x)
    assert adapt_calls == {"layer1": 2 * steps, "layer2": 2 * steps, "layer3": 0}
    after = _state(model)
    changed = {k.split(".")[0] for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])}
    assert changed == {"conv1", "bn1", "layer1", "layer2"}  # both tapped stages and the stem learn, nothing above
    named = dict(w.named_adapted_parameters())
    assert any(n.startswith("layer1.") for n in named) and any(n.startswith("layer2.") for n in named)
    assert not any(n.startswith(("layer3.", "layer4.", "fc.")) for n in named)
    w.restore()
    for h in handles:
        h.remove()


class RefClusT3:
    """The official test-time recipe on a deep copy: whole model in train mode, Adam over the stem and stages
    1-2, the summed IM loss of every projector on the full forward's layer1/layer2 outputs, ``steps`` times."""

    def __init__(self, model: nn.Module, head: ClusT3Head, lr: float, steps: int) -> None:
        self.model, self.head, self.steps = copy.deepcopy(model), head, steps
        params = [
            p for n, p in self.model.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")
        ]
        self.opt = torch.optim.Adam(params, lr=lr)
        self.feats: dict[str, torch.Tensor] = {}
        for n in ("layer1", "layer2"):
            getattr(self.model, n).register_forward_hook(lambda m, i, o, n=n: self.feats.__setitem__(n, o))

    def adapt(self, x: torch.Tensor) -> None:
        self.model.train()
        for _ in range(self.steps):
            self.model(x)
            loss = self.head.train_loss([self.feats["layer1"], self.feats["layer2"]])
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.model.eval()


def test_matches_reference_recipe(resnet_and_head: tuple[nn.Module, ClusT3Head]) -> None:
    model, head = copy.deepcopy(resnet_and_head[0]), resnet_and_head[1]
    x, steps = _data(1, seed=6)[0], 3
    ref = RefClusT3(model, copy.deepcopy(head), lr=1e-3, steps=steps)
    ref.adapt(x)
    with ClusT3(model, layer=[1, 2], head=head, lr=1e-3, steps=steps) as w:
        w(x)
        ours = _state(model)
    theirs = ref.model.state_dict()
    upstream = [k for k in theirs if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    assert any(k.endswith("running_mean") for k in upstream)
    for k in upstream:  # weights and refreshed running statistics of the adapted encoder
        assert torch.allclose(ours[k].double(), theirs[k].double(), rtol=1e-5, atol=1e-6), k


def test_prediction_is_the_reference_eval_reforward(resnet_and_head: tuple[nn.Module, ClusT3Head]) -> None:
    """With a negligible lr (the inputs of the layers above the taps do not change across iterations) the
    prediction equals the reference's eval-mode re-forward with the refreshed statistics of *every* BN layer,
    including those above the taps that the truncated iterations never ran."""
    model, head = copy.deepcopy(resnet_and_head[0]), resnet_and_head[1]
    x, steps = _data(1, seed=8)[0], 4
    ref = RefClusT3(model, copy.deepcopy(head), lr=1e-12, steps=steps)
    ref.adapt(x)
    with torch.no_grad():
        want, source = ref.model(x), model(x)
    with ClusT3(model, layer=[1, 2], head=head, lr=1e-12, steps=steps) as w:
        got = w(x)
    assert not torch.allclose(want, source, atol=1e-3)  # the refresh matters
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_reset_bitwise_and_restore_exact(resnet_and_head: tuple[nn.Module, ClusT3Head]) -> None:
    model, head = copy.deepcopy(resnet_and_head[0]), resnet_and_head[1]
    model.layer3.requires_grad_(False)  # non-default flags must come back as they were
    snap = snapshot_model(model)
    head_state, head_flags = _state(head), {n: p.requires_grad for n, p in head.named_parameters()}
    head_training = {n: m.training for n, m in head.named_modules()}
    before = _state(model)
    xs = _data(3, seed=7)
    w = ClusT3(model, layer=[1, 2], head=head, lr=1e-3, steps=2, episodic=False)
    first = w(xs[0])
    w(xs[1])
    w(xs[2])
    assert any(not torch.equal(v, before[k]) for k, v in _state(model).items())
    w.reset()
    after = _state(model)
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    assert w.optimizer is not None and len(w.optimizer.state) == 0
    assert torch.equal(w(xs[0]), first)
    assert w.restore() is model
    assert_model_unchanged(model, snap)  # state dict, requires_grad, training flags, hooks, attributes
    assert all(torch.equal(v, head_state[k]) for k, v in head.state_dict().items())
    assert {n: p.requires_grad for n, p in head.named_parameters()} == head_flags
    assert {n: m.training for n, m in head.named_modules()} == head_training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in head.modules())


def test_mismatched_layers_raise(resnet_and_head: tuple[nn.Module, ClusT3Head]) -> None:
    model, head = copy.deepcopy(resnet_and_head[0]), resnet_and_head[1]
    snap = snapshot_model(model)
    for layer in ([1, 3], 2, [2, 1], "layer1"):
        with pytest.raises(ValueError, match=r"trained on layer\(s\) \['layer1', 'layer2'\].*layer=\['layer1'"):
            ClusT3(model, layer=layer, head=head)
    unbound = ClusT3Head([64, 128])  # no binding: the layer count is still checked when wrapping
    with pytest.raises(ValueError, match="projectors for 2 layer"):
        ClusT3(model, layer=1, head=unbound)
    with pytest.raises(TypeError, match="ClusT3Head"):
        ClusT3(model, layer=[1, 2], head=None)
    assert_model_unchanged(model, snap)


def test_defaults_and_registry() -> None:
    import adaptkit

    assert adaptkit.get_method("clust3") is ClusT3
    w = ClusT3(TinyNet().eval(), layer=[1, 2], head=ClusT3Head([12, 16]))
    assert (w.lr, w.steps, w.bn_mode, w.episodic, type(w.optimizer).__name__) == (1e-5, 20, "refresh", True, "Adam")
    assert w.adapt_head is False and not any(p.requires_grad for p in w.head.parameters())
    w.restore()
