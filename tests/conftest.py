"""Shared fixtures: tiny hand-made datasets, the Flower runtime on a tiny shop, and where the
licensed real data lives."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus import GradSampleModule

from fedrec.client.task import NodeData, NodeHolder, node_model
from fedrec.config import compose_config, to_typed
from fedrec.data.dataset import Dataset, RawData, build_dataset
from fedrec.simulation import local_superlink, run_federated

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_dataset(rows: list[tuple[str, str, int]], attributes: dict[str, list[str]] | None = None,
                 name: str = "tiny") -> Dataset:
    """A dataset from (user, item, time) rows, through the same build step as every loader."""
    frame = pd.DataFrame(rows, columns=["user", "item", "order"])
    return build_dataset(name, RawData(frame, item_attributes=attributes), min_rating=None,
                         kcore=0, source=name)


def load_node(overrides: str, partition_id: int | None, num_partitions: int | None,
              data_path: str | None = None) -> NodeData:
    """A node's data as a ClientApp process loads it: through a holder of its own, for one
    run, so no test sees another's data."""
    return NodeHolder().node(0, overrides, partition_id, num_partitions, data_path)


def typed_config(*overrides: str):
    return to_typed(compose_config(list(overrides)))


@pytest.fixture
def tiny_shop():
    """A small synthetic shop, the product's own default data, shrunk for speed."""
    from fedrec.data.synthetic import generate_shop

    cfg = typed_config("dataset.num_users=60", "dataset.num_items=40",
                       "dataset.num_categories=4")
    return generate_shop(cfg.dataset)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# A tiny federation: 3 silos of a 60-shopper synthetic shop.
TINY = ("dataset.num_users=60 dataset.num_items=40 dataset.num_categories=4 partition=silo "
        "partition.num_silos=3 eval.num_negatives=10 train.local_epochs=2 train.lr=0.01 "
        "model.embedding_dim=16 model.hidden_dim=32")


@pytest.fixture(scope="module")
def flower():
    """Runs `flwr run` on this project; stops the local SuperLink if it started one."""
    with local_superlink():
        yield run_federated


def wait_for_round(run: Path, server_round: int, runner: threading.Thread,
                   timeout: float) -> None:
    """Block until the run that ``runner`` drives has logged ``server_round`` in its
    metrics.jsonl (rounds count from 0)."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > server_round):
        assert runner.is_alive() and time.monotonic() < deadline, (
            f"round {server_round} never finished")
        time.sleep(0.05)


def train_message(overrides: str, **config: Any) -> tuple[Message, Context]:
    """A train message for partition 0 of 3, as the server would send it, and its context."""
    # What Flower's runtime sets in a process before it builds messages for a run.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    node = load_node(overrides, 0, 3)
    model = node_model(node)
    content = RecordDict({
        "arrays": ArrayRecord(torch_state_dict=model.shared_state()),
        "config": ConfigRecord({"lr": 0.01, "lr-decay": 1.0, "local-epochs": 1,
                                "batch-size": 16, "server-round": 1, **config}),
    })
    message = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={"overrides": overrides})
    return message, context


def per_example_batch(node, size: int, negatives: int):
    """The first ``size`` training examples of a node, each with its target and ``negatives``
    random items as its own candidates (label 0), as DP-SGD trains."""
    history, target = node.examples.history[:size], node.examples.target[:size]
    candidates = torch.cat([target.unsqueeze(1),
                            torch.randint(0, node.dataset.num_items, (size, negatives))], dim=1)
    return history, candidates, torch.zeros(size, dtype=torch.long)


def assert_opacus_per_example_gradients(model, batch, rows, *, only: str = "",
                                        atol: float = 1e-6) -> None:
    """Opacus' per-sample gradient of each of ``rows`` equals that example's gradient alone,
    for every parameter whose name starts with ``only``."""
    history, candidates, labels = batch
    private = GradSampleModule(copy.deepcopy(model))
    F.cross_entropy(private(history, candidates), labels).backward()
    per_sample = {n: p.grad_sample for n, p in private.named_parameters()}
    for j in rows:
        alone = copy.deepcopy(model)
        F.cross_entropy(alone(history[j:j + 1], candidates[j:j + 1]), labels[:1]).backward()
        for name, p in alone.named_parameters():
            if name.startswith(only):
                assert torch.allclose(per_sample[f"_module.{name}"][j], p.grad, atol=atol), name


def assert_wire_contract(wire_log: Path, overrides: str) -> list[dict]:
    """Every message the server sent or received in a run (its ``wire_log``) keeps the wire
    contract of that run's config (fedrec.wire); returns the layouts."""
    from fedrec.data.federation import build_federation
    from fedrec.model import TwoTower
    from fedrec.wire import violations

    cfg = typed_config(*overrides.split())
    shared = set(TwoTower.for_dataset(cfg.model, build_federation(cfg).dataset).shared_state())
    layouts = [json.loads(line) for line in wire_log.read_text().splitlines()]
    assert layouts, f"{wire_log} logged no message"
    problems = [p for layout in layouts
                for p in violations(cfg, layout, layout["direction"], shared)]
    assert not problems, problems
    return layouts
