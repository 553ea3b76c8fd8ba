"""Pure functions behind the methods: losses and statistics, torch only.

AugMix lives in its own module (``adaptkit.functional.augmix``); it is not re-exported here, where the
function would hide the module of the same name.
"""

from __future__ import annotations

from adaptkit.functional.augment import cotta_augment, simclr_augment
from adaptkit.functional.clust3 import (
    IMTerms,
    cluster_log_probs,
    information_maximization_loss,
    information_maximization_terms,
)
from adaptkit.functional.entropy import marginal_entropy, softmax_entropy
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
from adaptkit.functional.ocl import (
    OCLTerms,
    class_directions,
    output_contrastive_loss,
    output_contrastive_terms,
    split_views,
    two_view_batch,
)
from adaptkit.functional.rotation import rotate_batch, rotation_loss, rotation_targets
from adaptkit.functional.tttpp import coral_loss, feature_moments, mean_discrepancy, nt_xent_loss

__all__ = [
    "IMTerms",
    "Moments",
    "OCLTerms",
    "batch_moments",
    "bn_prior_mix",
    "class_directions",
    "cluster_log_probs",
    "coral_loss",
    "cotta_augment",
    "feature_moments",
    "gaussian_w2",
    "information_maximization_loss",
    "information_maximization_terms",
    "marginal_entropy",
    "mean_discrepancy",
    "merge_moments",
    "ncttt_discriminator_loss",
    "ncttt_log_odds",
    "ncttt_noisy_views",
    "ncttt_test_loss",
    "nt_xent_loss",
    "output_contrastive_loss",
    "output_contrastive_terms",
    "prior_weight",
    "rotate_batch",
    "rotation_loss",
    "rotation_targets",
    "simclr_augment",
    "softmax_entropy",
    "split_views",
    "two_view_batch",
]
