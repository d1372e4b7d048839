"""Flower ServerApp: composes the config, builds the initial model and strategy, runs it, and
writes the run's outputs. The federation logic is Flower's; the model and data logic is fedrec's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import ConfigError
from fedrec.data.sequences import heldout_cases
from fedrec.metrics import RankingSums, evaluate_model
from fedrec.model import TwoTower
from fedrec.node import Federation, compose_once, load_config, load_federation
from fedrec.outputs import RunOutputs
from fedrec.rounds import MeteredGrid, RoundLog
from fedrec.strategy import build_strategy

app = ServerApp()
log = logging.getLogger("fedrec.server")


def _log_through_flower() -> None:
    """Send fedrec's progress lines to the handlers Flower streams to `flwr run --stream`."""
    ours = logging.getLogger("fedrec")
    ours.setLevel(logging.INFO)
    ours.handlers = list(logging.getLogger("flwr").handlers)
    ours.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    _log_through_flower()
    overrides = str(context.run_config["overrides"])
    cfg = load_config(overrides)
    if not Path(cfg.output_dir).expanduser().is_absolute():
        raise ConfigError(f"output_dir={cfg.output_dir!r} must be absolute in a federated run: "
                          f"the ServerApp runs in {Path.cwd()}, not in your project")
    torch.manual_seed(cfg.seed)
    fed = load_federation(overrides)
    model = TwoTower.for_dataset(cfg.model, fed.dataset)
    outputs = RunOutputs(cfg.output_dir, compose_once(overrides))

    metered = MeteredGrid(grid)
    rounds = RoundLog(outputs, metered, cfg.num_rounds,
                      _server_evaluation(fed, model) if cfg.eval.server else None)
    strategy = build_strategy(cfg.strategy, eval_every=cfg.eval.every,
                              num_rounds=cfg.num_rounds, train_metrics=rounds.aggregate_train,
                              evaluate_metrics=rounds.aggregate_evaluate)
    initial = ArrayRecord(torch_state_dict=model.shared_state())
    train_config = ConfigRecord({"lr": cfg.train.lr, "local-epochs": cfg.train.local_epochs,
                                 "batch-size": cfg.train.batch_size, "seed": cfg.seed})
    # Round 0: the untrained model, evaluated federated, so every run shows where it started.
    rounds.aggregate_evaluate([r.content for r in metered.send_and_receive(
        strategy.configure_evaluate(0, initial, ConfigRecord(), metered)) if not r.has_error()],
        "num-examples")
    result = strategy.start(grid=metered, initial_arrays=initial, num_rounds=cfg.num_rounds,
                            train_config=train_config, evaluate_fn=rounds.end_of_round)

    model.load_shared_state(result.arrays.to_torch_state_dict())
    final = rounds.last_federated or {}
    summary = {
        "mode": "federated",
        "model": cfg.model.kind,
        "dataset": cfg.dataset.name,
        "num_users": fed.dataset.num_users,
        "num_items": fed.dataset.num_items,
        "num_clients": fed.num_clients,
        "rounds": cfg.num_rounds,
        "strategy": cfg.strategy.name,
        "metrics": {"sampled": final.get("sampled", {}), "full": final.get("full", {})},
        "privacy": {"mechanism": "none", "epsilon": None, "delta": None, "secagg": False},
        "communication": {"bytes_up": metered.bytes_up, "bytes_down": metered.bytes_down},
        "wall_seconds": time.perf_counter() - started,
    }
    if "server" in rounds.last:
        summary["server_metrics"] = rounds.last["server"]
    outputs.write_summary(summary)
    outputs.save_model(model, fed.dataset, compose_once(overrides))
    sampled = summary["metrics"]["sampled"]
    log.info("final federated HR@10 %.4f NDCG@10 %.4f", sampled.get("hr@10", float("nan")),
             sampled.get("ndcg@10", float("nan")))
    log.info("results: %s", outputs.path)
    print(f"fedrec: final HR@10 {sampled.get('hr@10', float('nan')):.4f} "
          f"NDCG@10 {sampled.get('ndcg@10', float('nan')):.4f}; results in {outputs.path}",
          flush=True)


def _server_evaluation(fed: Federation, model: TwoTower):
    """Server-side evaluation of the global model on every user's test item (simulation only:
    a real server does not hold the shoppers' data)."""
    cfg = fed.cfg
    test = heldout_cases(fed.split, "test", num_items=fed.dataset.num_items,
                         max_history=cfg.model.max_history,
                         num_negatives=cfg.eval.num_negatives, seed=cfg.eval.seed)

    def evaluate(arrays: ArrayRecord) -> RankingSums:
        model.load_shared_state(arrays.to_torch_state_dict())
        return evaluate_model(model, test, list(cfg.eval.ks), cfg.eval.batch_size)

    return evaluate


