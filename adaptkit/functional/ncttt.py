"""NC-TTT losses (seed ncttt-paper.txt, sections 3.2-3.3): noisy views, soft labels, discriminator and test loss.

Notation: ``z`` a projected feature vector of dimension ``D`` (one pixel's channel vector, or a whole flattened
map), ``sigma`` the in-distribution noise std, ``alpha > 1`` the ratio of the out-of-distribution std to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ncttt_log_odds(sq_norm: torch.Tensor, dim: int, sigma: float, alpha: float) -> torch.Tensor:
    """Log-odds that a noise vector of squared norm ``sq_norm`` came from ``N(0, sigma^2 I)`` rather than
    ``N(0, (alpha sigma)^2 I)`` in ``dim`` dimensions, with equal priors:

    ``u = D ln(alpha) - ||eps||^2 / (2 sigma^2) * (1 - 1/alpha^2)``.

    Example:
        >>> import math, torch
        >>> from adaptkit.functional import ncttt_log_odds
        >>> u = ncttt_log_odds(torch.tensor([0.0]), dim=4, sigma=0.1, alpha=2.0)
        >>> round(u.item(), 6) == round(4 * math.log(2.0), 6)
        True
    """
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1 (the OOD noise is wider), got {alpha}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return dim * math.log(alpha) - sq_norm / (2.0 * sigma * sigma) * (1.0 - 1.0 / (alpha * alpha))


def ncttt_noisy_views(
    z: torch.Tensor, sigma: float, alpha: float, per_pixel: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One in-distribution and one OOD noisy view of every sample, with their soft labels.

    Noise is independent per sample and per element (the paper's model; the official code's broadcasting
    bug, which gives every image the same noise vector, is not reproduced).

    Args:
        z: projected features ``(B, D, H, W)`` (or ``(B, D)``).
        sigma: in-distribution std; the OOD view uses ``alpha * sigma``.
        alpha: std ratio (``> 1``).
        per_pixel: ``True``: each pixel's ``D``-vector is one sample (labels ``(2B, 1, H, W)``); ``False``: the
            whole flattened map is one sample (labels ``(2B, 1)``).
        generator: for reproducible noise.

    Returns:
        ``(views, labels)``: views ``(2B, ...)`` (first ``B`` in-distribution), labels = P(in-distribution).
    """
    eps = torch.randn((2 * z.shape[0], *tuple(z.shape[1:])), generator=generator, device=z.device, dtype=z.dtype)
    scale = torch.ones(2 * z.shape[0], device=z.device, dtype=z.dtype)
    scale[: z.shape[0]] = sigma
    scale[z.shape[0] :] = sigma * alpha
    eps = eps * scale.view(-1, *([1] * (z.dim() - 1)))
    e = eps.to(torch.promote_types(eps.dtype, torch.float32))  # labels in >= float32: D ln(alpha) overflows fp16
    if per_pixel and z.dim() > 2:
        sq = e.pow(2).sum(dim=1, keepdim=True)
        dim = z.shape[1]
    else:
        sq = e.flatten(1).pow(2).sum(dim=1, keepdim=True)
        dim = int(z[0].numel())
    labels = torch.sigmoid(ncttt_log_odds(sq, dim, sigma, alpha))
    return torch.cat([z, z]) + eps, labels


def ncttt_discriminator_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the discriminator's in-distribution logits and the soft labels
    (mean over samples, and pixels for per-pixel heads).

    Example:
        >>> import torch
        >>> from adaptkit.functional import ncttt_discriminator_loss
        >>> round(ncttt_discriminator_loss(torch.zeros(2, 1), torch.tensor([[1.0], [0.0]])).item(), 4)  # ln 2
        0.6931
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def ncttt_test_loss(logits: torch.Tensor) -> torch.Tensor:
    """Test-time loss on the clean projection: ``-mean log P(in-distribution) = mean softplus(-logit)``.

    Example:
        >>> import torch
        >>> from adaptkit.functional import ncttt_test_loss
        >>> round(ncttt_test_loss(torch.zeros(3, 1)).item(), 4)
        0.6931
    """
    return F.softplus(-logits).mean()
