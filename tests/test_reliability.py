"""Reliability of the wrapping core for every registered method: a user's ``.grad`` and exceptions, shared heads,
DataParallel replica threads, ``momentum=None`` BatchNorm layers, faults in the middle of a step.

docs/reliability.md lists each case with the test that covers it. The models and factories come from the
contract matrix (``tests/test_contract.py``): the tiny CNN and small trained heads.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import assert_model_unchanged, snapshot_model
from test_contract import BATCH, METHOD_KWARGS, SIZE, batch, get_model, wrap

import adaptkit
from adaptkit.core.truncate import ForwardStopper
from adaptkit.registry import get_method

METHODS = adaptkit.list_methods()
GRAD_METHODS = [m for m in METHODS if get_method(m).uses_grad]
AUX = {"ncttt": adaptkit.NCTTT, "clust3": adaptkit.ClusT3, "ttt": adaptkit.TTT, "ttt_pp": adaptkit.TTTPlusPlus}


def _train_head(cls: Any, model: nn.Module, layer: Any = 1) -> Any:
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    return cls.train_head(model, layer, data, epochs=1, progress=False)


def _aux(method: str, model: nn.Module, head: Any, **kw: Any) -> adaptkit.TTAMethod:
    return AUX[method](model, layer=1, head=head, **{**METHOD_KWARGS.get(method, {}), **kw})


# ------------------------------------------------------------------------------------------------ .grad
@pytest.mark.parametrize("method", METHODS)
def test_user_grad_put_aside_while_wrapped_and_handed_back_bitwise(method: str) -> None:
    model = get_model("tiny_cnn")
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    saved = {n: t.clone() for n, t in grads.items()}
    w = wrap(method, model)
    adapted = dict(w.named_adapted_parameters())
    assert all(p.grad is None for p in adapted.values()), "adapted parameters must start with a clean gradient"
    for i in range(3):
        w(batch(i))
    w.restore()
    for n, p in model.named_parameters():
        assert p.grad is grads[n], f"{n}: not the user's own .grad tensor"
        assert torch.equal(p.grad, saved[n]), f"{n}: the user's .grad was written"


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_with_autograd_history_is_not_backpropagated_into(method: str) -> None:
    """The batch comes out of the user's own graph (an upstream module): adapting must not write the upstream
    module's .grad nor free the user's graph (their later backward must still work)."""
    model = get_model("tiny_cnn")
    pre = nn.Conv2d(3, 3, 1)
    x = batch(0).requires_grad_(True)
    y = pre(x)
    w = wrap(method, model)
    w(y)
    w(pre(batch(1)))
    assert pre.weight.grad is None and x.grad is None, "adaptation backpropagated into the user's graph"
    y.sum().backward()  # the user's graph is intact
    assert pre.weight.grad is not None
    w.restore()


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_first_update_ignores_a_user_grad(method: str) -> None:
    """The first update with a stale user .grad on every parameter equals the update from a clean gradient."""
    clean, dirty = get_model("tiny_cnn"), get_model("tiny_cnn")
    for p in dirty.parameters():
        p.grad = torch.full_like(p, 10.0)
    states = []
    for model in (clean, dirty):
        torch.manual_seed(0)
        w = wrap(method, model, episodic=False)
        w(batch(0))
        states.append({k: v for k, v in w.adaptation_state_dict().items() if isinstance(v, torch.Tensor)})
        w.restore()
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"{k} differs: the stale .grad leaked into the update"


# ------------------------------------------------------------------------------------------------ exceptions
class UserError(Exception):
    """An exception whose constructor takes other arguments than a message (``type(e)(msg)`` cannot rebuild it)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code


@pytest.mark.parametrize("method", METHODS)
def test_user_exception_keeps_type_identity_and_gets_a_note(method: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    w = wrap(method, model)
    raised: list[BaseException] = []

    def boom(module: nn.Module, inputs: Any) -> None:
        e = UserError(7, "sensor offline")
        raised.append(e)
        raise e

    handle = model.fc2.register_forward_pre_hook(boom)
    with pytest.raises(UserError) as info:
        w(batch(0))
    handle.remove()
    assert info.value is raised[0] and info.value.code == 7 and str(info.value) == "code 7: sensor offline"
    assert any("adaptkit" in n and "(4, 3, 32, 32)" in n for n in getattr(info.value, "__notes__", []))
    w.restore()
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("where", ["forward", "with_body"])
@pytest.mark.parametrize("method", METHODS)
def test_keyboard_interrupt_restores_exactly(method: str, where: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    handle = None
    with pytest.raises(KeyboardInterrupt), wrap(method, model) as w:
        w(batch(0))  # adapted once: the restore has something to undo
        if where == "forward":

            def interrupt(module: nn.Module, inputs: Any) -> None:
                raise KeyboardInterrupt

            handle = model.bn2.register_forward_pre_hook(interrupt)
            w(batch(1))
        raise KeyboardInterrupt
    if handle is not None:
        handle.remove()
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_exception_inside_the_optimizer_step_restores_exactly(method: str) -> None:
    model = get_model("tiny_cnn")
    snap = snapshot_model(model)
    w = wrap(method, model)
    w(batch(0))
    assert w.optimizer is not None

    def failing_step(*args: Any, **kwargs: Any) -> None:
        raise UserError(3, "optimizer failed")

    w.optimizer.step = failing_step  # type: ignore[method-assign]
    with pytest.raises(UserError):
        w(batch(1))
    w.restore()
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("method", METHODS)
def test_use_after_restore_and_double_restore(method: str) -> None:
    model = get_model("tiny_cnn")
    w = wrap(method, model)
    assert w.restore() is model and w.restore() is model  # a documented no-op the second time
    with pytest.raises(RuntimeError, match="restored"):
        w(batch(0))
    with pytest.raises(RuntimeError, match="restored"):
        w.reset()
    w2 = wrap(method, model)
    with pytest.raises(RuntimeError, match="already wrapped"):
        wrap(method, model)
    w2.restore()


# ------------------------------------------------------------------------------------------------ shared heads
@pytest.mark.parametrize("method", list(AUX))
def test_shared_head_is_never_touched(method: str) -> None:
    """Two wrappers on one head, restored first-in-first-out: the caller's head is exactly as given (values,
    requires_grad, training flags, .grad, device, hooks), and each wrapper adapts a private copy."""
    cls = AUX[method]
    models = [get_model("tiny_cnn"), get_model("tiny_cnn")]
    head = _train_head(cls, models[0])
    head.train()
    first = next(head.parameters())
    first.requires_grad_(False)  # unusual flags must stay as they are
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    snap = snapshot_model(head)
    ws = [_aux(method, m, head, episodic=False) for m in models]
    assert all(w.head is not head for w in ws) and ws[0].head is not ws[1].head
    for i in range(2):
        for w in ws:
            w(batch(i))
    assert_model_unchanged(head, snap)  # while wrapped, too
    for w in ws:  # first in, first out
        w.restore()
    assert_model_unchanged(head, snap)


def test_method_without_head_adaptation_keeps_its_copy_frozen() -> None:
    model = get_model("tiny_cnn")
    head = _train_head(adaptkit.NCTTT, model)
    w = adaptkit.NCTTT(model, layer=1, head=head)
    assert not any(p.requires_grad for p in w.head.parameters())
    assert all(p.requires_grad for p in head.parameters())
    w.restore()


# ------------------------------------------------------------------------------------------------ DataParallel
def _replica(module: nn.Module, share_buffers: bool) -> nn.Module:
    """A DataParallel-style replica on CPU: new module objects sharing the parameters (and hook dicts, as torch's
    ``replicate`` does); the first replica shares the buffers, the others get copies."""
    rep = module._replicate_for_data_parallel()
    rep._parameters = dict(module._parameters)
    if not share_buffers:
        rep._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    rep._modules = {k: None if c is None else _replica(c, share_buffers) for k, c in module._modules.items()}
    return rep


class ThreadedDataParallel(nn.DataParallel):
    """``nn.DataParallel`` whose replicas run in worker threads on CPU, each on one chunk of the batch, as on
    several GPUs (grad mode propagated to the workers, as ``parallel_apply`` does)."""

    def __init__(self, module: nn.Module, replicas: int = 2) -> None:
        super().__init__(module)
        self.replicas = replicas

    def forward(self, x: torch.Tensor) -> Any:
        chunks = x.chunk(self.replicas)
        reps = [_replica(self.module, share_buffers=i == 0) for i in range(len(chunks))]
        grad = torch.is_grad_enabled()

        def run(i: int) -> torch.Tensor:
            with torch.set_grad_enabled(grad):
                return reps[i](chunks[i])

        with ThreadPoolExecutor(len(chunks)) as pool:
            outs = list(pool.map(run, range(len(chunks))))
        return torch.cat(outs)


@pytest.mark.parametrize("bn_mode", ["refresh", "batch", "source"])
@pytest.mark.parametrize("method", list(AUX))
def test_aux_methods_under_threaded_data_parallel(method: str, bn_mode: str) -> None:
    """An aux-head method on a DataParallel whose replicas run in threads predicts and adapts exactly as on the
    plain model (the adaptation runs through the module on the calling thread), and restores the model."""
    model = get_model("tiny_cnn")
    head = _train_head(AUX[method], model)
    dp = ThreadedDataParallel(get_model("tiny_cnn"))
    x = torch.cat([batch(0), batch(1)])
    assert torch.allclose(dp(x), get_model("tiny_cnn")(x), atol=1e-6)  # the fake replicas are faithful
    snap = snapshot_model(dp)
    w_dp = _aux(method, dp, head, bn_mode=bn_mode, episodic=False)
    w = _aux(method, model, head, bn_mode=bn_mode, episodic=False)
    for i in range(2):
        xi = torch.cat([batch(2 * i), batch(2 * i + 1)])
        torch.testing.assert_close(w_dp(xi), w(xi), rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(w_dp.named_adapted_parameters(), w.named_adapted_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    w_dp.restore()
    w.restore()
    assert_model_unchanged(dp, snap)


def test_forward_stopper_refuses_layers_run_in_other_threads() -> None:
    """A model that runs the tapped layer in a worker thread (not a recognised DataParallel) gets a clear error,
    not partial or mismatched features."""

    class Threaded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(self.conv, x).result()

    from adaptkit.core import HookManager

    net, hooks = Threaded(), HookManager()
    stop = ForwardStopper({"conv": net.conv}, hooks)
    with pytest.raises(RuntimeError, match="another thread"):
        stop.run(net, torch.zeros(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="another thread"):
        stop.capture(net, torch.zeros(2, 3, 8, 8))
    net(torch.zeros(2, 3, 8, 8))  # ordinary forwards (no run / capture call) hold nothing and raise nothing
    _out, got = stop.capture(net.conv, torch.zeros(2, 3, 8, 8))  # same thread: captured
    assert got["conv"].shape == (2, 4, 6, 6)
    hooks.remove_all()


# ------------------------------------------------------------------------------------------------ BatchNorm refresh
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_refresh_follows_each_layers_momentum_rule(momentum: float | None) -> None:
    """Layers above the tap get the n running-statistic updates of n training-mode forwards: the cumulative average
    for momentum=None (not momentum 0.1), the exponential rule otherwise; num_batches_tracked grows by n."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, momentum=momentum)
    )
    with torch.no_grad():
        net[4].running_mean.uniform_(-1, 1)
        net[4].running_var.uniform_(0.5, 2)
        net[4].num_batches_tracked.fill_(3)
    net.eval()
    data = [torch.randn(6, 3, 12, 12) for _ in range(2)]
    head = adaptkit.NCTTT.train_head(net, "2", data, epochs=1, progress=False)
    x = torch.randn(6, 3, 12, 12)
    steps = 4
    with adaptkit.NCTTT(net, layer="2", head=head, steps=steps, lr=1e-12, bn_mode="refresh") as nc:
        got = nc(x)
        refreshed = {k: v.clone() for k, v in net[4].state_dict().items()}
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for _ in range(steps):  # lr ~ 0: the weights do not move; n training-form forwards as the reference makes
            ref.train()(x)
        want = ref.eval()(x)
    for k, v in ref[4].state_dict().items():
        torch.testing.assert_close(refreshed[k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_forward_failing_in_the_first_step_writes_nothing(method: str) -> None:
    """An exception from the model's forward in the first adaptation step (here: right after bn1, which the
    aux-head methods run in training form, so its running statistics were just written) leaves the wrapped model
    exactly as before the batch: the wrapper can go on with the next batch as if the failed one never came."""
    model = get_model("tiny_cnn")
    kw = {"layer": "conv2"} if method in AUX else {}  # tapped above bn1: bn1 runs in the adaptation forward
    w = wrap(method, model, episodic=False, **kw)
    w(batch(0))
    snap = snapshot_model(model)

    def boom(module: nn.Module, inputs: Any, output: Any) -> None:
        raise UserError(5, "after bn1")

    handle = model.bn1.register_forward_hook(boom)
    with pytest.raises(UserError):
        w(batch(1))
    handle.remove()
    assert_model_unchanged(model, snap)
    w.restore()


# ------------------------------------------------------------------------------------------------ review findings
class FrozenStem(nn.Module):
    """A model whose ``train()`` re-freezes its stem (mmdet ``frozen_stages`` style) and that expands grey batches
    to RGB itself; its root forward-pre-hook calls are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.calls = 0
        self.register_forward_pre_hook(lambda m, i: setattr(m, "calls", m.calls + 1))

    def train(self, mode: bool = True) -> FrozenStem:
        super().train(mode)
        for p in [*self.conv1.parameters(), *self.bn1.parameters()]:
            p.requires_grad = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _frozen_stem() -> FrozenStem:
    torch.manual_seed(0)
    m = FrozenStem()
    nn.Module.train(m, False)  # eval without running the override
    for p in m.parameters():
        p.requires_grad_(True)
    return m


@pytest.mark.parametrize("method", METHODS)
def test_a_train_override_of_the_model_is_never_called(method: str) -> None:
    """Wrapping, checking inputs and adapting never call the model's train()/eval() (an override may change
    requires_grad), run no extra forward, and accept what the model itself accepts (grey batches it expands)."""
    model = _frozen_stem()
    snap = snapshot_model(model)
    if method in AUX:
        g = torch.Generator().manual_seed(7)
        data = [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(2)]
        head = AUX[method].train_head(copy.deepcopy(model), "conv2", data, epochs=1, progress=False)
        w = AUX[method](model, layer="conv2", head=head, **METHOD_KWARGS.get(method, {}))
    else:
        w = wrap(method, model, include=None) if method != "ocl" else wrap(method, model)
    assert all(p.requires_grad for p in dict(w.named_adapted_parameters()).values())
    calls = model.calls
    w(torch.randn(BATCH, 3, 16, 16))
    expected = model.calls - calls
    w(torch.randn(BATCH, 3, 16, 16))
    assert model.calls - calls == 2 * expected  # the first batch runs no extra (probe) forward
    if not w.transforms_input:
        w(torch.randn(BATCH, 1, 16, 16))  # the model expands grey batches itself: not second-guessed
    assert all(p.requires_grad for p in dict(w.named_adapted_parameters()).values())
    w.restore()
    snap.scalars[""]["calls"] = model.calls
    assert_model_unchanged(model, snap)


def test_a_note_never_replaces_the_users_exception() -> None:
    class TupleNotes(Exception):
        __notes__ = ("from my library",)

    model = get_model("tiny_cnn")
    w = wrap("tent", model)

    def boom(module: nn.Module, inputs: Any) -> None:
        raise TupleNotes("x")

    handle = model.fc2.register_forward_pre_hook(boom)
    with pytest.raises(TupleNotes):
        w(batch(0))
    handle.remove()
    w.restore()
