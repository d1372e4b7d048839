"""A real Flower deployment on loopback: SuperLink with TLS and SuperNode authentication, each
SuperNode reading only its own data folder (fedrec.deployment)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import wait_for_round

from fedrec.deployment import LocalDeployment

SPLIT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "split_nodes.py"
# The tiny synthetic shop split into 3 node folders (scripts/split_nodes.py), as a deployment
# reads it: node-local CSVs plus the catalogue they share. Federated evaluation only before the
# first and after the last round: each message starts a ClientApp process in a deployment.
SHOP = ("dataset.num_users=60 dataset.num_items=40 dataset.num_categories=4 partition=silo "
        "partition.num_silos=3")
RUN = ("dataset=csv dataset.path=node-data.csv eval.num_negatives=10 train.local_epochs=2 "
       "train.lr=0.01 model.embedding_dim=16 model.hidden_dim=32 eval.every=100 "
       "strategy.min_available_nodes=2 strategy.min_train_nodes=2 "
       "strategy.min_evaluate_nodes=2 round_timeout=600")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Path:
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("nodes")
    subprocess.run([sys.executable, str(SPLIT_SCRIPT), str(folder), *SHOP.split()], check=True,
                   capture_output=True)
    return folder


@pytest.fixture(scope="module")
def deployment(nodes, tmp_path_factory):
    data = [nodes / f"node-{k}" / "interactions.csv" for k in range(2)]
    with LocalDeployment(tmp_path_factory.mktemp("deployment"), data) as running:
        yield running


def _overrides(nodes: Path, rounds: int) -> str:
    return f"{RUN} dataset.catalogue={nodes / 'catalogue.csv'} num_rounds={rounds}"


@pytest.mark.slow  # starts the Flower runtime
def test_tls_authenticated_deployment_trains(deployment, nodes, tmp_path):
    summary = deployment.run(_overrides(nodes, 2), tmp_path / "run", timeout=900)
    assert summary["mode"] == "federated" and summary["rounds"] == 2
    assert summary["num_clients"] == 2 and summary["num_users"] is None
    assert summary["metrics"]["sampled"]["hr@10"] > 0
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["train_clients"] == 2 for r in rounds[1:])
    assert (deployment.logs / "superlink.log").stat().st_size > 0
    assert (deployment.logs / "supernode-0.log").stat().st_size > 0


@pytest.mark.slow  # starts the Flower runtime
def test_run_survives_a_node_killed_after_round_one(deployment, nodes, tmp_path):
    key = deployment.node_key("node-2")
    deployment.flwr("supernode", "register", f"{key}.pub", "fedrec-local")
    deployment.start_node(2, nodes / "node-2" / "interactions.csv")
    deployment.wait_online(3)
    run = tmp_path / "run"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        summary=deployment.run(_overrides(nodes, 3), run, timeout=840)))
    runner.start()
    wait_for_round(run, 1, runner, timeout=600)
    deployment.kill_node(2)
    runner.join(timeout=900)
    assert not runner.is_alive()
    summary = result["summary"]
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert summary["rounds"] == 3 and [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["train_clients"] == 3
    assert rounds[3]["train_clients"] == 2  # the run went on with the nodes that answer
    # The machine comes back: the same registered key rejoins as the same node.
    before = {n["node-id"] for n in deployment.nodes()}
    deployment.start_node(2, nodes / "node-2" / "interactions.csv")
    deployment.wait_online(3)
    assert {n["node-id"] for n in deployment.nodes()} == before
    deployment.stop_node(2)


@pytest.mark.slow  # starts the Flower runtime
def test_unregistered_node_is_refused(deployment, nodes):
    key = deployment.node_key("stranger")  # never registered
    node = deployment.start_node(9, nodes / "node-2" / "interactions.csv", key=key,
                                 name="supernode-unregistered")
    assert node.wait(timeout=120) != 0
    log = (deployment.logs / "supernode-unregistered.log").read_text()
    assert "Failed to activate SuperNode" in log
    assert sum(n["status"] == "online" for n in deployment.nodes()) == 2  # the live ones
