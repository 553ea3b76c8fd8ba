"""SAR: sharpness-aware and reliable entropy minimisation with model recovery (Niu et al., ICLR 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.layers import matches, norm_kind, select_norm_layers
from adaptkit.core.optim import OptimizerSpec, build_optimizer, check_lr
from adaptkit.core.sam import SAM
from adaptkit.functional.entropy import softmax_entropy
from adaptkit.functional.filters import entropy_margin, reliable_mask
from adaptkit.methods._norm_affine import NormAffineMixin
from adaptkit.registry import register_method

#: The official top-layer rule (mr-eggplant/SAR ``sar.py: collect_params``) as one full-match regex over module
#: names: ResNet ``layer4`` (also ``backbone.layer4`` of segmentation nets), the 10th-12th blocks of a ViT-style
#: ``blocks`` sequence (ViT-B/16: blocks 9-11; only a ``blocks`` container that is not itself inside an indexed
#: stage, so ConvNeXt/Swin ``stages.2.blocks.9`` are kept), the final ``norm`` and anything under a ``...norm.``
#: container. Models with none of these names adapt every norm layer.
OFFICIAL_EXCLUDE = r"(.*\.)?layer4(\..*)?|([A-Za-z_][^.]*\.)*blocks\.(9|10|11)(\..*)?|norm|.*norm\..*"

_RESNET_LR, _VIT_LR = 2.5e-4, 1e-3


@register_method
class SAR(NormAffineMixin, TTAMethod):
    """Sharpness-aware, reliable entropy minimisation on norm-layer affine parameters, with model recovery.

    Per batch (``steps`` times): a forward gives per-sample entropies ``H``; the reliable set ``S = {H < E0}``
    (``E0 = 0.4 ln C``) gives ``loss1 = mean_S H``; its gradient moves the weights to ``w + rho g / ||g||``
    (:class:`~adaptkit.core.sam.SAM`, one global norm); a second forward there keeps the samples of ``S`` still
    below ``E0``, ``loss2`` = their mean entropy, and the gradient of ``loss2`` at the perturbed point is applied
    to the original weights by the base optimizer (SGD, momentum 0.9). A moving average
    ``e <- 0.9 e + 0.1 loss2`` (starting at the first value) watches for collapse: when ``e < reset_constant``
    the model *and* optimizer are reset to the source state (:meth:`reset`) and ``e`` is cleared. Predictions
    are the first forward's logits (before that step's update), as in the official code.

    BatchNorm layers normalise with batch statistics (``track_running_stats=False``; the running buffers are kept
    and never written) - all of them, also those in excluded top layers, as the official ``configure_model``
    does. Affine parameters adapt in every selected norm layer except the top layers (``exclude="auto"``:
    :data:`OFFICIAL_EXCLUDE`, the official rule: ResNet ``layer4``, ViT ``blocks.9-11`` and the final ``norm``);
    on a model without such names nothing is excluded. Models without BatchNorm (ResNet-GN, ViT, ConvNeXt) adapt
    their GroupNorm / LayerNorm affine parameters. Dense outputs (``(B, C, H, W)`` or a dict with ``"out"``)
    select and average per pixel.

    If no sample is reliable (``S`` empty, or none left after the second forward) nothing is updated: no step,
    optimizer state and ``e`` unchanged (the official code backpropagates a NaN mean there, which gives zero
    gradients and a momentum-only SGD step).

    Args:
        model: a classifier (logits ``(B, C)``) or dense predictor.
        lr: base-optimizer learning rate. Default ``1e-3``: the TTA benchmark's SGD-SAM setting for CIFAR-10/100-C
            (mariodoebler/test-time-adaptation). ImageNet (official): ``SAR.official_lr(batch_size)``: 2.5e-4 for
            ResNet-50 BN/GN at batch >= 32, ``2 * bs * 2.5e-4 / 64`` below; ViT-B/16 ``bs * 1e-3 / 64``.
        steps: SAM updates per batch (official: 1).
        episodic: reset before every batch (default ``False``: online with automatic recovery).
        optimizer: base optimizer: ``"sgd"`` (default, official), ``"adam"`` or a callable
            ``params -> torch.optim.Optimizer``; SAM wraps it.
        momentum: SGD momentum (official 0.9, no Nesterov).
        weight_decay: weight decay of the built-in base optimizers (official 0).
        rho: SAM neighbourhood radius (official 0.05).
        adaptive: ASAM's scale-invariant perturbation (official ``False``).
        e_margin: entropy threshold ``E0``; ``None`` (default) is ``0.4 * ln C`` with ``C`` the number of classes
            of the logits (official: ``0.4 * ln 1000`` on ImageNet).
        reset_constant: recovery threshold ``e_m`` on the moving average (official 0.2); ``None`` or ``0``
            disables recovery.
        ema_momentum: weight of the old value in the moving average (official 0.9).
        norm: ``"auto"`` (BatchNorm if the model has any, else LayerNorm + GroupNorm) or a list of kinds among
            ``"batch"``, ``"layer"``, ``"group"`` (the official code collects all three).
        include: restrict the adapted norm layers (full-match regex, or list of names / dotted suffixes).
        exclude: norm layers whose affine parameters stay frozen: ``"auto"`` (default, :data:`OFFICIAL_EXCLUDE`),
            ``None`` (nothing), a full-match regex or a list of names / dotted suffixes (it replaces the automatic
            rule; combine them with ``SAR.OFFICIAL_EXCLUDE + "|..."``).
        predict: ``"before"`` (official: the first forward of the last step) or ``"after"`` the update.

    Attributes:
        ema: the moving average ``e`` (``None`` until the first finite ``loss2``, and after a recovery).
        num_recoveries: automatic resets since wrapping or the last :meth:`reset`.
        last_selected: size of ``S`` in the last step (samples, or pixels for dense outputs).
        last_selected_second: samples of ``S`` kept after the second forward in the last step.
        adapted_layers: norm layers whose affine parameters adapt.
        excluded_layers: norm layers the exclusion rule froze.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.SAR(model, lr=1e-3) as sar:
        ...     preds = sar(torch.randn(8, 3, 32, 32)).argmax(1)
        ...     frozen = sar.excluded_layers[0]
        >>> preds.shape, frozen
        (torch.Size([8]), 'layer4.0.bn1')
    """

    name = "sar"
    uses_grad = True
    default_episodic = False
    OFFICIAL_EXCLUDE = OFFICIAL_EXCLUDE

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: OptimizerSpec = "sgd",
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        adaptive: bool = False,
        e_margin: float | None = None,
        reset_constant: float | None = 0.2,
        ema_momentum: float = 0.9,
        norm: str | Sequence[str] = "auto",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = "auto",
        predict: str = "before",
        check_inputs: bool = True,
    ) -> None:
        check_lr(lr, "SAR")
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
            raise ValueError(f"SAR: steps must be an integer >= 1, got {steps}")
        if not rho >= 0:
            raise ValueError(f"SAR: rho must be non-negative, got {rho}")
        if e_margin is not None and not e_margin > 0:
            raise ValueError(f"SAR: e_margin must be positive (or None for 0.4 * ln C), got {e_margin}")
        if reset_constant is not None and not reset_constant >= 0:
            raise ValueError(f"SAR: reset_constant must be >= 0 (or None to disable recovery), got {reset_constant}")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"SAR: ema_momentum must be in [0, 1), got {ema_momentum}")
        if predict not in ("before", "after"):
            raise ValueError(f"SAR: predict must be 'before' or 'after', got {predict!r}")
        self.lr, self.steps, self.momentum, self.weight_decay = float(lr), int(steps), momentum, weight_decay
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self.e_margin = None if e_margin is None else float(e_margin)
        self.reset_constant = None if reset_constant is None else float(reset_constant)
        self.ema_momentum = float(ema_momentum)
        self.predict_when = predict
        self._opt_spec = optimizer
        self._norm, self._include, self._exclude = norm, include, exclude
        self.ema: float | None = None
        self.num_recoveries = 0
        self.last_selected: int | None = None
        self.last_selected_second: int | None = None
        self.adapted_layers: list[str] = []
        self.excluded_layers: list[str] = []
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ selection
    @staticmethod
    def official_lr(batch_size: int, arch: str = "resnet") -> float:
        """The official ImageNet-C learning rule (mr-eggplant/SAR ``main.py``).

        ``arch="resnet"`` (ResNet-50 BN or GN): 2.5e-4 for ``batch_size >= 32``, else ``2 * batch_size * 2.5e-4 / 64``;
        ``arch="vit"`` (ViT-B/16): ``batch_size * 1e-3 / 64``.

        Example:
            >>> from adaptkit import SAR
            >>> SAR.official_lr(64), SAR.official_lr(1), SAR.official_lr(64, "vit")
            (0.00025, 7.8125e-06, 0.001)
        """
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"SAR.official_lr: batch_size must be a positive integer, got {batch_size}")
        if arch == "resnet":
            return _RESNET_LR if batch_size >= 32 else 2 * batch_size * _RESNET_LR / 64
        if arch == "vit":
            return batch_size * _VIT_LR / 64
        raise ValueError(f"SAR.official_lr: arch must be 'resnet' or 'vit', got {arch!r}")

    def _exclusion(self) -> str | Sequence[str] | None:
        return OFFICIAL_EXCLUDE if isinstance(self._exclude, str) and self._exclude == "auto" else self._exclude

    def select(self) -> dict[str, nn.Module]:
        everything = select_norm_layers(self.inner, self._kinds(), self._include, None, who="SAR")
        exclude = self._exclusion()
        frozen = {n for n in everything if exclude is not None and matches(n, exclude)}
        adapted = {n: m for n, m in everything.items() if n not in frozen and _has_affine(m)}
        if not adapted:
            why = (
                f"exclude={self._exclude!r} froze all {len(frozen)} of them (exclude=None adapts the top layers too)"
                if frozen
                else "they have no affine parameters (affine=False)"
            )
            raise ValueError(
                f"SAR: no norm-layer affine parameters left to adapt: {why}. Run adaptkit.list_layers(model) to "
                "inspect the model"
            )
        self.adapted_layers = list(adapted)
        self.excluded_layers = [n for n in everything if n in frozen and _has_affine(everything[n])]
        # every BatchNorm layer of the chosen kinds runs on batch statistics, excluded ones too (official)
        keep = set(adapted) | {n for n, m in everything.items() if norm_kind(m) == "batch"}
        return {n: m for n, m in self.inner.named_modules() if n in keep}

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = []
        for n in self.adapted_layers:
            m = self._targets[n]
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    params.append(p)
        return params

    def train_modules(self) -> list[str]:
        return [n for n, m in self._targets.items() if norm_kind(m) == "batch"]

    def configure(self) -> None:
        self.use_batch_statistics()  # batch statistics; buffers kept, never written
        self.optimizer = build_optimizer(
            self._opt_spec, self.trainable_parameters(), self.lr, self.momentum, self.weight_decay, "SAR"
        )
        self.sam = SAM(self.optimizer, rho=self.rho, adaptive=self.adaptive)

    # ------------------------------------------------------------------ adaptation
    def _margin(self, logits: torch.Tensor) -> float:
        if self.e_margin is not None:
            return self.e_margin
        classes = logits.shape[1]
        if classes < 2:
            raise ValueError(
                f"SAR: the model outputs {classes} class; the default threshold 0.4 * ln C needs C >= 2 "
                "(pass e_margin=...)"
            )
        return entropy_margin(classes, 0.4)

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        self.sam.zero_grad()
        out = self.model(x)
        logits = get_logits(out)
        if logits.dim() < 2:
            raise ValueError(
                f"SAR: expected logits with a class dimension ((B, C) or (B, C, H, W)), got shape "
                f"{tuple(logits.shape)}"
            )
        margin = self._margin(logits)
        entropy = softmax_entropy(logits, dim=1)
        mask1 = reliable_mask(entropy, margin)
        self.last_selected, self.last_selected_second = int(mask1.sum()), 0
        if self.last_selected == 0:  # nothing reliable: no NaN loss, no step
            return out
        entropy[mask1].mean().backward()
        stepped = False
        with self.sam.perturbed():  # w + rho * g / ||g||; always back to w on exit
            entropy2 = softmax_entropy(get_logits(self.model(x)), dim=1)[mask1]
            mask2 = reliable_mask(entropy2, margin)
            self.last_selected_second = int(mask2.sum())
            if self.last_selected_second > 0:
                loss2 = entropy2[mask2].mean()
                value = float(loss2.detach())
                if math.isfinite(value):
                    m = self.ema_momentum
                    self.ema = value if self.ema is None else m * self.ema + (1.0 - m) * value
                    loss2.backward()
                    stepped = True
        if stepped:
            self.sam.base_step()  # gradient at w + e(w), applied to w
        self.sam.zero_grad()
        if self.reset_constant is not None and self.ema is not None and self.ema < self.reset_constant:
            self._recover()
        return out

    def _recover(self) -> None:
        """Model recovery: back to the source weights, optimizer state cleared, ``e`` cleared (counters kept)."""
        recoveries, sel, sel2 = self.num_recoveries + 1, self.last_selected, self.last_selected_second
        self.reset()
        self.num_recoveries, self.last_selected, self.last_selected_second = recoveries, sel, sel2

    def predict(self, x: Any, last: Any) -> Any:
        if self.predict_when == "after":
            return self.model(x)
        return last

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        if hasattr(self, "sam"):  # the weights were just reset from the snapshot: forget, never write, a backup
            self.sam.clear(restore=False)
        self.ema = None
        self.num_recoveries = 0
        self.last_selected = None
        self.last_selected_second = None

    def method_state(self) -> dict[str, Any]:
        return {
            "ema": self.ema,
            "num_recoveries": self.num_recoveries,
            "last_selected": self.last_selected,
            "last_selected_second": self.last_selected_second,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        ema = state.get("ema")
        if ema is not None and not isinstance(ema, (float, int)):
            ema = float(ema)  # a 0-d tensor from another writer
        self.ema = None if ema is None else float(ema)
        self.num_recoveries = int(state.get("num_recoveries", 0))
        self.last_selected = state.get("last_selected")
        self.last_selected_second = state.get("last_selected_second")

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, rho={self.rho}, steps={self.steps}, e_margin={self.e_margin}, "
            f"reset_constant={self.reset_constant}, adapted_layers={len(self.adapted_layers)}, " + super().extra_repr()
        )


def _has_affine(m: nn.Module) -> bool:
    return getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None


__all__ = ["OFFICIAL_EXCLUDE", "SAR"]
