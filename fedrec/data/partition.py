"""Who holds which shoppers: one client per shopper, or one per shop (silo)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from fedrec.config import PartitionConfig, SiloPartitionConfig
from fedrec.data.dataset import Dataset
from fedrec.data.split import Split

log = logging.getLogger(__name__)


def assign_clients(cfg: PartitionConfig, dataset: Dataset, split: Split) -> np.ndarray:
    """The client index of every user; clients are numbered 0..num_clients-1."""
    if cfg.kind == "user":
        return np.arange(dataset.num_users)
    assert isinstance(cfg, SiloPartitionConfig)
    rng = np.random.default_rng(cfg.seed)
    if cfg.num_silos > dataset.num_users:
        raise ValueError(f"partition.num_silos={cfg.num_silos} is more than the "
                         f"{dataset.num_users} users of {dataset.name}")
    if cfg.assignment == "iid":
        return rng.permutation(dataset.num_users) % cfg.num_silos
    return _dirichlet(cfg, rng, _dominant_category(dataset, split))


def num_clients(assignment: np.ndarray) -> int:
    return int(assignment.max()) + 1


def client_users(assignment: np.ndarray, client: int) -> np.ndarray:
    if not 0 <= client < num_clients(assignment):
        raise ValueError(f"client {client} does not exist: there are "
                         f"{num_clients(assignment)} clients (0..{num_clients(assignment) - 1})")
    return np.flatnonzero(assignment == client)


def _dominant_category(dataset: Dataset, split: Split) -> np.ndarray:
    """Each user's most frequent first item attribute in train (the category, for the shop)."""
    category = dataset.item_attributes[:, 0]
    if (category == 0).all():
        log.warning("%s has no item attributes: Dirichlet silos differ in size, not in taste",
                    dataset.name)
    counts = pd.DataFrame({"user": split.train["user"].to_numpy(),
                           "category": category[split.train["item"].to_numpy()]})
    top = counts.value_counts().reset_index().drop_duplicates("user")
    dominant = np.zeros(dataset.num_users, dtype=np.int64)
    dominant[top["user"].to_numpy()] = top["category"].to_numpy()
    return dominant


def _dirichlet(cfg: SiloPartitionConfig, rng: np.random.Generator,
               group: np.ndarray) -> np.ndarray:
    """Users of each group go to silos in Dirichlet(alpha) proportions drawn per group."""
    assignment = np.empty(len(group), dtype=np.int64)
    for value in np.unique(group):
        members = np.flatnonzero(group == value)
        share = rng.dirichlet(np.full(cfg.num_silos, cfg.alpha))
        assignment[members] = rng.choice(cfg.num_silos, size=len(members), p=share)
    sizes = np.bincount(assignment, minlength=cfg.num_silos)
    moved = 0
    for empty in np.flatnonzero(sizes == 0):
        # An empty silo cannot train; give it one user of the largest silo and say so.
        donor = int(np.argmax(np.bincount(assignment, minlength=cfg.num_silos)))
        assignment[np.flatnonzero(assignment == donor)[0]] = empty
        moved += 1
    if moved:
        log.warning("Dirichlet(alpha=%s) left %d of %d silos empty: moved one user into each",
                    cfg.alpha, moved, cfg.num_silos)
    return assignment


def client_split(assignment: np.ndarray, split: Split, client: int) -> Split:
    """Exactly the train, validation and test rows of one client's users."""
    return split.for_users(client_users(assignment, client))
