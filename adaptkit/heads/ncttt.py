"""``NCTTTHead``: projector + noise discriminator of NC-TTT (seed ncttt-paper.txt, spec ncttt.md section 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.functional.ncttt import ncttt_discriminator_loss, ncttt_noisy_views, ncttt_test_loss
from adaptkit.heads.base import AuxHead, as_feature_map, batch_stats_mode


class NCTTTHead(AuxHead):
    """Linear projector on a layer's features and a small discriminator telling in-distribution noisy views
    (std ``sigma``) from out-of-distribution ones (std ``alpha * sigma``).

    Two discriminator forms, as in the paper:

    * ``mode="pixel"`` (VisDA form, the default: any input size): 1x1 conv ``C'->hidden``, BatchNorm2d,
      LeakyReLU(0.2), 1x1 conv ``hidden->1``; every pixel's ``C'``-vector is one sample (``D = C'``).
    * ``mode="flat"`` (CIFAR form): flatten the whole ``C' x H x W`` map, Linear ``D->hidden``, BatchNorm1d,
      LeakyReLU(0.2), Linear ``hidden->1`` without bias; needs ``spatial=(H, W)`` and that exact size at test
      time.

    The projector is a 1x1 conv ``C->C'`` with bias and Xavier-normal init, no activation.

    Args:
        in_channels: channels ``C`` of the tapped layer.
        embed_dim: projector width ``C'`` (official code: 1536). Keep it well above ``in_channels``: the
            projected features then leave directions where only the noise lives, which is what makes the
            discrimination learnable from a random start (with ``C' <= C`` the loss sits at ``ln 2``).
        hidden: discriminator width (official: 4).
        mode: ``"pixel"`` or ``"flat"``.
        spatial: ``(H, W)`` of the tapped features (``"flat"`` only).
        sigma: in-distribution noise std (official code: 0.015).
        alpha: OOD std ratio (official code: 0.1 / 0.015).

    Example:
        >>> import torch
        >>> from adaptkit import NCTTTHead
        >>> head = NCTTTHead(16, embed_dim=8)
        >>> loss = head.train_loss([torch.randn(4, 16, 8, 8)], None)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int = 1536,
        hidden: int = 4,
        mode: str = "pixel",
        spatial: Sequence[int] | None = None,
        sigma: float = 0.015,
        alpha: float = 0.1 / 0.015,
    ) -> None:
        super().__init__()
        if mode not in ("pixel", "flat"):
            raise ValueError(f"NCTTTHead: mode must be 'pixel' or 'flat', got {mode!r}")
        if mode == "flat" and (spatial is None or len(spatial) != 2):
            raise ValueError("NCTTTHead: mode='flat' needs spatial=(H, W), the tapped feature map's size")
        if alpha <= 1 or sigma <= 0:
            raise ValueError(f"NCTTTHead: need sigma > 0 and alpha > 1, got sigma={sigma}, alpha={alpha}")
        embed = int(embed_dim)
        sp = None if spatial is None else [int(s) for s in spatial]
        self._remember(
            in_channels=int(in_channels), embed_dim=embed, hidden=int(hidden), mode=mode, spatial=sp,
            sigma=float(sigma), alpha=float(alpha),
        )  # fmt: skip
        self.mode, self.sigma, self.alpha = mode, float(sigma), float(alpha)
        self.projector = nn.Conv2d(in_channels, embed, 1)
        nn.init.xavier_normal_(self.projector.weight)
        if mode == "pixel":
            self.discriminator: nn.Sequential = nn.Sequential(
                nn.Conv2d(embed, hidden, 1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1)
            )
        else:
            assert sp is not None
            self.discriminator = nn.Sequential(
                nn.Flatten(1),
                nn.Linear(embed * sp[0] * sp[1], hidden),
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(hidden, 1, bias=False),
            )
        for m in self.discriminator.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)

    def _needs_spatial(self) -> bool:
        return self.mode == "flat"

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Projected features ``z`` (``(B, C', H, W)``; tokens and vectors via :func:`as_feature_map`)."""
        return self.projector(as_feature_map(feats))

    def discriminate(self, z: torch.Tensor) -> torch.Tensor:
        """In-distribution logits: ``(B, 1, H, W)`` per pixel or ``(B, 1)`` flat."""
        return self.discriminator(z)

    def train_loss(
        self, feats: Sequence[torch.Tensor], targets: Any = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """BCE of the discriminator on one in-distribution and one OOD noisy view per sample vs the soft labels."""
        z = self.project(feats[0])
        views, labels = ncttt_noisy_views(z, self.sigma, self.alpha, self.mode == "pixel", generator)
        return ncttt_discriminator_loss(self.discriminate(views), labels)

    def test_loss(
        self, feats: Sequence[torch.Tensor], targets: Any = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``-mean log P(in-distribution)`` of the clean projection; the discriminator's BatchNorm uses the
        batch's statistics and writes nothing (the reference runs it in training mode)."""
        with batch_stats_mode(self.discriminator):
            return ncttt_test_loss(self.discriminate(self.project(feats[0])))
