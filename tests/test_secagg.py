"""Secure aggregation (secagg=on) through the real Flower runtime: Flower's SecAgg+ workflow on
the server, its secaggplus_mod on the clients, fedrec's training in between."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_wire_contract, last_round_model

from fedrec.config import ConfigError, compose_config, to_typed
from fedrec.server.secagg import plan_secagg


def _rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # starts the Flower runtime
def test_secagg_aggregate_equals_the_plain_mean(flower, tmp_path):
    """Same initial model, same data, one round: SecAgg+ reveals the same weighted mean as
    plain FedAvg, up to its quantization, and both paths step and decay the item table alike."""
    runs = {}
    for mode in ("off", "on"):
        # client_seed: both runs' clients sample alike, so their updates are the same.
        overrides = (f"{TINY} num_rounds=1 secagg={mode} strategy.item_server_lr=2.0 "
                     "strategy.item_decay=0.1 client_seed=1")
        wire = tmp_path / f"{mode}.wire.jsonl"
        summary = flower(f"{overrides} wire_log={wire}", num_supernodes=3,
                         output_dir=tmp_path / mode)
        assert summary["privacy"]["secagg"] is (mode == "on")
        runs[mode] = last_round_model(tmp_path / mode, 1)
        layouts = assert_wire_contract(wire, overrides)
        if mode == "on":  # the count and loss do not leave a client in the clear
            results = [x["records"] for x in layouts
                       if x["direction"] == "up" and "fitres.metrics" in x.get("records", {})]
            assert len(results) == 3
            assert all(r["fitres.metrics"]["keys"] == [] for r in results)
    initial_to_plain = 0.0
    for name, plain in runs["off"].items():
        secure = runs["on"][name]
        assert secure.dtype == plain.dtype == torch.float32
        # Quantization step: 2 * clipping_range / quantization_range = 3.8e-6 per unit weight.
        torch.testing.assert_close(secure, plain, atol=5e-5, rtol=0)
        initial_to_plain = max(initial_to_plain, float((plain - secure).abs().max()))
    parameters = to_typed(compose_config(["secagg=on"])).secagg
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["privacy"]["secagg_parameters"]["num_shares"] == parameters.num_shares
    assert summary["privacy"]["secagg_parameters"]["max_weight"] > 0


FAULTY_CLIENT = '''
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedrec.client import app as fedrec_client


def drop_out(msg, context, call_next):
    """Partition 0 fails in round 1 once it has shared its keys."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if (configs is not None and configs.get("stage") == "collect_masked_vectors"
            and int(context.node_config["partition-id"]) == 0
            and msg.metadata.group_id == "1"):
        raise RuntimeError("injected drop-out after the share-keys stage")
    return call_next(msg, context)


app = ClientApp(mods=[drop_out])
app.train(mods=fedrec_client.TRAIN_MODS)(fedrec_client.train)
app.evaluate()(fedrec_client.evaluate)
'''

FAULTY_PROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedrec-dropout"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedrec"

[tool.flwr.app.components]
serverapp = "fedrec.server.app:app"
clientapp = "faulty_client:app"

[tool.flwr.app.config]
overrides = ""
'''


@pytest.mark.slow  # starts the Flower runtime
def test_round_survives_a_client_dropping_out_after_sharing_keys(flower, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(FAULTY_PROJECT))
    (project / "faulty_client.py").write_text(textwrap.dedent(FAULTY_CLIENT))
    summary = flower(f"{TINY} num_rounds=2 secagg=on secagg.reconstruction_threshold=2",
                     num_supernodes=3, output_dir=tmp_path / "run", project_dir=project)
    first, second = _rounds(tmp_path / "run")[1:3]
    assert first["failed_clients"] == 1
    assert first["train_clients"] == 2  # the survivors' sum was unmasked and aggregated
    assert "aggregated" not in first
    assert second["train_clients"] == 3 and "failed_clients" not in second
    assert summary["rounds"] == 2


@pytest.mark.slow  # starts the Flower runtime
def test_secagg_with_dp_sgd_runs_end_to_end(flower, tmp_path):
    overrides = f"{TINY} num_rounds=2 secagg=on privacy=dp_sgd privacy.target_epsilon=8"
    wire = tmp_path / "wire.jsonl"
    summary = flower(f"{overrides} wire_log={wire}", num_supernodes=3,
                     output_dir=tmp_path / "run")
    assert_wire_contract(wire, overrides)
    privacy = summary["privacy"]
    assert privacy["secagg"] is True and privacy["mechanism"] == "dp_sgd"
    assert 0 < privacy["epsilon"] <= 8
    assert all(r["train_clients"] == 3 for r in _rounds(tmp_path / "run")[1:])


@pytest.mark.slow  # starts the Flower runtime
def test_secagg_with_client_side_central_dp_runs_end_to_end(flower, tmp_path):
    summary = flower(f"{TINY} num_rounds=2 secagg=on privacy=central_dp privacy.side=client "
                     "privacy.max_epsilon=20", num_supernodes=3, output_dir=tmp_path / "run")
    privacy = summary["privacy"]
    assert privacy["secagg"] is True and privacy["side"] == "client"
    assert privacy["secagg_parameters"]["max_weight"] == 1.0  # DP-FedAvg weighs clients alike
    assert 0 < privacy["epsilon"] <= 20
    assert summary["rounds"] == 2


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
@pytest.mark.slow  # starts the Flower runtime
def test_secagg_runs_with_mean_based_strategies(flower, tmp_path, strategy):
    """FedProx (a client-side term sent in the legacy config) and FedAdam (a server optimizer
    over the revealed mean) through SecAgg+'s legacy workflow."""
    summary = flower(f"{TINY} num_rounds=2 secagg=on strategy={strategy}", num_supernodes=3,
                     output_dir=tmp_path / "run")
    assert summary["strategy"] == strategy and summary["privacy"]["secagg"] is True
    assert all(r["train_clients"] == 3 for r in _rounds(tmp_path / "run")[1:])


@pytest.mark.parametrize("overrides, key", [
    (["secagg=on", "strategy=krum"], "strategy"),
    (["secagg=on", "strategy=fedmedian"], "strategy"),
    (["secagg=on", "secagg.num_shares=4"], "secagg.num_shares"),
    (["secagg=on", "strategy=fedadam", "strategy.item_server_lr=2"], "strategy.item_server_lr"),
    (["secagg=on", "strategy=fedadam", "strategy.item_decay=0.1"], "strategy.item_decay"),
    (["secagg=on", "strategy=fedadam", "strategy.item_optimizer=sgd"],
     "strategy.item_optimizer"),
    (["secagg=on", "secagg.reconstruction_threshold=5"], "secagg.reconstruction_threshold"),
    (["secagg=on", "privacy=central_dp"], "privacy.side"),
    (["secagg=on", "privacy=central_dp", "privacy.side=client", "privacy.clipping=adaptive"],
     "privacy.clipping"),
])
def test_what_secagg_cannot_do_fails_when_the_config_is_composed(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        compose_config(overrides)


def test_secagg_plan_is_checked_against_the_round_sample():
    cfg = to_typed(compose_config(["secagg=on"])).secagg
    with pytest.raises(ConfigError, match="reconstruction_threshold=3 exceeds the 2 neighbours"):
        plan_secagg(cfg, sample_size=2, largest_weight=10)
    with pytest.raises(ConfigError, match="max_weight=5 is below"):
        plan_secagg(type(cfg)(**{**vars(cfg), "max_weight": 5.0}), sample_size=10,
                    largest_weight=10)
    assert plan_secagg(cfg, sample_size=10, largest_weight=10).max_weight == 20
