"""NC-TTT losses against independent references (Gaussian log-densities, explicit BCE)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from adaptkit.functional import ncttt_discriminator_loss, ncttt_log_odds, ncttt_noisy_views, ncttt_test_loss


def reference_log_odds(eps: torch.Tensor, sigma: float, alpha: float) -> torch.Tensor:
    """log N(eps; 0, sigma^2 I) - log N(eps; 0, (alpha sigma)^2 I), summed over the last dim, in float64."""
    eps = eps.double()
    zero, s = torch.tensor(0.0, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    return Normal(zero, s).log_prob(eps).sum(-1) - Normal(zero, alpha * s).log_prob(eps).sum(-1)


@pytest.mark.parametrize("dim,sigma,alpha", [(1, 0.1, 2.0), (16, 0.015, 0.1 / 0.015), (300, 1.0, 1.5)])
def test_log_odds_equals_gaussian_likelihood_ratio(dim: int, sigma: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(50, dim, generator=g, dtype=torch.float64) * sigma * torch.linspace(0.2, 2 * alpha, 50)[:, None]
    got = ncttt_log_odds(eps.pow(2).sum(-1), dim, sigma, alpha)
    torch.testing.assert_close(got, reference_log_odds(eps, sigma, alpha), rtol=1e-10, atol=1e-8)


def test_log_odds_threshold_and_expectations() -> None:
    """u = 0 exactly at ||eps||^2 = 2 D sigma^2 ln(alpha) / (1 - alpha^-2); E[u] has the spec's signs."""
    dim, sigma, alpha = 64, 0.015, 0.1 / 0.015
    r2 = 2 * dim * sigma**2 * math.log(alpha) / (1 - alpha**-2)
    assert abs(float(ncttt_log_odds(torch.tensor(r2, dtype=torch.float64), dim, sigma, alpha))) < 1e-9
    e_in = dim * (math.log(alpha) - (1 - alpha**-2) / 2)
    e_ood = dim * (math.log(alpha) - (alpha**2 - 1) / 2)
    assert float(ncttt_log_odds(torch.tensor(dim * sigma**2), dim, sigma, alpha)) == pytest.approx(e_in)
    assert float(ncttt_log_odds(torch.tensor(dim * (alpha * sigma) ** 2), dim, sigma, alpha)) == pytest.approx(e_ood)
    assert e_in > 0 > e_ood


@pytest.mark.parametrize("bad", [{"alpha": 1.0}, {"alpha": 0.5}, {"sigma": 0.0}])
def test_log_odds_rejects_bad_parameters(bad: dict[str, float]) -> None:
    kw = {"sigma": 0.1, "alpha": 2.0, **bad}
    with pytest.raises(ValueError):
        ncttt_log_odds(torch.zeros(1), 4, kw["sigma"], kw["alpha"])


@pytest.mark.parametrize("per_pixel", [True, False])
def test_noisy_views_labels_match_the_noise_drawn(per_pixel: bool) -> None:
    sigma, alpha = 0.05, 3.0
    z = torch.randn(6, 5, 4, 3, dtype=torch.float64)
    views, labels = ncttt_noisy_views(z, sigma, alpha, per_pixel, torch.Generator().manual_seed(1))
    assert views.shape == (12, 5, 4, 3)
    eps = views - torch.cat([z, z])
    if per_pixel:
        ref = reference_log_odds(eps.permute(0, 2, 3, 1), sigma, alpha).unsqueeze(1)  # (2B, 1, H, W)
    else:
        ref = reference_log_odds(eps.flatten(1), sigma, alpha).unsqueeze(1)  # (2B, 1)
    assert labels.shape == ref.shape
    torch.testing.assert_close(labels, torch.sigmoid(ref), rtol=1e-9, atol=1e-12)


def test_noisy_views_noise_scales_and_independence() -> None:
    """First half std sigma, second alpha*sigma; every sample and element gets its own draw (the official
    code's broadcasting bug gave every image the same noise vector)."""
    sigma, alpha, b = 0.1, 4.0, 64
    z = torch.zeros(b, 32, 8, 8)
    views, labels = ncttt_noisy_views(z, sigma, alpha, True, torch.Generator().manual_seed(2))
    assert views[:b].std().item() == pytest.approx(sigma, rel=0.03)
    assert views[b:].std().item() == pytest.approx(alpha * sigma, rel=0.03)
    assert not torch.allclose(views[0], views[1])
    corr = torch.corrcoef(views[:b].flatten(1)[:, :200])
    assert corr.fill_diagonal_(0).abs().max() < 0.4
    assert labels[:b].mean() > 0.99 and labels[b:].mean() < 0.01  # D = 32: essentially hard labels


def test_noisy_views_reproducible_with_generator() -> None:
    z = torch.randn(2, 3, 4, 4)
    a = ncttt_noisy_views(z, 0.1, 2.0, True, torch.Generator().manual_seed(5))
    b = ncttt_noisy_views(z, 0.1, 2.0, True, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_discriminator_loss_is_soft_label_bce() -> None:
    logits = torch.randn(7, 1, 3, 3, dtype=torch.float64)
    y = torch.rand(7, 1, 3, 3, dtype=torch.float64)
    p = 1 / (1 + torch.exp(-logits))
    ref = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(ncttt_discriminator_loss(logits, y), ref)


def test_test_loss_is_negative_log_in_probability_and_stable() -> None:
    logits = torch.randn(9, 1, dtype=torch.float64)
    ref = -torch.log(1 / (1 + torch.exp(-logits))).mean()
    torch.testing.assert_close(ncttt_test_loss(logits), ref)
    assert torch.isfinite(ncttt_test_loss(torch.tensor([[-1e4], [1e4]])))
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ncttt_test_loss, (x,))
