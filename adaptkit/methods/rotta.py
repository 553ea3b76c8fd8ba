"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan et al., CVPR 2023)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Callable, Union

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.layers import norm_kind, select_norm_layers
from adaptkit.core.optim import OptimizerSpec, build_optimizer
from adaptkit.core.robust_bn import RobustBN
from adaptkit.core.teacher import SeededGenerators, ema_update_, model_copy
from adaptkit.functional.augment import cotta_augment
from adaptkit.functional.memory import CSTUMemory, timeliness_weight
from adaptkit.registry import register_method

#: ``augment(x, generator) -> x_aug``: the student's view of the memory
AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AugmentSpec = Union[str, AugmentFn, None]

_NORM_KINDS = ("batch", "layer", "group")


def rotta_pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample pseudo-label and uncertainty of the teacher's logits, as RoTTA stores them in its memory.

    ``p = softmax(logits)``, label ``argmax p``, uncertainty ``sum_c -p_c log(p_c + 1e-6)`` (the official code's
    entropy, with its ``1e-6``). Dense logits ``(B, C, H, W)`` (an adaptkit extension): the label is the most
    frequent pixel label (the smallest class on ties), the uncertainty the mean pixel entropy.

    Example:
        >>> import torch
        >>> from adaptkit.methods.rotta import rotta_pseudo_labels
        >>> labels, unc = rotta_pseudo_labels(torch.tensor([[0.0, 0.0], [5.0, 0.0]]))
        >>> labels.tolist(), [round(u, 4) for u in unc.tolist()]
        ([0, 0], [0.6931, 0.0402])
    """
    p = logits.softmax(1)
    entropy = torch.sum(-p * torch.log(p + 1e-6), dim=1)
    labels = p.argmax(1)
    if logits.dim() == 2:
        return labels, entropy
    flat = labels.flatten(1)
    counts = torch.zeros(flat.shape[0], logits.shape[1], dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    return counts.argmax(1), entropy.flatten(1).mean(1)


def rotta_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_i w_i * CE(softmax(teacher_i), log_softmax(student_i))``; dense logits: CE averaged over pixels.

    Example:
        >>> import torch
        >>> from adaptkit.methods.rotta import rotta_loss
        >>> z = torch.zeros(2, 4)  # uniform student and teacher: CE = log 4 per sample
        >>> round(rotta_loss(z, z, torch.tensor([1.0, 0.0])).item(), 4)  # mean of (log 4, 0)
        0.6931
    """
    ce = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)
    if ce.dim() > 1:
        ce = ce.flatten(1).mean(1)
    return (ce * weights).mean()


@register_method
class RoTTA(TTAMethod):
    """Robust BatchNorm, a category-balanced memory and a timeliness-weighted mean teacher (Yuan et al., 2023).

    Every batch: the **teacher** (an EMA copy of the model, eval mode: Robust BN with its global statistics)
    predicts it - that is the returned output; each sample is offered, one by one, to the CSTU memory
    (:class:`~adaptkit.functional.memory.CSTUMemory`: capacity ``memory_size``, per-class quota, eviction by age
    and uncertainty). After every ``update_frequency`` offered samples (the counter runs across batches, so an
    update can fire mid-batch, with the memory as it is then): the teacher sees the memory and the student a
    strong augmentation of it, both as "train-mode" forwards (each model's Robust BN statistics move:
    ``mu <- (1 - alpha) mu + alpha mu_batch``, then normalise with the updated values); the loss
    ``mean_i w_i CE(softmax(teacher_i), log_softmax(student_i))`` with ``w_i = exp(-a_i) / (1 + exp(-a_i))``,
    ``a_i = age_i / memory_size``, takes one Adam step on the norm-layer affine parameters, and the teacher's
    copies of those parameters follow ``(1 - nu) * teacher + nu * student``.

    BatchNorm layers become Robust BN (:class:`~adaptkit.core.robust_bn.RobustBN`, hooks; global statistics held by
    the wrapper, the layers' running buffers never written); LayerNorm / GroupNorm layers adapt their affine
    parameters too (the TTA benchmark's RoTTA), so BN-free models (ViT, ConvNeXt) work. No layer runs in training
    mode (dropout stays off, also in the update forwards, unlike the official ``model.train()``).

    Args:
        model: a classifier (logits ``(B, C)``, ``C >= 2``) or a dense predictor (``(B, C, H, W)`` or a dict
            with ``"out"``; an extension: a memory label is the most frequent pixel label).
        lr: Adam learning rate (official CIFAR and ImageNet: 1e-3).
        memory_size: CSTU capacity ``N`` (64).
        update_frequency: offered samples between two updates (64).
        nu: teacher EMA rate (0.001).
        alpha: Robust BN update rate (0.05).
        lambda_t / lambda_u: weights of the age and uncertainty terms of the memory score (1.0 / 1.0).
        episodic: reset before every batch (default ``False``: RoTTA adapts continually and never resets).
        seed: seed of the augmentation generators (one per device, re-seeded by :meth:`reset`).
        num_classes: classes of the model's output; ``None`` takes them from the first batch's logits.
        augment: the student's view of the memory: ``"cotta"`` (CoTTA's strong augmentation,
            :func:`~adaptkit.functional.augment.cotta_augment`, image batches in ``value_range``), ``None`` (the
            memory as it is) or a callable ``(x, generator) -> x_aug``.
        value_range: pixel range of the inputs for ``augment="cotta"`` (default ``(0, 1)``).
        optimizer: ``None`` / ``"adam"`` (Adam, betas 0.9 / 0.999), ``"sgd"`` or a callable
            ``params -> torch.optim.Optimizer``.
        weight_decay: weight decay of the built-in optimizers (0).
        norm: the norm kinds to adapt (default all of ``"batch"``, ``"layer"``, ``"group"``).
        include / exclude: restrict the norm layers (full-match regex or list of names / dotted suffixes).
        check_inputs: validate each batch before adapting.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.RoTTA(model, memory_size=8, update_frequency=8) as rotta:
        ...     preds = rotta(torch.rand(8, 3, 32, 32)).argmax(1)
        >>> preds.shape, rotta.num_updates
        (torch.Size([8]), 1)
    """

    name = "rotta"
    uses_grad = True
    default_episodic = False
    transforms_input = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        memory_size: int = 64,
        update_frequency: int = 64,
        nu: float = 0.001,
        alpha: float = 0.05,
        lambda_t: float = 1.0,
        lambda_u: float = 1.0,
        episodic: bool = False,
        seed: int = 0,
        *,
        num_classes: int | None = None,
        augment: AugmentSpec = "cotta",
        value_range: Sequence[float] = (0.0, 1.0),
        optimizer: OptimizerSpec = None,
        weight_decay: float = 0.0,
        norm: str | Sequence[str] = _NORM_KINDS,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        check_inputs: bool = True,
    ) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"RoTTA: lr must be positive, got {lr}")
        for arg, v in (("memory_size", memory_size), ("update_frequency", update_frequency)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"RoTTA: {arg} must be a positive integer, got {v}")
        for arg, v in (("nu", nu), ("alpha", alpha)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"RoTTA: {arg} must be in [0, 1], got {v}")
        for arg, v in (("lambda_t", lambda_t), ("lambda_u", lambda_u)):
            if not math.isfinite(float(v)):
                raise ValueError(f"RoTTA: {arg} must be a finite number, got {v}")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) != num_classes):
            raise ValueError(f"RoTTA: num_classes must be an integer >= 2 or None, got {num_classes}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"RoTTA: num_classes must be >= 2 (the memory normalises by log C), got {num_classes}")
        if not (augment is None or callable(augment) or augment == "cotta"):
            raise ValueError(
                f"RoTTA: augment must be 'cotta', None or a callable (x, generator) -> x, got {augment!r}"
            )
        lo, hi = (float(v) for v in value_range)
        if not lo < hi:
            raise ValueError(f"RoTTA: value_range must be (low, high) with low < high, got {value_range!r}")
        kinds = [norm] if isinstance(norm, str) else list(norm)
        bad = [k for k in kinds if k not in _NORM_KINDS]
        if bad or not kinds:
            raise ValueError(f"RoTTA: norm must be a subset of {list(_NORM_KINDS)}, got {norm!r}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.memory_size, self.update_frequency = int(memory_size), int(update_frequency)
        self.nu, self.alpha = float(nu), float(alpha)
        self.lambda_t, self.lambda_u = float(lambda_t), float(lambda_u)
        self.seed = int(seed)
        self.value_range = (lo, hi)
        self._num_classes_arg = None if num_classes is None else int(num_classes)
        self._augment_spec = augment
        self._opt_spec = optimizer
        self._kinds, self._include, self._exclude = kinds, include, exclude
        self._bn: dict[str, nn.Module] = {}
        self._gens = SeededGenerators(self.seed)
        self.memory: CSTUMemory | None = None
        #: samples offered to the memory since the last reset (the update counter)
        self.num_samples = 0
        #: updates since the last reset
        self.num_updates = 0
        #: the loss of the last update (detached), or ``None``
        self.last_loss: torch.Tensor | None = None
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ selection
    def select(self) -> dict[str, nn.Module]:
        sel = select_norm_layers(
            self.inner, self._kinds, self._include, self._exclude, who="RoTTA", require_running_stats=True
        )
        sel = {
            n: m
            for n, m in sel.items()
            if norm_kind(m) == "batch" or isinstance(getattr(m, "weight", None), nn.Parameter)
            or isinstance(getattr(m, "bias", None), nn.Parameter)
        }  # fmt: skip
        if not any(isinstance(getattr(m, a, None), nn.Parameter) for m in sel.values() for a in ("weight", "bias")):
            raise ValueError(
                "RoTTA: the selected norm layers have no affine parameters (affine=False) to adapt; choose others "
                "with include= / norm= (adaptkit.list_layers(model) lists them)"
            )
        self._bn = {n: m for n, m in sel.items() if norm_kind(m) == "batch"}
        return sel

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = []
        for m in self._targets.values():
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    params.append(p)
        return params

    def configure(self) -> None:
        # the teacher is copied before any hook is installed (model_copy drops hooks anyway); not a registered
        # child: the wrapper's state_dict() stays the model's, the teacher travels in the adaptation state
        teacher = model_copy(self.inner)
        object.__setattr__(self, "teacher", teacher)
        names = list(self._named_trainable())
        t_params = dict(teacher.named_parameters())
        self._teacher_params = [t_params[n] for n in names]
        t_modules = dict(teacher.named_modules())
        self._rbn = RobustBN(self._bn, self.hooks, self.alpha) if self._bn else None
        self._teacher_rbn = RobustBN({n: t_modules[n] for n in self._bn}, self.hooks, self.alpha) if self._bn else None
        self.optimizer = build_optimizer(
            self._opt_spec or "adam", self.trainable_parameters(), self.lr, 0.9, self.weight_decay, "RoTTA"
        )
        self.memory = self._new_memory(self._num_classes_arg)

    def _new_memory(self, num_classes: int | None) -> CSTUMemory | None:
        if num_classes is None:
            return None
        return CSTUMemory(self.memory_size, num_classes, self.lambda_t, self.lambda_u)

    # ------------------------------------------------------------------ adaptation
    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise TypeError(
                f"{self._who()} needs a batch tensor (B, ...) to store in its memory, got {type(x).__name__}"
            )
        if self._augment_spec == "cotta" and x.dim() != 4:
            raise ValueError(
                f"{self._who()}: augment='cotta' needs image batches (B, C, H, W), got shape {tuple(x.shape)}; "
                "pass augment=None or a callable for other inputs"
            )
        with torch.no_grad():
            out = self.teacher(x)  # first: a batch the model cannot take raises the model's own error
            logits = get_logits(out).detach()
            labels, uncertainty = rotta_pseudo_labels(logits.float())
        mem = self._memory_for(logits)
        if mem.sample_shape is not None and mem.sample_shape != x.shape[1:]:
            raise ValueError(
                f"{self._who()}: the memory holds samples of shape {tuple(mem.sample_shape)}, the batch has "
                f"{tuple(x.shape[1:])}; call reset() before changing the input size"
            )
        labels_l, unc_l = labels.tolist(), uncertainty.tolist()
        for i in range(x.shape[0]):
            if math.isfinite(unc_l[i]):
                mem.add(x[i].detach(), labels_l[i], unc_l[i])
            else:  # a prediction that overflowed: the sample is not stored, the others still age
                mem.add_age()
                self.warn_once("nonfinite_pred", "a sample with a non-finite teacher prediction was not stored")
            self.num_samples += 1
            if self.num_samples % self.update_frequency == 0:
                self.update()
        return out

    def _memory_for(self, logits: torch.Tensor) -> CSTUMemory:
        if logits.dim() not in (2, 4):
            raise ValueError(f"{self._who()}: expected logits (B, C) or (B, C, H, W), got shape {tuple(logits.shape)}")
        c = logits.shape[1]
        if self.memory is None:
            if c < 2:
                raise ValueError(f"{self._who()}: the model gives {c} class score(s); RoTTA needs at least 2")
            self.memory = self._new_memory(c)
        assert self.memory is not None
        if c != self.memory.num_classes:
            raise ValueError(
                f"{self._who()}: the model gives {c} class scores, the memory was built for "
                f"{self.memory.num_classes} (num_classes=)"
            )
        return self.memory

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The student's view of the memory batch ``x`` (draws from the wrapper's seeded generator)."""
        spec = self._augment_spec
        if spec is None:
            return x
        gen = self._gens.get(x.device)
        if spec == "cotta":
            if "range" not in self._warned:  # one check per update until it warns (a device sync)
                self._check_range(x)
            return cotta_augment(x, gen, value_range=self.value_range)
        return spec(x, gen)  # type: ignore[operator]

    def _check_range(self, x: torch.Tensor) -> None:
        lo, hi = self.value_range
        xmin, xmax = (float(v) for v in torch.aminmax(x.detach()))
        tol = 1e-3 * (hi - lo)
        if xmin < lo - tol or xmax > hi + tol:
            self.warn_once(
                "range",
                f"inputs span [{xmin:.3g}, {xmax:.3g}] but the CoTTA augmentation clips to value_range "
                f"({lo:g}, {hi:g}); feed [0, 1] pixels and normalise inside the model, or pass value_range=(lo, hi)",
            )

    def update(self) -> None:
        """One RoTTA update on the memory as it is now (called by the forward every ``update_frequency`` samples)."""
        assert self.optimizer is not None and self.memory is not None
        batch = self.memory.get()
        strong = self.augment(batch.data)
        with torch.no_grad(), self._rbn_update(self._teacher_rbn):
            teacher_logits = get_logits(self.teacher(batch.data)).detach()
        with torch.enable_grad(), self._rbn_update(self._rbn):
            student_logits = get_logits(self.model(strong))
            loss = rotta_loss(student_logits, teacher_logits, timeliness_weight(batch.ages))
        self._step(loss)
        ema_update_(self._teacher_params, list(self._named_trainable().values()), 1.0 - self.nu)  # same names
        self.num_updates += 1
        self.last_loss = loss.detach()

    @staticmethod
    def _rbn_update(rbn: RobustBN | None) -> contextlib.AbstractContextManager[None]:
        return rbn.update() if rbn is not None else contextlib.nullcontext()

    def _step(self, loss: torch.Tensor) -> None:
        """Backward and one optimizer step; a non-finite loss or gradient skips the step (warned once)."""
        assert self.optimizer is not None
        ok = bool(torch.isfinite(loss.detach()))
        if ok:
            loss.backward()
            ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.trainable_parameters())
        if ok:
            self.optimizer.step()
        else:
            self.warn_once("nonfinite", f"the loss or its gradient is not finite ({float(loss):.3g}); step skipped")
        self.optimizer.zero_grad(set_to_none=True)

    def predict(self, x: Any, last: Any) -> Any:
        return last

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        if self._restored:  # the wrapper is done: let the teacher and the memory go (the counters stay readable)
            object.__setattr__(self, "teacher", None)
            self._teacher_params = []
            self.memory = None
            return
        self.memory = self._new_memory(self._num_classes_arg)
        self.num_samples = 0
        self.num_updates = 0
        self.last_loss = None
        self._gens.clear()
        for rbn in (self._rbn, self._teacher_rbn):
            if rbn is not None:
                rbn.reset()
        with torch.no_grad():
            for name, p in zip(self._named_trainable(), self._teacher_params):
                p.copy_(self._snapshot.tensors[name])

    def method_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_samples": self.num_samples, "num_updates": self.num_updates}
        for name, p in zip(self._named_trainable(), self._teacher_params):
            state[f"teacher.{name}"] = p.detach().clone()
        if self._rbn is not None and self._teacher_rbn is not None:
            state.update(self._rbn.state("rbn."))
            state.update(self._teacher_rbn.state("teacher_rbn."))
        if self.memory is not None:
            state.update({f"memory.{k}": v for k, v in self.memory.state_dict().items()})
        state.update(self._gens.state("rng."))
        return state

    def load_adaptation_state_dict(self, state: dict[str, Any]) -> None:
        """Load the output of :meth:`adaptation_state_dict`; RoTTA's own entries (teacher, Robust BN statistics,
        memory) are checked before anything is written, so a state that does not fit (e.g. saved with another
        ``memory_size``) raises with the model, the optimizer and the wrapper unchanged."""
        self._check_alive()
        if state.get("_adaptkit.method") == self.name:
            prefix = "_adaptkit.state."
            self._load_memory({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        super().load_adaptation_state_dict(state)

    def _load_memory(self, state: dict[str, Any]) -> CSTUMemory | None:
        """Check the method ``state`` (teacher, Robust BN statistics) and build the memory it holds; writes nothing
        to the wrapper."""
        for name, p in zip(self._named_trainable(), self._teacher_params):
            v = state.get(f"teacher.{name}")
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                raise ValueError(f"{self._who()}: the adaptation state lacks the teacher's {name!r} for this model")
        if self._rbn is not None and self._teacher_rbn is not None:
            self._rbn.check_state(state, "rbn.")
            self._teacher_rbn.check_state(state, "teacher_rbn.")
        mem_state = {k[len("memory.") :]: v for k, v in state.items() if k.startswith("memory.")}
        if mem_state:
            memory = CSTUMemory(self.memory_size, int(mem_state["num_classes"]), self.lambda_t, self.lambda_u)
            memory.load_state_dict(mem_state, device=self._device())
            return memory
        return self._new_memory(self._num_classes_arg)

    def load_method_state(self, state: dict[str, Any]) -> None:
        names = list(self._named_trainable())
        memory = self._load_memory(state)  # everything checked before anything is written
        with torch.no_grad():
            for name, p in zip(names, self._teacher_params):
                p.copy_(state[f"teacher.{name}"])
        if self._rbn is not None and self._teacher_rbn is not None:
            self._rbn.load_state(state, "rbn.")
            self._teacher_rbn.load_state(state, "teacher_rbn.")
        self.memory = memory
        self.num_samples = int(state.get("num_samples", 0))
        self.num_updates = int(state.get("num_updates", 0))
        self._gens.load_state(state, "rng.")

    def _device(self) -> torch.device:
        p = next(iter(self.trainable_parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, memory_size={self.memory_size}, update_frequency={self.update_frequency}, nu={self.nu}, "
            f"alpha={self.alpha}, " + super().extra_repr()
        )
