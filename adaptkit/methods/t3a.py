"""T3A: test-time template adjustment of the linear classifier (Iwasawa and Matsuo, NeurIPS 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.classifier import ClassifierMethod, replace_logits
from adaptkit.functional.t3a import (
    Supports,
    append_supports,
    prototypes,
    select_supports,
    t3a_logits,
    warmup_supports,
)
from adaptkit.registry import register_method


@register_method
class T3A(ClassifierMethod):
    """Replace the final linear classifier by class prototypes built from confident test features.

    The featurizer is frozen: every layer runs in eval mode (BatchNorm with its source statistics) and no gradient
    is taken. The supports start as the classifier's weight rows, each labelled by the classifier's argmax on it
    (with that prediction's entropy). For each batch, T3A first *adapts*: it appends every sample's penultimate
    feature ``z_i`` (the input of the final ``nn.Linear``) with the pseudo-label ``argmax p_i`` and the entropy
    ``H(p_i)`` of the model's own prediction, then keeps the ``filter_K`` lowest-entropy supports of each class.
    Then it *predicts the same batch*: ``logits = z @ prototypes.T`` with ``prototype_k = normalise(sum of
    normalise(s) over the class-k supports)`` (``z`` unnormalised, no bias). The supports persist across batches
    (online); :meth:`reset` returns to the warm-up supports. See :mod:`adaptkit.functional.t3a`.

    Args:
        model: a classifier whose logits ``(B, C)`` come from a final ``nn.Linear``; segmentation models raise a
            ``ValueError`` at wrap time.
        filter_K: supports kept per class, lowest entropy first (default 100; the official code picks it from
            {1, 5, 20, 50, 100, -1} on validation data). ``-1`` keeps every support: memory then grows with the
            stream (``d + 2`` numbers per test sample, never freed until :meth:`reset`).
        classifier: qualified name of the final ``nn.Linear`` (``None``: the last ``nn.Linear`` of the model,
            checked against the output's class count on every forward).
        include: the same as ``classifier`` (the layer keyword every adaptkit method takes).
        episodic: reset to the warm-up supports before every batch (default ``False``: online, as the official
            code within a domain).
        check_inputs: reject bad batches before the model runs.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.T3A(model, filter_K=20) as t3a:
        ...     logits = t3a(torch.randn(8, 3, 32, 32))
        ...     n = t3a.num_supports
        >>> logits.shape, n <= 10 + 8
        (torch.Size([8, 10]), True)
    """

    name = "t3a"
    uses_grad = False
    default_episodic = False

    def __init__(
        self,
        model: nn.Module,
        filter_K: int = 100,
        *,
        classifier: str | None = None,
        include: str | Sequence[str] | None = None,
        episodic: bool | None = None,
        check_inputs: bool = True,
    ) -> None:
        if isinstance(filter_K, bool) or int(filter_K) != filter_K or not (filter_K >= 1 or filter_K == -1):
            raise ValueError(f"T3A: filter_K must be a positive integer or -1 (keep all), got {filter_K!r}")
        self.filter_K = int(filter_K)
        self._warmup: Supports | None = None
        self._supports: Supports | None = None
        super().__init__(model, classifier=classifier, include=include, episodic=episodic, check_inputs=check_inputs)

    # ------------------------------------------------------------------ set-up and state
    def configure(self) -> None:
        super().configure()
        layer = self.classifier
        dtype = torch.promote_types(layer.weight.dtype, torch.float32)
        with torch.inference_mode(False), torch.no_grad():  # plain tensors even if wrapped in inference mode
            weight = layer.weight.detach().to(dtype).clone()
            bias = None if layer.bias is None else layer.bias.detach().to(dtype)
            self._warmup = warmup_supports(weight, bias)
        self._supports = self._warmup

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier's ``out_features``)."""
        return int(self.classifier.out_features)

    @property
    def supports(self) -> Supports:
        """The current support set (features, pseudo-labels, entropies); do not modify its tensors."""
        assert self._supports is not None
        return self._supports

    @property
    def num_supports(self) -> int:
        """Number of supports currently held (all classes)."""
        return int(self.supports.labels.numel())

    def prototypes(self) -> torch.Tensor:
        """The current ``(C, d)`` prototypes (what the next batch's logits would use before its own supports)."""
        return prototypes(self.supports, self.num_classes)

    def reset_state(self) -> None:
        self._supports = self._warmup  # never modified in place: the warm-up tensors themselves, bitwise

    def method_state(self) -> dict[str, Any]:
        s = self.supports
        return {"supports": s.feats.clone(), "labels": s.labels.clone(), "ent": s.ent.clone()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        w = self._warmup
        assert w is not None
        if set(state) != {"supports", "labels", "ent"}:
            raise KeyError(f"T3A: method state needs 'supports', 'labels' and 'ent', got {sorted(state)}")
        feats, labels, ent = state["supports"], state["labels"], state["ent"]
        m = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() == 1 else -1
        ok = (
            isinstance(feats, torch.Tensor)
            and isinstance(ent, torch.Tensor)
            and m >= 0
            and feats.shape == (m, w.feats.shape[1])
            and ent.shape == (m,)
            and not labels.is_floating_point()
            and (m == 0 or 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes)
        )
        if not ok:
            raise ValueError(
                f"{self._who()}: the saved supports do not fit this classifier ({self.num_classes} classes, "
                f"{w.feats.shape[1]} features); this state was saved for another model"
            )
        dev = w.feats.device
        self._supports = Supports(
            feats.detach().to(dev, w.feats.dtype).clone(),
            labels.detach().to(dev, torch.int64).clone(),
            ent.detach().to(dev, w.ent.dtype).clone(),
        )

    # ------------------------------------------------------------------ adapt, then predict the same batch
    def adapt_step(self, x: Any) -> Any:
        out, logits, z = self.forward_features(x)
        # the supports outlive the batch: plain tensors, not inference tensors (inference_mode(False) turns grad
        # mode on, hence the no_grad)
        with torch.inference_mode(False), torch.no_grad():
            zc, lc = z.clone(), logits.clone()
            dev = self.supports.feats.device
            supports = append_supports(self.supports, zc.to(dev), lc.to(dev))
            self._supports = select_supports(supports, self.filter_K, self.num_classes)
            new = t3a_logits(zc.to(dev), prototypes(self._supports, self.num_classes))
        return replace_logits(out, new.to(logits.device, logits.dtype))

    def predict(self, x: Any, last: Any) -> Any:
        return last

    def extra_repr(self) -> str:
        return f"filter_K={self.filter_K}, " + super().extra_repr()
