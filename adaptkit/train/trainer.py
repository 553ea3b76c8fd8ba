"""``train_head``: learn an auxiliary head on a source model's features (frozen backbone or jointly)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptkit._progress import progress
from adaptkit.core.base import _TAG, TTAMethod, get_logits
from adaptkit.core.hooks import HookManager
from adaptkit.core.layers import resolve_layer
from adaptkit.core.optim import OptimizerSpec, build_optimizer
from adaptkit.core.snapshot import Snapshot
from adaptkit.core.truncate import ForwardStopper
from adaptkit.core.unwrap import unwrap_model
from adaptkit.heads.base import AuxHead, feature_shape
from adaptkit.train import checkpoint as ckpt

HeadFactory = Callable[[list[tuple[int, ...]]], AuxHead]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` from a loader item: a tensor, a ``(x, y, ...)`` tuple/list or a dict with ``"image"``/``"label"``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("x", batch.get("input")))
        y = batch.get("label", batch.get("y", batch.get("target")))
        if isinstance(x, torch.Tensor):
            return x, y if isinstance(y, torch.Tensor) else None
    raise TypeError(
        f"train_head: cannot read a batch of type {type(batch).__name__}; yield tensors or (images, labels) tuples"
    )


def _progress(it: Iterable[Any], enabled: bool, desc: str, total: int | None) -> Iterable[Any]:
    """A tqdm bar on a terminal, a few log lines elsewhere (:func:`adaptkit._progress.progress`)."""
    return progress(it, total, desc, enabled)


def _len(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def train_head(
    model: nn.Module,
    layers: int | str | Sequence[int | str],
    head: AuxHead | HeadFactory,
    loader: Iterable[Any],
    epochs: int = 10,
    *,
    joint: bool = False,
    aux_weight: float = 1.0,
    lr: float | None = None,
    optimizer: OptimizerSpec = None,
    weight_decay: float = 0.0,
    val_loader: Iterable[Any] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    seed: int | None = 0,
    progress: bool = True,
    max_steps: int | None = None,
    head_lr: float | None = None,
    scheduler: SchedulerFactory | None = None,
    scheduler_interval: str = "epoch",
    checkpoint: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> AuxHead:
    """Train an auxiliary head on the features of ``layers`` of ``model``.

    Frozen mode (default): the model runs in eval mode under ``no_grad``, truncated at the deepest tapped layer
    (nothing above it is computed), and only the head learns; the model is left exactly as it was. Joint mode
    (``joint=True``, the papers' protocol): model and head train together on ``CE + aux_weight * aux``; the
    loader must yield labels; the model's weights change (its ``training`` / ``requires_grad`` flags are put
    back at the end).

    Args:
        model: the source model.
        layers: stage index or qualified name, or a list of them (heads taking several layers).
        head: an :class:`~adaptkit.heads.AuxHead`, or a factory ``feature_shapes -> head`` called with the
            per-sample ``(C, H, W)`` of each tapped layer (so the head can size itself).
        loader: training batches (tensors, ``(x, y)`` tuples or dicts with ``"image"``).
        epochs: passes over ``loader``.
        joint: train the model too (needs labels).
        aux_weight: weight of the auxiliary loss in joint mode.
        lr: default 1e-3 (Adam, frozen) / 1e-2 (SGD momentum 0.9, joint).
        optimizer: ``"adam"``, ``"sgd"`` or a callable ``params -> Optimizer``; default Adam frozen, SGD joint.
        weight_decay: for the built-in optimizers.
        val_loader: batches for a validation loss after every epoch (and accuracy in joint mode).
        device: where to train; default the model's device. The model is moved there (and back afterwards).
        amp: mixed precision (float16 on CUDA with a grad scaler, bfloat16 on CPU).
        seed: seeds the head's initialisation and the auxiliary task's randomness; ``None`` for no seeding.
        progress: tqdm progress bars (when tqdm is installed).
        max_steps: stop after this many optimisation steps in total (smoke tests, quick runs).
        head_lr: learning rate of the head's parameters (default ``lr``). In joint mode the optimizer then gets
            two parameter groups, ``[{"params": model params}, {"params": head params, "lr": head_lr}]`` (a
            callable ``optimizer`` receives that list): a fresh head often needs another rate than the encoder.
        scheduler: a factory ``optimizer -> lr scheduler`` (e.g. ``lambda o: MultiStepLR(o, [150, 250])``,
            the papers' step decay), stepped after every epoch, or after every optimisation step with
            ``scheduler_interval="step"`` (e.g. ``OneCycleLR``).
        scheduler_interval: ``"epoch"`` or ``"step"``.
        checkpoint: a file written after every epoch (head, the model in joint mode, optimizer, scheduler,
            random states, history). When it exists, training resumes after its last epoch and ends with
            bitwise the weights of an uninterrupted run (for a loader that replays the same batches given the
            same torch random state, e.g. a ``DataLoader`` without workers' own seeding); a finished checkpoint
            skips training. Long joint runs (the papers' 350 epochs) survive interruptions this way.
        on_epoch: called with each epoch's history row (``epoch``, ``train_loss``, ``val_loss``, ...) once the
            epoch is done (and checkpointed): logging, early inspection.

    Returns:
        The trained head, bound to the layers and feature shapes, with ``head.history`` holding one dict per
        epoch (``train_loss``, ``val_loss``, ...).
    """
    if isinstance(model, TTAMethod) or getattr(unwrap_model(model), _TAG, None) is not None:
        raise RuntimeError(
            "train_head: the model is already wrapped by an adaptkit method; train heads on the source model "
            "(wrapper.restore() returns it)"
        )
    inner = unwrap_model(model)
    names = [resolve_layer(inner, layer) for layer in (layers if isinstance(layers, (list, tuple)) else [layers])]
    if epochs < 1:
        raise ValueError(f"train_head: epochs must be >= 1, got {epochs}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"train_head: scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    home = next((p.device for p in inner.parameters()), torch.device("cpu"))
    dev = torch.device(device) if device is not None else home
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    modules = dict(inner.named_modules())
    hooks = HookManager()
    flags = Snapshot(inner)  # training / requires_grad flags only, put back at the end
    stopper = ForwardStopper({n: modules[n] for n in names}, hooks)
    history: list[dict[str, float]] = []
    try:
        inner.to(dev)
        if joint:
            inner.train()
        else:
            inner.eval()
        it = iter(loader)
        first = next(it, None)
        if first is None:
            raise ValueError("train_head: the loader is empty")
        x0, _ = split_batch(first)
        with torch.no_grad():
            was = inner.training
            inner.eval()
            feats0 = stopper.run(model, x0[:2].to(dev))
            inner.train(was)
        shapes = [feature_shape(feats0[n]) for n in names]
        if not isinstance(head, AuxHead):
            ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
            with ctx:
                if seed is not None:
                    torch.manual_seed(seed)
                head = head(list(shapes))
        if head.num_layers is not None and head.num_layers != len(names):
            raise ValueError(f"train_head: {type(head).__name__} takes {head.num_layers} layer(s), got {names}")
        head.bind(names, shapes, inner, tuple(x0.shape[1:]))
        head.binding["joint"] = bool(joint)  # how the encoder relates to the head (methods advise on it)
        head.check_features([feats0[n] for n in names], "train_head")
        head.to(dev)
        if joint:
            for p in inner.parameters():
                p.requires_grad_(True)
        rate = lr if lr is not None else (1e-2 if joint else 1e-3)
        if not joint and head_lr is not None:
            rate = head_lr
        spec = optimizer if optimizer is not None else ("sgd" if joint else "adam")
        opt = build_optimizer(spec, _param_groups(inner, head, joint, head_lr), rate, 0.9, weight_decay, "train_head")
        sched = scheduler(opt) if scheduler is not None else None
        autocast, scaler = _amp(dev, amp)
        steps, start = 0, 0
        sig = ckpt.signature(head, names, joint)
        joint_model = inner if joint else None  # a frozen model is not stored: it does not change
        trained = {"head": head, "model": joint_model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
        saved = ckpt.load(checkpoint, sig) if checkpoint is not None else None
        if saved is not None:
            start, steps, history = int(saved["epoch"]), int(saved["steps"]), list(saved["history"])
            ckpt.resume(saved, trained, gen)
        for epoch in range(start, epochs):
            if max_steps is not None and steps >= max_steps:
                break
            head.train()
            total, count = 0.0, 0
            for batch in _progress(loader, progress, f"train_head epoch {epoch + 1}/{epochs}", _len(loader)):
                x, y = split_batch(batch)
                x = x.to(dev, non_blocking=True)
                with autocast():
                    loss = _batch_loss(model, head, stopper, names, x, y, joint, aux_weight, gen, dev)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if sched is not None and scheduler_interval == "step":
                    sched.step()
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"train_head: the loss became {loss.item()} at epoch {epoch + 1}")
                total += loss.item() * x.shape[0]
                count += x.shape[0]
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            row = {"epoch": float(epoch + 1), "train_loss": total / max(count, 1)}
            if val_loader is not None:
                row.update(_validate(model, head, stopper, names, val_loader, joint, gen, dev))
            history.append(row)
            if sched is not None and scheduler_interval == "epoch":
                sched.step()
            if checkpoint is not None:
                ckpt.save(checkpoint, ckpt.capture(sig, epoch + 1, steps, history, trained, gen))
            if on_epoch is not None:
                on_epoch(dict(row))
        head.eval()
        if type(head).fit_end is not AuxHead.fit_end:
            inner.eval()
            head.fit_end(_feature_batches(model, stopper, names, loader, dev))
    finally:
        hooks.remove_all()
        flags.restore_flags()
        inner.to(home)
    head.history = history
    return head.to(home)


def _param_groups(inner: nn.Module, head: AuxHead, joint: bool, head_lr: float | None) -> list[Any]:
    """The optimizer's parameters: the head's (and the model's in joint mode); with ``head_lr`` in joint mode,
    two groups, the head's with its own lr."""
    own = list(head.parameters())
    if not joint or head_lr is None:
        return own + (list(inner.parameters()) if joint else [])
    return [{"params": list(inner.parameters())}, {"params": own, "lr": head_lr}]


def _batch_loss(
    model: nn.Module,
    head: AuxHead,
    stopper: ForwardStopper,
    names: list[str],
    x: torch.Tensor,
    y: torch.Tensor | None,
    joint: bool,
    aux_weight: float,
    gen: torch.Generator | None,
    dev: torch.device,
) -> torch.Tensor:
    x_aux, targets = head.prepare(x, gen)
    if not joint:
        with torch.no_grad():
            got = stopper.run(model, x_aux)
        return head.train_loss([got[n] for n in names], targets, gen)
    if y is None:
        raise ValueError("train_head(joint=True) needs labels: the loader must yield (images, labels)")
    out, got = stopper.capture(model, x)
    ce = F.cross_entropy(get_logits(out), y.to(dev))
    if x_aux is not x:
        got = stopper.run(model, x_aux)
    return ce + aux_weight * head.train_loss([got[n] for n in names], targets, gen)


@torch.no_grad()
def _validate(
    model: nn.Module,
    head: AuxHead,
    stopper: ForwardStopper,
    names: list[str],
    loader: Iterable[Any],
    joint: bool,
    gen: torch.Generator | None,
    dev: torch.device,
) -> dict[str, float]:
    inner = unwrap_model(model)
    was_model, was_head = inner.training, head.training
    inner.eval()
    head.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for batch in loader:
            x, y = split_batch(batch)
            x = x.to(dev)
            x_aux, targets = head.prepare(x, gen)
            got = stopper.run(model, x_aux)
            total += head.train_loss([got[n] for n in names], targets, gen).item() * x.shape[0]
            if joint and y is not None:
                correct += int((get_logits(model(x)).argmax(1) == y.to(dev)).sum())
            count += x.shape[0]
    finally:
        inner.train(was_model)
        head.train(was_head)
    row = {"val_loss": total / max(count, 1)}
    if joint:
        row["val_acc"] = correct / max(count, 1)
    return row


def _feature_batches(
    model: nn.Module, stopper: ForwardStopper, names: list[str], loader: Iterable[Any], dev: torch.device
) -> Iterator[list[torch.Tensor]]:
    with torch.no_grad():
        for batch in loader:
            x, _ = split_batch(batch)
            got = stopper.run(model, x.to(dev))
            yield [got[n] for n in names]


def _amp(dev: torch.device, amp: bool) -> tuple[Callable[[], Any], Any]:
    if not amp:
        return contextlib.nullcontext, None
    if dev.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)), None
