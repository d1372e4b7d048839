"""Chronological leave-one-out split, or the split the data came with."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.dataset import Dataset

log = logging.getLogger(__name__)

# A user needs this many interactions to give one to test and one to validation.
MIN_INTERACTIONS_TO_HOLD_OUT = 3


@dataclass(frozen=True)
class Split:
    """Train, validation and test interactions (columns user, item, order), sorted by user."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def for_users(self, users: np.ndarray) -> Split:
        """The rows of exactly these users, as one client holds them."""
        return Split(*(_rows_of(frame, users) for frame in (self.train, self.valid, self.test)))


def split_dataset(dataset: Dataset) -> Split:
    frame = dataset.interactions[["user", "item", "order"]]
    if dataset.presplit:
        parts = [frame[dataset.interactions["split"] == name] for name in ("train", "valid",
                                                                           "test")]
        return Split(*(part.reset_index(drop=True) for part in parts))
    # Rows are sorted by user and time (ties keep file order), so counting from the end of
    # each user's rows gives the most recent items.
    from_end = frame.groupby("user").cumcount(ascending=False).to_numpy()
    size = frame.groupby("user")["item"].transform("size").to_numpy()
    held = size >= MIN_INTERACTIONS_TO_HOLD_OUT
    test = held & (from_end == 0)
    valid = held & (from_end == 1)
    short = int((frame.groupby("user").size() < MIN_INTERACTIONS_TO_HOLD_OUT).sum())
    if short:
        log.info("%d users have fewer than %d interactions: all of theirs stay in train",
                 short, MIN_INTERACTIONS_TO_HOLD_OUT)
    return Split(
        train=frame[~(test | valid)].reset_index(drop=True),
        valid=frame[valid].reset_index(drop=True),
        test=frame[test].reset_index(drop=True),
    )


def _rows_of(frame: pd.DataFrame, users: np.ndarray) -> pd.DataFrame:
    users = np.sort(np.asarray(users))
    column = frame["user"].to_numpy()
    if len(users) == 1:  # one shopper per client: two binary searches instead of a scan
        lo, hi = np.searchsorted(column, [users[0], users[0] + 1])
        return frame.iloc[lo:hi].reset_index(drop=True)
    return frame[np.isin(column, users)].reset_index(drop=True)
