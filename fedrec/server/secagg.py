"""Secure aggregation (secagg=on), the server's side: Flower's SecAgg+ around fedrec's rounds.

SecAgg+ exists only in Flower's legacy workflow API, which speaks its own message layout
("fitins.*", "fitres.*") and drives legacy strategies. This module is the whole adaptation, one
function per side:

- ``run_secure_rounds`` (server): Flower's ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as the
  training step and the legacy twin of the configured strategy, which only post-processes the
  mean that SecAgg+ reveals. Evaluation, round logging and privacy reporting are the plain
  path's: the same new-API strategy samples and sums the evaluation replies.
- ``fedrec.client.secagg.secure_aggregation`` (client mod): runs Flower's ``secaggplus_mod`` and,
  for the one stage that trains, translates the legacy request into fedrec's train message and
  the reply back. The ClientApp's ``train`` is the plain path's, unchanged.

What each party learns: the server sees only the weighted sum of the updates and of the weights;
a client's masks fall away only in that sum, unless ``reconstruction_threshold`` of its
neighbours collude with the server. A client's loss and count do not leave it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrec.config import ConfigError, SecAggConfig, StrategyConfig
from fedrec.server.privacy import CentralDp, wrap_legacy_strategy
from fedrec.server.rounds import RoundLog
from fedrec.server.strategy import build_legacy_strategy, with_item_step
from fedrec.wire import ARRAY_NAMES, MAX_WEIGHT, WEIGHT_KEY

log = logging.getLogger("fedrec.server")

# SecAgg+ sums in integers modulo this (Flower's default): it bounds the clients per round.
_MODULUS_RANGE = 2**32


@dataclass(frozen=True)
class SecAggPlan:
    """The SecAgg+ parameters of a run: the config's, with max_weight resolved."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float | None


def plan_secagg(cfg: SecAggConfig, *, sample_size: int,
                largest_weight: float | None) -> SecAggPlan:
    """Check the config against the round's sample before any client is asked to train.

    ``largest_weight``: the largest client weight, when the server knows it (simulation)."""
    if sample_size < 2:
        raise ConfigError(f"secagg=on needs at least 2 clients a round, but the strategy samples "
                          f"{sample_size}: raise strategy.fraction_train or "
                          "strategy.min_train_nodes")
    neighbours = min(cfg.num_shares, sample_size)
    if neighbours < cfg.reconstruction_threshold:
        raise ConfigError(
            f"secagg.reconstruction_threshold={cfg.reconstruction_threshold} exceeds the "
            f"{neighbours} neighbours a client has when {sample_size} clients train a round: "
            f"lower it to at most {neighbours}")
    most = _MODULUS_RANGE // cfg.quantization_range
    if sample_size > most:
        raise ConfigError(
            f"secagg.quantization_range={cfg.quantization_range} leaves room for the sum of "
            f"{most} clients, but a round samples {sample_size}: lower the quantization range")
    max_weight = cfg.max_weight
    if max_weight is None:
        if largest_weight is None:  # the config check asks deployments to set it
            raise ConfigError("secagg.max_weight=null needs the clients' weights, which only a "
                              "simulation's server knows: set secagg.max_weight")
        max_weight = 1.0 if largest_weight == 1.0 else 2.0 * largest_weight
    elif largest_weight is not None and max_weight < largest_weight:
        raise ConfigError(f"secagg.max_weight={max_weight:g} is below the largest client's "
                          f"weight {largest_weight:g}: its masked update would overflow; set "
                          f"at least {largest_weight:g}, or null")
    return SecAggPlan(cfg.num_shares, cfg.reconstruction_threshold, cfg.clipping_range,
                      cfg.quantization_range, max_weight, cfg.timeout)


def run_secure_rounds(
    grid: Grid,
    context: Context,
    *,
    secagg: SecAggPlan,
    strategy_cfg: StrategyConfig,
    strategy: Strategy,
    rounds: RoundLog,
    initial: ArrayRecord,
    train_config: ConfigRecord,
    num_rounds: int,
    weighted_by_key: str,
    central: CentralDp | None,
    round_timeout: float,
) -> ArrayRecord:
    """Train ``num_rounds`` rounds with SecAgg+ and return the final shared parameters.

    ``strategy`` is the plain path's new-API strategy: here it only samples and aggregates the
    federated evaluation; its legacy twin, built from ``strategy_cfg``, aggregates training.
    Round 0 (the untrained model) is the caller's, as on the plain path."""
    names = list(initial.keys())
    state = initial.to_torch_state_dict()
    fit_config = {**train_config, ARRAY_NAMES: names, WEIGHT_KEY: weighted_by_key,
                  MAX_WEIGHT: secagg.max_weight}
    legacy = build_legacy_strategy(
        strategy_cfg,
        initial=[state[n].numpy() for n in names],
        fit_config=lambda server_round: {**fit_config, "server-round": server_round},
        train_metrics=rounds.aggregate_train,
        weighted_by_key=weighted_by_key,
    )
    if central is not None:
        legacy = wrap_legacy_strategy(legacy, central)
    secure = SecAggPlusWorkflow(
        num_shares=secagg.num_shares,
        reconstruction_threshold=secagg.reconstruction_threshold,
        max_weight=secagg.max_weight,
        clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range,
        modulus_range=_MODULUS_RANGE,
        timeout=secagg.timeout,
    )

    def current(legacy_context: LegacyContext) -> tuple[int, ArrayRecord]:
        server_round = legacy_context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
        arrays = legacy_context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        # SecAgg+ dequantizes to float64; the model and the next round's traffic are float32.
        return cast(int, server_round), ArrayRecord(torch_state_dict={
            n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in zip(
                names, arrays, strict=True)})

    def secure_train_round(grid: Grid, legacy_context: Context) -> None:
        _, before = current(cast(LegacyContext, legacy_context))
        secure(grid, legacy_context)
        _, after = current(cast(LegacyContext, legacy_context))
        stepped = with_item_step(before.to_torch_state_dict(), after.to_torch_state_dict(),
                                 strategy_cfg.item_server_lr, strategy_cfg.item_decay)
        legacy_context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([stepped[n].numpy() for n in names]), keep_input=True)

    def evaluate_round(grid: Grid, legacy_context: Context) -> None:
        server_round, arrays = current(cast(LegacyContext, legacy_context))
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=round_timeout)
        strategy.aggregate_evaluate(server_round, replies)
        rounds.end_of_round(server_round, arrays)

    legacy_context = LegacyContext(context, config=ServerConfig(num_rounds=num_rounds),
                                   strategy=legacy)
    DefaultWorkflow(fit_workflow=secure_train_round, evaluate_workflow=evaluate_round)(
        grid, legacy_context)
    return current(legacy_context)[1]
