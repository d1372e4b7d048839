"""The data an audit trains on: the run's dataset with canary shoppers put in at random and some
interactions of real shoppers held out, written as the generic CSV format so that the audited
run goes through the product's own loading, split and partition, unchanged.

- Canary shoppers (for the one-run epsilon): each a history of ``canary_length`` items drawn
  uniformly from the catalogue, put into the training data with probability 1/2, independently.
  The split sends each canary's last two items to validation and test, as it does for everyone;
  its other items are what training may see.
- Membership pairs (for membership inference on the trained guide): for each of ``shoppers``
  real shoppers, two of their training interactions drawn at random; one is kept (a member),
  the other removed before training (a non-member of the same shopper).

The audit's own randomness draws both, from ``seed``; training never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.dataset import Dataset
from fedrec.data.split import split_dataset

CANARY_PREFIX = "canary-"


@dataclass(frozen=True)
class AuditedData:
    interactions: Path  # user,item,timestamp
    items: Path  # item,attributes,title
    canaries: list[list[str]]  # each canary's items, oldest first (original ids)
    included: np.ndarray  # whether each canary is in the training data
    # user, item (original ids), before (the items the shopper bought before it, in the
    # training data): kept for training
    members: pd.DataFrame
    non_members: pd.DataFrame  # the same shoppers' interactions held out

    def overrides(self, name: str) -> str:
        """What makes a run read this data instead of the dataset it came from."""
        # The catalogue, not just item metadata: every item keeps its index, also one whose
        # only interaction was held out.
        return (f"dataset=csv dataset.name={name} dataset.path={self.interactions} "
                f"dataset.catalogue={self.items}")


def write_audited_data(dataset: Dataset, folder: Path, *, canaries: int, canary_length: int,
                       shoppers: int, seed: int) -> AuditedData:
    """Write the audited copy of ``dataset`` into ``folder``."""
    if canary_length < 4:
        raise ValueError(f"audit.canary_length={canary_length}: expected >= 4 (the split keeps "
                         "each shopper's last two items for validation and test, and a training "
                         "example reads an item before its own)")
    if dataset.presplit:
        raise ValueError(f"{dataset.name} comes pre-split, and the audited copy is split again "
                         "by time: audit a dataset that fedrec splits itself")
    if canary_length > dataset.num_items:
        raise ValueError(f"audit.canary_length={canary_length}: the catalogue has only "
                         f"{dataset.num_items} items")
    rng = np.random.default_rng([seed, 0x0A0D17])
    frame = dataset.interactions
    users, items = dataset.user_ids[frame["user"].to_numpy()], dataset.item_ids[
        frame["item"].to_numpy()]
    table = pd.DataFrame({"user": users.astype(str), "item": items.astype(str),
                          "timestamp": frame["order"].to_numpy()})

    train = split_dataset(dataset).train
    per_shopper = train.groupby("user").size()
    eligible = per_shopper.index[per_shopper >= 3].to_numpy()
    if shoppers > len(eligible):
        raise ValueError(f"audit.shoppers={shoppers}: only {len(eligible)} shoppers have 3 or "
                         "more training interactions")
    picked = np.sort(rng.choice(eligible, shoppers, replace=False))
    members, non_members = [], []
    for user in picked:
        bought = dataset.item_ids[train.loc[train["user"] == user, "item"].to_numpy()]
        # Each pair keeps an earlier item to read: what the shopper bought before it, which for
        # a member is its training example, and for the held-out item what it would have been.
        member, held_out = rng.choice(np.arange(1, len(bought)), 2, replace=False)
        before = [str(i) for k, i in enumerate(bought[:member]) if k != held_out]
        shopper = str(dataset.user_ids[user])
        members.append((shopper, str(bought[member]), before))
        non_members.append((shopper, str(bought[held_out]), [str(i) for i in bought[:held_out]]))
    members, non_members = (pd.DataFrame(rows, columns=["user", "item", "before"])
                            for rows in (members, non_members))
    dropped = pd.MultiIndex.from_frame(non_members[["user", "item"]])
    table = table[~pd.MultiIndex.from_frame(table[["user", "item"]]).isin(dropped)]

    histories = [[str(i) for i in dataset.item_ids[rng.choice(dataset.num_items, canary_length,
                                                               replace=False)]]
                 for _ in range(canaries)]
    included = rng.random(canaries) < 0.5
    canary_rows = pd.DataFrame(
        [(f"{CANARY_PREFIX}{k}", item, position) for k, history in enumerate(histories)
         if included[k] for position, item in enumerate(history)],
        columns=["user", "item", "timestamp"])
    folder.mkdir(parents=True, exist_ok=True)
    interactions, item_file = folder / "interactions.csv", folder / "items.csv"
    pd.concat([table, canary_rows]).to_csv(interactions, index=False)
    names = dataset.attribute_names
    joined = [str(n) for n in names if "|" in str(n)]
    if joined:
        raise ValueError(f"attribute {joined[0]!r} holds '|', which the audited data's catalogue "
                         "uses to separate attributes")
    titles = dataset.item_titles
    pd.DataFrame({
        "item": dataset.item_ids.astype(str),
        "attributes": ["|".join(str(names[a]) for a in row if a != 0)
                       for row in dataset.item_attributes],
        "title": titles if titles is not None else [""] * dataset.num_items,
    }).to_csv(item_file, index=False)
    return AuditedData(interactions, item_file, histories, included, members, non_members)
