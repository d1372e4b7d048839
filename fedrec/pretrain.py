"""Pretraining on the public catalogue, before any shopper's data is read.

The catalogue (each item's attributes: brands, categories, genres) is public, and so is the run's
seed, so a model pretrained on them says nothing about any shopper. It costs no privacy budget
under any mechanism, and the server runs it on the initial model (a deployed server holds the
catalogue too). Under noise, every step the model need not spend learning what the catalogue
already says ("items of one brand go together") is a step of signal kept.

The task is made-up shoppers: each browses a few items that share one attribute, and its target
is one more draw from the items with that attribute (independent draws, so a rare attribute's
target may repeat a history item), scored against the batch's other targets and uniform
negatives in a sampled softmax as ``fedrec.train.Objective``'s, without its logQ correction.
Another target that shares the attribute still counts as a negative, as in-batch negatives do.
The attribute is drawn with probability inversely proportional to how many items carry it: an
item's brand says more than a category that a third of the catalogue carries.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedrec.config import CataloguePretrainingConfig
from fedrec.model import TwoTower
from fedrec.train import false_negatives

log = logging.getLogger("fedrec.pretrain")


@dataclass
class PretrainResult:
    steps: int
    loss: float  # the mean loss of the last tenth of the steps
    seconds: float


class MadeUpShoppers:
    """Histories of items that share an attribute, and a target that shares it too, drawn from
    the catalogue alone."""

    def __init__(self, item_attributes: torch.Tensor, num_items: int, history_length: int,
                 generator: torch.Generator) -> None:
        attrs = item_attributes[:num_items]  # the model's last row is the padding item
        item, slot = (attrs != 0).nonzero(as_tuple=True)
        attribute = attrs[item, slot]
        order = torch.argsort(attribute, stable=True)
        self.items_by_attribute = item[order]
        self.counts = torch.bincount(attribute, minlength=int(attrs.max()) + 1)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        # An attribute of one item has no other item to be a target.
        weights = torch.where(self.counts >= 2, 1.0 / self.counts.clamp(min=1).float(), 0.0)
        if float(weights.sum()) == 0:
            raise ValueError("train.catalogue_pretraining.steps > 0 but no attribute is shared "
                             "by two items: the catalogue gives nothing to pretrain on; set "
                             "train.catalogue_pretraining.steps=0")
        self.weights = weights
        self.num_items = num_items
        self.history_length = history_length
        self.generator = generator

    def draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(histories, right-aligned with the padding item on the left; targets)."""
        g, length = self.generator, self.history_length
        attribute = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        count = self.counts[attribute]
        at = (torch.rand(batch_size, length + 1, generator=g) * count[:, None]).long()
        chosen = self.items_by_attribute[self.starts[attribute][:, None] + at]
        history, target = chosen[:, :length], chosen[:, length]
        # 1 to history_length items: a shopper's recent history is often a single item.
        kept = torch.randint(1, length + 1, (batch_size, 1), generator=g)
        padding = torch.arange(length).expand(batch_size, length) < length - kept
        return history.masked_fill(padding, self.num_items), target


def pretrain_on_catalogue(model: TwoTower, cfg: CataloguePretrainingConfig, *,
                          num_negatives: int, seed: int) -> PretrainResult | None:
    """Train ``model`` on made-up shoppers from its catalogue for ``cfg.steps`` steps; None
    when ``cfg.steps`` is 0."""
    if cfg.steps == 0:
        return None
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    shoppers = MadeUpShoppers(model.item_attributes, model.num_items,
                              min(cfg.history_length, model.max_history), generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr)
    model.train()
    last: list[float] = []
    for step in range(1, cfg.steps + 1):
        history, target = shoppers.draw(cfg.batch_size)
        negatives = torch.randint(0, model.num_items, (num_negatives,), generator=generator)
        # No users: a made-up shopper must not train a real shopper's personal vector.
        logits = model(history, torch.cat([target, negatives]))
        loss = F.cross_entropy(logits.masked_fill(false_negatives(target, negatives), -math.inf),
                               torch.arange(len(target)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step > cfg.steps - max(1, cfg.steps // 10):
            last.append(float(loss.detach()))
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            log.info("catalogue pretraining: step %d/%d  loss %.4f", step, cfg.steps,
                     float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    result = PretrainResult(steps=cfg.steps, loss=sum(last) / len(last),
                            seconds=time.perf_counter() - began)
    if not math.isfinite(result.loss):
        raise FloatingPointError(f"catalogue pretraining loss became {result.loss}: lower "
                                 f"train.catalogue_pretraining.lr (now {cfg.lr})")
    return result
