"""eval.patience: a run stops once that many evaluations in a row have not beaten its best
validation score, says why it stopped, and reports the best evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, federated_run_in_process, typed_config
from test_pool import POOL

from fedrec.centralized import run as run_centralized
from fedrec.config import ConfigError, compose_config, federated_config


def _scores(run_dir, select_by: str = "sampled.hr@10") -> dict[int, float]:
    protocol, metric = select_by.split(".")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["round"]: line["valid"][protocol][metric] for line in lines if "valid" in line}


def _assert_stopped_by_patience(summary: dict, scores: dict[int, float], patience: int,
                                every: int = 1) -> None:
    """The run ended ``patience`` evaluations after its best one, none of which beat it, and it
    reports that best one (the earliest of equals)."""
    best = max(scores.values())
    selected = min(r for r, score in scores.items() if score == best)
    assert summary["stopped_by"] == "eval.patience"
    assert summary["selected_round"] == selected
    assert summary["rounds"] == max(scores) == selected + patience * every
    assert summary["rounds"] < summary["rounds_requested"]


def test_patience_is_checked_and_stops_only_runs_whose_server_sees_validation():
    with pytest.raises(ConfigError, match=r"^eval.patience=0 .*null \(no early stop\)"):
        typed_config("eval.patience=0")
    plain = federated_config(compose_config("eval.patience=3 auto_rounds.stops_on_validation=40"))
    assert (plain.num_rounds, plain.eval.patience) == (40, 3)
    # Private or SecAgg+ runs see no validation figures: they train every round they plan for.
    for private in ("privacy=dp_sgd", "secagg=on partition.num_silos=3"):
        cfg = federated_config(compose_config(f"eval.patience=3 auto_rounds.fixed=9 {private}"))
        assert (cfg.num_rounds, cfg.eval.patience) == (9, None)
    chosen = federated_config(compose_config("num_rounds=5 privacy=dp_sgd"))
    assert chosen.num_rounds == 5


def test_the_centralized_run_stops_on_patience(tmp_path):
    # A high lr on a tiny shop: validation peaks within a few epochs, long before 60.
    summary = run_centralized(f"{TINY} train.lr=0.05 train.epochs=60 eval.patience=2 "
                              f"output_dir={tmp_path}")
    _assert_stopped_by_patience(summary, _scores(tmp_path), patience=2)


def test_without_patience_every_epoch_runs(tmp_path):
    summary = run_centralized(f"{TINY} train.epochs=3 output_dir={tmp_path}")
    assert summary["stopped_by"] == "train.epochs" and summary["rounds"] == 3


def test_a_federated_run_stops_on_patience(tmp_path):
    summary, _, _ = federated_run_in_process(
        f"{POOL} num_rounds=80 eval.every=2 eval.patience=2 train.lr=0.3", 2, tmp_path)
    _assert_stopped_by_patience(summary, _scores(tmp_path / "pool-2"), patience=2, every=2)
    # A resumed run goes on counting from the checkpoint.
    checkpoint = torch.load(tmp_path / "pool-2" / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == summary["rounds"] and checkpoint["stale_evaluations"] == 2
