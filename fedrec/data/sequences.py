"""Interactions turned into the tensors the model reads: prefix histories and evaluation cases.

Histories are right-aligned (the most recent item last) and padded with ``pad = num_items``, the
padding row of the item table. A training example predicts each item from the items before it,
never from the user's other items: that would let the model learn which item is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedrec.config import ConfigError
from fedrec.data.split import Split


@dataclass(frozen=True)
class TrainExamples:
    history: torch.Tensor  # (N, max_history) item indices, padded with num_items
    target: torch.Tensor  # (N,) the item that followed the history
    user: torch.Tensor  # (N,) whose history it is

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class EvalCases:
    """Users with held-out items, what is known of them, and their sampled negatives."""

    user: torch.Tensor  # (U,)
    history: torch.Tensor  # (U, max_history): the known items, most recent last
    known_rows: torch.Tensor  # (K,) row into user, with known_items: the items full ranking skips
    known_items: torch.Tensor  # (K,)
    heldout_rows: torch.Tensor  # (H,) row into user, with heldout_items: the items to rank
    heldout_items: torch.Tensor  # (H,)
    negatives: torch.Tensor  # (U, num_negatives): items the user never interacted with

    def __len__(self) -> int:
        return len(self.user)


def training_examples(train: pd.DataFrame, num_items: int, max_history: int) -> TrainExamples:
    """One example per interaction that has at least one earlier item of the same user."""
    users = train["user"].to_numpy()
    items = train["item"].to_numpy()
    position = train.groupby("user").cumcount().to_numpy()
    rows = np.flatnonzero(position >= 1)
    history = _histories(items, position, rows, max_history, num_items)
    return TrainExamples(torch.from_numpy(history), torch.from_numpy(items[rows].copy()),
                         torch.from_numpy(users[rows].copy()))


def eval_cases(
    known: pd.DataFrame,
    heldout: pd.DataFrame,
    interacted: pd.DataFrame,
    *,
    num_items: int,
    max_history: int,
    num_negatives: int,
    seed: int,
) -> EvalCases:
    """Cases for the users of ``heldout``; ``interacted`` lists every item a user ever touched,
    so that no sampled negative is a real positive."""
    known = known.sort_values(["user", "order"], kind="stable")
    eval_users = np.unique(heldout["user"].to_numpy())
    row_of = pd.Series(np.arange(len(eval_users)), index=eval_users)
    known = known[known["user"].isin(eval_users)]
    k_users, k_items = known["user"].to_numpy(), known["item"].to_numpy()

    # The last row of each user is the most recent known item: build the history ending there.
    position = known.groupby("user").cumcount().to_numpy()
    last = np.r_[k_users[1:] != k_users[:-1], True] if len(k_users) else np.zeros(0, bool)
    last_rows = np.flatnonzero(last)
    history = np.full((len(eval_users), max_history), num_items, dtype=np.int64)
    history[row_of.loc[k_users[last_rows]].to_numpy()] = _histories(
        k_items, position, last_rows, max_history, num_items, include_self=True)

    negatives = sample_negatives(interacted, eval_users, num_items, num_negatives, seed)
    return EvalCases(
        user=torch.from_numpy(eval_users.astype(np.int64)),
        history=torch.from_numpy(history),
        known_rows=torch.from_numpy(np.array(row_of.loc[k_users], dtype=np.int64)),
        known_items=torch.from_numpy(k_items.astype(np.int64)),
        heldout_rows=torch.from_numpy(
            np.array(row_of.loc[heldout["user"].to_numpy()], dtype=np.int64)),
        heldout_items=torch.from_numpy(np.array(heldout["item"], dtype=np.int64)),
        negatives=torch.from_numpy(negatives),
    )


def heldout_cases(split: Split, which: str, *, num_items: int, max_history: int,
                  num_negatives: int, seed: int) -> EvalCases:
    """Cases for the validation items (knowing train) or the test items (knowing train and
    validation), with negatives drawn from items outside all three."""
    interacted = pd.concat([split.train, split.valid, split.test], ignore_index=True)
    if which == "valid":
        known, heldout = split.train, split.valid
    elif which == "test":
        known, heldout = pd.concat([split.train, split.valid], ignore_index=True), split.test
    else:
        raise ValueError(f"which={which!r}: expected 'valid' or 'test'")
    return eval_cases(known, heldout, interacted, num_items=num_items, max_history=max_history,
                      num_negatives=num_negatives, seed=seed)


def check_negatives(num_negatives: int, num_items: int, split: Split, name: str) -> None:
    """Sampled evaluation draws its negatives from the items a shopper never touched. Too many
    would fail the first evaluation (of every client, in a federation), so a run is refused
    before it starts."""
    interacted = pd.concat([split.train, split.valid, split.test], ignore_index=True)
    most = int(interacted.groupby("user")["item"].nunique().max()) if len(interacted) else 0
    if num_items - most < num_negatives:
        raise ConfigError(f"eval.num_negatives={num_negatives} is more than the "
                          f"{num_items - most} items some shopper of {name} never interacted "
                          f"with: set eval.num_negatives <= {num_items - most}")


def sample_negatives(
    interacted: pd.DataFrame, users: np.ndarray, num_items: int, count: int, seed: int
) -> np.ndarray:
    """``count`` distinct never-interacted items per user, drawn from a generator seeded by
    (seed, user), so a user's negatives are the same wherever the user is evaluated."""
    grouped = interacted.groupby("user")["item"].apply(np.asarray)
    out = np.empty((len(users), count), dtype=np.int64)
    for row, user in enumerate(users):
        seen = grouped.get(user, np.zeros(0, np.int64))
        if num_items - len(np.unique(seen)) < count:
            raise ValueError(f"eval.num_negatives={count} is more than the "
                             f"{num_items - len(np.unique(seen))} items user {user} never "
                             "interacted with; lower eval.num_negatives")
        rng = np.random.default_rng([seed, int(user)])
        picked = np.zeros(0, np.int64)
        while len(picked) < count:
            draw = rng.integers(0, num_items, 2 * count + 8)
            draw = draw[~np.isin(draw, seen)]
            picked = np.concatenate([picked, draw])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]
        out[row] = picked[:count]
    return out


def _histories(items: np.ndarray, position: np.ndarray, rows: np.ndarray, length: int,
               pad: int, include_self: bool = False) -> np.ndarray:
    """The up-to-``length`` items before each of ``rows`` (within its user), most recent last."""
    history = np.full((len(rows), length), pad, dtype=np.int64)
    start = 0 if include_self else 1
    for back in range(start, length + start):
        ok = position[rows] >= back
        history[ok, length - 1 - back + start] = items[rows[ok] - back]
    return history
