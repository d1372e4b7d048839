"""Differential privacy: DP-SGD on the clients (shopper- or example-level), client-level
DP-FedAvg on the server. docs/privacy.md states each guarantee; this module implements them.

DP-SGD (``privacy=dp_sgd``). Flower's Opacus example builds a new PrivacyEngine every round, so
the epsilon it reports covers one round. Here a client plans its noise once, for every DP-SGD
step it expects over the whole run, and keeps the accountant's history in its Context.state
(``DpSgdLedger``), so epsilon composes across rounds, and a client whose next round would pass
its budget, or whose request leaves its plan, refuses to train.

DP-FedAvg (``privacy=central_dp``) is Flower's DifferentialPrivacy*Clipping wrappers around the
configured strategy, accounted by Flower's RdpAccountant (see ``CentralDp``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.server import strategy as legacy_strategy
from flwr.serverapp import Grid, RdpAccountant
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
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import register_norm_sampler
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fedrec.config import (
    CentralDpConfig,
    ConfigError,
    DpSgdConfig,
    DpSgdStepConfig,
    PrivacyConfig,
)
from fedrec.data.sequences import TrainExamples
from fedrec.train import Objective, TrainResult, batch_collate, examples_dataset, train

# Error codes of a client's refusals (Flower's own codes are small integers): its budget cannot
# pay for another round; the request leaves the client's own plan; the request asks for what
# the run's guarantee does not cover.
log = logging.getLogger("fedrec.server")

BUDGET_EXHAUSTED = 4001
OUTSIDE_PLAN = 4002
NOT_COVERED = 4003


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
    return _epsilon(accountant, [(plan.noise_multiplier, plan.sample_rate,
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


def _epsilon(accountant_name: str, history: list[Step], delta: float) -> float:
    accountant = create_accountant(accountant_name)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta, **_orders(accountant_name)))


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
        return _epsilon(self.accountant, history, self.plan.delta) if history else 0.0

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
                 examples: TrainExamples, objective: Objective, ledger: DpSgdLedger,
                 cfg: DpSgdConfig, step: DpSgdStepConfig, *, seed: int,
                 after_step: Callable[[], None] | None = None) -> TrainResult:
    """One round of DP-SGD (``ledger.plan.steps_per_round`` steps) on the parameters
    ``shared_optimizer`` holds; every other parameter must be frozen. Appends the round's steps
    to ``ledger.history``.

    ``seed`` (the client's own secret) drives the negatives and the examples a shopper's step
    reads. The Poisson sampling of units and the noise draw from fresh OS randomness, which
    the guarantee (amplification by sampling included) assumes nobody can predict."""
    if not objective.per_example:
        raise ValueError("DP-SGD needs a per-example objective (no in-batch negatives)")
    if cfg.unit == "shopper":
        result = _train_by_shopper(model, shared_optimizer, examples, objective, ledger.plan,
                                   cfg.max_grad_norm, step.examples_per_shopper, seed=seed,
                                   after_step=after_step)
    else:
        result = _train_by_example(model, shared_optimizer, examples, objective, ledger.plan,
                                   cfg, seed=seed, after_step=after_step)
    plan = ledger.plan
    ledger.history = _merge([*ledger.history,
                             (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)])
    return result


def _train_by_shopper(model: nn.Module, shared_optimizer: torch.optim.Optimizer,
                      examples: TrainExamples, objective: Objective, plan: DpSgdPlan,
                      max_grad_norm: float, examples_per_shopper: int, *, seed: int,
                      after_step: Callable[[], None] | None) -> TrainResult:
    """User-level DP-SGD: each step Poisson-samples shoppers at the plan's rate, computes each
    sampled shopper's gradient (mean loss over up to ``examples_per_shopper`` of their
    examples), and hands these as per-sample gradients to Opacus' DPOptimizer, which clips each
    to ``max_grad_norm`` and adds the noise once to their sum. Adding or removing a shopper
    changes one clipped term: that is the unit the accountant's add/remove bound protects.
    The step follows the noisy sum, not the sum over the client's own count of shoppers: a
    divisor that depends on the data is a release the accountant does not cover (Adam, the
    default optimizer, is blind to the scale)."""
    order = torch.argsort(examples.user, stable=True)
    shoppers, counts = torch.unique_consecutive(examples.user[order], return_counts=True)
    rows_of = torch.split(order, counts.tolist())
    params = [p for group in shared_optimizer.param_groups for p in group["params"]]
    optimizer = DPOptimizer(
        shared_optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=1, generator=torch.Generator().manual_seed(_secret_seed()))
    sampler = torch.Generator().manual_seed(_secret_seed())
    model.train()
    losses, seen = [], 0
    for step in range(plan.steps_per_round):
        draw = torch.rand(len(shoppers), generator=sampler)
        picked = (draw < plan.sample_rate).nonzero().flatten()
        per_shopper: list[list[torch.Tensor]] = [[] for _ in params]
        for index in picked.tolist():
            # Each shopper's own stream (negatives, examples read): one shopper's data never
            # changes what another shopper's term draws.
            generator = torch.Generator().manual_seed(
                (seed * 1_000_003 + step * 7_919 + int(shoppers[index])) % 2**62)
            rows = rows_of[index]
            if len(rows) > examples_per_shopper:
                rows = rows[torch.randperm(len(rows), generator=generator)[:examples_per_shopper]]
            batch = (examples.history[rows], examples.target[rows], examples.user[rows])
            loss = objective(model, batch, generator)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for store, grad, p in zip(per_shopper, grads, params, strict=True):
                store.append(torch.zeros_like(p) if grad is None else grad)
            losses.append(float(loss.detach()))
            seen += len(rows)
        for p, store in zip(params, per_shopper, strict=True):
            p.grad_sample = (torch.stack(store) if store
                             else p.new_zeros((0, *p.shape)))  # an empty step is noise alone
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    loss = sum(losses) / len(losses) if losses else math.nan
    if losses and not math.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss}: lower train.dp_sgd.lr")
    return TrainResult(loss=loss, num_examples=seen)


def _noise_only_step(optimizer: DPOptimizer) -> None:
    """The step of an empty Poisson draw: no gradient, the noise alone. Skipping it would make
    "nothing moved" an outcome whose probability depends on how many units the client holds."""
    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_by_example(model: nn.Module, shared_optimizer: torch.optim.Optimizer,
                      examples: TrainExamples, objective: Objective, plan: DpSgdPlan,
                      cfg: DpSgdConfig, *, seed: int,
                      after_step: Callable[[], None] | None) -> TrainResult:
    """Example-level DP-SGD through Opacus' PrivacyEngine, on a Poisson loader at the plan's
    public rate (Opacus takes the rate from the loader's length: 1 / steps_per_epoch)."""
    with warnings.catch_warnings():
        # Opacus warns on every engine that secure_mode is off; docs/privacy.md says so once.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    loader = DPDataLoader(examples_dataset(examples), sample_rate=plan.sample_rate,
                          collate_fn=batch_collate,
                          generator=torch.Generator().manual_seed(_secret_seed()))
    private = engine.make_private(
        module=model, optimizer=shared_optimizer, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False, grad_sample_mode=cfg.grad_sample_mode,
        criterion=nn.CrossEntropyLoss(),
        noise_generator=torch.Generator().manual_seed(_secret_seed()))
    if cfg.grad_sample_mode == "ghost":
        module, optimizer, criterion, private_loader = private
        objective = dataclasses.replace(objective, criterion=criterion)
    else:
        module, optimizer, private_loader = private
    # Step along the noisy sum: Opacus would divide it by the client's own expected batch
    # (its count of examples x the rate), a data-dependent scale the accountant does not cover.
    optimizer.expected_batch_size = 1
    if abs(1.0 / len(private_loader) - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus would account sampling rate {1.0 / len(private_loader)}, "
                           f"not the planned {plan.sample_rate}")
    epochs = plan.steps_per_round // len(private_loader)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer fire although item ids need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = train(module, optimizer, private_loader, objective, epochs=epochs,
                           seed=seed, after_step=after_step,
                           empty_step=lambda: _noise_only_step(optimizer))
    finally:
        module.remove_hooks()
    return result


# ----------------------------------------------------------------------------- DP-FedAvg
# Replacing one client's data moves a sum of updates clipped to C by up to 2C (one clipped
# update out, another in): the sensitivity the accountant's noise multiplier is relative to.
REPLACE_ONE_SENSITIVITY = 2.0


@dataclass
class CentralDp:
    """Client-level DP-FedAvg over ``population`` clients, ``sample_size`` of them a round.

    Flower samples a fixed number of clients without replacement, and the wrappers add noise
    of standard deviation ``noise_multiplier x C / sample_size`` to the mean of the clipped
    updates. Under replace-one the mean of k replies moves by up to 2C / k, so a round with k
    replies is a Gaussian mechanism whose noise over the sensitivity is
    ``noise_multiplier x k / (2 x sample_size)``; Flower's RdpAccountant (sampling without
    replacement, replace-one) composes exactly that. Every round's mechanism is known before
    the run, so the number of rounds that fit in ``max_epsilon`` is too: the run is cut to it.
    """

    cfg: CentralDpConfig
    population: int
    sample_size: int
    noise_multiplier: float  # as Flower's wrappers take it: noise stddev over C
    delta: float
    rounds: int  # rounds the budget allows, at most the num_rounds asked for
    accountant: RdpAccountant

    def compose_round(self, replies: int | None = None) -> None:
        """A round released a noised mean of ``replies`` clipped updates (all sampled when
        None); a round with no reply released nothing."""
        replies = self.sample_size if replies is None else replies
        if replies > 0:
            self.accountant.compose(self._event(replies))

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta) if self.accountant.num_releases else 0.0

    def next_round_fits(self) -> bool:
        """Whether one more full round keeps epsilon within max_epsilon."""
        return self.release_fits(self.sample_size)

    def release_fits(self, replies: int) -> bool:
        """Whether releasing the noised mean of ``replies`` updates keeps epsilon within
        max_epsilon (fewer replies than sampled cost more than a planned round)."""
        trial = _rdp_accountant(self.population, self.delta)
        trial.load_state_dict(self.accountant.state_dict())
        trial.compose(self._event(replies))
        return trial.get_epsilon(self.delta) <= self.cfg.max_epsilon * (1 + 1e-9)

    def _event(self, replies: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            accounted_noise(self.noise_multiplier) * replies / self.sample_size,
            self.sample_size, self.population)


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


def plan_central_dp(cfg: CentralDpConfig, *, population: int, sample_size: int,
                    num_rounds: int) -> CentralDp:
    if cfg.delta is None:
        delta = default_delta(population)
    else:
        delta = cfg.delta
        check_delta(delta, population, "clients")
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


class BudgetGuard(Strategy):
    """The DP-FedAvg strategy, refusing a release that would pass max_epsilon: a round whose
    replies are fewer than sampled (clients timed out) releases nothing when its real cost
    does not fit. Everything else is the wrapped strategy's."""

    def __init__(self, strategy: Strategy, central: CentralDp) -> None:
        self.strategy = strategy
        self.central = central

    def __getattr__(self, name: str) -> object:  # clipping_norm and the like, for the report
        return getattr(self.__dict__["strategy"], name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = sum(not r.has_error() for r in replies)
        if answered and not self.central.release_fits(answered):
            log.warning("round %d: %d of %d sampled clients replied; releasing their mean would "
                        "take epsilon past privacy.max_epsilon=%s, so the round releases "
                        "nothing", server_round, answered, self.central.sample_size,
                        self.central.cfg.max_epsilon)
            return None, None
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def wrap_strategy(strategy: Strategy, central: CentralDp) -> Strategy:
    """The configured strategy inside Flower's DP wrapper for the configured side and clipping.
    Fedrec does the accounting (``CentralDp``), so the wrapper gets no accountant."""
    cfg = central.cfg
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
                 secagg: dict[str, object] | None = None) -> None:
        self.cfg = cfg
        self.central = central
        self.dp_sgd = dp_sgd
        self.strategy = strategy
        self.secagg = secagg
        self.requests: dict[int, int] = {}  # train rounds each node was asked to join
        self.exhausted: set[int] = set()
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
        self.central.accountant.load_state_dict(state)
        if not self.central.next_round_fits():
            raise ConfigError(f"resume: epsilon {self.central.epsilon():.4f} leaves no room for "
                              f"another round within privacy.max_epsilon="
                              f"{self.central.cfg.max_epsilon}: the run is done")

    def state(self) -> dict[str, object] | None:
        """What a checkpoint keeps to resume the accounting."""
        return None if self.central is None else self.central.accountant.state_dict()

    def requested(self, node_ids: list[int]) -> None:
        """The server asked these nodes to train a round."""
        for node in node_ids:
            self.requests[node] = self.requests.get(node, 0) + 1

    def trained(self, replies: int) -> None:
        """A training round aggregated ``replies`` updates into a release."""
        if self.central is not None:
            self.central.compose_round(replies)

    def stop_before_next_round(self) -> bool:
        """DP-FedAvg: one more round would take epsilon past max_epsilon (rounds with failed
        clients cost more than planned)."""
        return self.central is not None and not self.central.next_round_fits()

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
                clipping_norm=cfg.max_grad_norm, target_epsilon=cfg.target_epsilon,
                accountant=f"opacus-{cfg.accountant}", sample_rate=plan.sample_rate,
                steps_per_round=plan.steps_per_round, planned_rounds=plan.planned_rounds,
                rounds_per_client_at_most=self._dp_sgd_rounds,
                exhausted_clients=len(self.exhausted),
                scope="per client: a unit is protected within the client that holds it")
        elif isinstance(cfg, CentralDpConfig) and self.central is not None:
            central = self.central
            # Adaptive clipping moves the norm every round; the wrapper holds the current one.
            norm = getattr(self.strategy, "clipping_norm", cfg.clipping_norm)
            report.update(
                unit="client", neighbouring=cfg.neighbouring, sampling=cfg.sampling,
                delta=central.delta, noise_multiplier=central.noise_multiplier,
                accounted_noise_multiplier=accounted_noise(central.noise_multiplier),
                clipping_norm=norm, max_epsilon=cfg.max_epsilon,
                accountant="flower-rdp (sampling without replacement, replace-one, noise over "
                           "the sensitivity 2C)",
                population=central.population, sample_size=central.sample_size,
                side=cfg.side, clipping=cfg.clipping)
        return report
