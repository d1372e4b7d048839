"""Epsilon computed without the accountants fedrec reports with (Opacus' RDP, Flower's RDP): a
closed form, privacy loss distributions of explicit neighbouring pairs, and the PRV accountant.
The tests hold fedrec's reported epsilon to be at least these."""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from scipy.stats import norm


def gaussian_composition_epsilon(noise_over_sensitivity: list[float], delta: float) -> float:
    """Exact epsilon of composed Gaussian mechanisms without sampling (Balle and Wang, 2018):
    the composition is one Gaussian mechanism with mu = sqrt(sum 1 / sigma_i^2), whose
    delta(epsilon) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    mu = math.sqrt(sum(1.0 / s**2 for s in noise_over_sensitivity))

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


def poisson_gaussian_pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """The Poisson-subsampled Gaussian under add/remove, by privacy loss distributions."""
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise)),
                       steps)
    return accountant.get_epsilon(delta)


def poisson_gaussian_prv_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """The same mechanism by the PRV accountant (Gopi et al., 2021): its lower estimate."""
    from prv_accountant import Accountant

    accountant = Accountant(noise_multiplier=noise, sampling_probability=rate, delta=delta,
                            eps_error=0.01, max_compositions=steps)
    low, _, _ = accountant.compute_epsilon(num_compositions=steps)
    return float(low)


def replace_one_sampled_lower_bound(noise_multiplier: float, sample_size: int, population: int,
                                    rounds: int, delta: float) -> float:
    """A lower bound on DP-FedAvg's epsilon under replace-one with ``sample_size`` of
    ``population`` clients sampled without replacement: one neighbouring pair, in which the
    replaced client's clipped update is +C in one federation and -C in the other (the others
    cancel). Released: the sum plus N(0, (z C)^2), i.e. (1 - g) N(0) + g N(+-C) with g = m / n.
    Binning both distributions on one grid is post-processing, so the pair's epsilon, and the
    mechanism's, is at least the binned pair's."""
    sigma, share = noise_multiplier, sample_size / population
    edges = np.linspace(-1 - 12 * sigma, 1 + 12 * sigma, 40_001)
    edges[0], edges[-1] = -np.inf, np.inf

    def binned(shift: float) -> dict[int, float]:
        mass = ((1 - share) * np.diff(norm.cdf(edges, 0, sigma))
                + share * np.diff(norm.cdf(edges, shift, sigma)))
        return {i: math.log(m) for i, m in enumerate(mass) if m > 0}

    pair = privacy_loss_distribution.from_two_probability_mass_functions(
        binned(+1.0), binned(-1.0), pessimistic_estimate=False,
        value_discretization_interval=1e-3)
    return pair.self_compose(rounds).get_epsilon_for_delta(delta)
