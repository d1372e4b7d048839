"""Differential privacy: record-level DP-SGD on the clients, user-level DP-FedAvg on the server.

DP-SGD (``privacy=dp_sgd``). Flower's Opacus example builds a new PrivacyEngine every round, so
the epsilon it reports covers one round. Here a client plans its noise once, for every DP-SGD
step it expects over the whole run, and keeps the accountant's history in its Context.state
(``DpSgdLedger``); each round starts Opacus from that history, so epsilon composes across rounds,
and a client whose next round would pass its budget refuses to train.

DP-FedAvg (``privacy=central_dp``) is Flower's DifferentialPrivacy*Clipping wrappers around the
configured strategy, accounted by Flower's RdpAccountant (see ``CentralDp``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord
from flwr.server import strategy as legacy_strategy
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn

from fedrec.config import CentralDpConfig, ConfigError, DpSgdConfig, PrivacyConfig
from fedrec.data.sequences import TrainExamples
from fedrec.train import Objective, TrainResult, make_loader, train

# Error code of a train reply from a client whose budget cannot pay for another round
# (Flower's own codes are small integers).
BUDGET_EXHAUSTED = 4001


# -------------------------------------------------------------------------------- DP-SGD
@dataclass(frozen=True)
class DpSgdPlan:
    """The noise a client adds, fixed once for its whole participation."""

    noise_multiplier: float
    sample_rate: float  # Poisson sampling rate of a DP-SGD step, as Opacus' DPDataLoader uses
    steps_per_round: int
    delta: float


def plan_dp_sgd(cfg: DpSgdConfig, *, num_records: int, batch_size: int, local_epochs: int,
                planned_rounds: int) -> DpSgdPlan:
    """Noise for ``planned_rounds`` rounds of ``local_epochs`` Poisson-sampled epochs to spend
    exactly ``cfg.target_epsilon``."""
    if num_records < 1:
        raise ValueError("DP-SGD needs at least one training record on the client")
    steps_per_epoch = math.ceil(num_records / batch_size)  # Opacus: sample rate 1 / len(loader)
    sample_rate = 1.0 / steps_per_epoch
    delta = cfg.delta if cfg.delta is not None else 1.0 / (10 * num_records)
    noise = _noise_multiplier(cfg.target_epsilon, delta, sample_rate,
                              planned_rounds * local_epochs * steps_per_epoch, cfg.accountant)
    return DpSgdPlan(noise, sample_rate, local_epochs * steps_per_epoch, delta)


@functools.lru_cache(maxsize=4096)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """Opacus' bisection, once per distinct input: a simulation process plans for many
    clients, and clients with the same number of records share a plan."""
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


Step = tuple[float, float, int]  # Opacus accountant history: (noise multiplier, rate, steps)


@dataclass
class DpSgdLedger:
    """A client's DP-SGD budget: its plan and the accountant history of the rounds it trained."""

    accountant: str
    target_epsilon: float
    plan: DpSgdPlan
    history: list[Step]

    def epsilon(self, *, with_next_round: bool = False) -> float:
        history = list(self.history)
        if with_next_round:
            plan = self.plan
            history = _merge([*history, (plan.noise_multiplier, plan.sample_rate,
                                         plan.steps_per_round)])
        if not history:
            return 0.0
        accountant = create_accountant(self.accountant)
        accountant.history = history
        return float(accountant.get_epsilon(self.plan.delta, **_orders(self.accountant)))

    def can_train(self) -> bool:
        # The plan spends the budget exactly; allow the accountant's rounding, not a round more.
        return self.epsilon(with_next_round=True) <= self.target_epsilon * (1 + 1e-6)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "accountant": self.accountant, "target-epsilon": self.target_epsilon,
            **{f"plan.{k}": v for k, v in dataclasses.asdict(self.plan).items()},
            "history.noise": [float(s[0]) for s in self.history],
            "history.rate": [float(s[1]) for s in self.history],
            "history.steps": [int(s[2]) for s in self.history],
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> DpSgdLedger:
        plan = DpSgdPlan(**{f.name: record[f"plan.{f.name}"]
                            for f in dataclasses.fields(DpSgdPlan)})  # type: ignore[arg-type]
        history = list(zip(record["history.noise"], record["history.rate"],  # type: ignore[arg-type]
                           record["history.steps"], strict=True))
        return cls(str(record["accountant"]), float(record["target-epsilon"]),  # type: ignore[arg-type]
                   plan, history)


def _secret_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1  # torch seeds are signed 64-bit


def _merge(history: list[Step]) -> list[Step]:
    """Join consecutive entries with the same noise and rate, as Opacus' step hook does."""
    merged: list[Step] = []
    for noise, rate, steps in history:
        if merged and merged[-1][:2] == (noise, rate):
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((noise, rate, steps))
    return merged


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of an embedding table for ghost clipping: Opacus' algorithm
    (sum each example's gradient rows per id, then take norms), with the (example, id) pairs
    made unique as one integer key instead of by ``torch.unique(dim=0)``, which took half of a
    DP-SGD step on this model."""
    ids = activations[0].reshape(activations[0].shape[0], -1)
    grads = backprops.reshape(-1, backprops.shape[-1])
    rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    keys, position = torch.unique(rows * layer.num_embeddings + ids.reshape(-1),
                                  return_inverse=True)
    summed = torch.zeros(len(keys), grads.shape[-1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, position, grads)
    norms = torch.zeros(ids.shape[0], dtype=grads.dtype, device=grads.device)
    norms.scatter_add_(0, keys // layer.num_embeddings, (summed ** 2).sum(1))
    return {layer.weight: norms.sqrt()}


def train_dp_sgd(model: nn.Module, shared_optimizer: torch.optim.Optimizer,
                 examples: TrainExamples, batch_size: int, objective: Objective,
                 ledger: DpSgdLedger, cfg: DpSgdConfig, *, epochs: int, seed: int,
                 after_step: Callable[[], None] | None = None) -> TrainResult:
    """One round of DP-SGD on the parameters ``shared_optimizer`` holds; every other parameter
    must be frozen. Appends the round's steps to ``ledger.history``.

    ``seed`` only drives the negatives, which are independent of the data. The Poisson sampling
    and the noise draw from fresh OS randomness: the server sends the seed, and the guarantee
    (amplification by sampling included) assumes it can predict neither."""
    if not objective.per_example:
        raise ValueError("DP-SGD needs a per-example objective (no in-batch negatives)")
    with warnings.catch_warnings():
        # Opacus warns on every engine that secure_mode is off; docs/privacy.md says so once.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    private = engine.make_private(
        module=model, optimizer=shared_optimizer,
        data_loader=make_loader(examples, batch_size, _secret_seed()),
        noise_multiplier=ledger.plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True, grad_sample_mode=cfg.grad_sample_mode,
        criterion=nn.CrossEntropyLoss(),
        noise_generator=torch.Generator().manual_seed(_secret_seed()))
    if cfg.grad_sample_mode == "ghost":
        module, optimizer, criterion, private_loader = private
        objective = dataclasses.replace(objective, criterion=criterion)
    else:
        module, optimizer, private_loader = private
    if abs(1.0 / len(private_loader) - ledger.plan.sample_rate) > 1e-12:
        raise RuntimeError(f"the client's data changed since its DP plan: sampling rate "
                           f"{1.0 / len(private_loader)} != planned {ledger.plan.sample_rate}")
    try:
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer fire although item ids need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = train(module, optimizer, private_loader, objective, epochs=epochs,
                           seed=seed, after_step=after_step)
    finally:
        module.remove_hooks()
    ledger.history = _merge([tuple(h) for h in engine.accountant.history])
    return result


# ----------------------------------------------------------------------------- DP-FedAvg
@dataclass
class CentralDp:
    """User-level DP-FedAvg over ``population`` clients, ``sample_size`` of them a round.

    Flower samples a fixed number of clients without replacement, so the accountant is Flower's
    RdpAccountant with that sampling (its supported relation for it is replace-one: a neighbour
    federation swaps one client's data for another's). Every round's mechanism is known before
    the run, so the number of rounds that fit in ``max_epsilon`` is too: the run is cut to it
    and ends normally, with its model saved.
    """

    cfg: CentralDpConfig
    population: int
    sample_size: int
    noise_multiplier: float
    delta: float
    rounds: int  # rounds the budget allows, at most the num_rounds asked for
    accountant: RdpAccountant

    def compose_round(self) -> None:
        self.accountant.compose(self._event())

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta) if self.accountant.num_releases else 0.0

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(self.noise_multiplier, self.sample_size, self.population)


def _epsilon_after(noise: float, rounds: int, population: int, sample_size: int,
                   delta: float) -> float:
    accountant = _rdp_accountant(population, delta)
    accountant.compose(GaussianPrivacyEvent(noise, sample_size, population), rounds)
    return accountant.get_epsilon(delta)


def _rdp_accountant(population: int, delta: float) -> RdpAccountant:
    return RdpAccountant(AccountingConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=NeighboringRelation.REPLACE_ONE,
        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))


def plan_central_dp(cfg: CentralDpConfig, *, population: int, sample_size: int,
                    num_rounds: int) -> CentralDp:
    delta = cfg.delta if cfg.delta is not None else 1.0 / (10 * population)
    noise = cfg.noise_multiplier
    if noise is None:  # the least noise with which all num_rounds fit in max_epsilon
        low, high = 0.0, 1.0
        while _epsilon_after(high, num_rounds, population, sample_size, delta) > cfg.max_epsilon:
            low, high = high, 2 * high
            if high > 1e6:
                raise ConfigError(f"privacy.max_epsilon={cfg.max_epsilon} cannot be met in "
                                 f"{num_rounds} rounds of {sample_size} of {population} clients")
        while high - low > 1e-2 * high:
            middle = (low + high) / 2
            fits = _epsilon_after(middle, num_rounds, population, sample_size, delta)
            low, high = (low, middle) if fits <= cfg.max_epsilon else (middle, high)
        noise = high
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
    return CentralDp(cfg, population, sample_size, noise, delta, rounds,
                     _rdp_accountant(population, delta))


def wrap_strategy(strategy: Strategy, central: CentralDp) -> Strategy:
    """The configured strategy inside Flower's DP wrapper for the configured side and clipping.
    Fedrec does the accounting (``CentralDp``), so the wrapper gets no accountant."""
    cfg = central.cfg
    if cfg.clipping == "fixed":
        cls = (DifferentialPrivacyServerSideFixedClipping if cfg.side == "server"
               else DifferentialPrivacyClientSideFixedClipping)
        return cls(strategy, central.noise_multiplier, cfg.clipping_norm, central.sample_size)
    cls = (DifferentialPrivacyServerSideAdaptiveClipping if cfg.side == "server"
           else DifferentialPrivacyClientSideAdaptiveClipping)
    return cls(strategy, central.noise_multiplier, central.sample_size,
               initial_clipping_norm=cfg.clipping_norm,
               target_clipped_quantile=cfg.target_clipped_quantile,
               clip_norm_lr=cfg.clip_norm_lr, clipped_count_stddev=cfg.clipped_count_stddev)


def wrap_legacy_strategy(strategy: legacy_strategy.Strategy,
                         central: CentralDp) -> legacy_strategy.Strategy:
    """Distributed DP for secagg=on: each client clips its own update (Flower's legacy
    fixedclipping wrapper sends the norm), SecAgg+ reveals only the sum, and the server adds the
    noise to it. Server-side and adaptive clipping are refused with secagg when the config is
    composed. Flower's wrapper releases nothing in a round with any failed client."""
    cfg = central.cfg
    if cfg.side != "client" or cfg.clipping != "fixed":
        raise ConfigError(f"privacy.side={cfg.side} privacy.clipping={cfg.clipping} cannot run "
                          "with secagg=on: use privacy.side=client privacy.clipping=fixed")
    return legacy_strategy.DifferentialPrivacyClientSideFixedClipping(
        strategy, central.noise_multiplier, cfg.clipping_norm, central.sample_size)


# -------------------------------------------------------------------------------- report
class PrivacyReport:
    """The run's privacy as the server can state it, updated after every training round.

    dp_sgd: each client accounts for itself and reports its epsilon; the run's epsilon is the
    largest any client reported, its delta and noise multiplier the weakest (largest delta,
    smallest noise). central_dp: the server's own accountant. ``secagg``: the SecAgg+
    parameters the run used, or None without secure aggregation.
    """

    def __init__(self, cfg: PrivacyConfig, central: CentralDp | None = None,
                 strategy: Strategy | None = None,
                 secagg: dict[str, object] | None = None) -> None:
        self.cfg = cfg
        self.central = central
        self.strategy = strategy
        self.secagg = secagg
        self.epsilon: float | None = None
        self.delta: float | None = None
        self.noise_multiplier: float | None = None
        self.exhausted: set[int] = set()
        if cfg.mechanism != "none":
            self.epsilon = 0.0  # nothing is spent before the first round
        if central is not None:
            self.epsilon, self.delta = 0.0, central.delta
            self.noise_multiplier = central.noise_multiplier

    def resume(self, rounds_done: int) -> None:
        """A resumed run: DP-FedAvg's accountant composes the rounds its release already made
        (the same mechanism each round, so replaying them is exact)."""
        if self.central is not None:
            for _ in range(rounds_done):
                self.central.compose_round()
            self.epsilon = self.central.epsilon()

    def trained(self, replies: list[dict[str, float]]) -> None:
        """A round's train replies (their metrics) were aggregated into a release."""
        if self.central is not None:
            self.central.compose_round()
            self.epsilon = self.central.epsilon()
            return
        for metrics in replies:
            if "epsilon" not in metrics:
                continue
            self.epsilon = max(self.epsilon or 0.0, metrics["epsilon"])
            self.delta = max(self.delta or 0.0, metrics["delta"])
            self.noise_multiplier = min(self.noise_multiplier or math.inf,
                                        metrics["noise-multiplier"])

    def as_dict(self) -> dict[str, object]:
        report: dict[str, object] = {"mechanism": self.cfg.mechanism, "epsilon": self.epsilon,
                                     "delta": self.delta, "secagg": self.secagg is not None}
        if self.secagg is not None:
            report["secagg_parameters"] = self.secagg
        if isinstance(self.cfg, DpSgdConfig):
            report.update(noise_multiplier=self.noise_multiplier,
                          clipping_norm=self.cfg.max_grad_norm, unit="record",
                          target_epsilon=self.cfg.target_epsilon, accountant=self.cfg.accountant,
                          exhausted_clients=len(self.exhausted))
        elif isinstance(self.cfg, CentralDpConfig):
            # Adaptive clipping moves the norm every round; the wrapper holds the current one.
            norm = getattr(self.strategy, "clipping_norm", self.cfg.clipping_norm)
            report.update(noise_multiplier=self.noise_multiplier, clipping_norm=norm,
                          unit="client", max_epsilon=self.cfg.max_epsilon,
                          accountant="flower-rdp (sampling without replacement, replace-one)",
                          side=self.cfg.side, clipping=self.cfg.clipping)
        return report
