"""``RotationHead``: the 4-way rotation classifier of TTT (Sun et al. 2020; spec baselines.md section 9)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.functional.rotation import ROTATION_MODES, rotate_batch, rotation_loss, rotation_targets
from adaptkit.heads.base import AuxHead, as_feature_map

NORMS = ("batch", "group")


class RotationHead(AuxHead):
    """Predicts by how many multiples of 90 degrees the input image was rotated, from a layer's features.

    Architecture: ``conv3x3(C -> width)`` (no bias) + norm + ReLU, global average pool, ``Linear(width -> 4)``.
    Transformer tokens ``(B, N, C)`` and vectors ``(B, C)`` are viewed as ``(B, C, N, 1)`` / ``(B, C, 1, 1)`` maps
    (:func:`~adaptkit.heads.base.as_feature_map`); the pool makes the head independent of the spatial size.

    **Deviation from the paper.** TTT's self-supervised head is a separate copy of the next ResNet stage
    (``layer3`` + norm + pool + linear on a ResNet-26 whose shared encoder ends at ``layer2``). A generic library
    cannot copy "the next stage" of an arbitrary model, so adaptkit uses this small conv head; the head's capacity
    is lower, which mostly matters for joint training of the paper's Y-shaped network.

    Args:
        in_channels: channels ``C`` of the tapped layer.
        width: channels of the hidden conv; ``None`` = ``in_channels``.
        norm: ``"batch"`` (BatchNorm2d, the default) or ``"group"`` (GroupNorm with ``groups`` groups, the paper's
            preferred normalisation for batches of copies of one image).
        groups: GroupNorm groups (paper: 8); must divide ``width``.
        rotations: how :meth:`prepare` builds training batches: ``"all"`` (each image in its four rotations, the
            paper's training) or ``"random"``.

    Example:
        >>> import torch
        >>> from adaptkit.heads.rotation import RotationHead
        >>> head = RotationHead(16, width=8)
        >>> x_aux, labels = head.prepare(torch.rand(2, 3, 32, 32))
        >>> x_aux.shape, labels.tolist()
        (torch.Size([8, 3, 32, 32]), [0, 0, 1, 1, 2, 2, 3, 3])
        >>> head.train_loss([torch.randn(8, 16, 8, 8)], labels).shape
        torch.Size([])
    """

    def __init__(
        self,
        in_channels: int,
        width: int | None = None,
        norm: str = "batch",
        groups: int = 8,
        rotations: str = "all",
    ) -> None:
        super().__init__()
        width = int(width or in_channels)
        if norm not in NORMS:
            raise ValueError(f"RotationHead: norm must be one of {NORMS}, got {norm!r}")
        if rotations not in ROTATION_MODES:
            raise ValueError(f"RotationHead: rotations must be one of {ROTATION_MODES}, got {rotations!r}")
        if norm == "group" and width % groups:
            raise ValueError(f"RotationHead: norm='group' needs width ({width}) divisible by groups ({groups})")
        self._remember(
            in_channels=int(in_channels), width=width, norm=norm, groups=int(groups), rotations=rotations
        )  # fmt: skip
        self.rotations = rotations
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(groups, width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width, 4)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Rotation logits ``(B, 4)`` for one layer's features (maps, tokens or vectors)."""
        h = self.relu(self.norm(self.conv(as_feature_map(feats))))
        return self.fc(h.mean(dim=(2, 3)))

    def prepare(
        self, x: torch.Tensor, generator: torch.Generator | None = None, mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated batch and its labels (:func:`~adaptkit.functional.rotation.rotation_targets`).

        Args:
            x: ``(B, C, H, W)`` images (square when odd rotations occur).
            generator: randomness of ``mode="random"``.
            mode: ``"all"`` (``4B`` samples) or ``"random"`` (``B`` samples); ``None`` = the head's ``rotations``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RotationHead.prepare: expected a batch of images (B, C, H, W), got {shape}")
        b = x.shape[0]
        labels = rotation_targets(b, mode or self.rotations, generator, device=x.device)
        src = x if labels.shape[0] == b else x.repeat(labels.shape[0] // b, 1, 1, 1)
        return rotate_batch(src, labels), labels

    def train_loss(
        self, feats: Sequence[torch.Tensor], targets: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Cross-entropy of the predicted rotation of every sample (:func:`rotation_loss`)."""
        if targets is None:
            raise ValueError("RotationHead: the loss needs the rotation labels from RotationHead.prepare(x)")
        return rotation_loss(self(feats[0]), targets)
