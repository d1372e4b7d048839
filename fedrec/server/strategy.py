"""Config -> Flower strategy, and the aggregation of ranking metrics as exact sums.

Every strategy is Flower's own class from ``flwr.serverapp.strategy``; fedrec only chooses it,
passes the hyper-parameters from fedrec/conf/strategy/, adds up evaluation replies (sums and counts,
not a weighted mean of means), and wraps it in ``RunStrategy`` for the run's evaluation schedule
and item-table step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Scalar, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import strategy as legacy_strategy
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedrec.config import ConfigError, StrategyConfig
from fedrec.model import ITEM_TABLE
from fedrec.server.cohort import Cohorts, with_cohort

STRATEGY_CLASSES: dict[str, type[flwr_strategy.Strategy]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "fedmedian": flwr_strategy.FedMedian,
    "krum": flwr_strategy.Krum,
    "multikrum": flwr_strategy.MultiKrum,
}
# SecAgg+ runs in Flower's legacy workflow, which drives the legacy twins of the strategies
# that post-process a weighted mean (the only thing SecAgg+ reveals). Their hyper-parameters
# have the same names.
LEGACY_STRATEGY_CLASSES: dict[str, type[legacy_strategy.Strategy]] = {
    "fedavg": legacy_strategy.FedAvg,
    "fedprox": legacy_strategy.FedProx,
    "fedadam": legacy_strategy.FedAdam,
    "fedyogi": legacy_strategy.FedYogi,
    "fedadagrad": legacy_strategy.FedAdagrad,
    "fedavgm": legacy_strategy.FedAvgM,
}
# Keys every strategy takes from the top of its config group, not from params.
COMMON_KEYS = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
               "min_available_nodes")
# Keys fedrec sets itself and a user must not override through params.
RESERVED_KEYS = ("weighted_by_key", "arrayrecord_key", "configrecord_key",
                 "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")


def sum_metric_records(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Add the clients' metric sums and counts: averages of averages would weight a client with
    one test user like a shop with a thousand."""
    total = MetricRecord()
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                total[key] = total.get(key, 0.0) + value  # type: ignore[operator]
    return total


MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


def build_strategy(cfg: StrategyConfig, *, train_metrics: MetricsAggregation,
                   evaluate_metrics: MetricsAggregation,
                   weighted_by_key: str = "num-examples") -> flwr_strategy.Strategy:
    """The configured Flower strategy; unknown or reserved params fail here, before training.
    ``weighted_by_key`` is the reply metric that weights each client in the mean."""
    cls = STRATEGY_CLASSES[cfg.name]
    _check_params(cfg, cls)
    kwargs = {key: getattr(cfg, key) for key in COMMON_KEYS}
    return cls(**kwargs, **dict(cfg.params), train_metrics_aggr_fn=train_metrics,
               evaluate_metrics_aggr_fn=evaluate_metrics, weighted_by_key=weighted_by_key)


def build_legacy_strategy(cfg: StrategyConfig, *, initial: list[np.ndarray],
                          fit_config: Callable[[int], dict[str, Scalar]],
                          train_metrics: MetricsAggregation,
                          weighted_by_key: str) -> legacy_strategy.Strategy:
    """The legacy twin of the configured strategy, for SecAgg+'s training rounds. It samples
    the clients and post-processes the mean; fedrec evaluates with the new-API strategy."""
    if cfg.name not in LEGACY_STRATEGY_CLASSES:
        raise ConfigError(f"strategy={cfg.name} needs each client's update, which secagg=on "
                          f"hides: use one of {', '.join(LEGACY_STRATEGY_CLASSES)}")
    _check_params(cfg, STRATEGY_CLASSES[cfg.name])

    def fit_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        records = [RecordDict({"metrics": MetricRecord(cast(Any, metrics))})
                   for _, metrics in results]
        return dict(train_metrics(records, weighted_by_key))

    return LEGACY_STRATEGY_CLASSES[cfg.name](
        fraction_fit=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_fit_clients=cfg.min_train_nodes, min_evaluate_clients=cfg.min_evaluate_nodes,
        min_available_clients=cfg.min_available_nodes, **dict(cfg.params),
        initial_parameters=ndarrays_to_parameters(initial), on_fit_config_fn=fit_config,
        fit_metrics_aggregation_fn=fit_metrics)


def with_item_step(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                   item_server_lr: float, item_decay: float) -> dict[str, torch.Tensor]:
    """``after`` with the item table moved ``item_server_lr`` times as far from ``before``,
    then decayed by ``item_decay`` times ``before`` (decoupled, as AdamW's)."""
    if item_server_lr == 1 and item_decay == 0:
        return after
    step = after[ITEM_TABLE] - before[ITEM_TABLE]
    return {**after, ITEM_TABLE: before[ITEM_TABLE] * (1 - item_decay) + item_server_lr * step}


def _check_params(cfg: StrategyConfig, cls: type) -> None:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    allowed = sorted(accepted - set(COMMON_KEYS) - set(RESERVED_KEYS))
    for key in cfg.params:
        if key not in allowed:
            raise ConfigError(f"strategy.params.{key} is not a parameter of {cls.__name__}: "
                              f"expected one of {', '.join(allowed) or '(none)'}")


class RunStrategy(flwr_strategy.Strategy):
    """The strategy as a run drives it, outermost (so after any DP noise: post-processing).
    Federated evaluation only every ``eval_every`` rounds and after the last (``None``: never,
    as in a private run); the item table stepped ``item_server_lr`` times the wrapped
    strategy's own step (``item_optimizer="strategy"``) or the replies' weighted mean's
    (``"sgd"``, weighted by ``weighted_by_key``), and decayed by ``item_decay``.
    ``round_offset``: rounds a resumed run did before (Flower counts from 1 again). Everything
    else is the wrapped strategy's."""

    def __init__(self, strategy: flwr_strategy.Strategy, *, eval_every: int | None,
                 num_rounds: int, round_offset: int, item_server_lr: float, item_decay: float,
                 item_optimizer: str, weighted_by_key: str,
                 cohorts: Cohorts | None = None) -> None:
        self.strategy = strategy
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.round_offset = round_offset
        self.item_server_lr = item_server_lr
        self.item_decay = item_decay
        self.item_optimizer = item_optimizer
        self.weighted_by_key = weighted_by_key
        self.cohorts = cohorts  # a pool of virtual shoppers: the round's cohort, by node
        self._sent = ArrayRecord()  # the global model of the round being trained

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        if self.cohorts is None:
            return messages
        cohort = self.cohorts.sample(server_round + self.round_offset)
        return with_cohort(messages, self.cohorts.by_node(cohort))

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        after = arrays.to_torch_state_dict()
        if self.item_optimizer == "sgd":
            # The wrapped strategy accepted these replies, so they agree on keys and weights.
            mean = aggregate_arrayrecords([reply.content for reply in replies
                                           if not reply.has_error()], self.weighted_by_key)
            after[ITEM_TABLE] = torch.from_numpy(mean[ITEM_TABLE].numpy())
        before = self._sent.to_torch_state_dict()
        stepped = with_item_step(before, after, self.item_server_lr, self.item_decay)
        # Flower's server optimizers return float64 under NumPy 2 (a float64 scalar times a
        # float32 array), which would double every later round's traffic: keep the sent types.
        return ArrayRecord(torch_state_dict={key: value.to(before[key].dtype)
                                             for key, value in stepped.items()}), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        run_round = server_round + self.round_offset if server_round else 0
        if self.eval_every is None or (run_round % self.eval_every
                                       and run_round != self.num_rounds):
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        # Flower's start() names the outermost class; say which strategy runs inside it.
        inner = self.strategy
        names = [type(inner).__name__]
        while hasattr(inner, "strategy"):
            inner = inner.strategy
            names.append(type(inner).__name__)
        log(INFO, "\t├── Strategy: %s", " around ".join(names))
        self.strategy.summary()
