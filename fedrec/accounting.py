"""DP-SGD's accounting, which both sides compute: the client to plan and enforce its budget,
the server to state every client's epsilon without any client reporting it. Every input is
public (the config, the planned rounds, delta), so both arrive at the same plan.

A client plans its noise once, for every DP-SGD step it expects over the whole run, so epsilon
composes across rounds; docs/privacy.md states the guarantee.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedrec.config import ConfigError, DpSgdConfig, DpSgdStepConfig

# Importing Opacus calls logging.basicConfig (opacus/utils/module_utils.py): the root logger
# gains a stderr handler, and every line of Flower's `flwr` logger, which propagates, is printed
# twice in both apps, once coloured and once as "11/30/2026 09:50:03:INFO:...". Both apps import
# this module, after or with Opacus' first import, so the handler is dropped here, and only it.
_OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
for _handler in list(logging.getLogger().handlers):
    if getattr(_handler.formatter, "_fmt", None) == _OPACUS_ROOT_FORMAT:
        logging.getLogger().removeHandler(_handler)


# -------------------------------------------------------------------------------- delta
def default_delta(units: int) -> float:
    """1 / n^1.1 for n protected units: below 1 / n, where (epsilon, 1/n)-DP allows publishing
    one unit's data outright. For small n it is still large (10 shops: 0.079); set
    privacy.delta where that matters."""
    return float(units) ** -1.1


def check_delta(delta: float, units: int, what: str) -> None:
    if units < 1:
        raise ConfigError(f"no {what} to protect: DP-SGD needs training examples")
    if delta >= 1.0 / units:
        raise ConfigError(
            f"privacy.delta={delta:.3g} is not below 1 / {units} {what}: a mechanism with delta "
            f">= 1 / n may publish one of the n units' data outright; set privacy.delta to at "
            f"most {default_delta(units):.3g} (1 / n^1.1), or null for that")


# -------------------------------------------------------------------------------- DP-SGD
@dataclass(frozen=True)
class DpSgdPlan:
    """The noise a client adds, fixed once for its whole participation. Every field follows
    from public values (the config, the planned rounds and delta the run states), so the
    server computes the same plan and no client needs to report it."""

    noise_multiplier: float
    sample_rate: float  # Poisson rate at which a step takes each unit (shopper or example)
    steps_per_round: int
    delta: float
    planned_rounds: int


def plan_dp_sgd(cfg: DpSgdConfig, step: DpSgdStepConfig, *, delta: float,
                planned_rounds: int) -> DpSgdPlan:
    """Noise for ``planned_rounds`` rounds of ``step.steps_per_round`` Poisson-sampled steps to
    spend exactly ``cfg.target_epsilon``."""
    if planned_rounds < 1:
        raise ConfigError(f"planned rounds={planned_rounds}: expected an integer >= 1")
    noise = _noise_multiplier(cfg.target_epsilon, delta, step.sample_rate,
                              planned_rounds * step.steps_per_round, cfg.accountant)
    return DpSgdPlan(noise, step.sample_rate, step.steps_per_round, delta, planned_rounds)


def dp_sgd_epsilon(plan: DpSgdPlan, rounds: int, accountant: str) -> float:
    """A client's epsilon after training ``rounds`` rounds of its plan."""
    if rounds <= 0:
        return 0.0
    return epsilon_of(accountant, [(plan.noise_multiplier, plan.sample_rate,
                                  rounds * plan.steps_per_round)], plan.delta)


def rounds_within(plan: DpSgdPlan, target_epsilon: float, accountant: str) -> int:
    """How many rounds of ``plan`` a client trains before its next would pass the target."""
    rounds = plan.planned_rounds
    while dp_sgd_epsilon(plan, rounds + 1, accountant) <= target_epsilon * (1 + 1e-6):
        rounds += 1
    while rounds > 0 and dp_sgd_epsilon(plan, rounds, accountant) > target_epsilon * (1 + 1e-6):
        rounds -= 1
    return rounds


@functools.lru_cache(maxsize=4096)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """Opacus' bisection, once per distinct input: the server and a simulation process plan
    for many clients, which share one plan."""
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                sample_rate=sample_rate, steps=steps, accountant=accountant,
                                **_orders(accountant))


# Integer Renyi orders for the RDP accountant. Opacus' default also has the fractional orders
# 1.1 ... 10.9, whose series made planning a small client's noise take 3 s (with integers, 0.06
# s). Any set of orders gives a valid bound; planning and reporting use the same set, so the
# plan spends exactly the target (a few percent more noise than the fractional orders need).
RDP_ORDERS = [*range(2, 64), 80, 96, 128, 192, 256]


def _orders(accountant: str) -> dict[str, list[int]]:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def epsilon_of(accountant_name: str, history: list[Step], delta: float) -> float:
    accountant = create_accountant(accountant_name)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta, **_orders(accountant_name)))


Step = tuple[float, float, int]  # Opacus accountant history: (noise multiplier, rate, steps)
