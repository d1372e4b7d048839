"""A pool node's shoppers trained together, when each shopper's round is one plain SGD step.

A device with n examples that trains one local epoch in batches of at least n, by plain SGD on
the sampled softmax, takes exactly one step from the global model w: w - lr g_u(w), g_u the
gradient of its mean loss. The weighted mean a pool node replies with is then
w - lr sum_u n_u g_u(w) / sum_u n_u, which is one SGD step on the sum of the shoppers' summed
losses: each loss still over that shopper's own examples and the negatives its own seed draws.
So the node takes that step once, with one forward and backward pass over all its shoppers'
rows, instead of a model reset, a dense item-table gradient and an optimizer step per shopper.
Weight decay and FedProx's proximal step are linear in the step, so they carry over.

Under user-level DP-FedAvg each shopper's update is clipped before the sum, which is not
linear in its gradient: ``train_one_step_clipped`` takes each shopper's gradient apart
(``fedrec.client.shopper_objective``), over the item rows that shopper reads (not the whole
table) and the dense layers, clips it, and adds the clipped steps. Without weight decay or a
proximal term, the step is -lr times the gradient, so its norm is lr times the gradient's.

Nothing else is batched this way: Adam's first step, several steps, dropout (of either kind:
its masks come from the node's generator, not from each shopper's seed) and DP-SGD's
clipping per example are not linear in one shopper's gradient, so those shoppers train one at
a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedrec.client.shopper_objective import ShopperObjective, log_expected, per_shopper_gradients
from fedrec.client.task import NodeData, TrainRequest, proximal_step
from fedrec.config import CentralDpConfig
from fedrec.model import ATTRIBUTE_TABLE, ITEM_TABLE, PERSONAL_PREFIX, TwoTower
from fedrec.train import TrainResult, make_optimizer, row_chunks

# Rows of one forward pass, which holds a (shoppers x their most rows x negatives) product.
CHUNK_ROWS = 2048
# Rows of one pass that takes each shopper's gradient apart: it holds every shopper's own
# gradients over the items it reads (about 280 on Beauty), which stay in cache at this size.
# On Beauty, 549 shoppers took 1.2 s at 128 rows, 1.4 s at 512 and 2.6 s at 2,048 (one
# thread, when the item tower still ran inside vmap); 559 took 0.59 / 0.55 / 0.53 s at 64 /
# 128 / 256 rows before it ran once per step (``fedrec.client.shopper_objective.ItemTower``).
CLIPPED_CHUNK_ROWS = 128


def one_step_shoppers(node: NodeData, shoppers: list[int],
                      request: TrainRequest) -> tuple[list[int], list[int]]:
    """``shoppers`` split into those whose round is one plain SGD step, and the others."""
    cfg = node.cfg
    # Clipped one by one: the step must be -lr times the gradient, for the norm to be lr times
    # the gradient's. Not the attention tower: torch has no vmap rule for its fused attention
    # and would loop over the shoppers there (measured on the mean tower only).
    clipped = (isinstance(cfg.privacy, CentralDpConfig) and cfg.train.weight_decay == 0
               and request.proximal_mu == 0 and cfg.model.user_tower == "mean")
    # train.weight_decay=null: each shopper picks their own decay, so their steps differ.
    one_step = (cfg.train.optimizer == "sgd" and cfg.train.weight_decay is not None
                and cfg.train.loss == "sampled_softmax"
                and cfg.model.dropout == 0 and cfg.model.history_id_dropout == 0
                and request.local_epochs == 1
                and (cfg.privacy.mechanism == "none" or clipped)
                and not cfg.model.personal_embedding)
    if not one_step:
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
    shoppers, sizes, rows = _by_size(node, seeds)
    model.train()
    assert cfg.train.weight_decay is not None  # one_step_shoppers: a decay all of them share
    optimizer = make_optimizer(model.parameters(), cfg.train.optimizer, lr=lr,
                               weight_decay=cfg.train.weight_decay)
    after_step = proximal_step(model, lr * proximal_mu) if proximal_mu > 0 else None
    optimizer.zero_grad(set_to_none=True)
    total_loss, first = 0.0, 0
    for chunk in row_chunks(sizes, CHUNK_ROWS):
        count = int(sizes[chunk].sum())
        negatives = _negatives(model, node, shoppers[chunk], seeds)
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


def train_one_step_clipped(node: NodeData, model: TwoTower, seeds: dict[int, int], *,
                           lr: float, clipping_norm: float) -> tuple[dict[str, torch.Tensor],
                                                                     TrainResult]:
    """The mean of the updates the shoppers in ``seeds`` (shopper: the seed of its round) would
    each send after its one step from ``model``'s state, the global model, each clipped to
    ``clipping_norm`` as ``fedrec.client.app.clipped_update`` clips it, added to that model;
    and their mean loss over their rows. ``model`` is left unchanged."""
    shoppers, sizes, rows = _by_size(node, seeds)
    model.train()
    dense = {name: p.detach() for name, p in model.named_parameters()
             if name not in (ITEM_TABLE, ATTRIBUTE_TABLE)
             and not name.startswith(PERSONAL_PREFIX)}
    # A frozen id table (item vectors and histories from attributes alone) has no gradient:
    # carrying its zero rows through every shopper's norm and sum cost a quarter of the step
    # (559 Beauty shoppers, one thread: 1.3 s, 1.0 s without).
    table_trains = model.item_embedding.weight.requires_grad
    attributes_train = model.attribute_embedding.weight.requires_grad
    objective = ShopperObjective(model, node.examples, logq=node.cfg.train.logq_correction)
    gradients = per_shopper_gradients(objective, dense, id_table=table_trains,
                                      attributes=attributes_train)
    step = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in dense.items()}
    tables = {name: model.get_parameter(name).detach() for name, trains in
              ((ITEM_TABLE, table_trains), (ATTRIBUTE_TABLE, attributes_train)) if trains}
    step.update({name: torch.zeros_like(table, dtype=torch.float64)
                 for name, table in tables.items()})
    total_loss, first = 0.0, 0
    for chunk in row_chunks(sizes, CLIPPED_CHUNK_ROWS):
        count = int(sizes[chunk].sum())
        batch = objective.batch(rows[first:first + count], sizes[chunk],
                                _negatives(model, node, shoppers[chunk], seeds))
        grads = gradients(batch)
        # Each array's norm in float32, added up in float64: float64 norms of every shopper's
        # arrays, and einsum's weighted sums below, cost 0.02 s of a 0.54 s step (Beauty).
        squares = sum(square.double() for square in grads.squares().values())
        update_norms = lr * squares.sqrt()
        scale = torch.where(update_norms > 0, (clipping_norm / update_norms).clamp(max=1.0), 1.0)
        weights = (-lr * scale).float()  # each shopper's clipped step, summed over the chunk
        for name, summed in grads.weighted_sum(dict.fromkeys(step, weights), tables).items():
            step[name] += summed.double()
        total_loss += float((grads.losses.double() * sizes[chunk]).sum())
        first += count
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"training loss became {total_loss}: lower train.lr")
    start = model.shared_state()
    mean = {name: (start[name].double() + step[name] / len(shoppers)).to(start[name].dtype)
            if name in step else start[name].clone() for name in start}
    return mean, TrainResult(loss=total_loss / len(rows), num_examples=len(rows))


def _by_size(node: NodeData, seeds: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """The shoppers of ``seeds`` that have rows, by their number of rows (so a chunk pads
    little); each one's number of rows; and their rows, shopper after shopper."""
    asked = sorted(seeds)
    counts = torch.tensor(node.shopper_rows.count(asked))
    order = torch.argsort(counts, stable=True)
    order = order[counts[order] > 0]
    shoppers, sizes = torch.tensor(asked)[order], counts[order]
    return shoppers, sizes, node.shopper_rows.rows(shoppers.tolist())


def _negatives(model: TwoTower, node: NodeData, shoppers: torch.Tensor,
               seeds: dict[int, int]) -> torch.Tensor:
    """Each shopper's negatives, drawn as its own round draws them: first, from its seed."""
    return torch.stack([
        torch.randint(0, model.num_items, (node.cfg.train.num_negatives,),
                      generator=torch.Generator().manual_seed(seeds[int(s)]))
        for s in shoppers])


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
    logits = logits - log_expected(node.cfg.train.logq_correction, slot, target, candidates,
                                   num_items, negatives.shape[1])
    sampled = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1),
                         negatives[slot] == target.unsqueeze(1)], dim=1)
    logits = logits.masked_fill(sampled, -math.inf)
    return F.cross_entropy(logits, torch.zeros_like(target), reduction="sum")
