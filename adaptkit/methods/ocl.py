"""OCL: test-time training of segmentation models with an output contrastive loss (Zhang et al., 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.bn import BNStatsOverride
from adaptkit.core.layers import filter_by_name, norm_kind, unique_parameters
from adaptkit.core.optim import OptimizerSpec, build_optimizer
from adaptkit.core.teacher import SeededGenerators, stochastic_restore_
from adaptkit.functional.moments import Moments
from adaptkit.functional.ocl import OCLTerms, output_contrastive_terms, split_views, two_view_batch
from adaptkit.registry import register_method

_PARAM_SETS = ("all", "norm")
_PREDICTIONS = ("mean", "first")


@register_method
class OCL(TTAMethod):
    """Flip-consistency plus within-view diversity in the output space, with whole-network SGD.

    Each call forwards ``cat([x, hflip(x)])`` in **one** pass, flips the second half of the logits back and
    minimises ``lambda_pos * L_pos + lambda_neg * L_neg`` (:func:`adaptkit.functional.ocl.output_contrastive_terms`)
    with SGD over every parameter that requires grad at wrap time. After each step every adapted element is reset
    to its source value with probability ``restore_prob`` (stochastic restoration; seeded ``torch.Generator``,
    re-seeded on :meth:`reset`). BatchNorm layers normalise with ``bn_prior * source + (1 - bn_prior) * batch``
    statistics of the two-view batch (unbiased variance, no gradient through the batch statistics, running buffers
    never written). The prediction comes from the forward that produced the loss, i.e. before this call's update.

    Args:
        model: a segmentation model returning logits ``(B, C, H, W)``, a dict with ``"out"`` (optional
            ``"aux"``, torchvision style) or a tuple whose first item is the logits. Classifiers ``(B, C)`` work
            too, but their negative term is the constant 1 (one "pixel" per image).
        lr: SGD learning rate (OCL: 2e-5 for GTA5 sources on 0-255 Caffe inputs; re-tune, e.g. 1e-5 to 1e-4).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (5e-4).
        steps: gradient steps per batch (1).
        lambda_pos / lambda_neg: loss weights (3.0 / 1.0).
        restore_prob: per-element, per-step probability of resetting an adapted value to the source (0.01).
        bn_prior: weight ``pi`` of the source statistics in every BatchNorm layer, independent of the batch size
            (OCL's README runs: 0.85). ``0`` (or ``None``) keeps plain eval-mode BatchNorm with the source
            statistics, as OCL's ``--prior 0`` does; ``1`` is the same as ``0`` in effect. ``"batch"``: the
            two-view batch's statistics alone (weight 0 on the source), what ``0`` would mean if read as a
            mixing weight.
        episodic: reset before every batch (default ``False``: continual, as OCL).
        seed: seed of the restoration masks' generators (one per device, re-seeded on :meth:`reset`; on CUDA,
            bitwise replay also needs ``torch.use_deterministic_algorithms(True)``).
        stride: grid subsampling of the negative term (OCL ``--downsampling``, 1).
        params: ``"all"`` (every parameter that requires grad, OCL) or ``"norm"`` (norm-layer affine only).
        include / exclude: restrict the adapted parameters by the name of the module owning them (full-match
            regex or a list of names / dotted suffixes); BatchNorm prior mixing applies to every BatchNorm layer.
        prediction: ``"mean"`` (OCL: the average of the two views' flip-aligned outputs) or ``"first"`` (the
            un-flipped view's output only).
        optimizer: ``None`` (SGD as above) or a callable ``params -> torch.optim.Optimizer``.
        check_inputs: reject empty or non-finite batches.

    Example:
        >>> import torch, torchvision
        >>> from adaptkit.methods.ocl import OCL
        >>> model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        ...     weights=None, weights_backbone=None, num_classes=5).eval()
        >>> with OCL(model, lr=1e-4) as ocl:
        ...     out = ocl(torch.randn(1, 3, 64, 64))
        >>> out["out"].shape
        torch.Size([1, 5, 64, 64])
    """

    name = "ocl"
    uses_grad = True
    transforms_input = True
    default_episodic = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-5,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        steps: int = 1,
        lambda_pos: float = 3.0,
        lambda_neg: float = 1.0,
        restore_prob: float = 0.01,
        bn_prior: float | str | None = 0.85,
        episodic: bool = False,
        seed: int = 0,
        *,
        stride: int = 1,
        params: str = "all",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        prediction: str = "mean",
        optimizer: OptimizerSpec = None,
        check_inputs: bool = True,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"OCL: lr must be >= 0, got {lr}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"OCL: steps must be a positive integer, got {steps}")
        if not 0.0 <= restore_prob <= 1.0:
            raise ValueError(f"OCL: restore_prob must be in [0, 1], got {restore_prob}")
        self._batch_bn = isinstance(bn_prior, str) and bn_prior.lower() == "batch"
        if isinstance(bn_prior, str) and not self._batch_bn:
            raise ValueError(f"OCL: bn_prior must be a number in [0, 1], None or 'batch'; got {bn_prior!r}")
        prior = 0.0 if bn_prior is None or self._batch_bn else float(bn_prior)
        if math.isnan(prior) or not 0.0 <= prior <= 1.0:
            raise ValueError(
                f"OCL: bn_prior is the weight of the source statistics, in [0, 1] (or 'batch'); got {bn_prior}"
            )
        if int(stride) != stride or stride < 1:
            raise ValueError(f"OCL: stride must be a positive integer, got {stride}")
        if params not in _PARAM_SETS:
            raise ValueError(f"OCL: params must be one of {list(_PARAM_SETS)}, got {params!r}")
        if prediction not in _PREDICTIONS:
            raise ValueError(f"OCL: prediction must be one of {list(_PREDICTIONS)}, got {prediction!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.steps = int(steps)
        self.lambda_pos, self.lambda_neg = float(lambda_pos), float(lambda_neg)
        self.restore_prob, self.bn_prior, self.seed = float(restore_prob), prior, int(seed)
        self.stride, self.params, self.prediction = int(stride), params, prediction
        self._include, self._exclude, self._opt_spec = include, exclude, optimizer
        self._params: list[nn.Parameter] = []
        self._bn: dict[str, nn.Module] = {}
        self._sources: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._rng = SeededGenerators(self.seed)  # one generator per device for the restoration masks
        #: the unweighted ``(positive, negative)`` terms of the last step (detached), or ``None``
        self.last_terms: OCLTerms | None = None
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ selection
    def select(self) -> dict[str, nn.Module]:
        inner = self.inner
        owners: dict[str, nn.Module] = {}
        for name, m in inner.named_modules():
            if self.params == "norm" and norm_kind(m) not in ("batch", "group", "layer"):
                continue
            if any(p is not None and p.requires_grad for p in m._parameters.values()):
                owners[name] = m
        include, exclude = self._include, self._exclude
        sel = filter_by_name(owners, include, exclude, "module with trainable parameters in OCL(include=...)")
        params = unique_parameters(sel.values(), names=None, requires_grad=True)
        if not params:
            raise ValueError(
                "OCL updates the parameters that require grad at wrap time, and the selection has none "
                f"(params={self.params!r}, include={include!r}, exclude={exclude!r}); set requires_grad=True on "
                "what should adapt, or run adaptkit.list_layers(model) to see the valid names"
            )
        self._params = params
        self._bn = {}
        if self.bn_prior > 0 or self._batch_bn:
            self._bn = {
                n: m
                for n, m in inner.named_modules()
                if norm_kind(m) == "batch" and m.track_running_stats and getattr(m, "running_mean", None) is not None
            }
        return {n: m for n, m in inner.named_modules() if n in sel or n in self._bn}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._params)

    def configure(self) -> None:
        live = self._named_trainable()
        self._sources = [(p, self._snapshot.tensors[n]) for n, p in live.items()]
        if self._bn:
            BNStatsOverride(self._bn, self._policy, self.hooks)
        self.optimizer = build_optimizer(
            self._opt_spec or "sgd", self.trainable_parameters(), self.lr, self.momentum, self.weight_decay, "OCL"
        )

    # ------------------------------------------------------------------ BN prior
    def _policy(self, name: str, module: nn.Module, mom: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        pi = self.bn_prior
        if pi >= 1.0:
            return None
        mean_s = module.running_mean.to(mom.mean.dtype)
        var_s = module.running_var.to(mom.var.dtype)
        mean = pi * mean_s + (1.0 - pi) * mom.mean
        var = pi * var_s + (1.0 - pi) * mom.var
        return mean, torch.where(torch.isnan(mom.var), var_s, var)  # one value per channel: source variance

    # ------------------------------------------------------------------ adaptation
    def loss_terms(self, output: Any, batch_size: int) -> OCLTerms:
        """OCL terms of a two-view model output (the model's output on ``cat([x, hflip(x)])``)."""
        logits_a, logits_b = split_views(get_logits(output), batch_size)
        return output_contrastive_terms(logits_a, logits_b, self.lambda_pos, self.lambda_neg, self.stride)

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            raise TypeError(f"{self._who()} needs an image batch tensor (B, C, H, W) to flip, got {type(x).__name__}")
        b = x.shape[0]
        out = self.model(two_view_batch(x))
        terms = self.loss_terms(out, b)
        terms.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stochastic_restore()
        self.last_terms = OCLTerms(*(t.detach() for t in terms))
        return self._merge_views(out, b)

    def predict(self, x: Any, last: Any) -> Any:
        return last

    def _merge_views(self, v: Any, b: int) -> Any:
        """The model's output for ``x`` from its two-view output: view a, or the mean with view b flipped back."""
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != 2 * b:
                return v.detach()
            a, fb = split_views(v.detach(), b)
            return a if self.prediction == "first" else (a + fb) / 2
        if isinstance(v, dict):
            return type(v)((k, self._merge_views(val, b)) for k, val in v.items())
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return type(v)(*(self._merge_views(val, b) for val in v))
        if isinstance(v, (tuple, list)):
            return type(v)(self._merge_views(val, b) for val in v)
        return v

    def _generator(self, device: torch.device) -> torch.Generator:
        return self._rng.get(device)

    def _stochastic_restore(self) -> None:
        """Reset each adapted element to its source value with probability ``restore_prob`` (in place)."""
        params = [p for p, _ in self._sources]
        stochastic_restore_(params, [src for _, src in self._sources], self.restore_prob, self._rng)

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        self._rng.clear()  # re-seeded lazily: a reset run replays the same masks
        self.last_terms = None

    def method_state(self) -> dict[str, Any]:
        return self._rng.state("rng.")

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._rng.load_state(state, "rng.")

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, lambda_pos={self.lambda_pos}, lambda_neg={self.lambda_neg}, "
            f"restore_prob={self.restore_prob}, bn_prior={'batch' if self._batch_bn else self.bn_prior}, "
            + super().extra_repr()
        )
