"""Input checks with actionable messages."""

from __future__ import annotations

from typing import Any

import torch


def check(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(msg)`` unless ``cond``.

    Example:
        >>> from adaptkit.core.check import check
        >>> check(1 + 1 == 2, "arithmetic is broken")
    """
    if not cond:
        raise exc(msg)


def check_batch(x: Any, who: str, finite: bool = True) -> None:
    """Validate a test batch: a non-empty floating tensor with a batch dimension and finite values.

    Args:
        x: the input given to a wrapper's ``forward``.
        who: the wrapper's name, for the message.
        finite: also reject NaN / Inf (one sum over ``x``; the element-wise test only if that sum is not finite).
    """
    if not isinstance(x, torch.Tensor):
        return  # custom inputs (dicts, tuples) are the model's business
    check(x.dim() >= 1, f"{who}: expected a batch with a leading batch dimension, got a 0-d tensor")
    check(
        x.shape[0] > 0,
        f"{who}: got an empty batch (shape {tuple(x.shape)}); skip empty batches before calling the wrapper",
    )
    # A finite sum implies finite elements (NaN / Inf propagate through any summation order); only a
    # non-finite sum (bad values, or a float overflow of the sum) needs the element-wise test, which is
    # ~40x slower on CPU.
    if finite and x.is_floating_point() and not bool(torch.isfinite(x.detach().sum())):
        check(
            bool(torch.isfinite(x).all()),
            f"{who}: the input batch contains NaN or Inf values; clean or drop those samples first "
            "(e.g. torch.nan_to_num) - adapting on them would corrupt the model",
        )
