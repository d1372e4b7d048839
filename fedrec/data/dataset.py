"""The one representation every loader produces, and the filtering that all of them share.

A loader only parses its format into raw tables with the original ids; ``build_dataset`` then
applies the implicit-feedback threshold, removes duplicates, applies k-core filtering and
re-indexes users and items to contiguous integers, logging every row it drops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Dataset:
    """Interactions over contiguous ids, with maps back to the original ids.

    ``interactions`` has int64 columns ``user``, ``item``, ``order`` (timestamp, or the position in
    the file when the data has no time), ``rating`` when the data has ratings, and ``split`` when
    the data comes pre-split. Rows are sorted by user, then order, then file position, so a user's
    rows read as their history.
    """

    name: str
    interactions: pd.DataFrame
    user_ids: np.ndarray  # original id (str) of each contiguous user index
    item_ids: np.ndarray  # original id (str) of each contiguous item index
    # (num_items, max_attributes) indices into attribute_names; 0 pads (attribute_names[0]).
    item_attributes: np.ndarray
    attribute_names: np.ndarray
    item_titles: np.ndarray | None = None
    # (num_users, num_features) indices into user_feature_names; 0 means unknown.
    user_features: np.ndarray | None = None
    user_feature_names: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_attributes(self) -> int:
        """Attribute vocabulary size, padding included."""
        return len(self.attribute_names)

    def history(self, user: int) -> list[str]:
        """The original ids of the items of ``user`` (an index), oldest first."""
        rows = self.interactions["user"].to_numpy() == user
        return [str(self.item_ids[i]) for i in self.interactions["item"].to_numpy()[rows]]

    @property
    def presplit(self) -> bool:
        return "split" in self.interactions.columns


@dataclass
class RawData:
    """What a format parser hands to ``build_dataset``: tables keyed by the original ids.

    ``interactions`` has string columns ``user`` and ``item``, a numeric ``order`` and optionally
    ``rating`` and ``split``; ``item_attributes`` maps an item id to its attribute names;
    ``user_features`` maps a user id to its categorical feature values ("gender=F", ...).
    """

    interactions: pd.DataFrame
    item_attributes: dict[str, list[str]] | None = None
    item_titles: dict[str, str] | None = None
    user_features: dict[str, list[str]] | None = None


def build_dataset(
    name: str, raw: RawData, *, min_rating: float | None, kcore: int, source: str,
    catalogue: np.ndarray | None = None,
) -> Dataset:
    """Filter, de-duplicate and re-index raw tables; ``source`` names the data in log lines.
    ``catalogue``: the item ids to index, when they must not depend on the data (nodes that
    each read their own data share one catalogue)."""
    frame = raw.interactions.copy()
    frame["user"] = frame["user"].astype(str)
    frame["item"] = frame["item"].astype(str)
    frame["position"] = np.arange(len(frame), dtype=np.int64)
    total = len(frame)

    if min_rating is not None:
        if "rating" not in frame.columns:
            raise ValueError(f"dataset.min_rating={min_rating} but {source} has no ratings; "
                             "set dataset.min_rating=null")
        keep = frame["rating"] >= min_rating
        _log_drop(source, (~keep).sum(), total, f"rating < {min_rating}")
        frame = frame[keep]

    # Keep the earliest occurrence of a repeated (user, item): a leave-one-out target must not
    # also sit in the training history.
    frame = frame.sort_values(["user", "order", "position"], kind="stable")
    dup = frame.duplicated(["user", "item"], keep="first")
    _log_drop(source, int(dup.sum()), total, "repeated (user, item) pairs")
    frame = frame[~dup]

    if kcore > 0:
        before = len(frame)
        frame = _kcore(frame, kcore)
        _log_drop(source, before - len(frame), total, f"{kcore}-core filtering")
    if frame.empty:
        raise ValueError(f"{source}: no interactions left after filtering "
                         f"(min_rating={min_rating}, kcore={kcore})")

    user_ids = _natural_order(frame["user"].unique().astype(object))
    item_ids = _natural_order(
        frame["item"].unique().astype(object) if catalogue is None else catalogue)
    user_index = pd.Series(np.arange(len(user_ids)), index=user_ids)
    item_index = pd.Series(np.arange(len(item_ids)), index=item_ids)

    out = pd.DataFrame({
        "user": user_index.loc[frame["user"].to_numpy()].to_numpy(dtype=np.int64),
        "item": item_index.loc[frame["item"].to_numpy()].to_numpy(dtype=np.int64),
        "order": frame["order"].to_numpy(dtype=np.int64),
        "position": frame["position"].to_numpy(dtype=np.int64),
    })
    if "rating" in frame.columns:
        out["rating"] = frame["rating"].to_numpy(dtype=np.float32)
    if "split" in frame.columns:
        out["split"] = pd.Categorical(frame["split"].to_numpy(), categories=list(SPLITS))
    out = out.sort_values(["user", "order", "position"], kind="stable").drop(columns="position")
    out = out.reset_index(drop=True)

    attributes, attribute_names = _encode_lists(item_ids, raw.item_attributes)
    titles = None
    if raw.item_titles is not None:
        titles = np.array([raw.item_titles.get(i, "") for i in item_ids], dtype=object)
    user_features = feature_names = None
    if raw.user_features is not None:
        user_features, feature_names = _encode_lists(user_ids, raw.user_features)

    dataset = Dataset(
        name=name, interactions=out, user_ids=user_ids, item_ids=item_ids,
        item_attributes=attributes, attribute_names=attribute_names, item_titles=titles,
        user_features=user_features, user_feature_names=feature_names,
    )
    log.info("%s: %d users, %d items, %d interactions, %d attributes", source, dataset.num_users,
             dataset.num_items, len(out), dataset.num_attributes - 1)
    return dataset


def catalogue_dataset(name: str, item_attributes: dict[str, list[str]],
                      item_titles: dict[str, str] | None) -> Dataset:
    """A dataset of items and no interactions: what a server that holds no data knows."""
    item_ids = _natural_order(np.array(list(item_attributes), dtype=object))
    attributes, attribute_names = _encode_lists(item_ids, item_attributes)
    titles = None
    if item_titles is not None:
        titles = np.array([item_titles.get(i, "") for i in item_ids], dtype=object)
    empty = pd.DataFrame({c: np.zeros(0, dtype=np.int64) for c in ("user", "item", "order")})
    return Dataset(name=name, interactions=empty, user_ids=np.zeros(0, dtype=object),
                   item_ids=item_ids, item_attributes=attributes,
                   attribute_names=attribute_names, item_titles=titles)


def _log_drop(source: str, dropped: int, total: int, why: str) -> None:
    if dropped:
        log.info("%s: dropped %d of %d rows: %s", source, dropped, total, why)


def _kcore(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    while True:
        user_counts = frame["user"].map(frame["user"].value_counts())
        item_counts = frame["item"].map(frame["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return frame
        frame = frame[keep]


def _natural_order(ids: np.ndarray) -> np.ndarray:
    """Sort ids numerically when they all are integers, so index i of ML data is id i+1."""
    try:
        as_int = np.array([int(i) for i in ids])
    except ValueError:
        return np.sort(ids)
    return ids[np.argsort(as_int, kind="stable")]


def _encode_lists(
    ids: np.ndarray, values: dict[str, list[str]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad per-id value lists into an index matrix over a vocabulary whose entry 0 is padding."""
    rows = [values.get(i, []) if values else [] for i in ids]
    vocab = ["<none>", *sorted({v for row in rows for v in row})]
    index = {v: n for n, v in enumerate(vocab)}
    width = max((len(row) for row in rows), default=0)
    matrix = np.zeros((len(ids), max(width, 1)), dtype=np.int64)
    for r, row in enumerate(rows):
        matrix[r, : len(row)] = [index[v] for v in row]
    return matrix, np.array(vocab, dtype=object)
