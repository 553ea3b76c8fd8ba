"""Pure functions behind the methods: losses and statistics, torch only."""

from __future__ import annotations

from adaptkit.functional.clust3 import (
    IMTerms,
    cluster_log_probs,
    information_maximization_loss,
    information_maximization_terms,
)
from adaptkit.functional.entropy import softmax_entropy
from adaptkit.functional.moments import (
    Moments,
    batch_moments,
    bn_prior_mix,
    gaussian_w2,
    merge_moments,
    prior_weight,
)
from adaptkit.functional.ncttt import (
    ncttt_discriminator_loss,
    ncttt_log_odds,
    ncttt_noisy_views,
    ncttt_test_loss,
)

__all__ = [
    "IMTerms",
    "Moments",
    "batch_moments",
    "bn_prior_mix",
    "cluster_log_probs",
    "gaussian_w2",
    "information_maximization_loss",
    "information_maximization_terms",
    "merge_moments",
    "ncttt_discriminator_loss",
    "ncttt_log_odds",
    "ncttt_noisy_views",
    "ncttt_test_loss",
    "prior_weight",
    "softmax_entropy",
]
