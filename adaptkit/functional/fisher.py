"""EATA's anti-forgetting regulariser (Niu et al., ICML 2022, Eqn. 8-9): a diagonal Fisher estimate from unlabeled
in-distribution data and the EWC-style penalty ``alpha * sum_k F_k (theta_k - theta0_k)^2``.

The estimate follows the official code (mr-eggplant/EATA ``main.py``): for each batch, cross-entropy of the
model's logits against its own argmax (mean over the batch), the gradient of that batch loss squared element-wise,
summed over batches and divided by the number of batches. It is an *empirical* Fisher of pseudo-labels: it needs
no labels. The gradients come from :func:`torch.autograd.grad`, so no ``.grad`` attribute is ever written, and
they are taken with gradients enabled even inside the caller's ``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"diagonal_fisher: cannot find logits in a model output of type {type(output).__name__}")


def _inputs_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):  # (x, y) or (x,) from a DataLoader: labels are never used
        batch = batch[0] if batch else None
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"diagonal_fisher: each batch must be a tensor x or a tuple (x, ...), got {type(batch).__name__}"
        )
    return batch


def diagonal_fisher(
    model: Callable[[torch.Tensor], Any],
    params: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    max_samples: int | None = 2000,
    logits: Callable[[Any], torch.Tensor] = _logits_of,
    skip_single: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """EATA's diagonal Fisher of ``params``: ``F = (1 / n_batches) * sum_batches grad(CE(z, argmax z))^2``.

    Args:
        model: called on each batch's inputs (moved to the device of the first parameter).
        params: ``{name: tensor}`` requiring gradients, the parameters the estimate is taken for.
        batches: an iterable of input tensors or ``(x, y, ...)`` tuples (``y`` ignored), e.g. a DataLoader.
        max_samples: stop after this many samples (the last batch is cut to fit, as the official code's
            fixed-size Fisher set does); ``None`` uses every batch.
        logits: maps the model output to logits, classes along dim 1 (``(B, C)`` or dense ``(B, C, H, W)``:
            then the cross-entropy is the mean over pixels).
        skip_single: skip batches of one sample (a training-mode BatchNorm cannot normalise them).

    Returns:
        ``({name: F}, n_samples)``: the estimate (detached, zeros where a parameter got no gradient) and the number
        of samples it used.

    Raises:
        ValueError: no usable sample.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.functional.fisher import diagonal_fisher
        >>> net = nn.Linear(3, 2)
        >>> fisher, n = diagonal_fisher(net, dict(net.named_parameters()), [torch.randn(4, 3)] * 3, max_samples=10)
        >>> n, sorted(fisher), bool((fisher["weight"] >= 0).all())
        (10, ['bias', 'weight'], True)
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"diagonal_fisher: max_samples must be >= 1 or None, got {max_samples}")
    names = list(params)
    tensors = [params[n] for n in names]
    if not tensors:
        raise ValueError("diagonal_fisher: no parameters given")
    device = tensors[0].device
    n_batches = n_samples = 0
    # also under the caller's no_grad / inference_mode: normal tensors, gradients on
    with torch.inference_mode(False), torch.enable_grad():
        total = [torch.zeros_like(t).detach() for t in tensors]
        for batch in batches:
            if max_samples is not None and n_samples >= max_samples:
                break
            x = _inputs_of(batch)
            if max_samples is not None:
                x = x[: max_samples - n_samples]
            if x.shape[0] == 0 or (skip_single and x.shape[0] == 1):
                continue
            x = x.to(device, non_blocking=True)
            if x.is_inference():  # made under torch.inference_mode(): a normal tensor for autograd
                x = x.clone()
            z = logits(model(x))
            loss = F.cross_entropy(z, z.detach().argmax(1))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g.detach() ** 2)
            n_batches += 1
            n_samples += x.shape[0]
        if n_batches == 0:
            raise ValueError("diagonal_fisher: the data gave no usable sample (empty, or only single-sample batches)")
        return {n: acc / n_batches for n, acc in zip(names, total)}, n_samples


def fisher_penalty(
    params: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    alpha: float,
) -> torch.Tensor:
    """EWC-style penalty ``alpha * sum_k sum(F_k * (theta_k - theta0_k)^2)`` over the names in ``fisher``.

    Args:
        params: ``{name: theta}`` (the live parameters; the penalty is differentiable in them).
        fisher: ``{name: F}``, same shapes.
        anchor: ``{name: theta0}``, the weights the penalty pulls back to (EATA: the weights at wrap time).
        alpha: EATA's ``fisher_alpha`` (beta in the paper).

    Example:
        >>> import torch
        >>> from adaptkit.functional.fisher import fisher_penalty
        >>> p = {"w": torch.tensor([1.0, 3.0])}
        >>> fisher_penalty(p, {"w": torch.tensor([2.0, 0.5])}, {"w": torch.tensor([0.0, 1.0])}, alpha=10.0).item()
        40.0
    """
    terms = [(fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher]
    if not terms:
        raise ValueError("fisher_penalty: empty Fisher dictionary")
    return alpha * torch.stack(terms).sum()
