"""Shared machinery: the wrapper base class, snapshots, hooks, layer selection, BN statistics."""

from __future__ import annotations

from adaptkit.core.base import TTAMethod, get_logits
from adaptkit.core.hooks import FeatureTap, HookManager
from adaptkit.core.layers import LayerInfo, list_layers, resolve_layer, select_norm_layers, stage_names
from adaptkit.core.snapshot import Snapshot
from adaptkit.core.unwrap import strip_prefix, unwrap_model

__all__ = [
    "FeatureTap",
    "HookManager",
    "LayerInfo",
    "Snapshot",
    "TTAMethod",
    "get_logits",
    "list_layers",
    "resolve_layer",
    "select_norm_layers",
    "stage_names",
    "strip_prefix",
    "unwrap_model",
]
