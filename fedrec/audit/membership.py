"""What anyone who can query the trained guide learns: scores of (shopper, item) pairs.

A pair's score is the model's log-probability of the item, over the whole catalogue, given what
the shopper bought before it: the training example a member was (the loss attack). The
calibrated score subtracts the item's mean log-probability over reference histories that do not
hold it: a popular item scores high for everyone, which says nothing about one shopper.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedrec.model import TwoTower

BATCH = 512


def catalogue_log_probabilities(model: TwoTower, item_vectors: torch.Tensor,
                                histories: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
    """log P(item | history) for every catalogue item, under the model's softmax, in batches
    of histories; the last ``model.max_history`` items of each are read, as in training."""
    if any(len(h) == 0 for h in histories):
        raise ValueError("an empty history: every scored pair needs one item to read")
    model.eval()
    with torch.no_grad():
        for first in range(0, len(histories), BATCH):
            chunk = histories[first:first + BATCH]
            width = min(model.max_history, max(len(h) for h in chunk))
            padded = torch.full((len(chunk), width), model.num_items, dtype=torch.long)
            for row, history in enumerate(chunk):
                kept = list(history)[-width:]
                padded[row, width - len(kept):] = torch.as_tensor(kept, dtype=torch.long)
            logits = model.user_vectors(padded) @ item_vectors.T / model.temperature
            yield logits.log_softmax(dim=1).double()


def item_baseline(model: TwoTower, item_vectors: torch.Tensor,
                  histories: Sequence[Sequence[int]]) -> np.ndarray:
    """Each item's mean log-probability over ``histories`` that do not hold it."""
    total = torch.zeros(item_vectors.shape[0], dtype=torch.float64)
    count = torch.zeros_like(total)
    first = 0
    for batch in catalogue_log_probabilities(model, item_vectors, histories):
        held = torch.zeros_like(batch, dtype=torch.bool)
        for row, history in enumerate(histories[first:first + len(batch)]):
            held[row, torch.as_tensor(list(history), dtype=torch.long)] = True
        total += batch.masked_fill(held, 0.0).sum(0)
        count += (~held).sum(0)
        first += len(batch)
    return (total / count.clamp(min=1)).numpy()


def pair_scores(model: TwoTower, item_vectors: torch.Tensor,
                histories: Sequence[Sequence[int]], items: Sequence[int]) -> np.ndarray:
    """log P(item | history) per pair."""
    if len(histories) != len(items):
        raise ValueError(f"{len(histories)} histories for {len(items)} items")
    scores, first = [], 0
    for batch in catalogue_log_probabilities(model, item_vectors, histories):
        picked = torch.as_tensor(list(items[first:first + len(batch)]), dtype=torch.long)
        scores.append(batch.gather(1, picked[:, None])[:, 0].numpy())
        first += len(batch)
    return np.concatenate(scores)
