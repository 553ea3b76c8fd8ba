"""Pure functions behind the methods: losses and statistics, torch only."""

from __future__ import annotations

from adaptkit.functional.entropy import softmax_entropy
from adaptkit.functional.moments import (
    Moments,
    batch_moments,
    bn_prior_mix,
    gaussian_w2,
    merge_moments,
    prior_weight,
)

__all__ = [
    "Moments",
    "batch_moments",
    "bn_prior_mix",
    "gaussian_w2",
    "merge_moments",
    "prior_weight",
    "softmax_entropy",
]
