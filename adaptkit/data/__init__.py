"""Shifted data: synthetic corruptions (``adaptkit.data.corruptions``). Imports torch only.

Example:
    >>> import torch
    >>> from adaptkit.data import corrupt
    >>> corrupt(torch.rand(2, 1, 28, 28), "gaussian_noise", severity=5, generator=0).shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from adaptkit.data.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    Corruption,
    corrupt,
    get_corruption,
    list_corruptions,
)

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "Corruption", "corrupt", "get_corruption", "list_corruptions"]
