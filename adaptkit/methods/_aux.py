"""``AuxHeadMethod``: the shared wrapper of the test-time-training methods (NC-TTT, TTT, ClusT3, TTT++).

What every such method does, written once: tap one or more layers, run the model only up to them while
adapting (hooks, any architecture), minimise the head's test loss over the encoder up to and including the
tapped layers, then predict with the full model. A new method is a head class plus a few class attributes.

BatchNorm handling (``bn_mode``), the lever the NC-TTT spec calls "silent and big":

* ``"refresh"`` (the reference protocol): the adapted encoder's BN layers run in training form during the
  iterations (batch statistics, running statistics updated with the layer's momentum, as ``model.train()``
  does in the official code); the prediction is an eval-mode forward with the refreshed statistics. Layers
  above the tap are never run while adapting (truncation), so their refresh is done before the prediction by
  one training-form pass over the adapted model (batch statistics everywhere, nothing else written) that
  applies the ``n`` momentum updates the reference's ``n`` full forwards would have made, in closed form:
  ``(1-m)^n * running + (1-(1-m)^n) * batch`` (unbiased batch variance, as torch's update). This equals the
  reference exactly when the layers' inputs do not change across iterations; here they are measured with the
  adapted weights (what the reference's last iterations see). Cost: one extra forward above the tap.
  A layer with ``momentum=None`` (cumulative average) gets the ``n`` cumulative updates instead:
  ``(t * running + n * batch) / (t + n)`` with ``t = num_batches_tracked``; ``num_batches_tracked`` grows by ``n``.
* ``"batch"``: batch statistics everywhere (adaptation and prediction), running buffers never written. Both
  normalise with the **biased** batch variance (what a training-mode BatchNorm uses), so the prediction is the
  adaptation forward's normalisation, not a different one.
* ``"source"``: every BN layer keeps the source statistics; only weights adapt.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar, Union

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod
from adaptkit.core.bn import BNStatsOverride
from adaptkit.core.layers import norm_kind, resolve_layer
from adaptkit.core.optim import OptimizerSpec, build_optimizer
from adaptkit.core.truncate import ForwardStopper, modules_registered_before, probe_upstream
from adaptkit.functional.moments import Moments
from adaptkit.heads.base import AuxHead
from adaptkit.train.trainer import train_head

LayerArg = Union[int, str, Sequence[Union[int, str]], None]
BN_MODES = ("refresh", "batch", "source")


def refresh_running_stats(module: nn.Module, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """Apply, in closed form, the ``n`` running-statistic updates that ``n`` training-mode forwards of a BatchNorm
    layer on a batch with moments ``(mean, var)`` (``var`` unbiased) would make, as torch does: exponential
    (``momentum`` m: ``(1-m)^n * running + (1-(1-m)^n) * batch``) or, with ``momentum=None``, the cumulative
    average (``(t * running + n * batch) / (t + n)``, ``t = num_batches_tracked``). ``num_batches_tracked``
    grows by ``n``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.methods._aux import refresh_running_stats
        >>> bn = nn.BatchNorm1d(1, momentum=None)  # cumulative average; 0 batches tracked, running mean 0
        >>> refresh_running_stats(bn, torch.tensor([2.0]), torch.tensor([1.0]), n=3)
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([2.0], 3)
    """
    tracked = getattr(module, "num_batches_tracked", None)
    if module.momentum is None:
        t = 0 if tracked is None else int(tracked)
        keep = t / (t + n)
    else:
        keep = (1.0 - float(module.momentum)) ** n
    with torch.no_grad():
        module.running_mean.mul_(keep).add_(mean.to(module.running_mean.dtype), alpha=1 - keep)
        module.running_var.mul_(keep).add_(var.to(module.running_var.dtype), alpha=1 - keep)
        if tracked is not None:
            tracked.add_(n)


def _has_stats(m: nn.Module) -> bool:
    return norm_kind(m) == "batch" and getattr(m, "running_mean", None) is not None


class AuxHeadMethod(TTAMethod):
    """Base of the auxiliary-head (test-time training) wrappers. Subclasses set :attr:`head_class`, ``name``
    and defaults, and may override :meth:`make_head`.

    Args:
        model: the source model.
        layer: stage index or qualified name (or a list, for heads on several layers); ``None`` takes the
            layers the head was trained on.
        head: a trained head (from ``train_head`` or ``load``).
        lr: learning rate. steps: adaptation iterations per batch.
        optimizer: ``"adam"``, ``"sgd"`` or a callable ``params -> torch.optim.Optimizer``.
        momentum / weight_decay: for the built-in optimizers (``momentum`` is SGD's).
            ``lr``, ``steps``, ``optimizer`` and ``momentum`` left as ``None`` take the method's
            :attr:`defaults` (each method's card lists them and their sources).
        bn_mode: ``"refresh"``, ``"batch"`` or ``"source"`` (module docstring).
        episodic: reset before every batch (default per method).
        truncate: stop the forward at the tapped layer while adapting (default; ``False`` runs the full
            model every iteration). A ``nn.DataParallel`` model adapts through its module on the calling thread
            (whole batch, one device: replica threads could not be matched to the batch order) and predicts
            through the DataParallel.
        seed: seeds the auxiliary task's randomness (noise, rotations, augmentations); re-seeded on reset.
        check_inputs: reject empty or non-finite batches.
    """

    uses_grad = True
    transforms_input = True
    default_episodic = True
    head_class: ClassVar[type[AuxHead]] = AuxHead
    #: the head's own parameters are adapted too (TTT updates its SSL head; NC-TTT does not). Either way the
    #: wrapper works on a private copy (``wrapper.head``): the caller's head is never moved, frozen or written,
    #: so one trained head can serve several wrappers at once
    adapt_head: ClassVar[bool] = False

    #: per-method defaults of the optimisation arguments left as ``None``
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "steps": 1, "optimizer": "adam", "momentum": 0.9}

    def __init__(
        self,
        model: nn.Module,
        layer: LayerArg = None,
        head: AuxHead | None = None,
        *,
        lr: float | None = None,
        steps: int | None = None,
        optimizer: OptimizerSpec = None,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        bn_mode: str = "refresh",
        episodic: bool | None = None,
        truncate: bool = True,
        seed: int | None = 0,
        check_inputs: bool = True,
    ) -> None:
        d = self.defaults
        lr = d["lr"] if lr is None else lr
        steps = d["steps"] if steps is None else steps
        optimizer = d["optimizer"] if optimizer is None else optimizer
        momentum = d["momentum"] if momentum is None else momentum
        who = f"adaptkit.{type(self).__name__}"
        if not isinstance(head, self.head_class):
            raise TypeError(
                f"{who}: head= must be a trained {self.head_class.__name__} (got {type(head).__name__}); make one "
                f"with "
                f"{who}.train_head(model, layer=..., loader=...) or {self.head_class.__name__}.load(path)"
            )
        if lr <= 0 or int(steps) < 1:
            raise ValueError(f"{who}: need lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"{who}: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.lr, self.steps, self.momentum, self.weight_decay = float(lr), int(steps), momentum, weight_decay
        self.bn_mode, self.truncate, self.seed = bn_mode, bool(truncate), seed
        self._opt_spec = optimizer
        self._layer_arg = layer
        # a private copy: the caller's head (device, flags, training mode, .grad, values) is theirs, and another
        # wrapper may be using it
        head = copy.deepcopy(head)
        for p in head.parameters():
            p.grad = None
        object.__setattr__(self, "_head", head)  # registered as the submodule `head` in configure()
        self._phase = "adapt"
        self._checked = False
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ selection
    def _layers(self) -> list[str]:
        arg = self._layer_arg
        if arg is None:
            if self._head.binding is None:
                raise ValueError(f"{self._who()}: pass layer= (the head carries no layer binding)")
            arg = list(self._head.binding["layers"])
        args = arg if isinstance(arg, (list, tuple)) else [arg]
        return [resolve_layer(self.inner, a) for a in args]

    def _upstream(self, layers: list[str]) -> list[str]:
        binding = self._head.binding or {}
        shape = binding.get("input_shape")
        if shape is None:
            regs = [modules_registered_before(self.inner, n) for n in layers]
            return list(dict.fromkeys(n for r in sorted(regs, key=len) for n in r))
        dev = next((p.device for p in self.inner.parameters()), torch.device("cpu"))
        flags = {m: m.training for m in self.inner.modules()}
        for m in flags:  # not .eval(): a user's train() override (e.g. frozen stages) must not run
            m.training = False
        try:
            example = torch.zeros((2, *shape), device=dev)
            names, feats = probe_upstream(self.inner, layers, example)
            self._head.check_features([feats[n] for n in layers], self._who())
        finally:
            for m, flag in flags.items():
                m.training = flag
        return names

    def select(self) -> dict[str, nn.Module]:
        self.layers = self._layers()
        if self._head.num_layers is not None and len(self.layers) != self._head.num_layers:
            raise ValueError(f"{self._who()}: the head takes {self._head.num_layers} layer(s), got {self.layers}")
        self._head.check_layers(self.layers, self.inner, self._who())
        modules = dict(self.inner.named_modules())
        up = self._upstream(self.layers)
        sel = {
            n: modules[n]
            for n in up
            if any(True for _ in modules[n].parameters(recurse=False))
            or any(b is not None for b in modules[n].buffers(recurse=False))
        }
        if not any(any(True for _ in m.parameters(recurse=False)) for m in sel.values()):
            raise ValueError(f"{self._who()}: no parameters run before layer(s) {self.layers}; nothing to adapt")
        self._upstream_bn = [n for n in sel if _has_stats(modules[n])]
        self._above_bn = [n for n, m in modules.items() if n and n not in sel and _has_stats(m)]
        if self.bn_mode != "source":
            sel.update({n: modules[n] for n in self._above_bn})
        return sel

    def trainable_parameters(self) -> list[nn.Parameter]:
        up = set(self._targets) - set(self._above_bn)
        return [p for n, m in self._targets.items() if n in up for p in m.parameters(recurse=False)]

    def train_modules(self) -> list[str]:
        return list(self._upstream_bn) if self.bn_mode != "source" else []

    # ------------------------------------------------------------------ configuration
    def configure(self) -> None:
        dev = next((p.device for p in self.inner.parameters()), torch.device("cpu"))
        self.head = self._head.to(dev)
        self._head_flags = {n: p.requires_grad for n, p in self.head.named_parameters()}
        self._head_training = {n: m.training for n, m in self.head.named_modules()}
        self._head_state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        for p in self.head.parameters():
            p.requires_grad_(self.adapt_head)
        self.head.train(self.adapt_head)
        if self.bn_mode == "batch":
            for n in self._upstream_bn:
                self._targets[n].track_running_stats = False
        modules = dict(self.inner.named_modules())
        self._stopper = ForwardStopper({n: modules[n] for n in self.layers}, self.hooks)
        over = {"refresh": self._above_bn, "batch": [*self._upstream_bn, *self._above_bn]}.get(self.bn_mode, [])
        if over:
            bns = {n: self._targets[n] for n in over}
            active = "measure" if self.bn_mode == "refresh" else "predict"
            BNStatsOverride(bns, self._bn_policy, self.hooks, active=lambda: self._phase == active)
        self._full = not self.truncate
        # DataParallel runs hooks in replica threads on batch chunks: the adaptation forwards (and anything that
        # uses batch statistics) run on its module in this thread instead
        self._dp = isinstance(self.model, nn.DataParallel)
        self._adapt_model = self.inner if self._dp else self.model
        self.optimizer = build_optimizer(
            self._opt_spec, self._all_trainable(), self.lr, self.momentum, self.weight_decay, self._who()
        )
        self._gen: torch.Generator | None = None
        if self.seed is not None:
            self._gen = torch.Generator(device=dev)
            self._gen.manual_seed(self.seed)

    def _all_trainable(self) -> list[nn.Parameter]:
        return self.trainable_parameters() + (list(self.head.parameters()) if self.adapt_head else [])

    def _to_adapt_device(self, x: Any) -> Any:
        if self._dp and isinstance(x, torch.Tensor):
            dev = next((p.device for p in self.inner.parameters()), x.device)
            return x.to(dev)
        return x

    def _bn_policy(self, name: str, module: nn.Module, mom: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        unbiased = torch.nan_to_num(mom.var, nan=0.0) if mom.count < 2 else mom.var
        biased = unbiased * ((mom.count - 1) / mom.count)  # what a training-mode BatchNorm normalises with
        if self.bn_mode == "batch":
            return mom.mean, biased
        # refresh (measure pass): the n running-statistic updates of n training-mode forwards, training-form output
        refresh_running_stats(module, mom.mean, unbiased, self.steps)
        return mom.mean, biased

    # ------------------------------------------------------------------ adaptation
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped features of ``x`` (truncated forward unless ``truncate=False``)."""
        x = self._to_adapt_device(x)
        if self._full:
            _, got = self._stopper.capture(self._adapt_model, x)
        else:
            got = self._stopper.run(self._adapt_model, x)
        feats = [got[n] for n in self.layers]  # a missing layer already raised in the stopper
        if not self._checked:
            self.head.check_features(feats, self._who())
            self._checked = True
        return feats

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        x_aux, targets = self.head.prepare(x, self._gen)
        self.step(self.head.test_loss(self.features(x_aux), targets, self._gen))
        return None

    def step(self, loss: torch.Tensor) -> bool:
        """Backward and one optimizer step; a non-finite loss or gradient skips the step (warned once) instead
        of writing NaN into the model. Returns whether the step was taken."""
        assert self.optimizer is not None
        ok = bool(torch.isfinite(loss.detach()))
        if ok:
            loss.backward()
            ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self._all_trainable())
        if ok:
            self.optimizer.step()
        else:
            self.warn_once(
                "nonfinite", f"the test-time loss or its gradient is not finite ({float(loss.detach()):.3g}); the "
                "step was skipped. Lower lr, or check that the head was trained on features like these.",
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        return ok

    def predict(self, x: Any, last: Any) -> Any:
        ups = [self._targets[n] for n in self._upstream_bn]
        try:
            if self.bn_mode == "refresh" and self._above_bn:
                tracks = [m.track_running_stats for m in ups]
                for m in ups:
                    m.track_running_stats = False  # batch statistics, no further update of the adapted layers
                self._phase = "measure"
                try:
                    self._adapt_model(self._to_adapt_device(x))
                finally:
                    for m, t in zip(ups, tracks):
                        m.track_running_stats = t
            for m in ups:
                m.training = False  # eval form for the prediction (the reference's model.eval() re-forward)
            self._phase = "predict"
            if self.bn_mode == "batch" and self._dp:  # batch statistics of the whole batch, not of each chunk
                return self.inner(self._to_adapt_device(x))
            return self.model(x)
        finally:
            self._phase = "adapt"
            self._assert_modes()

    # ------------------------------------------------------------------ state
    def _zero_grad(self) -> None:
        super()._zero_grad()
        if self.adapt_head and hasattr(self, "head"):
            for p in self.head.parameters():
                p.grad = None

    def reset_state(self) -> None:
        if hasattr(self, "head"):
            if self.adapt_head:
                with torch.no_grad():
                    for k, v in self.head.state_dict().items():
                        v.copy_(self._head_state[k])
            if self._gen is not None and self.seed is not None:
                self._gen.manual_seed(self.seed)

    def restore(self) -> nn.Module:
        if self._restored:
            return self.model
        out = super().restore()
        # the private copy goes back to the caller's head as well (values, flags, modes), for inspection
        with torch.no_grad():
            for k, v in self.head.state_dict().items():
                v.copy_(self._head_state[k])
        for n, p in self.head.named_parameters():
            p.requires_grad_(self._head_flags[n])
            p.grad = None
        for n, m in self.head.named_modules():
            m.training = self._head_training[n]
        return out

    def method_state(self) -> dict[str, Any]:
        if not self.adapt_head:
            return {}
        return {f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if self.adapt_head and state:
            self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    # ------------------------------------------------------------------ head training
    @classmethod
    def make_head(cls, feature_shapes: list[tuple[int, ...]], **kwargs: Any) -> AuxHead:
        """Build an untrained head for tapped features of per-sample shapes ``feature_shapes``."""
        return cls.head_class(feature_shapes[0][0], **kwargs)

    @classmethod
    def train_head(
        cls,
        model: nn.Module,
        layer: int | str | Sequence[int | str],
        loader: Any,
        epochs: int = 10,
        *,
        joint: bool = False,
        aux_weight: float = 1.0,
        lr: float | None = None,
        optimizer: OptimizerSpec = None,
        weight_decay: float = 0.0,
        val_loader: Any = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        seed: int | None = 0,
        progress: bool = True,
        max_steps: int | None = None,
        head_lr: float | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        checkpoint: Any = None,
        on_epoch: Any = None,
        **head_kwargs: Any,
    ) -> AuxHead:
        """Train this method's head on ``layer`` of the source ``model`` (see :func:`adaptkit.train.train_head`;
        ``head_kwargs`` go to the head's constructor)."""
        return train_head(
            model,
            layer,
            lambda shapes: cls.make_head(shapes, **head_kwargs),
            loader,
            epochs,
            joint=joint,
            aux_weight=aux_weight,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            val_loader=val_loader,
            device=device,
            amp=amp,
            seed=seed,
            progress=progress,
            max_steps=max_steps,
            head_lr=head_lr,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            checkpoint=checkpoint,
            on_epoch=on_epoch,
        )

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, lr={self.lr}, steps={self.steps}, bn_mode={self.bn_mode!r}, "
            + super().extra_repr()
        )
