"""Likelihoods against torch.distributions."""
import math

import torch
from torch.distributions import Bernoulli, Independent, Normal

from gpvae.likelihoods import make_likelihood


def test_gaussian_matches_torch_distributions():
    torch.manual_seed(0)
    x, out = torch.rand(4, 1, 5, 5), torch.randn(3, 4, 1, 5, 5)
    for sigma in (0.1, 0.7):
        lik = make_likelihood("gaussian", sigma)
        ref = Independent(Normal(out, sigma), 3).log_prob(x.expand_as(out))
        torch.testing.assert_close(lik.log_prob(x, out), ref, rtol=1e-5, atol=1e-3)


def test_learned_sigma_is_a_parameter_and_starts_at_sigma_x():
    lik = make_likelihood("gaussian-learned", 0.3)
    params = list(lik.parameters())
    assert len(params) == 1 and math.isclose(params[0].exp().item(), 0.3, rel_tol=1e-6)
    assert list(make_likelihood("gaussian", 0.3).parameters()) == []


def test_bernoulli_matches_torch_distributions_and_binarizes():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(4, 1, 5, 5))
    logits = torch.randn(2, 4, 1, 5, 5)
    lik = make_likelihood("bernoulli")
    ref = Independent(Bernoulli(logits=logits), 3).log_prob(x.expand_as(logits))
    torch.testing.assert_close(lik.log_prob(x, logits), ref)
    xb = lik.prepare(torch.full((10000,), 0.3), torch.Generator().manual_seed(0))
    assert set(xb.unique().tolist()) <= {0.0, 1.0} and abs(xb.mean().item() - 0.3) < 0.02
