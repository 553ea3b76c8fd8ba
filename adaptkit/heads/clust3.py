"""``ClusT3Head``: ClusT3's per-layer clustering projectors (Hakim et al., ICCV 2023; spec ncttt.md section 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.functional.clust3 import information_maximization_loss
from adaptkit.heads.base import AuxHead, as_feature_map

PROJECTORS = ("linear", "large")


def _projector(channels: int, clusters: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Conv2d(channels, clusters, 1)
    hidden = max(1, channels // 2)
    return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, clusters, 1))


class ClusT3Head(AuxHead):
    """``num_projectors`` independent clustering projectors on each tapped layer; the loss is the sum over every
    projector of the information-maximisation loss of its cluster logits
    (:func:`~adaptkit.functional.clust3.information_maximization_loss`).

    Each projector maps a ``(B, C, H, W)`` feature map to ``(B, K, H, W)`` cluster logits; every location of
    every image is one point with a softmax over the ``K`` clusters. Transformer tokens ``(B, N, C)`` and
    vectors ``(B, C)`` are used through :func:`~adaptkit.heads.as_feature_map` (one point per token / image).
    The projectors work at any spatial size.

    Projector forms (official code; PyTorch's default conv initialisation, as there):

    * ``"linear"``: one 1x1 conv ``C->K`` with bias, no BatchNorm or activation (CIFAR code, ``M > 1``).
    * ``"large"``: 1x1 conv ``C->C/2``, ReLU, 1x1 conv ``C/2->K`` (VisDA code; CIFAR code with ``M = 1``).

    The loss is **summed**, not averaged, over layers and projectors, as in the official code (with the
    README's 2 x 15 projectors the auxiliary term weighs about 30 times one projector's loss); scale the
    learning rate accordingly when changing ``num_projectors``.

    Args:
        in_channels: channels ``C`` of each tapped layer (an int for one layer, a list for several).
        num_clusters: ``K`` (official default 10).
        num_projectors: ``M`` projectors per layer (official code default 5; the README's best CIFAR setup
            is 15 per layer on layer1 + layer2).
        projector: ``"linear"`` or ``"large"``.

    Example:
        >>> import torch
        >>> from adaptkit.heads.clust3 import ClusT3Head
        >>> head = ClusT3Head([16, 32], num_clusters=4, num_projectors=3)
        >>> loss = head.train_loss([torch.randn(4, 16, 8, 8), torch.randn(4, 32, 4, 4)])
        >>> loss.shape, len(head.projectors), len(head.projectors[0])
        (torch.Size([]), 2, 3)
    """

    num_layers = None

    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_clusters: int = 10,
        num_projectors: int = 5,
        projector: str = "linear",
    ) -> None:
        super().__init__()
        channels = [int(in_channels)] if isinstance(in_channels, int) else [int(c) for c in in_channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"ClusT3Head: in_channels must be positive channel counts, got {in_channels!r}")
        if int(num_clusters) < 2 or int(num_projectors) < 1:
            raise ValueError(
                f"ClusT3Head: need num_clusters >= 2 and num_projectors >= 1, got {num_clusters}, {num_projectors}"
            )
        if projector not in PROJECTORS:
            raise ValueError(f"ClusT3Head: projector must be one of {PROJECTORS}, got {projector!r}")
        self._remember(
            in_channels=channels, num_clusters=int(num_clusters), num_projectors=int(num_projectors),
            projector=projector,
        )  # fmt: skip
        self.in_channels, self.num_clusters, self.num_projectors = channels, int(num_clusters), int(num_projectors)
        self.projectors = nn.ModuleList(
            nn.ModuleList(_projector(c, self.num_clusters, projector) for _ in range(self.num_projectors))
            for c in channels
        )

    def _check(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(
                f"ClusT3Head: got features of {len(feats)} layer(s) but the head has projectors for "
                f"{len(self.in_channels)} (in_channels={self.in_channels})"
            )
        maps = [as_feature_map(f) for f in feats]
        for i, (m, c) in enumerate(zip(maps, self.in_channels)):
            if m.shape[1] != c:
                raise ValueError(
                    f"ClusT3Head: layer {i} gives {m.shape[1]} channels, its projectors take {c} "
                    f"(features of shape {tuple(feats[i].shape)})"
                )
        return maps

    def cluster_logits(self, feats: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Cluster logits ``(B, K, H, W)`` of every projector: one list per layer, ``num_projectors`` each."""
        return [[proj(m) for proj in projs] for m, projs in zip(self._check(feats), self.projectors)]

    def train_loss(
        self, feats: Sequence[torch.Tensor], targets: Any = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sum over layers and projectors of ``L_IM = H(Z|X) - H(Z)`` (also the test-time loss)."""
        losses = [information_maximization_loss(z) for zs in self.cluster_logits(feats) for z in zs]
        return torch.stack(losses).sum()

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_clusters={self.num_clusters}, "
            f"num_projectors={self.num_projectors}, {super().extra_repr()}"
        )
