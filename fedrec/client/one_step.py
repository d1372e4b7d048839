"""A pool node's shoppers trained together, when each shopper's round is one plain SGD step.

A device with n examples that trains one local epoch in batches of at least n, by plain SGD on
the sampled softmax, takes exactly one step from the global model w: w - lr g_u(w), g_u the
gradient of its mean loss. The weighted mean a pool node replies with is then
w - lr sum_u n_u g_u(w) / sum_u n_u, which is one SGD step on the sum of the shoppers' summed
losses: each loss still over that shopper's own examples and the negatives its own seed draws.
So the node takes that step once, with one forward and backward pass over all its shoppers'
rows, instead of a model reset, a dense item-table gradient and an optimizer step per shopper.
Weight decay and FedProx's proximal step are linear in the step, so they carry over.

Nothing else is batched this way: Adam's first step, several steps, dropout (of either kind:
its masks come from the node's generator, not from each shopper's seed) and DP-SGD's
clipping are not linear in one shopper's gradient, so those shoppers train one at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedrec.client.task import NodeData, TrainRequest, proximal_step
from fedrec.model import TwoTower
from fedrec.train import TrainResult, make_optimizer

# Rows of one forward pass, which holds a (shoppers x their most rows x negatives) product.
CHUNK_ROWS = 2048


def one_step_shoppers(node: NodeData, shoppers: list[int],
                      request: TrainRequest) -> tuple[list[int], list[int]]:
    """``shoppers`` split into those whose round is one plain SGD step, and the others."""
    cfg = node.cfg
    # train.weight_decay=null: each shopper picks their own decay, so their steps differ.
    linear = (cfg.train.optimizer == "sgd" and cfg.train.weight_decay is not None
              and cfg.train.loss == "sampled_softmax"
              and cfg.model.dropout == 0 and cfg.model.history_id_dropout == 0
              and request.local_epochs == 1
              and cfg.privacy.mechanism == "none" and not cfg.model.personal_embedding)
    if not linear:
        return [], list(shoppers)
    counts = node.shopper_rows.count(shoppers)
    together = [s for s, n in zip(shoppers, counts, strict=True) if 0 < n <= request.batch_size]
    chosen = set(together)
    return together, [s for s in shoppers if s not in chosen]


def train_one_step_together(node: NodeData, model: TwoTower, seeds: dict[int, int], *,
                            lr: float, proximal_mu: float) -> tuple[dict[str, torch.Tensor],
                                                                    TrainResult]:
    """The weighted mean (by examples) of the models the shoppers in ``seeds`` (shopper: the
    seed of its round) would each send after its one step from ``model``'s state, the global
    model; and their mean loss. ``model`` is left holding that mean."""
    cfg = node.cfg
    asked = sorted(seeds)
    counts = torch.tensor(node.shopper_rows.count(asked))
    # Shoppers of about the same number of rows side by side, so a chunk pads little.
    order = torch.argsort(counts, stable=True)
    order = order[counts[order] > 0]
    shoppers, sizes = torch.tensor(asked)[order], counts[order]
    rows = node.shopper_rows.rows(shoppers.tolist())
    model.train()
    assert cfg.train.weight_decay is not None  # one_step_shoppers: a decay all of them share
    optimizer = make_optimizer(model.parameters(), cfg.train.optimizer, lr=lr,
                               weight_decay=cfg.train.weight_decay)
    after_step = proximal_step(model, lr * proximal_mu) if proximal_mu > 0 else None
    optimizer.zero_grad(set_to_none=True)
    total_loss, first = 0.0, 0
    for chunk in _chunks(sizes, CHUNK_ROWS):
        count = int(sizes[chunk].sum())
        # Each shopper's negatives, drawn as its own round draws them: first, from its seed.
        negatives = torch.stack([
            torch.randint(0, model.num_items, (cfg.train.num_negatives,),
                          generator=torch.Generator().manual_seed(seeds[int(s)]))
            for s in shoppers[chunk]])
        loss = _summed_loss(model, node, rows[first:first + count], sizes[chunk], negatives)
        (loss / len(rows)).backward()  # gradients add up over the chunks
        total_loss += float(loss.detach()) / len(rows)
        first += count
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"training loss became {total_loss}: lower train.lr")
    optimizer.step()
    if after_step is not None:
        after_step()
    return model.shared_state(), TrainResult(loss=total_loss, num_examples=len(rows))


def _chunks(sizes: torch.Tensor, rows: int) -> list[slice]:
    """Consecutive shoppers in chunks of at least ``rows`` rows (the last one: what is left)."""
    chunks, start, filled = [], 0, 0
    for end, size in enumerate(sizes.tolist(), 1):
        filled += size
        if filled >= rows:
            chunks.append(slice(start, end))
            start, filled = end, 0
    if start < len(sizes):
        chunks.append(slice(start, len(sizes)))
    return chunks


def _summed_loss(model: TwoTower, node: NodeData, rows: torch.Tensor, sizes: torch.Tensor,
                 negatives: torch.Tensor) -> torch.Tensor:
    """Each row's sampled-softmax loss as its shopper's own batch computes it
    (``fedrec.train.Objective``), summed. ``rows``: the shoppers' rows, shopper by shopper,
    ``sizes[s]`` of them for shopper s, whose negatives are ``negatives[s]``. A shopper's batch
    holds only that shopper's rows, so the other rows' targets are masked as the same user's
    (in-batch negatives drop out): a row scores its target against its shopper's negatives, less
    those equal to the target, with logQ from that shopper's own targets."""
    examples, num_items = node.examples, model.num_items
    target = examples.target[rows]
    slot = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    place = torch.arange(len(rows)) - (torch.cumsum(sizes, 0) - sizes)[slot]  # within its shopper
    distinct, position = torch.unique(torch.cat([target, negatives.reshape(-1)]),
                                      return_inverse=True)
    items = model.item_vectors(distinct)
    target_item, negative_item = F.embedding(position, items).split(
        [len(target), negatives.numel()])
    user = model.user_vectors(examples.history[rows], examples.user[rows])
    # A shopper's rows against its negatives, as one (rows x negatives) product per shopper:
    # a copy of the negatives' vectors per row cost ten times more.
    width = int(sizes.max())
    padded = torch.zeros(len(sizes) * width, user.shape[1]).index_copy(0, slot * width + place,
                                                                        user)
    negative_scores = torch.bmm(padded.view(len(sizes), width, -1),
                                negative_item.view(*negatives.shape, -1).transpose(1, 2))
    logits = torch.cat([(user * target_item).sum(-1, keepdim=True),
                        negative_scores.view(len(sizes) * width, -1)[slot * width + place]],
                       dim=1) / model.temperature
    candidates = torch.cat([target.unsqueeze(1), negatives[slot]], dim=1)
    if node.cfg.train.logq_correction:
        # An item is a candidate of a shopper's batch max(its count there, 1) + N/V times in
        # expectation: Objective's B x share + N/V with the shopper's own shares.
        pair = slot * num_items + target
        pairs, counts = torch.unique(pair, return_counts=True)
        asked = slot.unsqueeze(1) * num_items + candidates
        found = torch.searchsorted(pairs, asked).clamp(max=len(pairs) - 1)
        count = torch.where(pairs[found] == asked, counts[found], 1).float()
        logits = logits - torch.log(count + negatives.shape[1] / num_items)
    sampled = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1),
                         negatives[slot] == target.unsqueeze(1)], dim=1)
    logits = logits.masked_fill(sampled, -math.inf)
    return F.cross_entropy(logits, torch.zeros_like(target), reduction="sum")
