"""Segmentation metrics (``adaptkit.metrics``): confusion matrix, IoU, mIoU, pixel accuracy, SegmentationMeter."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptkit.metrics import (
    SegmentationMeter,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)

# A 2x3 image (batch of 1) worked out by hand:
#   target          pred
#   0 0 1           0 1 1
#   1 2 2           1 2 0
# cm[t, p]: t=0 -> p0 x1, p1 x1; t=1 -> p1 x2; t=2 -> p2 x1, p0 x1.
# class 0: TP 1, FP 1 (pixel (1,2)), FN 1 (pixel (0,1)) -> IoU 1/3
# class 1: TP 2, FP 1 (pixel (0,1)), FN 0              -> IoU 2/3
# class 2: TP 1, FP 0,               FN 1 (pixel (1,2)) -> IoU 1/2
# mIoU = (1/3 + 2/3 + 1/2) / 3 = 1/2; pixel accuracy = 4 / 6 = 2/3.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
CM = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def _close(a: torch.Tensor, b: list[float]) -> bool:
    """Elementwise equality up to float tolerance, NaN equal to NaN."""
    return torch.allclose(a, torch.tensor(b, dtype=a.dtype), equal_nan=True)


def _set_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None) -> list[float]:
    """Reference IoU per class with Python sets of pixel positions (independent of the confusion matrix)."""
    p, t = pred.reshape(-1).tolist(), target.reshape(-1).tolist()
    valid = [i for i in range(len(t)) if ignore_index is None or t[i] != ignore_index]
    out = []
    for c in range(num_classes):
        in_target = {i for i in valid if t[i] == c}
        in_pred = {i for i in valid if p[i] == c}
        union = in_target | in_pred
        out.append(len(in_target & in_pred) / len(union) if union else float("nan"))
    return out


def test_hand_computed_2x3() -> None:
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    assert cm.dtype == torch.int64 and cm.shape == (3, 3)
    assert torch.equal(cm, CM)
    assert _close(iou_per_class(cm), [1 / 3, 2 / 3, 1 / 2])
    assert mean_iou(cm) == pytest.approx(0.5)
    assert pixel_accuracy(cm) == pytest.approx(4 / 6)


def test_ignore_index_skips_pixels_whatever_their_prediction() -> None:
    target = torch.tensor([[[0, 255, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 7, 1], [2, 2, 0]]])  # 7 and 0 sit on ignored pixels: never looked at
    cm = confusion_matrix(pred, target, num_classes=3)
    assert torch.equal(cm, torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]]))
    assert int(cm.sum()) == 4
    # class 0: 1/1; class 1: TP 1, FN 1 -> 1/2; class 2: TP 1, FP 1 -> 1/2
    assert _close(iou_per_class(cm), [1.0, 0.5, 0.5])
    assert pixel_accuracy(cm) == pytest.approx(3 / 4)


def test_custom_and_no_ignore_index() -> None:
    target = torch.tensor([[[0, -1], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 0]]])
    assert int(confusion_matrix(pred, target, 2, ignore_index=-1).sum()) == 3
    # ignore_index may also be a real class (e.g. background 0)
    assert torch.equal(confusion_matrix(pred, target.clamp_min(0), 2, ignore_index=0), torch.tensor([[0, 0], [1, 1]]))
    # None keeps every pixel, so 255 is then an out-of-range label
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(PRED, torch.full_like(TARGET, 255), 3, ignore_index=None)
    assert torch.equal(confusion_matrix(PRED, TARGET, 3, ignore_index=None), CM)


def test_class_absent_from_both_is_nan_and_skipped() -> None:
    cm = confusion_matrix(PRED, TARGET, num_classes=4)  # class 3 never appears
    iou = iou_per_class(cm)
    assert _close(iou, [1 / 3, 2 / 3, 1 / 2, float("nan")])
    assert mean_iou(cm) == pytest.approx(0.5)  # nanmean over the three present classes, not /4


def test_class_only_predicted_scores_zero() -> None:
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 2], [1, 1]]])  # class 2 predicted once, never in the target
    iou = iou_per_class(confusion_matrix(pred, target, 3))
    assert _close(iou, [1 / 2, 1.0, 0.0])
    assert mean_iou(confusion_matrix(pred, target, 3)) == pytest.approx(0.5)


def test_empty_matrix_is_nan() -> None:
    cm = confusion_matrix(PRED, torch.full_like(TARGET, 255), 3)
    assert int(cm.sum()) == 0
    assert torch.isnan(iou_per_class(cm)).all()
    assert math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))


def test_logits_and_labels_agree() -> None:
    logits = torch.randn(4, 5, 8, 6, requires_grad=True)
    target = torch.randint(0, 5, (4, 8, 6))
    target[:, 0] = 255
    from_logits = confusion_matrix(logits, target, 5)
    assert torch.equal(from_logits, confusion_matrix(logits.argmax(1), target, 5))
    # one-hot scores of the hand case give the hand matrix
    one_hot = torch.nn.functional.one_hot(PRED, 3).permute(0, 3, 1, 2).float()
    assert torch.equal(confusion_matrix(one_hot, TARGET, 3), CM)


def test_accumulation_equals_one_big_batch() -> None:
    preds = [torch.randn(2, 4, 6, 5), torch.randint(0, 4, (3, 6, 5)), torch.randn(1, 4, 6, 5)]
    targets = [torch.randint(0, 4, (2, 6, 5)), torch.randint(0, 4, (3, 6, 5)), torch.randint(0, 4, (1, 6, 5))]
    targets[1][0, :2] = 255
    meter = SegmentationMeter(4)
    for p, t in zip(preds, targets):
        meter.update(p, t)
    labels = torch.cat([p.argmax(1) if p.is_floating_point() else p for p in preds])
    big = confusion_matrix(labels, torch.cat(targets), 4)
    assert torch.equal(meter.confmat, big)
    assert torch.equal(meter.confmat, sum(confusion_matrix(p, t, 4) for p, t in zip(preds, targets)))
    out = meter.compute()
    assert set(out) == {"miou", "pixel_acc", "iou_per_class"}
    assert out["miou"] == mean_iou(big) and out["pixel_acc"] == pixel_accuracy(big)
    assert torch.equal(out["iou_per_class"], iou_per_class(big))


def test_meter_reset_and_empty() -> None:
    meter = SegmentationMeter(3)
    out = meter.compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pixel_acc"]) and out["iou_per_class"].shape == (3,)
    meter.update(PRED, TARGET)
    assert meter.compute()["miou"] == pytest.approx(0.5)
    meter.reset()
    assert int(meter.confmat.sum()) == 0
    meter.update(PRED, TARGET)
    assert torch.equal(meter.confmat, CM)  # nothing left over from before the reset
    assert "num_classes=3" in repr(meter)


@pytest.mark.parametrize("ignore_index", [255, None])
def test_matches_set_based_iou(ignore_index: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    num_classes = 5
    pred = torch.randint(0, num_classes, (3, 7, 9), generator=g)
    target = torch.randint(0, num_classes - 1, (3, 7, 9), generator=g)  # class 4: only ever predicted
    if ignore_index is not None:
        target[torch.rand(target.shape, generator=g) < 0.2] = ignore_index
    iou = iou_per_class(confusion_matrix(pred, target, num_classes, ignore_index))
    assert _close(iou, _set_iou(pred, target, num_classes, ignore_index))


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(1, 4),
    data=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=24),
)
def test_property_matches_set_based_iou(num_classes: int, data: list[tuple[int, int]]) -> None:
    # labels >= num_classes become ignored targets / are replaced by class 0 in predictions
    target = torch.tensor([[t if t < num_classes else 255 for t, _ in data]])
    pred = torch.tensor([[p if p < num_classes else 0 for _, p in data]])
    cm = confusion_matrix(pred, target, num_classes)
    valid = int((target != 255).sum())
    assert int(cm.sum()) == valid
    assert _close(iou_per_class(cm), _set_iou(pred, target, num_classes, 255))
    acc = pixel_accuracy(cm)
    assert math.isnan(acc) if valid == 0 else acc == pytest.approx(int((pred == target).sum()) / valid)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(torch.zeros(1, 2, 4, dtype=torch.long), TARGET, 3)
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(torch.randn(1, 3, 3, 2), TARGET, 3)  # spatial dims swapped
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(torch.randn(2, 3, 2, 3), TARGET, 3)  # batch size differs
    with pytest.raises(ValueError, match="expected num_classes=4"):
        confusion_matrix(torch.randn(1, 3, 2, 3), TARGET, 4)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(PRED.float(), TARGET, 3)  # float labels are ambiguous
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(PRED, TARGET.float(), 3)
    with pytest.raises(ValueError, match="target has labels"):
        confusion_matrix(PRED, TARGET + 1, 3)
    with pytest.raises(ValueError, match="pred has labels"):
        confusion_matrix(PRED - 1, TARGET, 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(PRED, TARGET, 0)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMeter(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        iou_per_class(torch.zeros(2, 3, dtype=torch.long))
    meter = SegmentationMeter(3)
    with pytest.raises(ValueError, match="does not match"):
        meter.update(PRED[:, :1], TARGET)
    assert int(meter.confmat.sum()) == 0  # a rejected batch leaves the state untouched


@pytest.mark.gpu
def test_meter_on_cuda() -> None:
    dev = torch.device("cuda")
    meter = SegmentationMeter(3)
    meter.update(PRED.to(dev), TARGET.to(dev))
    assert meter.confmat.device.type == "cuda"
    meter.update(PRED, TARGET)  # a CPU batch is counted and moved to the state's device
    assert torch.equal(meter.confmat.cpu(), 2 * CM)
    out = meter.compute()
    assert out["miou"] == pytest.approx(0.5) and out["iou_per_class"].device.type == "cpu"
