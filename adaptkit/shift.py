"""Shift score: Wasserstein-2 distance between source and test BatchNorm statistics (Schneider et al., 2020).

The seed paper shows that this distance, averaged over layers, predicts the error of a model under shift
(Fig. 3). Each BN layer's source statistics are its running buffers; the test statistics are the channel
moments of the layer's input over all test samples given, measured in the unadapted (source) model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.bn import BNStatsOverride
from adaptkit.core.hooks import HookManager
from adaptkit.core.layers import select_norm_layers
from adaptkit.core.snapshot import Snapshot
from adaptkit.core.unwrap import unwrap_model
from adaptkit.functional.moments import Moments, gaussian_w2, merge_moments


@dataclass(frozen=True)
class ShiftScore:
    """Per-layer and aggregated Wasserstein-2 distances.

    Attributes:
        per_layer: ``{bn_layer_name: W2}`` in forward order.
        mean: the average over layers (the paper's aggregate).
        samples: test samples the statistics were estimated from.
    """

    per_layer: dict[str, float] = field(default_factory=dict)
    mean: float = 0.0
    samples: int = 0

    def __float__(self) -> float:
        return self.mean


def shift_from_moments(
    layers: Mapping[str, nn.Module], moments: Mapping[str, Moments], normalize: bool = True
) -> ShiftScore:
    """Build a :class:`ShiftScore` from per-layer test moments and the layers' running statistics."""
    per = {}
    samples = 0
    for name, m in layers.items():
        if name not in moments:
            continue
        mom = moments[name]
        var_t = torch.nan_to_num(mom.var.double(), nan=0.0)
        d = gaussian_w2(
            m.running_mean.double(),
            m.running_var.double(),
            mom.mean.double().to(m.running_mean.device),
            var_t.to(m.running_mean.device),
            normalize=normalize,
            eps=float(getattr(m, "eps", 1e-5)),
        )
        per[name] = float(d)
        samples = max(samples, mom.samples)
    if not per:
        raise ValueError("shift_score: no BatchNorm layer saw any data")
    return ShiftScore(per, sum(per.values()) / len(per), samples)


def _batches(data: Any) -> Iterable[Any]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def shift_score(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    max_batches: int | None = None,
    normalize: bool = True,
) -> ShiftScore:
    """Wasserstein-2 distance between a model's source BN statistics and those of ``data``.

    Per BN layer, with both distributions taken as diagonal Gaussians, ``W2^2 = sum_c (mu_s - mu_t)^2 +
    (sigma_s - sigma_t)^2``; with ``normalize=True`` (the paper's "normalized" distance) each channel is
    measured in units of the source standard deviation and channels are averaged. The aggregate is the mean
    over layers. The model is run in eval mode under ``no_grad`` and left exactly as it was.

    Args:
        model: a model with BatchNorm layers.
        data: a batch tensor, or an iterable of batches / ``(x, y)`` pairs (e.g. a DataLoader).
        include / exclude: restrict the layers (see ``select_norm_layers``).
        max_batches: stop after this many batches.
        normalize: per-channel normalisation by the source variance.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> score = adaptkit.shift_score(model, torch.randn(8, 3, 32, 32))
        >>> len(score.per_layer), score.mean > 0
        (20, True)
    """
    inner = unwrap_model(model)
    layers = select_norm_layers(inner, ["batch"], include, exclude, who="shift_score", require_running_stats=True)
    acc: dict[str, Moments] = {}

    def policy(name: str, module: nn.Module, mom: Moments) -> None:
        wide = Moments(mom.mean.double(), mom.var.double(), mom.count, mom.samples)
        acc[name] = merge_moments(acc.get(name), wide)
        return None

    snap = Snapshot(inner)
    hooks = HookManager()
    try:
        inner.eval()
        BNStatsOverride(layers, policy, hooks)
        with torch.no_grad():
            for i, x in enumerate(_batches(data)):
                if max_batches is not None and i >= max_batches:
                    break
                model(x)
    finally:
        hooks.remove_all()
        snap.restore_flags()
    return shift_from_moments(layers, acc, normalize=normalize)
