"""The one local training loop: the centralized reference and every client call ``train``.

The caller owns the optimizer and the batches, so DP-SGD swaps in Opacus' private model,
optimizer and Poisson-sampled loader, and FedProx passes its proximal step as ``after_step``,
without a second copy of the loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrec.config import TrainConfig
from fedrec.data.sequences import TrainExamples

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # history, target, user


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean batch loss of the last epoch
    num_examples: int  # examples per epoch
    # The optimizer's state after the round, when the client keeps it (train_round).
    optimizer_state: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Objective:
    """How a batch becomes a loss: the config's loss plus what it needs about the items."""

    num_items: int
    num_negatives: int
    # log of each item's share of the training targets, for the logQ correction; None disables.
    item_log_share: torch.Tensor | None
    # DP-SGD bounds each example's influence, so an example's loss must depend on that example
    # alone: no in-batch negatives (they are other records), its own uniform negatives instead.
    per_example: bool = False
    # (logits, labels) -> mean loss; Opacus' ghost clipping substitutes its own wrapper.
    criterion: Callable[[torch.Tensor, torch.Tensor], Any] = F.cross_entropy

    @classmethod
    def from_config(cls, cfg: TrainConfig, examples: TrainExamples, num_items: int, *,
                    per_example_negatives: int | None = None,
                    shopper_negatives: int | None = None) -> Objective:
        """DP-SGD's negatives. ``per_example_negatives``: each example draws its own (the unit
        is the example). ``shopper_negatives``: a batch holds one shopper's examples (the
        unit), which share them; no logQ, since the batch's other targets, that shopper's own,
        are masked and the candidates are uniform."""
        if shopper_negatives is not None:
            return cls(num_items, shopper_negatives, None)
        per_example = per_example_negatives is not None or cfg.loss == "bpr"
        log_share = None
        # With per-example uniform negatives every item is equally likely: logQ is a constant.
        if cfg.logq_correction and not per_example:
            counts = torch.bincount(examples.target, minlength=num_items).float()
            log_share = torch.log(counts.clamp(min=1.0) / max(len(examples), 1))
        # BPR is the per-example softmax over the target and one negative:
        # -log sigmoid(a - b) = cross-entropy of [a, b] at label 0.
        negatives = cfg.num_negatives
        if cfg.loss == "bpr":
            negatives = 1
        elif per_example_negatives is not None:
            negatives = per_example_negatives
        return cls(num_items, negatives, log_share, per_example=per_example)

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Any:
        history, target, user = batch
        if self.per_example:
            negatives = torch.randint(0, self.num_items, (len(target), self.num_negatives),
                                      generator=generator)
            logits = model(history, torch.cat([target.unsqueeze(1), negatives], dim=1), user)
            false_negative = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1),
                                        negatives == target.unsqueeze(1)], dim=1)
            logits = logits.masked_fill(false_negative, -math.inf)
            return self.criterion(logits, torch.zeros_like(target))
        return self.criterion(self._shared_logits(model, batch, generator),
                              torch.arange(len(target)))

    def _shared_logits(self, model: nn.Module, batch: Batch,
                       generator: torch.Generator) -> torch.Tensor:
        """Softmax over the batch's targets plus uniform negatives, corrected by logQ: an item
        shows up as a candidate B*share + N/V times per batch in expectation, and popular items
        would otherwise be pushed down just for being sampled often."""
        history, target, user = batch
        size = len(target)
        negatives = torch.randint(0, self.num_items, (self.num_negatives,), generator=generator)
        candidates = torch.cat([target, negatives])
        logits = model(history, candidates, user)
        if self.item_log_share is not None:
            expected = size * self.item_log_share.exp()[candidates] + (
                self.num_negatives / self.num_items)
            logits = logits - torch.log(expected)
        return logits.masked_fill(false_negatives(target, negatives, user), -math.inf)


def false_negatives(target: torch.Tensor, negatives: torch.Tensor,
                    user: torch.Tensor | None = None) -> torch.Tensor:
    """Which of a shared softmax's candidates (the batch's targets, then the negatives) are no
    negatives for each row: another row's target equal to this row's item or of this row's
    user, and a negative equal to this row's item."""
    in_batch = target.unsqueeze(1) == target.unsqueeze(0)
    if user is not None:
        in_batch |= user.unsqueeze(1) == user.unsqueeze(0)
    in_batch &= ~torch.eye(len(target), dtype=torch.bool)
    sampled = negatives.unsqueeze(0) == target.unsqueeze(1)
    return torch.cat([in_batch, sampled], dim=1)


class _BatchedRows(TensorDataset):
    """Fetches a batch with one index per tensor. DataLoader's default, one example at a time
    then a stack, cost about 9 us an example: an ML-100K shop's round took 0.51 s with it and
    takes 0.45 s without."""

    def __getitems__(self, indices: list[int]) -> Batch:
        rows = torch.as_tensor(indices, dtype=torch.long)
        history, target, user = (t[rows] for t in self.tensors)
        return history, target, user


def batch_collate(batch: Batch) -> Batch:
    return batch  # __getitems__ already returns the batch; collate has nothing left to do


def examples_dataset(examples: TrainExamples) -> TensorDataset:
    """The examples as a dataset that fetches a whole batch at once (also for Opacus'
    DPDataLoader, whose Poisson draws may be empty: zero-row tensors)."""
    return _BatchedRows(examples.history, examples.target, examples.user)


def make_loader(examples: TrainExamples, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(examples_dataset(examples), batch_size=batch_size, shuffle=True,
                      generator=generator, collate_fn=batch_collate)


def make_optimizer(params: Iterable[nn.Parameter], optimizer: str, *, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class DecayChoice:
    weight_decay: float
    why: str  # one line for the log: the key that set it, or the statistic that chose it


def choose_weight_decay(cfg: TrainConfig, shoppers: torch.Tensor, *,
                        federated: bool) -> DecayChoice:
    """train.weight_decay, or with null, what train.auto_decay picks for the examples whose
    shoppers are ``shoppers`` (one id per example): by their median number of training
    examples, and by whether the optimizer trains one client of a federation or the whole
    centralized model. ``shoppers`` is the data this optimizer trains on, never more, so a client
    decides from its own shoppers alone and tells no one."""
    if cfg.weight_decay is not None:
        return DecayChoice(cfg.weight_decay, f"train.weight_decay={cfg.weight_decay:g}")
    auto = cfg.auto_decay
    counts = torch.unique(shoppers, return_counts=True)[1]
    median = float(counts.float().median()) if len(counts) else 0.0
    short = median < auto.short_history_below
    kind, pair = ("short", auto.short_histories) if short else ("long", auto.long_histories)
    where = "federated" if federated else "centralized"
    decay = getattr(pair, where)
    return DecayChoice(decay, f"weight decay {decay:g}: the median shopper has {median:g} "
                       f"training examples ({'<' if short else '>='} "
                       f"train.auto_decay.short_history_below={auto.short_history_below:g}: "
                       f"{kind} histories, {where})")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    objective: Objective,
    *,
    epochs: int,
    seed: int,
    after_step: Callable[[], None] | None = None,
    empty_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train for ``epochs`` passes over ``batches``; ``after_step`` runs after each optimizer
    step (FedProx's proximal pull toward the global model); ``empty_step`` takes the step of an
    empty batch (DP-SGD: noise alone, as its accountant assumes), which is otherwise skipped."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    last_loss, num_examples = math.nan, 0
    for _ in range(epochs):
        total, count, num_examples = 0.0, 0, 0
        for batch in batches:
            if len(batch[1]) == 0:  # Poisson sampling can draw an empty batch
                if empty_step is not None:
                    empty_step()
                    if after_step is not None:
                        after_step()
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = objective(model, batch, generator)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach())
            count += 1
            num_examples += len(batch[1])
        last_loss = total / max(count, 1)
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"training loss became {last_loss}: lower train.lr")
    return TrainResult(loss=last_loss, num_examples=num_examples)


def row_chunks(sizes: torch.Tensor, rows: int) -> list[slice]:
    """Consecutive shoppers (``sizes``: each one's rows) in chunks of at least ``rows`` rows (the
    last one: what is left): what one pass over several shoppers' rows holds."""
    chunks, start, filled = [], 0, 0
    for end, size in enumerate(sizes.tolist(), 1):
        filled += size
        if filled >= rows:
            chunks.append(slice(start, end))
            start, filled = end, 0
    if start < len(sizes):
        chunks.append(slice(start, len(sizes)))
    return chunks
