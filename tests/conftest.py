"""Shared fixtures: tiny hand-made datasets, the Flower runtime on a tiny shop, a whole federated
run in this process, and where the licensed real data lives."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from opacus import GradSampleModule

from fedrec.client.app import app as client_app
from fedrec.client.task import NodeData, NodeHolder, node_model
from fedrec.config import compose_config, to_typed
from fedrec.data.dataset import Dataset, RawData, build_dataset
from fedrec.data.federation import build_federation
from fedrec.server.run import plan_run, start
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


def last_round_model(run: Path, rounds: int) -> dict[str, torch.Tensor]:
    """The global model after the run's last round (checkpoint.pt), not model.pt's: a run
    picks its round by validation and may keep the untrained round 0, a SecAgg+ run (no
    validation) its last."""
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == rounds
    return checkpoint["arrays"]


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


SERVER = 1  # the SuperLink's node id, which a ServerApp's messages come from


class ClientAppGrid(Grid):
    """Flower's Grid interface over the real ClientApp in this process: each message goes to
    ``client_app`` with its node's Context, kept across messages as a SuperNode keeps it, so the
    real ServerApp run (fedrec.server.run) and Flower's strategies drive real nodes, in seconds.
    A message id is assigned as a SuperLink assigns it."""

    def __init__(self, overrides: str, num_nodes: int) -> None:
        self.contexts = {1000 + k: Context(
            run_id=1, node_id=1000 + k, state=RecordDict(), run_config={"overrides": overrides},
            node_config={"partition-id": k, "num-partitions": num_nodes})
            for k in range(num_nodes)}
        self.replies: dict[str, Message] = {}

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            TaskIdentity.node_id = message.metadata.dst_node_id  # the node's process
            reply = client_app(message, self.contexts[message.metadata.dst_node_id])
            TaskIdentity.node_id = SERVER
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def federated_run_in_process(overrides: str, pool_nodes: int | None,
                   tmp_path) -> tuple[dict, dict, ClientAppGrid]:
    """A whole federated run, the ServerApp's own (plan_run, start), over nodes in this
    process; its summary, its final global model and its nodes."""
    out = tmp_path / f"pool-{pool_nodes}"
    overrides = (f"{overrides} partition.pool_nodes={'null' if pool_nodes is None else pool_nodes}"
                 f" output_dir={out} guide_example=false")
    fed = build_federation(typed_config(*overrides.split()))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER, 1
    grid = ClientAppGrid(overrides, fed.num_nodes)
    summary = start(plan_run(compose_config(overrides), grid), Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    final = torch.load(out / "checkpoint.pt", weights_only=True)["arrays"]  # the last round
    return summary, final, grid
