"""Auxiliary heads for test-time training: a base with layer binding and save/load, one file per head."""

from __future__ import annotations

from adaptkit.heads.base import AuxHead, as_feature_map, batch_stats_mode, feature_shape
from adaptkit.heads.clust3 import ClusT3Head
from adaptkit.heads.ncttt import NCTTTHead
from adaptkit.heads.rotation import RotationHead
from adaptkit.heads.tttpp import FeatureQueue, TTTPPHead

__all__ = [
    "AuxHead",
    "ClusT3Head",
    "FeatureQueue",
    "NCTTTHead",
    "RotationHead",
    "TTTPPHead",
    "as_feature_map",
    "batch_stats_mode",
    "feature_shape",
]
