"""Evaluation metrics: classification accuracy/error, mCE and relative mCE, and segmentation mIoU.

mCE (Hendrycks & Dietterich, 2019): per corruption, the errors summed over severities divided by a
baseline's summed errors for the same corruption, averaged over corruptions. On ImageNet-C the baseline is
AlexNet (its published errors below); elsewhere adaptkit uses the unadapted source model, so the source
scores 100 and a method's mCE is its error relative to no adaptation.

Segmentation metrics are built on a pixel confusion matrix (:func:`confusion_matrix`, rows = target) that
adds up over batches; :func:`iou_per_class`, :func:`mean_iou` and :func:`pixel_accuracy` read it, and
:class:`SegmentationMeter` accumulates it batch by batch. They return fractions in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: AlexNet top-1 error (%) on ImageNet-C, averaged over severities 1-5 (Hendrycks & Dietterich 2019; the
#: values the ImageNet-C evaluation code normalises by).
ALEXNET_IMAGENET_C_ERR = {
    "gaussian_noise": 88.6428, "shot_noise": 89.4468, "impulse_noise": 92.2640, "defocus_blur": 81.9880,
    "glass_blur": 82.6268, "motion_blur": 78.5948, "zoom_blur": 79.8360, "snow": 86.6816, "frost": 82.6572,
    "fog": 81.9324, "brightness": 56.4592, "contrast": 85.3204, "elastic_transform": 64.6056,
    "pixelate": 71.7840, "jpeg_compression": 60.6500,
}  # fmt: skip
#: AlexNet clean ImageNet top-1 error (%), for relative mCE.
ALEXNET_CLEAN_ERR = 43.45


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in percent.

    Example:
        >>> import torch
        >>> from adaptkit.metrics import accuracy
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        50.0
    """
    if len(target) == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return float((logits.argmax(1) == target).float().mean()) * 100.0


def corruption_errors(
    err: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float] | float]
) -> dict[str, float]:
    """Corruption error per corruption: ``100 * sum_s err / sum_s baseline`` (errors in %).

    ``baseline`` values may be per-severity sequences (same length as ``err``) or a scalar average, which is
    used for every evaluated severity.

    Example:
        >>> from adaptkit.metrics import corruption_errors
        >>> corruption_errors({"fog": [20.0, 40.0]}, {"fog": [40.0, 80.0]})
        {'fog': 50.0}
    """
    out = {}
    for c, e in err.items():
        b = baseline[c]
        b_sum = float(b) * len(e) if isinstance(b, (int, float)) else float(sum(b))
        out[c] = 100.0 * float(sum(e)) / b_sum
    return out


def mce(err: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float] | float]) -> float:
    """Mean corruption error over the corruptions in ``err`` (see :func:`corruption_errors`)."""
    ce = corruption_errors(err, baseline)
    return sum(ce.values()) / len(ce)


def relative_mce(
    err: Mapping[str, Sequence[float]],
    clean_err: float,
    baseline: Mapping[str, Sequence[float] | float],
    baseline_clean_err: float,
) -> float:
    """Relative mCE: per corruption ``sum_s (err - clean) / sum_s (baseline - baseline_clean)``, averaged, in %.

    Example:
        >>> from adaptkit.metrics import relative_mce
        >>> relative_mce({"fog": [30.0]}, 10.0, {"fog": [50.0]}, 10.0)
        50.0
    """
    vals = []
    for c, e in err.items():
        b = baseline[c]
        bs = [float(b)] * len(e) if isinstance(b, (int, float)) else [float(v) for v in b]
        num = sum(v - clean_err for v in e)
        den = sum(v - baseline_clean_err for v in bs)
        vals.append(100.0 * num / den if den != 0 else float("nan"))
    return sum(vals) / len(vals)


# --- segmentation metrics -------------------------------------------------------------------------------------


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Pixel confusion matrix of a segmentation batch: ``cm[t, p]`` counts valid pixels of class ``t`` predicted ``p``.

    Rows are target classes, columns predicted classes. Pixels whose target equals ``ignore_index`` are left
    out (``None`` keeps every pixel); their prediction is never looked at. Matrices of several batches add up,
    so a dataset's matrix is the sum of its batches' matrices (see :class:`SegmentationMeter`). Computed with
    one ``bincount`` on the inputs' device, without gradients.

    Args:
        pred: Predicted labels, an integer tensor shaped like ``target`` (``(B, H, W)``), or logits / scores
            ``(B, C, H, W)`` with ``C == num_classes`` (argmax over dim 1). More generally ``(B, *)`` and
            ``(B, C, *)``.
        target: Integer labels ``(B, H, W)`` in ``[0, num_classes)``, or ``ignore_index``.
        num_classes: Number of classes ``C``.
        ignore_index: Target value marking pixels to skip (default 255, the usual "void" label), or ``None``.

    Returns:
        ``(C, C)`` int64 counts on the inputs' device.

    Raises:
        ValueError: If the shapes do not match (neither labels nor logits of ``target``'s shape), if labels are
            not integers, or if a valid pixel's target or predicted label lies outside ``[0, num_classes)``.

    Example:
        >>> import torch
        >>> from adaptkit.metrics import confusion_matrix
        >>> target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
        >>> pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
        >>> confusion_matrix(pred, target, num_classes=3)
        tensor([[1, 1, 0],
                [0, 2, 0],
                [0, 0, 1]])
    """
    num_classes = _check_num_classes(num_classes)
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
    pred = pred.detach()
    if pred.shape == target.shape:
        if pred.is_floating_point() or pred.is_complex():
            raise ValueError(
                f"pred has target's shape {tuple(target.shape)} but dtype {pred.dtype}: pass labels as an integer "
                f"tensor, or logits with a class dimension (B, {num_classes}, ...)"
            )
        labels = pred
    elif pred.dim() == target.dim() + 1 and pred.shape[:1] + pred.shape[2:] == target.shape:
        if pred.shape[1] != num_classes:
            raise ValueError(f"logits have {pred.shape[1]} classes in dim 1, expected num_classes={num_classes}")
        labels = pred.argmax(1)
    else:
        raise ValueError(
            f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}: expected labels of "
            f"the same shape or logits (B, {num_classes}, ...) around it"
        )
    target = target.detach().reshape(-1).long()
    labels = labels.reshape(-1).long()
    if ignore_index is not None:
        valid = target != ignore_index
        target, labels = target[valid], labels[valid]
    for name, t in (("target", target), ("pred", labels)):
        if t.numel() and bool(((t < 0) | (t >= num_classes)).any()):
            bad = t[(t < 0) | (t >= num_classes)].unique()[:5].tolist()
            raise ValueError(
                f"{name} has labels {bad} outside [0, {num_classes}) on valid pixels (ignore_index={ignore_index})"
            )
    counts = torch.bincount(target * num_classes + labels, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _check_cm(cm: torch.Tensor) -> torch.Tensor:
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square (C, C) confusion matrix, got shape {tuple(cm.shape)}")
    return cm.double()


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """Intersection over union per class, ``TP / (TP + FP + FN)``, from a confusion matrix (rows = target).

    A class absent from both target and prediction has an undefined IoU: NaN (so :func:`mean_iou` skips it).
    A class predicted but never present in the target scores 0.

    Args:
        cm: ``(C, C)`` confusion matrix from :func:`confusion_matrix` (or a sum of them).

    Returns:
        ``(C,)`` float64 IoUs in ``[0, 1]`` (or NaN), on ``cm``'s device.

    Example:
        >>> import torch
        >>> from adaptkit.metrics import iou_per_class
        >>> iou_per_class(torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]))
        tensor([0.3333, 0.6667, 0.5000,    nan], dtype=torch.float64)
    """
    cm = _check_cm(cm)
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes present in the target or the prediction (NaN-mean of :func:`iou_per_class`).

    NaN when no class is present at all (an empty matrix).

    Example:
        >>> import torch
        >>> from adaptkit.metrics import mean_iou
        >>> mean_iou(torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]))
        0.5
    """
    return float(iou_per_class(cm).nanmean())


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Fraction of valid pixels labelled correctly, ``trace(cm) / cm.sum()`` in ``[0, 1]``; NaN if no pixels.

    Example:
        >>> import torch
        >>> from adaptkit.metrics import pixel_accuracy
        >>> pixel_accuracy(torch.tensor([[3, 1], [0, 4]]))
        0.875
    """
    cm = _check_cm(cm)
    total = float(cm.sum())
    return float(cm.diagonal().sum()) / total if total > 0 else float("nan")


class SegmentationMeter:
    """Accumulates a confusion matrix over batches and reports mIoU, pixel accuracy and per-class IoU.

    Works like a torchmetrics metric: :meth:`update` per batch, :meth:`compute` at the end, :meth:`reset` to
    start over. Device-agnostic: each batch is counted on its own device and the running ``(C, C)`` int64
    matrix lives on the device of the first batch after a reset (later batches' counts are moved there).
    Accumulating batches gives exactly the matrix of one big batch.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Target value marking pixels to skip (default 255), or ``None``.

    Example:
        >>> import torch
        >>> from adaptkit.metrics import SegmentationMeter
        >>> meter = SegmentationMeter(num_classes=3)
        >>> meter.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 0, 1]]]))
        >>> meter.update(torch.tensor([[[1, 2, 0]]]), torch.tensor([[[1, 2, 2]]]))
        >>> out = meter.compute()
        >>> round(out["miou"], 4), round(out["pixel_acc"], 4)
        (0.5, 0.6667)
        >>> out["iou_per_class"]
        tensor([0.3333, 0.6667, 0.5000], dtype=torch.float64)
        >>> meter.reset(); meter.confmat.sum().item()
        0
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = ignore_index
        self._cm: torch.Tensor | None = None

    @property
    def confmat(self) -> torch.Tensor:
        """The accumulated ``(C, C)`` int64 confusion matrix (rows = target); zeros on CPU before any update."""
        if self._cm is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return self._cm

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (labels or logits, see :func:`confusion_matrix`)."""
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self._cm = cm if self._cm is None else self._cm + cm.to(self._cm.device)

    def compute(self) -> dict[str, float | torch.Tensor]:
        """``{"miou": float, "pixel_acc": float, "iou_per_class": (C,) float64 CPU tensor}``, fractions in [0, 1].

        Before any update (or when every pixel was ignored) the values are NaN.
        """
        cm = self.confmat
        return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm), "iou_per_class": iou_per_class(cm).cpu()}

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self._cm = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index})"
