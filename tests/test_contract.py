"""The wrapper contract (design.md section 5), checked for every registered method on a matrix of models.

Every method in ``adaptkit.list_methods()`` runs against a tiny CNN defined here, four torchvision
classification models, five timm models and three torchvision segmentation models (random weights; dict
outputs ``out`` / ``aux``, per-pixel losses). A method that needs constructor arguments beyond the model (an
auxiliary head, ...) adds a factory to ``METHOD_FACTORIES``; one that needs BatchNorm layers is listed in
``NEEDS_BN``, and on BatchNorm-free models only its documented ``ValueError`` is checked. By default every
method runs the whole contract on the ``REPRESENTATIVE`` models and the tests marked ``@everywhere`` on every
model but ``SLOW_MODELS``; ``--runslow`` runs everything on every model.
"""

from __future__ import annotations

import copy
import io
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import (
    assert_classes_unchanged,
    assert_model_unchanged,
    calibrate_bn,
    count_live_tensors,
    snapshot_classes,
    snapshot_model,
)
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

import adaptkit
from adaptkit.core.layers import norm_kind

BATCH = 4
SIZE = 32  # the smallest size at which the stride-16 segmentation backbones still give a 2 x 2 map (see get_model)
RESERVED = "_adaptkit."


# ---------------------------------------------------------------------------------------------- models
class TinyCNN(nn.Module):
    """Conv + BN + ReLU + Dropout + Linear: every layer kind the contract cares about, in a few kB."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(8 * 8 * 8, 16)
        self.bn3 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(p=0.5)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.fc1(x.flatten(1))))  # a wrong spatial size fails here, after bn1/bn2 ran
        return self.fc2(self.drop(x))


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)


def _seg(name: str, **kw: Any) -> Callable[[], nn.Module]:
    """A torchvision segmentation model (dict output ``out`` / ``aux``): random weights, no backbone download."""
    return lambda: getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, num_classes=4, **kw
    )


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        timm = pytest.importorskip("timm")
        # dropout / drop-path switched on so that a train-mode leak changes the outputs
        return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.5, drop_path_rate=0.1, **kw)

    return make


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny_cnn": TinyCNN,
    "tv_resnet18": _tv("resnet18"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_densenet121": _tv("densenet121", drop_rate=0.2),
    "timm_resnet18": _timm("resnet18"),
    "timm_test_efficientnet": _timm("test_efficientnet"),
    "timm_test_convnext": _timm("test_convnext"),
    "timm_test_vit": _timm("test_vit", img_size=SIZE),
    "seg_fcn_resnet50": _seg("fcn_resnet50", aux_loss=True),
    "seg_deeplabv3_mobilenet_v3_large": _seg("deeplabv3_mobilenet_v3_large", aux_loss=True),
    "seg_lraspp_mobilenet_v3_large": _seg("lraspp_mobilenet_v3_large"),
}
#: models without any BatchNorm layer (asserted when the model is built)
BN_FREE = {"timm_test_convnext", "timm_test_vit"}
#: models that run even the @everywhere tests only with --runslow (FCN-ResNet-50, 35 M parameters; DenseNet-121,
#: ~0.9 s per test)
SLOW_MODELS = {"seg_fcn_resnet50", "tv_densenet121"}
METHODS = adaptkit.list_methods()

#: methods that adapt BatchNorm statistics and so refuse models without BatchNorm layers (ValueError)
NEEDS_BN = {"bn_adapt"}
#: methods that work on a final ``nn.Linear`` classifier (penultimate features) and so refuse segmentation models
#: (ValueError naming ``list_layers``)
NEEDS_CLASSIFIER: set[str] = {"lame", "t3a"}
#: method -> factory(model, **overrides) for methods needing more than the model; default: cls(model, **kw)
METHOD_FACTORIES: dict[str, Callable[..., adaptkit.TTAMethod]] = {}
#: arguments used in the contract runs (small but visible updates)
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "bn_adapt": {"N": 16},
    "tent": {"lr": 1e-3},
    "ncttt": {"lr": 1e-3, "steps": 2},
    "clust3": {"lr": 1e-3, "steps": 2},
    "ttt": {"lr": 1e-3, "steps": 2, "momentum": 0.9},  # momentum-free SGD keeps no optimizer state
    "ttt_pp": {"lr": 1e-3},
    "memo": {"n_augmentations": 4, "momentum": 0.9},  # 4 AugMix copies per image; momentum: optimizer state
    "t3a": {"filter_K": 2},  # the per-class filter acts from the first batch of 4 (10 classes + 4 supports)
    "eta": {"e_margin": 3.0, "d_margin": 1.01},  # E0 above ln C: every sample reliable; d_margin > 1: none redundant
    "eata": {"e_margin": 3.0, "d_margin": 1.01},  # and a Fisher from one batch (factory below)
    "shot_im": {"lr": 1e-3, "momentum": 0.9},  # momentum-free SGD (the default) keeps no optimizer state
    "rotta": {"memory_size": 8, "update_frequency": 4, "nu": 0.05},  # an update per batch of 4; visible EMA
    "sar": {"lr": 1e-3, "e_margin": 100.0},  # random-weight nets are near uniform: E0 = 0.4 ln C keeps no sample
    "cotta": {"n_augmentations": 2},  # 2 augmented teacher forwards (official 32): the averaging branch, cheaply
}
#: methods whose targets are all normalisation layers (the aux-head methods adapt whole encoder blocks)
NORM_ONLY = {"bn_adapt", "tent", "eta", "eata", "shot_im", "rotta"}

_HEADS: dict[tuple[Any, ...], Any] = {}


def _aux_factory(cls: type[adaptkit.TTAMethod]) -> Callable[..., adaptkit.TTAMethod]:
    """Wrap with a head trained (two quick steps, frozen model) for the model's stage 1, cached per model."""

    def make(model: nn.Module, layer: Any = 1, include: Any = None, **kw: Any) -> adaptkit.TTAMethod:
        if include is not None:
            layer = include[0] if isinstance(include, (list, tuple)) else include
        inner = adaptkit.core.unwrap_model(model)
        key = (cls.name, type(inner).__name__, sum(p.numel() for p in inner.parameters()), str(layer))
        if key not in _HEADS:
            g = torch.Generator().manual_seed(7)
            data = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(2)]
            _HEADS[key] = cls.train_head(inner, layer, data, epochs=1, progress=False)  # type: ignore[attr-defined]
        return cls(model, layer=layer, head=_HEADS[key], **kw)

    return make


METHOD_FACTORIES["ncttt"] = _aux_factory(adaptkit.NCTTT)
METHOD_FACTORIES["clust3"] = _aux_factory(adaptkit.ClusT3)
METHOD_FACTORIES["ttt"] = _aux_factory(adaptkit.TTT)
METHOD_FACTORIES["ttt_pp"] = _aux_factory(adaptkit.TTTPlusPlus)
METHOD_FACTORIES["eata"] = lambda model, **kw: adaptkit.EATA(model, fisher_data=[batch(9)], **kw)

_PRISTINE: dict[str, nn.Module] = {}


def _calibrate(model: nn.Module) -> None:
    """Give BN layers non-trivial source statistics (a cumulative average over two batches), then eval()."""
    g = torch.Generator().manual_seed(123)
    calibrate_bn(model, (torch.randn(8, 3, SIZE, SIZE, generator=g) for _ in range(2)))


def get_model(name: str) -> nn.Module:
    """A fresh copy of the named model: random weights, calibrated BN statistics, eval mode (cached)."""
    if name not in _PRISTINE:
        torch.manual_seed(0)
        model = MODELS[name]()
        _calibrate(model)
        for p in model.parameters():
            p.requires_grad_(True)
        assert has_bn(model) == (name not in BN_FREE), f"update BN_FREE for {name}"
        out = logits(reference(model, batch(0)))
        if out.dim() == 4:  # dense output: SIZE must leave the decoder more than a 1 x 1 map (no constant maps)
            assert out.flatten(2).std(-1).min() > 1e-3, f"{name} gives spatially constant logits at {SIZE}px"
        _PRISTINE[name] = model
    return copy.deepcopy(_PRISTINE[name])


def batch(i: int, size: int = SIZE) -> torch.Tensor:
    """Deterministic test batch ``i``, shifted away from the calibration distribution."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(BATCH, 3, size, size, generator=g) * 1.5 + 0.3


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def applicable(method: str, model_name: str) -> bool:
    if method in NEEDS_CLASSIFIER and model_name.startswith("seg_"):
        return False  # dense predictors have no final nn.Linear classifier
    return method not in NEEDS_BN or model_name not in BN_FREE


def wrap(method: str, model: nn.Module, **kw: Any) -> adaptkit.TTAMethod:
    """Wrap ``model`` with ``method`` using the contract's default arguments, overridden by ``kw``."""
    kwargs = {**METHOD_KWARGS.get(method, {}), **kw}
    factory = METHOD_FACTORIES.get(method)
    if factory is not None:
        return factory(model, **kwargs)
    return adaptkit.adapt(model, method, **kwargs)


def reference(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(x)


def logits(out: Any) -> torch.Tensor:
    return adaptkit.core.get_logits(out)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_training(method: str, inner: nn.Module, wrapper: adaptkit.TTAMethod) -> set[str]:
    """Names of the modules that must be in training mode while the wrapper runs (an independent spec)."""
    if method == "bn_adapt":
        return set()  # statistics are swapped in; every layer runs in inference form
    if method == "tent":
        return {n for n, m in inner.named_modules() if isinstance(m, _BatchNorm)}  # batch statistics
    return set(wrapper.train_modules())


# ---------------------------------------------------------------------------------------------- fixtures
def _cases(slow: set[str]) -> list[Any]:
    return [
        pytest.param((meth, name), id=f"{meth}-{name}", marks=[pytest.mark.slow] if name in slow else [])
        for meth in METHODS
        for name in MODELS
        if applicable(meth, name)
    ]


#: the models every method runs the whole contract on by default: our own CNN, a torchvision BN ResNet, a timm BN net,
#: a timm LayerNorm ViT (no BatchNorm) and a torchvision segmentation model (dict outputs); with 16 methods the whole
#: matrix on all 12 models is too long for the default run, so the other models run it with --runslow
REPRESENTATIVE = {
    "tiny_cnn", "tv_resnet18", "timm_test_efficientnet", "timm_test_vit", "seg_lraspp_mobilenet_v3_large",
}  # fmt: skip
CASES = _cases(set(MODELS) - REPRESENTATIVE)
#: the core of the contract (output type, bitwise reset, exact restore, layer modes) on every model but the two
#: slowest by default (those with --runslow)
everywhere = pytest.mark.parametrize("case", _cases(SLOW_MODELS), indirect=True)
NOT_APPLICABLE = [
    pytest.param(meth, name, id=f"{meth}-{name}") for meth in METHODS for name in MODELS if not applicable(meth, name)
]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str, nn.Module]:
    """``(method, model_name, fresh_model)`` for every pair where the method applies."""
    method, name = request.param
    return method, name, get_model(name)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method,name", NOT_APPLICABLE)
def test_not_applicable_raises(method: str, name: str) -> None:
    """BNAdapt on a LayerNorm-only net: the documented ValueError, and the model untouched."""
    model = get_model(name)
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match="list_layers"):
        wrap(method, model)
    assert_model_unchanged(model, snap)


@everywhere
def test_output_type_and_shape(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    x = batch(0)
    ref = reference(model, x)
    w = wrap(method, model)
    out = w(x)
    assert type(out) is type(ref)
    if isinstance(ref, dict):  # segmentation: every entry ("out", "aux"), in order, as the model's
        assert list(out) == list(ref)
        assert all(out[k].shape == ref[k].shape and torch.isfinite(out[k]).all() for k in ref)
    assert logits(out).shape == logits(ref).shape
    assert logits(out).dtype == logits(ref).dtype
    assert not logits(out).requires_grad
    assert torch.isfinite(logits(out)).all()
    w.restore()


@everywhere
def test_reset_is_bitwise(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    before = state_of(model)
    w = wrap(method, model)
    first = w(batch(0))
    w(batch(1))
    w(batch(2))
    if w.uses_grad:
        changed = [n for n, p in w.named_adapted_parameters() if not torch.equal(p, before[n])]
        assert changed, "three adaptation steps changed no parameter"
        assert w.optimizer is None or len(w.optimizer.state) > 0
    w.reset()
    after = state_of(model)
    assert after.keys() == before.keys()
    bad = [k for k in before if not torch.equal(after[k], before[k])]
    assert not bad, f"reset() left tensors changed: {bad[:5]}"
    if w.optimizer is not None:
        assert len(w.optimizer.state) == 0
    assert all(p.grad is None for p in w.trainable_parameters())
    again = w(batch(0))
    assert torch.equal(logits(again), logits(first))
    w.restore()


@everywhere
def test_restore(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    snap = snapshot_model(model)
    w = wrap(method, model)
    w(batch(0))
    w(batch(1))
    assert w.restore() is model
    assert_model_unchanged(model, snap)
    assert w.restore() is model  # idempotent
    assert_model_unchanged(model, snap)
    with pytest.raises(RuntimeError, match="restore"):
        w(batch(0))
    with pytest.raises(RuntimeError):
        w.reset()
    assert_model_unchanged(model, snap)


class _Boom(Exception):
    pass


def test_restore_when_with_body_raises(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    snap = snapshot_model(model)
    with pytest.raises(_Boom), wrap(method, model) as m:
        m(batch(0))
        raise _Boom
    assert_model_unchanged(model, snap)


def test_restore_when_forward_raises(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    snap = snapshot_model(model)
    wrong = torch.randn(BATCH, 5, SIZE, SIZE)  # wrong channel count: with the checks off, the model's forward raises
    with pytest.raises(RuntimeError), wrap(method, model, check_inputs=False) as m:
        m(batch(0))
        m(wrong)
    assert_model_unchanged(model, snap)
    # without the context manager: the wrapper survives a failed forward and still restores cleanly
    w = wrap(method, model, check_inputs=False)
    with pytest.raises(RuntimeError):
        w(wrong)
    w(batch(0))
    assert w.restore() is model
    assert_model_unchanged(model, snap)


def test_adaptation_state_round_trip(case: tuple[str, str, nn.Module]) -> None:
    method, name, model = case
    wa = wrap(method, model)
    wa(batch(0))
    wa(batch(1))
    sd = wa.adaptation_state_dict()
    tensor_keys = [k for k in sd if not k.startswith(RESERVED)]
    assert tensor_keys
    assert not [k for k in sd if k.startswith(("module.", "_orig_mod."))]
    if has_bn(model):
        assert any(k.endswith("num_batches_tracked") for k in tensor_keys)
    assert set(tensor_keys) <= set(model.state_dict())
    # serialisable the way users save checkpoints
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    other = get_model(name)
    wb = wrap(method, other)
    wb(batch(5))  # some other adaptation first: loading must overwrite it
    wb.load_adaptation_state_dict(sd)
    out_a = wa(batch(2))
    out_b = wb(batch(2))
    assert torch.equal(logits(out_a), logits(out_b))

    wa.reset()
    wa.load_adaptation_state_dict(sd)
    assert torch.equal(logits(wa(batch(2))), logits(out_a))

    forged = dict(sd)
    forged[RESERVED + "method"] = "not_" + method
    with pytest.raises(ValueError):
        wb.load_adaptation_state_dict(forged)
    wa.restore()
    wb.restore()


def test_load_state_from_another_method_raises(case: tuple[str, str, nn.Module]) -> None:
    method, name, model = case
    pool = [m for m in METHODS if applicable(m, name)]
    if len(pool) < 2:
        pytest.skip("no other applicable method")
    # the next applicable method in registry order (cyclic): every method's state is offered to another once;
    # all pairs would grow with the square of the number of methods
    others = [pool[(pool.index(method) + 1) % len(pool)]]
    w = wrap(method, model)
    w(batch(0))
    snap_sd = state_of(model)
    for other in others:
        theirs = wrap(other, get_model(name))
        theirs(batch(0))
        sd = theirs.adaptation_state_dict()
        theirs.restore()
        with pytest.raises(ValueError, match=other):
            w.load_adaptation_state_dict(sd)
    after = state_of(model)
    assert all(torch.equal(after[k], v) for k, v in snap_sd.items()), "a refused load changed the model"
    w.restore()


def test_adapts_under_no_grad(case: tuple[str, str, nn.Module]) -> None:
    method, name, model = case
    twin = get_model(name)
    w, w_twin = wrap(method, model), wrap(method, twin)
    with torch.no_grad():
        out = w(batch(0))
        out2 = w(batch(1))
    ref = w_twin(batch(0))
    ref2 = w_twin(batch(1))
    assert torch.equal(logits(out), logits(ref))
    assert torch.equal(logits(out2), logits(ref2))
    if w.uses_grad:
        before = get_model(name).state_dict()
        assert any(not torch.equal(p, before[n]) for n, p in w.named_adapted_parameters())
    a, b = state_of(model), state_of(twin)
    assert all(torch.equal(a[k], b[k]) for k in a)
    w.restore()
    w_twin.restore()


def test_adapts_under_inference_mode(case: tuple[str, str, nn.Module]) -> None:
    method, name, model = case
    snap = snapshot_model(model)
    twin = get_model(name)
    w, w_twin = wrap(method, model), wrap(method, twin)
    with torch.inference_mode():
        x0, x1 = batch(0), batch(1)
        out = w(x0)
        out2 = w(x1)
    ref = w_twin(batch(0))
    ref2 = w_twin(batch(1))
    assert torch.equal(logits(out), logits(ref))
    assert torch.equal(logits(out2), logits(ref2))
    if w.uses_grad:
        before = get_model(name).state_dict()
        assert any(not torch.equal(p, before[n]) for n, p in w.named_adapted_parameters())
    assert not any(t.is_inference() for t in model.state_dict().values())
    if w.optimizer is not None:
        assert not any(
            t.is_inference() for s in w.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
    w(batch(2))  # plain forwards still work afterwards
    w.reset()
    assert w.restore() is model
    assert_model_unchanged(model, snap)
    w_twin.restore()


@everywhere
def test_dropout_off_and_modes_fixed(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    w = wrap(method, model, episodic=True)
    inner = w.inner
    want = expected_training(method, inner, w)
    assert set(w.train_modules()) == want
    assert want <= set(w.targeted_modules)
    names = dict(inner.named_modules())
    if method in NORM_ONLY:
        assert all(norm_kind(names[n]) is not None for n in w.targeted_modules)

    seen: dict[str, list[bool]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, []).append(mod.training))
        for n, m in inner.named_modules()
    ]
    x = batch(0)
    ref = w(x)

    def check_modes(when: str) -> None:
        # norm methods: every call in the wanted mode; aux-head methods: the adaptation forwards (first calls)
        # train the wanted layers, and the final prediction may switch them to eval form (documented)
        if method in NORM_ONLY:
            wrong = {n: t for n, t in seen.items() if any(f != (n in want) for f in t)}
        else:
            wrong = {n: t for n, t in seen.items() if t[0] != (n in want) or (n not in want and any(t))}
        assert not wrong, f"{when}: wrong training flags during forward: {dict(list(wrong.items())[:5])}"
        seen.clear()

    check_modes("first forward")
    for when, action in [
        ("repeat", lambda: None),
        ("model.eval()", model.eval),
        ("model.train()", model.train),
        ("wrapper.train()", w.train),
        ("wrapper.eval()", w.eval),
        ("model.train(); wrapper.train()", lambda: (model.train(), w.train())),
    ]:
        action()
        out = w(x)
        assert torch.equal(logits(out), logits(ref)), f"outputs changed after {when}"
        check_modes(when)
        after = {n: m.training for n, m in inner.named_modules()}
        assert {n for n, t in after.items() if t} == want, f"after {when}"
    assert w.train() is w
    assert w.training
    assert w.eval() is w
    assert not w.training
    for h in handles:
        h.remove()
    w.restore()


def test_no_class_level_changes(case: tuple[str, str, nn.Module]) -> None:
    method, name, model = case
    classes = sorted(
        {nn.Module, nn.BatchNorm1d, nn.BatchNorm2d, _BatchNorm, _NormBase, nn.LayerNorm, nn.GroupNorm, nn.Dropout}
        | {type(m) for m in model.modules()},
        key=lambda c: f"{c.__module__}.{c.__qualname__}",
    )
    cls_snap = snapshot_classes(classes)
    bn_forward = nn.BatchNorm2d.forward
    other = get_model(name)
    other_snap = snapshot_model(other)
    x = batch(0)
    ref = reference(other, x)
    with wrap(method, model) as m:
        m(x)
        m(batch(1))
        assert nn.BatchNorm2d.forward is bn_forward
        assert_classes_unchanged(classes, cls_snap)
        inside = reference(other, x)
        assert torch.equal(logits(inside), logits(ref))
        assert_model_unchanged(other, other_snap)
    assert_classes_unchanged(classes, cls_snap)
    assert torch.equal(logits(reference(other, x)), logits(ref))
    assert_model_unchanged(other, other_snap)


def test_double_wrapping_raises(case: tuple[str, str, nn.Module]) -> None:
    method, _, model = case
    w = wrap(method, model)
    w(batch(0))
    wrapped_snap = snapshot_model(model)
    for target in (model, w, nn.DataParallel(model)):
        for other in METHODS:
            with pytest.raises((RuntimeError, TypeError), match="already"):
                wrap(other, target)
            assert_model_unchanged(model, wrapped_snap)
    w(batch(1))  # the first wrapper is unharmed
    w.restore()
    wrap(method, model).restore()  # after restore() the model can be wrapped again


def test_data_parallel(case: tuple[str, str, nn.Module]) -> None:
    method, name, model = case
    dp = nn.DataParallel(model)
    snap = snapshot_model(dp)
    w = wrap(method, dp)
    assert w.targeted_modules
    assert not [n for n in w.targeted_modules if n.startswith(("module.", "_orig_mod."))]
    w_plain = wrap(method, get_model(name))
    assert w.targeted_modules == w_plain.targeted_modules
    for i in range(2):
        assert torch.equal(logits(w(batch(i))), logits(w_plain(batch(i))))
    sd = w.adaptation_state_dict()
    assert not [k for k in sd if k.startswith(("module.", "_orig_mod."))]
    assert sd.keys() == w_plain.adaptation_state_dict().keys()
    assert w.restore() is dp
    assert_model_unchanged(dp, snap)
    w_plain.restore()


# ------------------------------------------------------------------------------- tiny-CNN-only contract checks
@pytest.mark.parametrize("method", METHODS)
def test_compiled_model_keys_unprefixed(method: str) -> None:
    model = get_model("tiny_cnn")
    compiled = torch.compile(model, backend="eager")
    snap = snapshot_model(model)  # after compiling: torch.compile tags the module itself
    with pytest.warns(UserWarning, match="compile"):
        w = wrap(method, compiled)
    assert not [n for n in w.targeted_modules if n.startswith(("module.", "_orig_mod."))]
    assert not [k for k in w.adaptation_state_dict() if k.startswith(("module.", "_orig_mod."))]
    assert w.restore() is compiled
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("method", METHODS)
def test_bad_selection_leaves_model_untouched(method: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match="list_layers"):
        wrap(method, model, include=["no_such_layer"])
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("method", METHODS)
def test_restore_when_error_inside_norm_layer(method: str) -> None:
    """An error raised after the wrapper's BN pre-hooks ran (user hook on bn2) leaves nothing swapped."""
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    w = wrap(method, model)

    def boom(module: nn.Module, inputs: Any) -> None:
        raise _Boom

    handle = model.bn2.register_forward_pre_hook(boom)
    with pytest.raises(_Boom):
        w(batch(0))
    handle.remove()
    with pytest.raises(RuntimeError):
        w(batch(0, size=16))  # fails in fc1, after bn1/bn2 ran with swapped statistics
    w.restore()
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("method", METHODS)
def test_memory_flat(method: str) -> None:
    model = get_model("tiny_cnn")
    w = wrap(method, model)
    xs = [batch(i) for i in range(5)]
    for x in xs:
        w(x)
    del x
    start = count_live_tensors()
    for i in range(50):
        w(xs[i % 5])
    grown = count_live_tensors() - start
    assert grown <= 3, f"{grown} more live tensors after 50 online forwards"
    w.restore()


# ------------------------------------------------------------------------------- regressions (design.md 4)
def _bn_prior_reference(
    model: nn.Module, x: torch.Tensor, N: float, stats_from: torch.Tensor | None = None
) -> torch.Tensor:
    """BNAdapt's formula, computed independently in float64 on a plain copy of the model.

    Each BN layer normalises with ``N/(N+n) * source + n/(N+n) * test`` for mean and unbiased variance,
    ``n`` the batch size. With ``stats_from`` the test statistics come from that batch instead of ``x``
    (what a wrapper that reuses the previous batch's statistics would compute).
    """
    model = copy.deepcopy(model).double().eval()
    x = x.double()
    stats_from = None if stats_from is None else stats_from.double()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    source = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in bns}
    frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pre(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if id(m) in frozen:
            mean, var = frozen[id(m)]
        else:
            h = inputs[0].double()
            dims = [0, *range(2, h.dim())]
            n = h.shape[0]
            lam = N / (N + n)
            mu_s, var_s = source[id(m)]
            mean = lam * mu_s + (1 - lam) * h.mean(dims)
            var = lam * var_s + (1 - lam) * h.var(dims, unbiased=True)
            if record:
                frozen[id(m)] = (mean, var)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)

    for m in bns:
        m.register_forward_pre_hook(pre)
    with torch.no_grad():
        if stats_from is not None:
            record = True
            model(stats_from)
        record = False
        return model(x)


@pytest.mark.parametrize("user_mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["tiny_cnn", "tv_resnet18"])
def test_regression_robusta_eval_reuses_statistics(name: str, user_mode: str) -> None:
    """robusta's BayesianBatchNorm reused the previous batch's statistics after a user ``model.eval()``."""
    model = get_model(name)
    pristine = get_model(name)
    xa, xb = batch(0), batch(1) * 0.5 - 0.7  # clearly different batch statistics
    w = adaptkit.BNAdapt(model, N=16)
    getattr(model, user_mode)()
    out_a = w(xa)
    out_b = w(xb)
    want_a = _bn_prior_reference(pristine, xa, 16)
    want_b = _bn_prior_reference(pristine, xb, 16)
    stale_b = _bn_prior_reference(pristine, xb, 16, stats_from=xa)
    assert not torch.allclose(want_b.float(), stale_b.float(), rtol=1e-3, atol=1e-3)  # the check can fail
    torch.testing.assert_close(out_a, want_a.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_b, want_b.float(), rtol=1e-4, atol=1e-4)
    w.restore()


@pytest.mark.parametrize("name", ["tiny_cnn", "tv_resnet18"])
def test_regression_torch_ttt_tent_eval_uses_batch_statistics(name: str) -> None:
    """torch-ttt's Tent turned stat tracking off, yet after ``eval()`` normalised with source statistics."""
    model = get_model(name)
    w = adaptkit.Tent(model, lr=1e-3)
    model.eval()
    w.eval()
    errs: dict[str, float] = {}
    gaps: dict[str, float] = {}

    def hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def check(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            h = inputs[0].detach()
            with torch.no_grad():
                batch_norm = F.batch_norm(h, None, None, m.weight, m.bias, True, 0.0, m.eps)
                source_norm = F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            errs[name] = max(errs.get(name, 0.0), float((out.detach() - batch_norm).abs().max()))
            gaps[name] = max(gaps.get(name, 0.0), float((source_norm - batch_norm).abs().max()))

        return check

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)
    ]
    assert set(errs) == set() and handles
    w(batch(0))
    model.eval()
    w.eval()
    w(batch(1))
    for h in handles:
        h.remove()
    assert set(errs) == {n for n, m in model.named_modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)}
    assert max(errs.values()) < 1e-4, errs
    assert max(gaps.values()) > 1e-2  # source statistics would have given visibly different outputs
    w.restore()
