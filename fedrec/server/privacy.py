"""The server's side of privacy: client-level DP-FedAvg (``privacy=central_dp``), Flower's
DifferentialPrivacy*Clipping wrappers around the configured strategy, planned by Flower's
RdpAccountant and accounted in a ledger of the same RDP (``CentralDp``), and the run's privacy
report for either mechanism.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server import strategy as legacy_strategy
from flwr.serverapp import Grid, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    compute_stdv,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig

from fedrec.accounting import (
    DpSgdPlan,
    check_delta,
    default_delta,
    dp_sgd_epsilon,
    rounds_within,
)
from fedrec.config import CentralDpConfig, ConfigError, DpSgdConfig, PrivacyConfig

log = logging.getLogger("fedrec.server")


# ----------------------------------------------------------------------------- DP-FedAvg
# Replacing one client's data moves a sum of updates clipped to C by up to 2C (one clipped
# update out, another in): the sensitivity the accountant's noise multiplier is relative to.
REPLACE_ONE_SENSITIVITY = 2.0


# One distinct release: (noise over the sensitivity, sample size, population).
Release = tuple[float, int, int]
# The orders of Flower's RdpAccountant, which plans the run (its backend's default).
CENTRAL_ORDERS = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


@dataclass
class CentralDp:
    """Client-level DP-FedAvg over ``population`` clients, ``sample_size`` of them a round.

    Flower samples a fixed number of clients without replacement, and the wrappers add noise
    of standard deviation ``noise_multiplier x C / sample_size`` to the mean of the clipped
    updates. Under replace-one the mean of k replies moves by up to 2C / k, so a round with k
    replies is a Gaussian mechanism whose noise over the sensitivity is
    ``noise_multiplier x k / (2 x sample_size)``, sampled without replacement: the RDP of
    dp_accounting, the library behind Flower's RdpAccountant, composes exactly that. Every
    round's mechanism is known before the run, so the number of rounds that fit in
    ``max_epsilon`` is too: the run is cut to it.

    The ledger counts each distinct release, and each one's RDP curve is computed once: RDP
    adds up, so epsilon after any ledger is a sum and a conversion. Composing into an
    accountant instead computed the curve again on every release and every budget check,
    0.27 s each on Beauty (sampling 1,118 of 22,363), about 1 s a round.
    """

    cfg: CentralDpConfig
    population: int
    sample_size: int
    noise_multiplier: float  # as Flower's wrappers take it: noise stddev over C
    delta: float
    rounds: int  # rounds the budget allows, at most the num_rounds asked for
    ledger: Counter[Release] = field(default_factory=Counter)
    _curves: dict[Release, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def compose_round(self, replies: int | None = None) -> None:
        """A round released a noised mean of ``replies`` clipped updates (all sampled when
        None); a round with no reply released nothing."""
        replies = self.sample_size if replies is None else replies
        if replies > 0:
            self.ledger[self._release(replies)] += 1

    def epsilon(self) -> float:
        return self._epsilon(self.ledger) if self.ledger else 0.0

    def next_round_fits(self) -> bool:
        """Whether one more full round keeps epsilon within max_epsilon."""
        return self.release_fits(self.sample_size)

    def release_fits(self, replies: int) -> bool:
        """Whether releasing the noised mean of ``replies`` updates keeps epsilon within
        max_epsilon (fewer replies than sampled cost more than a planned round)."""
        trial = self.ledger + Counter([self._release(replies)])
        return self._epsilon(trial) <= self.cfg.max_epsilon * (1 + 1e-9)

    def state(self) -> dict[str, object]:
        """The ledger, for a checkpoint: each distinct release and how often it happened."""
        return {"releases": [{"noise_multiplier": noise, "sample_size": sample_size,
                              "population_size": population, "count": count}
                             for (noise, sample_size, population), count in self.ledger.items()]}

    def load(self, state: dict[str, object]) -> None:
        """A checkpoint's ledger; one written by Flower's RdpAccountant (before 2026-12-02)
        lists the same releases under ``compositions``."""
        entries = state.get("releases")
        if entries is None:  # Flower's RdpAccountant.state_dict()
            entries = [{**entry["event"], "count": entry["count"]}  # type: ignore[index]
                       for entry in state["compositions"]]  # type: ignore[union-attr]
        ledger: Counter[Release] = Counter()
        for entry in entries:  # type: ignore[union-attr]
            if entry["population_size"] != self.population:
                raise ConfigError(f"resume: the checkpoint's releases are over a population of "
                                  f"{entry['population_size']} clients, this run's over "
                                  f"{self.population}")
            ledger[(float(entry["noise_multiplier"]), int(entry["sample_size"]),
                    int(entry["population_size"]))] += int(entry["count"])
        self.ledger = ledger

    def _release(self, replies: int) -> Release:
        return (accounted_noise(self.noise_multiplier) * replies / self.sample_size,
                self.sample_size, self.population)

    def _epsilon(self, ledger: Counter[Release]) -> float:
        for release in ledger:
            if release not in self._curves:
                self._curves[release] = _rdp_curve(*release)
        total = sum(count * self._curves[release] for release, count in ledger.items())
        epsilon, _ = rdp_privacy_accountant.compute_epsilon(CENTRAL_ORDERS, total, self.delta)
        return float(epsilon)


def accounted_noise(noise_multiplier: float) -> float:
    """Flower's noise multiplier (stddev over C) as the accountant takes it: over the
    replace-one sensitivity, 2C."""
    return noise_multiplier / REPLACE_ONE_SENSITIVITY


def _epsilon_after(noise: float, rounds: int, population: int, sample_size: int,
                   delta: float) -> float:
    """Epsilon after ``rounds`` full rounds at Flower's ``noise`` multiplier."""
    accountant = _rdp_accountant(population, delta)
    accountant.compose(GaussianPrivacyEvent(accounted_noise(noise), sample_size, population),
                       rounds)
    return accountant.get_epsilon(delta)


def _rdp_accountant(population: int, delta: float) -> RdpAccountant:
    return RdpAccountant(AccountingConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=NeighboringRelation.REPLACE_ONE,
        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))


def _rdp_curve(noise: float, sample_size: int, population: int) -> np.ndarray:
    """One release's RDP at CENTRAL_ORDERS, as Flower's RdpAccountant composes it."""
    accountant = rdp_privacy_accountant.RdpAccountant(
        CENTRAL_ORDERS, dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_accounting.GaussianDpEvent(noise)))
    return accountant.rdp


def least_noise(epsilon_of: Callable[[float], float], max_epsilon: float, *,
                tolerance: float) -> float | None:
    """The least noise multiplier, to ``tolerance`` relative, at which ``epsilon_of`` is at
    most ``max_epsilon`` (epsilon falls as the noise grows): doubling, then bisection. None
    when even a multiplier of 10^6 does not fit."""
    low, high = 0.0, 1.0
    while epsilon_of(high) > max_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            return None
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (low, middle) if epsilon_of(middle) <= max_epsilon else (middle, high)
    return high


def plan_central_dp(cfg: CentralDpConfig, *, population: int, sample_size: int,
                    num_rounds: int) -> CentralDp:
    if cfg.delta is None:
        delta = default_delta(population)
    else:
        delta = cfg.delta
        check_delta(delta, population, "clients")
    noise = cfg.noise_multiplier
    if noise is None:  # the least noise with which all num_rounds fit in max_epsilon
        noise = least_noise(
            lambda z: _epsilon_after(z, num_rounds, population, sample_size, delta),
            cfg.max_epsilon, tolerance=1e-2)
        if noise is None:
            raise ConfigError(f"privacy.max_epsilon={cfg.max_epsilon} cannot be met in "
                              f"{num_rounds} rounds of {sample_size} of {population} clients")
    def fits(rounds: int) -> bool:
        return _epsilon_after(noise, rounds, population, sample_size, delta) <= cfg.max_epsilon

    rounds = num_rounds
    if not fits(num_rounds):  # epsilon grows with the rounds: bisect for the last that fits
        low, high = 0, num_rounds  # fits(low) (vacuously for 0), not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        rounds = low
    if rounds == 0:
        raise ConfigError(f"privacy.noise_multiplier={noise} spends more than privacy.max_epsilon"
                         f"={cfg.max_epsilon} in a single round: raise the noise multiplier")
    if cfg.clipping == "adaptive":
        # Adaptive clipping spends part of the noise on the count of clipped updates; the
        # update noise left is (z^-2 - (2 s)^-2)^-1/2, which needs s > z / 2.
        count_stddev = cfg.clipped_count_stddev or sample_size / 20
        if noise >= 2 * count_stddev:
            raise ConfigError(
                f"privacy.clipped_count_stddev={cfg.clipped_count_stddev} (null means "
                f"{sample_size} sampled clients / 20 = {sample_size / 20}) is too small for "
                f"noise multiplier {noise:.4f}: expected a value > {noise / 2:.4f}")
    return CentralDp(cfg, population, sample_size, noise, delta, rounds)


class _Wrapper(Strategy):
    """A strategy around another, passing everything on unless a subclass says otherwise."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class BudgetGuard(_Wrapper):
    """The DP-FedAvg strategy, refusing a release that would pass max_epsilon: a round whose
    replies are fewer than sampled (clients timed out) releases nothing when its real cost
    does not fit. Everything else is the wrapped strategy's."""

    def __init__(self, strategy: Strategy, central: CentralDp) -> None:
        super().__init__(strategy)
        self.central = central

    def __getattr__(self, name: str) -> object:  # clipping_norm and the like, for the report
        return getattr(self.__dict__["strategy"], name)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = clients_in(r.content for r in replies if not r.has_error())
        if answered and not self.central.release_fits(answered):
            log.warning("round %d: %d of %d sampled clients replied; releasing their mean would "
                        "take epsilon past privacy.max_epsilon=%s, so the round releases "
                        "nothing", server_round, answered, self.central.sample_size,
                        self.central.cfg.max_epsilon)
            return None, None
        return self.strategy.aggregate_train(server_round, replies)


def clients_in(records: Iterable[RecordDict]) -> int:
    """The clients whose updates a round's replies hold: a pool node's reply stands for the
    shoppers it trained (its unit-weight), any other reply for one client."""
    weights = (next((m["unit-weight"] for m in r.metric_records.values() if "unit-weight" in m),
                    1) for r in records)
    return sum(int(w) for w in weights)  # type: ignore[arg-type]


class PoolNoise(_Wrapper):
    """DP-FedAvg's server side on a pool of virtual shoppers (user-level DP). Each node clips
    every shopper's update to C itself, as the shopper's device would
    (``fedrec.client.app.clipped_update``), and replies with their mean and count; the weighted
    mean of the replies is the mean over the cohort's clipped updates, to which this adds
    Gaussian noise of standard deviation ``noise_multiplier x C / cohort`` once: what Flower's
    client-side fixed-clipping wrapper adds to the mean of the cohort's own replies, with
    Flower's functions. That wrapper would count the nodes' replies, not the shoppers, as the
    sampled clients."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 cohort: int) -> None:
        super().__init__(strategy)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.cohort = cohort

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # As Flower's wrapper does: the node's fixedclipping_mod reads it (and leaves the mean
        # of updates its node clipped to its own norm unchanged).
        config[KEY_CLIPPING_NORM] = self.clipping_norm
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        noised = arrays.to_numpy_ndarrays()
        add_gaussian_noise_inplace(noised, compute_stdv(self.noise_multiplier,
                                                        self.clipping_norm, self.cohort))
        return ArrayRecord(dict(zip(arrays.keys(), (Array(np.asarray(a)) for a in noised),
                                    strict=True))), metrics


def wrap_strategy(strategy: Strategy, central: CentralDp, *, pooled: bool = False) -> Strategy:
    """The configured strategy inside Flower's DP wrapper for the configured side and clipping
    (``pooled``, a pool of virtual shoppers: inside ``PoolNoise``). Fedrec does the accounting
    (``CentralDp``), so the wrapper gets no accountant."""
    cfg = central.cfg
    if pooled:  # the config refuses a pool with server-side or adaptive clipping
        return BudgetGuard(PoolNoise(strategy, central.noise_multiplier, cfg.clipping_norm,
                                     central.sample_size), central)
    if cfg.clipping == "fixed":
        cls = (DifferentialPrivacyServerSideFixedClipping if cfg.side == "server"
               else DifferentialPrivacyClientSideFixedClipping)
        return BudgetGuard(cls(strategy, central.noise_multiplier, cfg.clipping_norm,
                               central.sample_size), central)
    cls = (DifferentialPrivacyServerSideAdaptiveClipping if cfg.side == "server"
           else DifferentialPrivacyClientSideAdaptiveClipping)
    return BudgetGuard(cls(strategy, central.noise_multiplier, central.sample_size,
                           initial_clipping_norm=cfg.clipping_norm,
                           target_clipped_quantile=cfg.target_clipped_quantile,
                           clip_norm_lr=cfg.clip_norm_lr,
                           clipped_count_stddev=cfg.clipped_count_stddev), central)


def wrap_legacy_strategy(strategy: legacy_strategy.Strategy,
                         central: CentralDp) -> legacy_strategy.Strategy:
    """Distributed DP for secagg=on: each client clips its own update (Flower's legacy
    fixedclipping wrapper sends the norm), SecAgg+ reveals only the sum, and the server adds the
    noise to it. Server-side and adaptive clipping are refused with secagg when the config is
    composed. Flower's wrapper releases nothing in a round with an error reply; a client that
    times out in a SecAgg+ stage is left out without an error, so a release of fewer updates
    than sampled is checked against the budget here (LegacyBudgetGuard)."""
    cfg = central.cfg
    if cfg.side != "client" or cfg.clipping != "fixed":
        raise ConfigError(f"privacy.side={cfg.side} privacy.clipping={cfg.clipping} cannot run "
                          "with secagg=on: use privacy.side=client privacy.clipping=fixed")
    return LegacyBudgetGuard(legacy_strategy.DifferentialPrivacyClientSideFixedClipping(
        strategy, central.noise_multiplier, cfg.clipping_norm, central.sample_size), central)


class LegacyBudgetGuard(legacy_strategy.Strategy):
    """BudgetGuard for Flower's legacy strategies (SecAgg+'s workflow)."""

    def __init__(self, strategy: legacy_strategy.Strategy, central: CentralDp) -> None:
        self.strategy = strategy
        self.central = central

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        if results and not self.central.release_fits(len(results)):
            log.warning("round %d: %d of %d sampled clients took part; releasing their sum would "
                        "take epsilon past privacy.max_epsilon=%s, so the round releases "
                        "nothing", server_round, len(results), self.central.sample_size,
                        self.central.cfg.max_epsilon)
            return None, {}
        return self.strategy.aggregate_fit(server_round, results, failures)

    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)


# -------------------------------------------------------------------------------- report
class PrivacyReport:
    """The run's privacy as the server states it, from what it knows itself: no client reports
    its epsilon (a reply carrying it would say how much data the client holds).

    dp_sgd: every client's plan follows from public values, so the server holds the same plan;
    a client's epsilon depends only on how many rounds it trained, which is at most the number
    of rounds the server asked it to (``requested``) and at most what its plan allows. The run's
    epsilon is the largest over clients. central_dp: the server's own accountant, composed
    with each round's real number of replies. ``secagg``: the SecAgg+ parameters, or None.
    """

    def __init__(self, cfg: PrivacyConfig, *, central: CentralDp | None = None,
                 dp_sgd: DpSgdPlan | None = None, strategy: Strategy | None = None,
                 secagg: dict[str, object] | None = None, client_unit: str = "client") -> None:
        self.cfg = cfg
        self.client_unit = client_unit  # what DP-FedAvg protects: a shopper, or a client
        self.central = central
        self.dp_sgd = dp_sgd
        self.strategy = strategy
        self.secagg = secagg
        # Train rounds each client was asked to join: a node, or a pool's shopper.
        self.requests: dict[int | tuple[str, int], int] = {}
        self.exhausted: set[int] = set()  # nodes that declined a round for their budget
        self._asked_past_budget = 0  # clients of the last round asked past their plan
        self._dp_sgd_rounds = (None if dp_sgd is None else rounds_within(
            dp_sgd, cfg.target_epsilon, cfg.accountant))  # type: ignore[attr-defined]

    def resume(self, state: dict[str, object] | None) -> None:
        """A resumed run: DP-FedAvg's accountant as the checkpoint left it, every release of the
        first attempt included; a run whose budget allows no further round is refused."""
        if self.central is None:
            return
        if state is None:
            raise ConfigError("resume: the checkpoint holds no DP-FedAvg accountant state (it "
                              "predates it): the rounds it released cannot be accounted")
        self.central.load(state)
        if not self.central.next_round_fits():
            raise ConfigError(f"resume: epsilon {self.central.epsilon():.4f} leaves no room for "
                              f"another round within privacy.max_epsilon="
                              f"{self.central.cfg.max_epsilon}: the run is done")

    def state(self) -> dict[str, object] | None:
        """What a checkpoint keeps to resume the accounting."""
        return None if self.central is None else self.central.state()

    def requested(self, clients: list[int | tuple[str, int]]) -> None:
        """The server asked these clients to train a round."""
        self._asked_past_budget = 0
        for client in clients:
            self.requests[client] = self.requests.get(client, 0) + 1
            self._asked_past_budget += self.requests[client] > self._budget_rounds

    def trained(self, replies: int) -> None:
        """A training round aggregated ``replies`` updates into a release."""
        if self.central is not None:
            self.central.compose_round(replies)

    def stop_before_next_round(self) -> bool:
        """DP-FedAvg: one more round would take epsilon past max_epsilon (rounds with failed
        clients cost more than planned)."""
        return self.central is not None and not self.central.next_round_fits()

    def exhausted_clients(self) -> int:
        """Clients that declined a round because it would pass their budget."""
        if self._pooled:
            return sum(1 for asked in self.requests.values() if asked > self._budget_rounds)
        return len(self.exhausted)

    def exhausted_now(self, declined_nodes: int) -> int:
        """Clients of the last round that declined it for their budget; ``declined_nodes``:
        the nodes that replied so. A pool node declines only when all its shoppers did, so on
        a pool the count is of the round's shoppers asked past the rounds their plan allows,
        each of which declines."""
        return self._asked_past_budget if self._pooled else declined_nodes

    @property
    def _pooled(self) -> bool:
        return any(isinstance(client, tuple) for client in self.requests)

    @property
    def _budget_rounds(self) -> int:
        return self._dp_sgd_rounds or 0

    @property
    def epsilon(self) -> float | None:
        if self.central is not None:
            return self.central.epsilon()
        if self.dp_sgd is not None:
            most = max(self.requests.values(), default=0)
            return dp_sgd_epsilon(self.dp_sgd, min(most, self._dp_sgd_rounds or 0),
                                  self.cfg.accountant)  # type: ignore[attr-defined]
        return None

    def as_dict(self) -> dict[str, object]:
        report: dict[str, object] = {
            "mechanism": self.cfg.mechanism, "unit": None, "neighbouring": None,
            "sampling": None, "epsilon": self.epsilon, "delta": None, "noise_multiplier": None,
            "secagg": self.secagg is not None}
        if self.secagg is not None:
            report["secagg_parameters"] = self.secagg
        cfg = self.cfg
        if isinstance(cfg, DpSgdConfig) and self.dp_sgd is not None:
            plan = self.dp_sgd
            report.update(
                unit=cfg.unit, neighbouring=cfg.neighbouring, sampling=cfg.sampling,
                delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                clipping_norm=cfg.max_grad_norm, clip_groups=dict(cfg.clip_groups),
                target_epsilon=cfg.target_epsilon,
                accountant=f"opacus-{cfg.accountant}", sample_rate=plan.sample_rate,
                steps_per_round=plan.steps_per_round, planned_rounds=plan.planned_rounds,
                rounds_per_client_at_most=self._dp_sgd_rounds,
                exhausted_clients=self.exhausted_clients(),
                scope="per client: a unit is protected within the client that holds it")
        elif isinstance(cfg, CentralDpConfig) and self.central is not None:
            central = self.central
            # Adaptive clipping moves the norm every round; the wrapper holds the current one.
            norm = getattr(self.strategy, "clipping_norm", cfg.clipping_norm)
            report.update(
                unit=self.client_unit, neighbouring=cfg.neighbouring, sampling=cfg.sampling,
                delta=central.delta, noise_multiplier=central.noise_multiplier,
                accounted_noise_multiplier=accounted_noise(central.noise_multiplier),
                clipping_norm=norm, max_epsilon=cfg.max_epsilon,
                accountant="rdp, dp_accounting as Flower's RdpAccountant (sampling without "
                           "replacement, replace-one, noise over the sensitivity 2C)",
                population=central.population, sample_size=central.sample_size,
                side=cfg.side, clipping=cfg.clipping)
        return report
