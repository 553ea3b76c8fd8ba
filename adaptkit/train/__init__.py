"""Training helpers for auxiliary heads (frozen backbone or joint)."""

from __future__ import annotations

from adaptkit.train.trainer import split_batch, train_head

__all__ = ["split_batch", "train_head"]
