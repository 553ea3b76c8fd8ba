"""Shared test helpers: full model-state snapshots and "nothing changed" assertions.

Importable from any test module as ``from helpers import ...`` (``tests/`` is on ``sys.path`` because
``tests/conftest.py`` lives there and pytest uses the default ``prepend`` import mode).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.modules.module as _module_mod

from adaptkit.bench.models import recalibrate_bn

#: Plain-value attribute types compared by value (training, momentum, eps, track_running_stats, p, ...).
_SCALARS = (bool, int, float, str, type(None), tuple)

#: Process-wide hook registries of ``torch.nn.modules.module`` (a patch there affects every model).
GLOBAL_HOOK_DICTS = tuple(
    sorted(k for k in dir(_module_mod) if k.startswith("_global_") and isinstance(getattr(_module_mod, k), dict))
)


def _hook_dicts(obj: Any) -> dict[str, dict[Any, Any]]:
    """Shallow copies of every hook dict in ``vars(obj)`` (``_forward_hooks``, ``_state_dict_hooks``, ...)."""
    return {k: dict(v) for k, v in vars(obj).items() if "hook" in k and isinstance(v, dict)}


def _param_hooks(p: torch.Tensor) -> tuple[Any, Any]:
    bw = getattr(p, "_backward_hooks", None)
    acc = getattr(p, "_post_accumulate_grad_hooks", None)
    return (None if bw is None else dict(bw), None if acc is None else dict(acc))


@dataclass
class ModelSnapshot:
    """Everything about a model that a wrapper could change (see :func:`snapshot_model`)."""

    state: dict[str, torch.Tensor]
    params: dict[str, nn.Parameter]
    buffers: dict[str, torch.Tensor | None]
    modules: dict[str, nn.Module]
    classes: dict[str, type]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    training: dict[str, bool]
    hooks: dict[str, dict[str, dict[Any, Any]]]
    param_hooks: dict[str, tuple[Any, Any]]
    attrs: dict[str, set[str]]
    scalars: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def snapshot_model(model: nn.Module) -> ModelSnapshot:
    """Record a model's full state: cloned values, parameter/buffer objects, flags, hooks and attributes.

    Args:
        model: any module (a DataParallel wrapper included: its own entries are recorded too).

    Returns:
        A :class:`ModelSnapshot` for :func:`assert_model_unchanged`.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    return ModelSnapshot(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        params={f"{mn}.{pn}" if mn else pn: p for mn, m in modules.items() for pn, p in m._parameters.items()},
        buffers={f"{mn}.{bn}" if mn else bn: b for mn, m in modules.items() for bn, b in m._buffers.items()},
        modules=modules,
        classes={n: type(m) for n, m in modules.items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
        training={n: m.training for n, m in modules.items()},
        hooks={n: _hook_dicts(m) for n, m in modules.items()},
        param_hooks={n: _param_hooks(p) for n, p in model.named_parameters()},
        attrs={n: set(vars(m)) for n, m in modules.items()},
        scalars={n: {k: v for k, v in vars(m).items() if isinstance(v, _SCALARS)} for n, m in modules.items()},
    )


def model_differences(model: nn.Module, snap: ModelSnapshot) -> list[str]:
    """Human-readable list of everything that differs between ``model`` and ``snap`` (empty: unchanged)."""
    now = snapshot_model(model)
    diffs: list[str] = []

    def same_keys(what: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
        if set(a) != set(b):
            diffs.append(f"{what}: missing {sorted(set(b) - set(a))[:5]}, extra {sorted(set(a) - set(b))[:5]}")
            return False
        return True

    if same_keys("modules", now.modules, snap.modules):
        diffs += [f"module {n!r} replaced" for n, m in now.modules.items() if m is not snap.modules[n]]
        diffs += [f"module {n!r} class changed" for n, c in now.classes.items() if c is not snap.classes[n]]
    if same_keys("state_dict keys", now.state, snap.state):
        for k, v in now.state.items():
            ref = snap.state[k]
            if v.dtype != ref.dtype or v.shape != ref.shape or not torch.equal(v, ref):
                diffs.append(f"value of {k!r} changed")
    if same_keys("parameters", now.params, snap.params):
        diffs += [f"parameter {k!r} is a different object" for k, p in now.params.items() if p is not snap.params[k]]
    if same_keys("buffers", now.buffers, snap.buffers):
        diffs += [f"buffer {k!r} is a different object" for k, b in now.buffers.items() if b is not snap.buffers[k]]
    if now.requires_grad != snap.requires_grad:
        diffs.append(
            "requires_grad changed: "
            + str({k: v for k, v in now.requires_grad.items() if snap.requires_grad.get(k) != v})[:300]
        )
    for k, g in now.grads.items():
        ref = snap.grads.get(k)
        if (g is None) != (ref is None) or (g is not None and ref is not None and not torch.equal(g, ref)):
            diffs.append(f".grad of {k!r} changed")
    if now.training != snap.training:
        diffs.append(
            "training flags changed: "
            + str({k: v for k, v in now.training.items() if snap.training.get(k) != v})[:300]
        )
    for n, hooks in now.hooks.items():
        ref_hooks = snap.hooks.get(n, {})
        if hooks != ref_hooks:
            changed = sorted(k for k in set(hooks) | set(ref_hooks) if hooks.get(k) != ref_hooks.get(k))
            diffs.append(f"hooks of module {n!r} changed: {changed}")
    for n, ph in now.param_hooks.items():
        if ph != snap.param_hooks.get(n):
            diffs.append(f"tensor hooks of parameter {n!r} changed")
    for n, attrs in now.attrs.items():
        if attrs != snap.attrs.get(n):
            ref = snap.attrs.get(n, set())
            diffs.append(f"attributes of module {n!r}: extra {sorted(attrs - ref)}, missing {sorted(ref - attrs)}")
    for n, sc in now.scalars.items():
        ref = snap.scalars.get(n, {})
        bad = {k: (ref.get(k), v) for k, v in sc.items() if k in ref and ref[k] != v}
        if bad:
            diffs.append(f"attribute values of module {n!r} changed (before, after): {bad}")
    return diffs


def assert_model_unchanged(model: nn.Module, snap: ModelSnapshot) -> None:
    """Assert ``model`` is exactly as recorded: bitwise values, same objects, flags, hooks and attributes."""
    diffs = model_differences(model, snap)
    assert not diffs, "model changed:\n  " + "\n  ".join(diffs[:20])


def snapshot_classes(classes: list[type]) -> dict[str, dict[str, Any]]:
    """Shallow copies of ``cls.__dict__`` for each class, plus torch's process-wide module hook registries."""
    snap = {f"{c.__module__}.{c.__qualname__}": dict(vars(c)) for c in classes}
    for name in GLOBAL_HOOK_DICTS:
        snap[f"torch.nn.modules.module.{name}"] = dict(getattr(_module_mod, name))
    return snap


def assert_classes_unchanged(classes: list[type], snap: dict[str, dict[str, Any]]) -> None:
    """Assert no attribute of the classes (or the global hook registries) was added, removed or replaced."""
    now = snapshot_classes(classes)
    for key, ref in snap.items():
        cur = now[key]
        assert set(cur) == set(ref), f"{key}: attributes added {set(cur) - set(ref)}, removed {set(ref) - set(cur)}"
        changed = [k for k in ref if cur[k] is not ref[k]]
        assert not changed, f"{key}: attributes replaced: {changed}"


def count_live_tensors() -> int:
    """Number of live ``torch.Tensor`` objects the garbage collector can see (after a full collection)."""
    gc.collect()
    # type() rather than isinstance(): no __class__ lookups on lazy/deprecated module proxies
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def randomize_bn(
    bn: nn.Module,
    bias: float = 0.5,
    mean: float = 1.0,
    var: tuple[float, float] = (0.5, 2.0),
    tracked: int = 11,
) -> nn.Module:
    """Give a BatchNorm layer non-trivial affine parameters and running statistics (in place):
    weight ~ U(0.5, 1.5), bias ~ U(-bias, bias), running_mean ~ U(-mean, mean), running_var ~ U(*var)."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-bias, bias)
        bn.running_mean.uniform_(-mean, mean)
        bn.running_var.uniform_(*var)
        bn.num_batches_tracked.fill_(tracked)
    return bn


def calibrate_bn(model: nn.Module, batches: Any) -> nn.Module:
    """Give a random-weight model source BN statistics that match ``batches`` (a cumulative average over them,
    in training mode, no gradients), restore each layer's momentum and return the model in eval mode."""
    return recalibrate_bn(model, batches)


def small_dropout_cnn(classes: int = 3) -> nn.Module:
    """A seeded 3-channel CNN with BatchNorm and Dropout (head-training tests: joint mode draws dropout masks)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )  # fmt: skip
