"""Error metrics for corruption benchmarks: accuracy/error, mCE and relative mCE.

mCE (Hendrycks & Dietterich, 2019): per corruption, the errors summed over severities divided by a
baseline's summed errors for the same corruption, averaged over corruptions. On ImageNet-C the baseline is
AlexNet (its published errors below); elsewhere adaptkit uses the unadapted source model, so the source
scores 100 and a method's mCE is its error relative to no adaptation.
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
