"""One shopper's sampled-softmax loss, laid out so that ``torch.func.vmap`` takes many
shoppers' gradients apart in one pass: each shopper reads its distinct items (history items,
targets and its own negatives, which all its examples share) once, as rows of the id table
handed in, so a shopper's gradient holds the rows it read and not a copy of the whole table.

The attribute table is handed in the same way, as each read item's mean attribute row: that
mean is linear in the table, so ``attribute_gradients`` turns a shopper's gradient on its
items' means into its gradient on the attribute rows they reach. Taken inside ``vmap``, the
table's gradient was a dense copy per shopper through the embedding's backward: on Beauty
(638 attributes, 559 shoppers, one thread) the clipped step of a pool node took 0.83 s with it
and 0.60 s with the table left out altogether.

The item tower runs once over the catalogue when it has no dropout (``ItemTower``): a shopper's
gradient on its items' vectors comes out of ``vmap``, and the tower's backward runs per shopper
by hand from the shared forward pass.

Two paths take shoppers apart this way: a pool node's shoppers under user-level DP-FedAvg
(``fedrec.client.one_step``), and the sampled shoppers of a DP-SGD step by shopper
(``fedrec.client.dp_sgd``), where a shopper's examples are one unit and may share negatives.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.data.sequences import TrainExamples
from fedrec.model import ATTRIBUTE_TABLE, ITEM_TABLE, TwoTower, _masked_mean

# What ``attribute_gradients`` returns: for each (shopper, attribute row) pair a shopper's
# items reach, the shopper's slot, the attribute, and the gradient on that row.
AttributeRowGradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ShopperObjective(nn.Module):
    """One shopper's mean loss over its rows, as its own batch computes it
    (``fedrec.train.Objective``), as a function of the dense parameters (all but the id and
    attribute tables), of the id rows that shopper reads and of those items' mean attribute
    rows, and of its items' vectors when they are handed in (``ItemTower``); ``batch`` lays a
    chunk of shoppers out one per slot for ``vmap``."""

    def __init__(self, model: TwoTower, examples: TrainExamples, *, logq: bool) -> None:
        super().__init__()
        self.model = model
        self.examples = examples
        self.logq = logq

    def loss(self, dense: dict[str, torch.Tensor], read_rows: torch.Tensor,
             attr_mean: torch.Tensor, vectors: torch.Tensor | None,
             shopper: dict[str, torch.Tensor]) -> torch.Tensor:
        """``vectors``: the item vectors of the shopper's items, or None to compute them here
        (through the item tower, with ``dense``'s item MLP)."""
        params = {f"model.{name}": value for name, value in dense.items()}
        return torch.func.functional_call(self, params, (read_rows, attr_mean, vectors, shopper))

    def forward(self, read_rows: torch.Tensor, attr_mean: torch.Tensor,
                vectors: torch.Tensor | None, shopper: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model
        if vectors is None:
            vectors = model._vector(read_rows, attr_mean)
        read = read_rows if model.history_items == "id" else model._history_read(read_rows,
                                                                                  attr_mean)
        if model.history_encoder is None:
            user = model._user_from_pooled(shopper["history_weights"] @ read, shopper["user"])
        else:
            user = model._user_from_embedded(shopper["history"], read[shopper["history_at"]],
                                             shopper["user"])
        # Every row against every item the shopper read, then the logits picked out as numbers:
        # gathering item vectors per row (and scattering their gradients back) cost more.
        scores = user @ vectors.T
        logits = torch.cat([scores.gather(1, shopper["target_at"].unsqueeze(1)),
                            scores[:, shopper["negatives_at"]]], dim=1) / model.temperature
        logits = (logits - shopper["log_expected"]).masked_fill(shopper["sampled"], -math.inf)
        losses = F.cross_entropy(logits, torch.zeros_like(shopper["target_at"]),
                                 reduction="none")
        return (losses * shopper["real"]).sum() / shopper["real"].sum()

    def batch(self, rows: torch.Tensor, sizes: torch.Tensor,
              negatives: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each shopper's rows padded to the chunk's most, and the distinct items it reads
        (history items, targets, negatives), padded with the padding item, which no row
        reads; every row's items as places among its shopper's."""
        examples, num_items = self.examples, self.model.num_items
        history, target, user = examples.history[rows], examples.target[rows], examples.user[rows]
        shoppers, width = len(sizes), int(sizes.max())
        slot = torch.repeat_interleave(torch.arange(shoppers), sizes)
        place = torch.arange(len(rows)) - (torch.cumsum(sizes, 0) - sizes)[slot]
        # Each (shopper, item) once: the shopper's gradient on an item row is one row.
        span = num_items + 1
        keys = torch.cat([(slot.unsqueeze(1) * span + history).flatten(), slot * span + target,
                          (torch.arange(shoppers).unsqueeze(1) * span + negatives).flatten()])
        distinct, at = torch.unique(keys, return_inverse=True)
        owner = distinct // span
        owned = torch.bincount(owner, minlength=shoppers)
        local = torch.arange(len(distinct)) - (torch.cumsum(owned, 0) - owned)[owner]
        items = torch.full((shoppers, int(owned.max())), num_items)
        items[owner, local] = distinct % span
        at = local[at]
        history_at, target_at, negatives_at = at.split(
            [history.numel(), len(target), negatives.numel()])
        # A shopper's slots past its rows repeat its first row, which then counts for nothing:
        # a real row's inputs keep every layer finite (an all-padding history need not).
        first = torch.cumsum(sizes, 0) - sizes
        source = first.unsqueeze(1).repeat(1, width)
        source[slot, place] = torch.arange(len(rows))
        real = torch.zeros(shoppers, width)
        real[slot, place] = 1.0

        candidates = torch.cat([target.unsqueeze(1), negatives[slot]], dim=1)
        sampled = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1),
                             negatives[slot] == target.unsqueeze(1)], dim=1)
        expected = log_expected(self.logq, slot, target, candidates, num_items,
                                negatives.shape[1])
        history, history_at = history[source], history_at.view(history.shape)[source]
        if self.model.history_encoder is None:
            # The mean tower reads a row's history as a weighted sum of its shopper's items
            # (rows x items): one product per shopper, where gathering each history entry's
            # vector and scattering its gradient back cost 0.05 s of a Beauty pool node's 0.65 s
            # clipped step (559 shoppers, one thread).
            known = (history != num_items).float()
            weights = torch.zeros(shoppers, width, items.shape[1]).scatter_add_(
                2, history_at, known / known.sum(-1, keepdim=True).clamp(min=1.0))
            reads = {"history_weights": weights}
        else:
            reads = {"history": history, "history_at": history_at}
        return {"items": items, **reads, "user": user[source], "target_at": target_at[source],
                "negatives_at": negatives_at.view(negatives.shape),
                "log_expected": expected[source].float(), "sampled": sampled[source],
                "real": real}


@dataclass(frozen=True)
class ShopperGradients:
    """A chunk's per-shopper gradients: on the dense parameters ({name: (shoppers, *shape)}),
    on the id rows each read ((shoppers, items, dim), rows of ``items``; None when the id table
    does not train), on the attribute rows each reached (``attribute_gradients``, None when
    that table does not train); and each shopper's loss.

    A shopper's gradient on a table stays the rows it reached, never a table of its own: the
    two clipping paths (a pool node's under DP-FedAvg, DP-SGD by shopper) read norms and
    weighted sums from the rows."""

    dense: dict[str, torch.Tensor]
    id_rows: torch.Tensor | None
    attribute_rows: AttributeRowGradients | None
    losses: torch.Tensor
    items: torch.Tensor

    def squares(self) -> dict[str, torch.Tensor]:
        """Each shopper's squared norm of its gradient on each trained parameter, by name.
        A row a shopper read twice (the padding item) has a zero gradient in all but one
        place, so the rows' norm is the table's."""
        squares = {name: torch.linalg.vector_norm(g.flatten(1), dim=1) ** 2
                   for name, g in self.dense.items()}
        if self.id_rows is not None:
            squares[ITEM_TABLE] = self.id_rows.pow(2).sum((1, 2))
        if self.attribute_rows is not None:
            owner, _, attribute_grads = self.attribute_rows
            squares[ATTRIBUTE_TABLE] = torch.zeros(len(self.items)).index_add_(
                0, owner, attribute_grads.pow(2).sum(1))
        return squares

    def weighted_sum(self, weights: dict[str, torch.Tensor],
                     tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sum over the shoppers of each one's gradient on each trained parameter times its
        weight for that parameter (``weights[name]``: (shoppers,)); ``tables`` shape the
        tables' sums."""
        summed = {name: (weights[name] @ g.flatten(1)).view(g.shape[1:])
                  for name, g in self.dense.items()}
        if self.id_rows is not None:
            summed[ITEM_TABLE] = torch.zeros_like(tables[ITEM_TABLE]).index_add_(
                0, self.items.flatten(),
                (weights[ITEM_TABLE][:, None, None] * self.id_rows).flatten(0, 1))
        if self.attribute_rows is not None:
            owner, attribute, attribute_grads = self.attribute_rows
            summed[ATTRIBUTE_TABLE] = torch.zeros_like(tables[ATTRIBUTE_TABLE]).index_add_(
                0, attribute, weights[ATTRIBUTE_TABLE][owner, None] * attribute_grads)
        return summed


def per_shopper_gradients(objective: ShopperObjective, dense: dict[str, torch.Tensor], *,
                          id_table: bool, attributes: bool,
                          randomness: str = "error") -> Callable[[dict[str, torch.Tensor]],
                                                                 ShopperGradients]:
    """Each shopper's gradient of ``objective.loss`` at ``dense`` and the model's tables as they
    stand, for a ``batch`` of ``objective.batch``; the id table's and the attribute table's only
    when asked (``id_table``, ``attributes``: whether each trains).

    Without dropout in the item tower, an item's vector is the same for every shopper that reads
    it, so the tower runs once over the catalogue (``ItemTower``) and ``vmap`` takes each
    shopper's gradient on its items' vectors; the tower's backward then runs per shopper by
    hand. Inside ``vmap`` the tower ran forward again for each (shopper, item) pair: on Beauty
    (559 shoppers, about 280 items each) that was most of the clipped step."""
    model = objective.model
    means = attribute_means(model)
    tower = (ItemTower(model, means, dense) if model.item_mlp[2].p == 0
             and all(name in dense for name in ITEM_MLP) else None)
    per_shopper = torch.func.vmap(
        torch.func.grad_and_value(objective.loss, argnums=(
            0, *[1] * id_table, *[2] * attributes, *[3] * (tower is not None))),
        in_dims=(None, 0, 0, None if tower is None else 0, 0), randomness=randomness)
    inside = dense if tower is None else {name: value for name, value in dense.items()
                                          if name not in ITEM_MLP}

    def gradients(batch: dict[str, torch.Tensor]) -> ShopperGradients:
        items = batch["items"]
        # F.embedding, not indexing: a table's rows gathered by a 2-d index took 3x as long.
        item_means = F.embedding(items, means)
        vectors = None if tower is None else F.embedding(items, tower.vectors)
        (dense_grads, *rest), losses = per_shopper(inside, id_rows(model, items), item_means,
                                                   vectors, batch)
        row_grads = rest.pop(0) if id_table else None
        mean_grads = rest.pop(0) if attributes else None
        if tower is not None:
            mlp_grads, input_grads = tower.backward(items, vectors, item_means, rest.pop(),
                                                    inputs=id_table or attributes)
            dense_grads = {**dense_grads, **mlp_grads}
            if input_grads is not None:  # the tower's reads add to the history's
                id_part, mean_part = input_grads[..., :-item_means.shape[-1]], input_grads[
                    ..., -item_means.shape[-1]:]
                if row_grads is not None and model.item_vectors_read != "attributes":
                    row_grads = row_grads + id_part
                if mean_grads is not None:
                    mean_grads = mean_grads + mean_part
        return ShopperGradients(
            dense_grads, row_grads,
            None if mean_grads is None else attribute_gradients(model, items, mean_grads),
            losses, items)

    return gradients


# The item tower's MLP (``fedrec.model._mlp``: Linear, ReLU, Dropout, Linear), by name in the
# model's parameters, whose per-shopper gradients ``ItemTower.backward`` takes by hand.
ITEM_MLP = ("item_mlp.0.weight", "item_mlp.0.bias", "item_mlp.3.weight", "item_mlp.3.bias")
NORMALIZE_EPS = 1e-12  # F.normalize's


class ItemTower:
    """The item tower run once over every item (the padding item included) at ``dense``'s item
    MLP, keeping what its backward reads: each item's input, hidden layer, output norm and
    vector (``TwoTower._vector``, without dropout)."""

    def __init__(self, model: TwoTower, means: torch.Tensor,
                 dense: dict[str, torch.Tensor]) -> None:
        self.weights = [dense[name] for name in ITEM_MLP]
        first_w, first_b, last_w, last_b = self.weights
        self.reads_ids = model.item_vectors_read != "attributes"
        self.inputs = torch.cat([model.item_embedding.weight.detach(), means],
                                dim=-1) if self.reads_ids else means
        self.hidden = F.relu(self.inputs @ first_w.T + first_b)
        out = self.hidden @ last_w.T + last_b
        self.norms = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
        self.vectors = out / self.norms.clamp(min=NORMALIZE_EPS)

    def backward(self, items: torch.Tensor, vectors: torch.Tensor, means: torch.Tensor,
                 vector_grads: torch.Tensor, *, inputs: bool,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Each shopper's gradient on the item MLP, from its gradient on the vectors of the
        ``items`` it read (shoppers, items, dim); and on those items' inputs (id row, mean
        attribute row) when ``inputs``."""
        first_w, _, last_w, _ = self.weights
        norms, hidden = F.embedding(items, self.norms), F.embedding(items, self.hidden)
        # F.normalize's backward: the part along the vector drops out, over the norm (below
        # F.normalize's eps, the output is the input over eps).
        along = torch.where(norms > NORMALIZE_EPS,
                            (vectors * vector_grads).sum(-1, keepdim=True), 0.0)
        out_grads = (vector_grads - vectors * along) / norms.clamp(min=NORMALIZE_EPS)
        # ReLU's backward as autograd runs it: a mask built and multiplied in cost 0.06 s of
        # the 0.2 s this backward took (Beauty, 559 shoppers, one thread).
        hidden_grads = torch.ops.aten.threshold_backward(out_grads @ last_w, hidden, 0)
        item_inputs = F.embedding(items, self.inputs) if self.reads_ids else means
        grads = dict(zip(ITEM_MLP, (hidden_grads.mT @ item_inputs, hidden_grads.sum(1),
                                    out_grads.mT @ hidden, out_grads.sum(1)), strict=True))
        return grads, hidden_grads @ first_w if inputs else None


def id_rows(model: TwoTower, items: torch.Tensor) -> torch.Tensor:
    """The id rows of ``items`` (shoppers, items) for ``ShopperObjective.loss``; none (a last
    axis of 0) when the model reads no id row: the gather of rows nothing reads cost 0.03 s of
    a Beauty pool node's 0.71 s clipped step (559 shoppers, one thread)."""
    table = model.item_embedding.weight.detach()
    return F.embedding(items, table) if model.reads_id_rows else table.new_zeros((*items.shape, 0))


def attribute_means(model: TwoTower) -> torch.Tensor:
    """Every item's mean attribute row, the padding item's included (zero), as the model's
    item tower reads it (``TwoTower._item_parts``)."""
    attrs = model.item_attributes
    return _masked_mean(F.embedding(attrs, model.attribute_embedding.weight.detach()), attrs)


def attribute_gradients(model: TwoTower, items: torch.Tensor,
                        mean_grads: torch.Tensor) -> AttributeRowGradients:
    """Each shopper's gradient on the attribute table, from ``mean_grads`` (shoppers, items,
    dim), its gradient on the mean attribute rows of the ``items`` it read: each item's share
    goes to each of its attributes (the padding attribute 0 takes none, as the embedding's
    padding row). Only the rows a shopper reached, one per (shopper, attribute)."""
    attrs = F.embedding(items, model.item_attributes)
    real = attrs != 0
    share = mean_grads / real.sum(-1, keepdim=True).clamp(min=1)
    num_attributes = model.attribute_embedding.num_embeddings
    keys, order = torch.sort((torch.arange(len(items)).view(-1, 1, 1) * num_attributes
                              + attrs)[real])
    pairs, counts = torch.unique_consecutive(keys, return_counts=True)
    # (pair x read item) ones times the items' shares: a copy of each share per attribute,
    # added up by pair, cost twice as much (0.1 s of a Beauty pool node's clipped step).
    reads = torch.arange(items.numel()).view(*items.shape, 1).expand_as(attrs)[real][order]
    starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    with warnings.catch_warnings():  # torch calls its CSR tensors beta; this uses the basics
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        spread = torch.sparse_csr_tensor(starts, reads, share.new_ones(len(reads)),
                                         (len(pairs), items.numel()), check_invariants=False)
    return pairs // num_attributes, pairs % num_attributes, spread @ share.flatten(0, 1)


def log_expected(enabled: bool, slot: torch.Tensor, target: torch.Tensor,
                 candidates: torch.Tensor, num_items: int, num_negatives: int) -> torch.Tensor:
    """logQ: an item is a candidate of a shopper's batch max(its count there, 1) + N/V times in
    expectation, Objective's B x share + N/V with the shopper's own shares; 0 without the
    correction."""
    if not enabled:
        return torch.zeros(candidates.shape)
    pair = slot * num_items + target
    pairs, counts = torch.unique(pair, return_counts=True)
    asked = slot.unsqueeze(1) * num_items + candidates
    found = torch.searchsorted(pairs, asked).clamp(max=len(pairs) - 1)
    count = torch.where(pairs[found] == asked, counts[found], 1).float()
    return torch.log(count + num_negatives / num_items)
