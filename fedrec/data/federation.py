"""The dataset as a simulation sees it: loaded, split and assigned to clients. The server of a
simulation evaluates on it and counts its units; each simulated node cuts its own slice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.config import Config, ConfigError, FileDatasetConfig
from fedrec.data.dataset import Dataset
from fedrec.data.loaders import load_dataset
from fedrec.data.partition import assign_clients, num_clients
from fedrec.data.sequences import check_negatives
from fedrec.data.split import Split, split_dataset


@dataclass(frozen=True)
class Federation:
    cfg: Config
    dataset: Dataset
    split: Split
    assignment: np.ndarray

    @property
    def num_clients(self) -> int:
        return num_clients(self.assignment)

    @property
    def num_nodes(self) -> int:
        """The SuperNodes a simulation needs: one per client, or a pool of virtual shoppers'."""
        pool = self.cfg.pool_nodes
        return self.num_clients if pool is None else min(pool, self.num_clients)

    def node_clients(self, node: int) -> np.ndarray:
        """The clients SuperNode ``node`` holds: itself, or on a pool every num_nodes-th
        shopper from ``node`` on. Public: the server finds a shopper's node the same way."""
        return np.arange(node, self.num_clients, self.num_nodes)

    def check_nodes(self, nodes: int | None) -> None:
        """A simulation needs one node per client the partition makes, or the pool's size."""
        if nodes == self.num_nodes:
            return
        what = (f"partition={self.cfg.partition.kind} gives {self.num_clients} clients on "
                f"{self.dataset.name}" if self.cfg.pool_nodes is None else
                f"partition.pool_nodes={self.cfg.pool_nodes} puts the {self.num_clients} "
                f"shoppers of {self.dataset.name} on {self.num_nodes} nodes")
        raise ConfigError(f"the federation has {nodes} nodes but {what}: run with "
                          f"--federation-config \"num-supernodes={self.num_nodes}\"")

    def node_users(self, node: int) -> np.ndarray:
        """The shoppers whose data SuperNode ``node`` holds."""
        clients = self.node_clients(node)
        return np.flatnonzero(np.isin(self.assignment, clients))

    def client_examples(self) -> np.ndarray:
        """Training examples per client: one per interaction after each user's first."""
        per_user = (self.split.train.groupby("user").size() - 1).clip(lower=0)
        return np.bincount(self.assignment[per_user.index.to_numpy()],
                           weights=per_user.to_numpy(), minlength=self.num_clients)


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
    check_negatives(cfg.eval.num_negatives, dataset.num_items, split, dataset.name)
    if data_path is not None:  # a deployed node is one client holding everything it reads
        return Federation(cfg, dataset, split, np.zeros(dataset.num_users, dtype=np.int64))
    return Federation(cfg, dataset, split, assign_clients(cfg.partition, dataset, split))

