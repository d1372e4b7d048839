"""What one federated node holds and does: its shoppers' data, a round of training, evaluation.

``client_app.py`` only moves Flower records in and out of these functions. A node's data is
read once per process and kept (a simulation process serves many virtual nodes, so the dataset is
loaded once and each node's slice cut once). Raw interactions, user ids and personal vectors stay
here: what leaves is listed, per mechanism, in ``fedrec.wire`` and docs/privacy.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from fedrec.config import (
    Config,
    ConfigError,
    DpSgdConfig,
    FileDatasetConfig,
    TwoTowerConfig,
    compose_config,
    to_typed,
)
from fedrec.data.dataset import Dataset
from fedrec.data.loaders import load_dataset
from fedrec.data.partition import assign_clients, client_users, num_clients
from fedrec.data.sequences import EvalCases, TrainExamples, heldout_cases, training_examples
from fedrec.data.split import Split, split_dataset
from fedrec.metrics import RankingSums, evaluate_case_sets
from fedrec.model import TwoTower
from fedrec.privacy import DpSgdLedger, train_dp_sgd
from fedrec.train import Objective, TrainResult, make_loader, make_optimizer, train


@dataclass(frozen=True)
class Federation:
    """The dataset as a simulation process sees it: loaded, split and assigned to clients."""

    cfg: Config
    dataset: Dataset
    split: Split
    assignment: np.ndarray

    @property
    def num_clients(self) -> int:
        return num_clients(self.assignment)

    def client_examples(self) -> np.ndarray:
        """Training examples per client: one per interaction after each user's first."""
        per_user = (self.split.train.groupby("user").size() - 1).clip(lower=0)
        return np.bincount(self.assignment[per_user.index.to_numpy()],
                           weights=per_user.to_numpy(), minlength=self.num_clients)


@dataclass(frozen=True)
class NodeData:
    cfg: Config
    dataset: Dataset  # the catalogue (ids, attributes) every node shares
    users: np.ndarray
    split: Split
    examples: TrainExamples
    objective: Objective
    valid_cases: EvalCases
    test_cases: EvalCases


@functools.lru_cache(maxsize=2)
def compose_once(overrides: str) -> DictConfig:
    """One composition per process, so ${now:...} in output_dir resolves once."""
    return compose_config(overrides)


@functools.lru_cache(maxsize=2)
def load_config(overrides: str) -> Config:
    cfg = to_typed(compose_once(overrides))
    if not isinstance(cfg.model, TwoTowerConfig):
        raise ConfigError(f"model={cfg.model.kind} has no parameters to federate: "
                          "use model=two_tower (run the baseline with fedrec.centralized)")
    return cfg


@functools.lru_cache(maxsize=2)
def load_federation(overrides: str, data_path: str | None = None) -> Federation:
    return build_federation(load_config(overrides), data_path)


def build_federation(cfg: Config, data_path: str | None = None) -> Federation:
    """The dataset loaded, split and assigned to clients as ``cfg`` says (``data_path``: a
    deployed node's own data, which is one client)."""
    dataset_cfg = cfg.dataset
    if data_path is not None:
        if not isinstance(dataset_cfg, FileDatasetConfig):
            raise ConfigError(f"node config data-path={data_path!r} needs a file dataset, but "
                              f"dataset={dataset_cfg.format} reads no files")
        dataset_cfg = type(dataset_cfg)(**{**vars(dataset_cfg), "path": data_path})
    dataset = load_dataset(dataset_cfg)
    split = split_dataset(dataset)
    if data_path is not None:  # a deployed node is one client holding everything it reads
        return Federation(cfg, dataset, split, np.zeros(dataset.num_users, dtype=np.int64))
    return Federation(cfg, dataset, split, assign_clients(cfg.partition, dataset, split))


@functools.lru_cache(maxsize=4096)
def load_node(overrides: str, partition_id: int | None, num_partitions: int | None,
              data_path: str | None = None) -> NodeData:
    """A simulated node's partition (partition_id of num_partitions), or, in a deployment,
    everything in the node's own ``data_path``."""
    cfg = load_config(overrides)
    if data_path is not None:
        if cfg.federation != "deployment":
            raise ConfigError(f"this node reads its own data-path={data_path!r}, but the run has"
                              " federation=simulation: add federation=deployment (and "
                              "dataset.catalogue) to the overrides")
        partition_id = 0  # the node's own data is one client's
    else:
        if cfg.federation == "deployment":
            raise ConfigError("federation=deployment, but this node has no data-path in its "
                              "node config: start it with --node-config \"data-path='...'\"")
        if partition_id is None or num_partitions is None:
            raise ConfigError("this node has neither partition-id/num-partitions (simulation) "
                              "nor data-path (deployment) in its node config")
    fed = load_federation(overrides, data_path)
    if data_path is None and num_partitions != fed.num_clients:
        raise ConfigError(
            f"the federation has {num_partitions} nodes but partition={fed.cfg.partition.kind}"
            f" gives {fed.num_clients} clients on {fed.dataset.name}: run with "
            f"--federation-config \"num-supernodes={fed.num_clients}\"")
    return _node_data(fed, client_users(fed.assignment, partition_id))


def _node_data(fed: Federation, users: np.ndarray) -> NodeData:
    cfg, dataset = fed.cfg, fed.dataset
    split = fed.split.for_users(users)
    examples = training_examples(split.train, dataset.num_items, cfg.model.max_history)
    valid_cases, test_cases = (
        heldout_cases(split, part, num_items=dataset.num_items, max_history=cfg.model.max_history,
                      num_negatives=cfg.eval.num_negatives, seed=cfg.eval.seed)
        for part in ("valid", "test"))
    dp_negatives = (cfg.privacy.negatives_per_example
                    if isinstance(cfg.privacy, DpSgdConfig) else None)
    objective = Objective.from_config(cfg.train, examples, dataset.num_items,
                                      per_example_negatives=dp_negatives)
    return NodeData(cfg, dataset, users, split, examples, objective, valid_cases, test_cases)


def node_model(node: NodeData) -> TwoTower:
    personal = node.users if node.cfg.model.personal_embedding else None
    return TwoTower.for_dataset(node.cfg.model, node.dataset, personal_users=personal)


def protected_units(node: NodeData) -> int:
    """How many units DP-SGD protects on this node: its shoppers with training examples, or
    its examples."""
    privacy = node.cfg.privacy
    if isinstance(privacy, DpSgdConfig) and privacy.unit == "example":
        return len(node.examples)
    return int(torch.unique(node.examples.user).numel())


def train_round(
    node: NodeData,
    model: TwoTower,
    *,
    lr: float,
    local_epochs: int,
    batch_size: int,
    proximal_mu: float,
    seed: int,
    ledger: DpSgdLedger | None = None,
) -> TrainResult:
    """Train ``model`` (already holding the global shared state) on the node's examples; with a
    ``ledger``, by DP-SGD on the ledger's plan (which fixes the steps: ``local_epochs`` and
    ``batch_size`` are unused), recording the round in the ledger. ``seed``: the client's own
    secret for the round, never the server's."""
    train_cfg = type(node.cfg.train)(**{**vars(node.cfg.train), "lr": lr})
    after_step = _proximal_step(model, lr * proximal_mu) if proximal_mu > 0 else None
    if ledger is None:
        loader = make_loader(node.examples, batch_size, seed)
        return train(model, make_optimizer(model.parameters(), train_cfg), loader,
                     node.objective, epochs=local_epochs, seed=seed, after_step=after_step)
    if model.personal is not None:  # refused when the config is composed; never trained here
        raise ValueError("DP-SGD does not cover a personal embedding")
    privacy = node.cfg.privacy
    assert isinstance(privacy, DpSgdConfig)
    return train_dp_sgd(model, make_optimizer(model.parameters(), train_cfg), node.examples,
                        node.objective, ledger, privacy, node.cfg.train.dp_sgd, seed=seed,
                        after_step=after_step)


def _proximal_step(model: TwoTower, strength: float) -> Callable[[], None]:
    """FedProx's proximal term mu/2 |w - w_global|^2, applied as its exact proximal step after
    each optimizer step. Being a separate step, it also works under DP-SGD, where Opacus
    builds the gradient from per-example gradients only (and it needs no data, so it costs no
    privacy)."""
    anchor = {name: p.detach().clone() for name, p in model.shared_state().items()}
    params = [(p, anchor[n]) for n, p in model.named_parameters() if n in anchor]
    shrink = strength / (1.0 + strength)

    def step() -> None:
        with torch.no_grad():
            for p, a in params:
                p.sub_(shrink * (p - a))

    return step


def evaluate_node(node: NodeData, model: TwoTower) -> tuple[RankingSums, RankingSums]:
    """Validation and test sums: the server reports the test metrics of the round that the
    validation metric picks (``eval.select_by``), as the centralized run picks its epoch."""
    valid, test = evaluate_case_sets(model, [node.valid_cases, node.test_cases],
                                     list(node.cfg.eval.ks), node.cfg.eval.batch_size)
    return valid, test
