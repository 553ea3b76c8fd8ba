"""TTT++: test-time training with contrastive learning and online feature alignment (Liu et al., NeurIPS 2021;
spec ../shared/reference/baselines.md section 10), in its online (per-batch) form."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn as nn

from adaptkit.core.alerts import AdaptationWarning
from adaptkit.heads.tttpp import SCALE_ENC, SCALE_PROJ, FeatureQueue, Queue, TTTPPHead
from adaptkit.methods._aux import AuxHeadMethod, LayerArg
from adaptkit.registry import register_method

#: learning rates from which TTTPlusPlus warns when the head was trained on a frozen backbone
FROZEN_LR_WARN = 5e-3


@register_method
class TTTPlusPlus(AuxHeadMethod):
    """Adapt the encoder (every parameter that runs before the tapped layer) with SimCLR's contrastive loss on
    two augmented views of the test batch plus the alignment of the test features' first and second moments to
    the stored source moments, at the pooled-feature and projection levels (Liu et al., *TTT++: When Does
    Self-Supervised Test-Time Training Fail or Thrive?*).

    Per batch ``x`` of ``B`` images, online by default (no reset between batches), ``steps`` iterations of:

    1. two SimCLR views of ``x`` (random resized crop, flip, colour jitter, grayscale; per sample);
    2. a forward of the ``2B`` views and one of the clean ``B`` images, each truncated at the tapped layer, with
       the encoder's BatchNorm layers in training form (batch statistics, running statistics refreshed:
       ``bn_mode="refresh"``, the released code's ``ext.train()``);
    3. ``loss = ssl_weight * NT-Xent(views) + sum over levels of scale * (CORAL / coral_src + 0.5 * mean_disc /
       mean_disc_src)``, the target moments taken over the clean batch's features plus a FIFO queue of the
       features of past batches (``queue_size`` rows in all, incl. the batch);
    4. one optimizer step on the encoder (head frozen in eval mode).

    Then the batch's (last-step) features enter the queue, and a full eval-mode forward gives the predictions.
    ``reset()`` clears the queue; ``episodic=True`` therefore aligns each batch on its own moments only.

    Args:
        model: the source classifier.
        layer: stage index or qualified name of the tapped layer, the end of the encoder (released: the ResNet-50
            encoder output, i.e. ``layer=4`` on a torchvision ResNet); default: the head's binding.
        head: a trained :class:`~adaptkit.heads.tttpp.TTTPPHead` with source moments (``TTTPlusPlus.train_head``
            or ``TTTPPHead.load``); frozen at test time.
        lr: learning rate (released CIFAR-10: 0.01; CIFAR-100: 1e-4).
        steps: iterations per batch (online form: 1).
        optimizer: ``"sgd"`` (released, momentum 0.9), ``"adam"`` or a callable ``params -> Optimizer``.
        momentum / weight_decay: for the built-in optimizers.
        queue_size: target sample size incl. the batch (released CIFAR-10 1536, CIFAR-100 2048); ``None`` = the
            head's ``queue_size`` (the size its source normalisers were measured at); ``0`` disables the queue.
        scale_enc / scale_proj: alignment weights of the pooled features and the projections (released CIFAR-10
            0.05 / 0.2; CIFAR-100 5.0 / 20.0).
        ssl_weight: weight of NT-Xent; ``None`` = ``temperature / 0.07`` (about 7.14), the constant factor of the
            released ``SupConLoss``, so ``lr`` and the scales mean what they mean there; 0 gives alignment only.
        bn_mode, episodic, truncate, seed, check_inputs: see :class:`~adaptkit.methods._aux.AuxHeadMethod`
            (``seed`` fixes the augmentations; re-seeded on reset).

    Example:
        >>> import torch, torchvision
        >>> from adaptkit.methods.tttpp import TTTPlusPlus
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.rand(8, 3, 32, 32) for _ in range(2)]
        >>> head = TTTPlusPlus.train_head(model, layer=2, loader=data, epochs=1, progress=False, proj_dim=16)
        >>> with TTTPlusPlus(model, layer=2, head=head, lr=1e-3) as m:
        ...     preds = m(torch.rand(8, 3, 32, 32)).argmax(1)
        >>> preds.shape
        torch.Size([8])
    """

    name = "ttt_pp"
    head_class = TTTPPHead
    default_episodic = False
    adapt_head = False

    defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "steps": 1, "optimizer": "sgd", "momentum": 0.9}

    def __init__(
        self,
        model: nn.Module,
        layer: LayerArg = None,
        head: TTTPPHead | None = None,
        *,
        queue_size: int | None = None,
        scale_enc: float = SCALE_ENC,
        scale_proj: float = SCALE_PROJ,
        ssl_weight: float | None = None,
        **kwargs: Any,
    ) -> None:
        who = f"adaptkit.{type(self).__name__}"
        if isinstance(head, TTTPPHead) and not head.has_source_moments:
            raise ValueError(
                f"{who}: the head has no source moments (TTT++ aligns test features to them); train it with "
                f"{who}.train_head(model, layer=..., loader=...), which stores them, or call head.fit_end(...)"
            )
        qs = (head.queue_size if isinstance(head, TTTPPHead) else 0) if queue_size is None else int(queue_size)
        if qs < 0 or scale_enc < 0 or scale_proj < 0 or (ssl_weight is not None and ssl_weight < 0):
            raise ValueError(
                f"{who}: need queue_size >= 0 and non-negative weights, got queue_size={queue_size}, "
                f"scale_enc={scale_enc}, scale_proj={scale_proj}, ssl_weight={ssl_weight}"
            )
        self.queue_size, self.scale_enc, self.scale_proj = qs, float(scale_enc), float(scale_proj)
        self.ssl_weight = None if ssl_weight is None else float(ssl_weight)
        self._queues = (FeatureQueue(qs), FeatureQueue(qs))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        lr = kwargs.get("lr")
        lr = self.defaults["lr"] if lr is None else lr
        frozen = isinstance(head, TTTPPHead) and (head.binding or {}).get("joint") is False
        # warned before wrapping, so a warnings-as-errors setup leaves the model as it was
        if frozen and isinstance(lr, (int, float)) and lr >= FROZEN_LR_WARN:
            warnings.warn(
                f"{who}: lr={lr:g} suits an encoder trained jointly with the contrastive head (released: 0.01), "
                "but this head was trained on a frozen backbone: such steps can wreck the classifier (built-in "
                "Fashion-MNIST benchmark: 42% at lr=0.01 vs 79% at lr=1e-4, BNAdapt 78%). Try lr=1e-4, or train "
                "the head with joint=True.",
                AdaptationWarning,
                stacklevel=2,
            )
        super().__init__(model, layer, head, **kwargs)

    # ------------------------------------------------------------------ adaptation
    def _queued(self, n: int) -> Queue:
        past = [q.recent(self.queue_size - n) for q in self._queues]
        return None if past[0] is None or past[1] is None else (past[0], past[1])

    def adapt_step(self, x: Any) -> Any:
        assert self.optimizer is not None
        head: TTTPPHead = self.head  # type: ignore[assignment]
        views, n = head.prepare(x, self._gen)
        f_views = self.features(views)[0]  # separate forwards: BN batch statistics of the views and of the
        f_clean = self.features(x)[0]  # clean batch stay apart, as in the released code
        loss = head.test_loss(
            [torch.cat([f_views, f_clean])], n, self._gen, queue=self._queued(n), ssl_weight=self.ssl_weight,
            scale_enc=self.scale_enc, scale_proj=self.scale_proj,
        )  # fmt: skip
        self.step(loss)
        with torch.no_grad():
            self._pending = head.embed(f_clean.detach())
        return None

    def predict(self, x: Any, last: Any) -> Any:
        if self._pending is not None:  # the batch enters the queue once, after its last step
            for q, rows in zip(self._queues, self._pending):
                q.push(rows)
            self._pending = None
        return super().predict(x, last)

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        super().reset_state()
        if hasattr(self, "_queues"):
            for q in self._queues:
                q.clear()
            self._pending = None

    def method_state(self) -> dict[str, Any]:
        state = super().method_state()
        for key, q in zip(("queue.enc", "queue.proj"), self._queues):
            rows = q.recent(len(q))
            if rows is not None:
                state[key] = rows.detach().clone()
        if self._gen is not None:
            state["rng"] = self._gen.get_state()  # the augmentations of the next batch
        return state

    def load_method_state(self, state: dict[str, Any]) -> None:
        super().load_method_state(state)
        dev = next((b.device for b in self.head.buffers()), torch.device("cpu"))
        for key, q in zip(("queue.enc", "queue.proj"), self._queues):
            q.clear()
            if key in state:
                q.push(state[key].to(dev))
        self._pending = None
        if self._gen is not None and "rng" in state:
            self._gen.set_state(state["rng"].cpu())

    def extra_repr(self) -> str:
        return f"queue_size={self.queue_size}, scales=({self.scale_enc}, {self.scale_proj}), " + super().extra_repr()
