"""The two-tower recommender: a shopper vector and an item vector, scored by their dot product.

Scores are cosine similarities over a temperature, so serving is a dot product against an index
of normalised item vectors. The item id table is shared by both towers and is looked up once per
forward pass (history and candidates together): Opacus' ghost clipping refuses a module called
twice in one forward. The optional personal embedding is the one part that never leaves a client;
``shared_state`` is everything else and is what the federation exchanges.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.config import TwoTowerConfig
from fedrec.data.dataset import Dataset

PERSONAL_PREFIX = "personal"
# The item id table's name in the shared state: the parameter the server steps apart
# (strategy.item_server_lr) and a pool node keeps row by row (fedrec.client.shopper_update).
ITEM_TABLE = "item_embedding.weight"
# The attribute table: per-shopper gradients take it row by row too (fedrec.client
# .shopper_objective).
ATTRIBUTE_TABLE = "attribute_embedding.weight"


class TwoTower(nn.Module):
    def __init__(
        self,
        cfg: TwoTowerConfig,
        item_attributes: np.ndarray,
        num_attributes: int,
        user_features: np.ndarray | None = None,
        num_user_features: int = 0,
        personal_users: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        num_items, dim = len(item_attributes), cfg.embedding_dim
        self.num_items = num_items
        self.max_history = cfg.max_history
        self.temperature = cfg.temperature
        self.history_items = cfg.history_items
        self.history_id_dropout = cfg.history_id_dropout
        # Row num_items is the padding item: it has no attributes and a zero id embedding.
        attrs = np.vstack([item_attributes, np.zeros((1, item_attributes.shape[1]), np.int64)])
        self.register_buffer("item_attributes", torch.as_tensor(attrs, dtype=torch.long))
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        self.attribute_embedding = nn.Embedding(num_attributes, dim, padding_idx=0)
        self.item_vectors_read = cfg.item_vectors
        if cfg.item_vectors == "attributes" and num_attributes <= 1:
            raise ValueError("model.item_vectors=attributes but the items have no attributes "
                             "(only the padding one): use model.item_vectors=id_and_attributes")
        self.item_mlp = _mlp((1 if cfg.item_vectors == "attributes" else 2) * dim,
                             cfg.hidden_dim, dim, cfg.dropout)
        self.reads_id_rows = cfg.item_vectors != "attributes" or cfg.history_items != "attributes"
        if not self.reads_id_rows:
            # Nothing reads the id table, so nothing trains it: no optimizer decays it, and
            # shopper-level DP-SGD does not carry a zero gradient of the whole table for every
            # sampled shopper (3 MB each on Beauty).
            self.item_embedding.weight.requires_grad_(False)

        self.feature_embedding: nn.Embedding | None = None
        if cfg.use_user_features:
            if user_features is None:
                raise ValueError("model.use_user_features=true but the dataset has no user "
                                 "features; set model.use_user_features=false")
            self.register_buffer("user_features", torch.as_tensor(user_features,
                                                                  dtype=torch.long))
            self.feature_embedding = nn.Embedding(num_user_features, dim, padding_idx=0)
        self.user_mlp = _mlp((2 if cfg.use_user_features else 1) * dim, cfg.hidden_dim, dim,
                             cfg.dropout)
        self.history_encoder: HistoryEncoder | None = None
        if cfg.user_tower == "attention":
            self.history_encoder = HistoryEncoder(cfg)

        self.personal: nn.Embedding | None = None
        if cfg.personal_embedding:
            if personal_users is None:
                raise ValueError("model.personal_embedding=true needs the users it holds")
            users = torch.as_tensor(np.sort(personal_users), dtype=torch.long)
            self.register_buffer(f"{PERSONAL_PREFIX}_users", users)
            self.personal = nn.Embedding(len(users), dim)
            nn.init.zeros_(self.personal.weight)  # a new shopper starts from the shared tower

    @classmethod
    def for_dataset(cls, cfg: TwoTowerConfig, dataset: Dataset,
                    personal_users: np.ndarray | None = None) -> TwoTower:
        features = dataset.user_features
        return cls(cfg, dataset.item_attributes, dataset.num_attributes,
                   user_features=features,
                   num_user_features=0 if features is None else len(dataset.user_feature_names),
                   personal_users=personal_users)

    # ------------------------------------------------------------------------------ towers
    def forward(self, history: torch.Tensor, candidates: torch.Tensor,
                users: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of candidates for each history: (B, C) for candidates shared by the batch,
        shape (C,), or for per-example candidates, shape (B, C)."""
        if candidates.dim() == 1:
            if self.history_items != "id":  # each distinct history item read once, no MLP
                return self.user_vectors(history, users) @ self.item_vectors(
                    candidates).T / self.temperature
            history_in, item = self._read_items(history.reshape(-1), candidates, dim=0)
            user = self._user_from_embedded(history, history_in.view(*history.shape, -1), users)
            return user @ item.T / self.temperature
        # Per-example candidates keep the batch axis first through every layer, which is what
        # Opacus needs to tell one example's gradient from another's.
        history_in, item = self._read_items(history, candidates, dim=1)
        user = self._user_from_embedded(history, history_in, users)
        return torch.einsum("bd,bcd->bc", user, item) / self.temperature

    def _read_items(self, history: torch.Tensor, candidates: torch.Tensor,
                    dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the user tower reads for each history item, and each candidate's item vector.
        History and candidates go through each embedding together, in one call each: Opacus'
        ghost clipping refuses a module called twice in one forward pass. The item MLP reads the
        candidates alone: running it over the history too (about 50 items an example on
        ML-100K against 9 candidates) was most of a per-example step's cost."""
        ids = torch.cat([history, candidates], dim=dim)
        sizes = [history.shape[dim], candidates.shape[dim]]
        if self.history_items == "id":
            # split, not slicing: a slice's backward writes into a zero-filled copy of the whole.
            history_emb, candidate_emb = self.item_embedding(ids).split(sizes, dim=dim)
            return history_emb, self._item_from_embedded(candidates, candidate_emb)
        (history_emb, candidate_emb), (history_attrs, candidate_attrs) = (
            part.split(sizes, dim=dim) for part in self._item_parts(ids))
        return (self._history_read(history_emb, history_attrs),
                self._vector(candidate_emb, candidate_attrs))

    def _item_parts(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's id row and the mean of its attribute rows."""
        attrs = self.item_attributes[items]
        return self.item_embedding(items), _masked_mean(self.attribute_embedding(attrs), attrs)

    def _history_read(self, embedded: torch.Tensor, attr_mean: torch.Tensor) -> torch.Tensor:
        if self.history_items == "attributes":
            return attr_mean
        if self.training and self.history_id_dropout > 0:
            # One draw per row, not per coordinate: the item is read from its attributes alone.
            # user_vectors reads each distinct item once: one draw for all its entries.
            kept = torch.rand((*embedded.shape[:-1], 1), device=embedded.device)
            embedded = embedded * (kept >= self.history_id_dropout) / (
                1 - self.history_id_dropout)
        return embedded + attr_mean

    def user_vectors(self, history: torch.Tensor,
                     users: torch.Tensor | None = None) -> torch.Tensor:
        if self.history_items == "id":
            return self._user_from_embedded(history, self.item_embedding(history), users)
        distinct, position = torch.unique(history, return_inverse=True)
        read = F.embedding(position, self._history_read(*self._item_parts(distinct)))
        return self._user_from_embedded(history, read, users)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        if items is None:
            items = torch.arange(self.num_items, device=self.item_embedding.weight.device)
        return self._item_from_embedded(items, self.item_embedding(items))

    def _user_from_embedded(self, history: torch.Tensor, embedded: torch.Tensor,
                            users: torch.Tensor | None) -> torch.Tensor:
        known = history != self.num_items
        if self.history_encoder is not None:
            pooled = self.history_encoder(embedded, known)
        else:
            mask = known.unsqueeze(-1).float()
            pooled = (embedded * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self._user_from_pooled(pooled, users)

    def _user_from_pooled(self, pooled: torch.Tensor,
                          users: torch.Tensor | None) -> torch.Tensor:
        """The user tower past the reading of the history, from its pooled (or encoded) form."""
        parts = [pooled]
        if self.feature_embedding is not None:
            if users is None:
                raise ValueError("this model reads user features: pass the users")
            parts.append(_masked_mean(self.feature_embedding(self.user_features[users]),
                                      self.user_features[users]))
        vector = self.user_mlp(torch.cat(parts, dim=-1))
        if self.personal is not None and users is not None:
            slots = torch.searchsorted(self.personal_users, users)
            known = (slots < len(self.personal_users)) & (
                self.personal_users[slots.clamp(max=len(self.personal_users) - 1)] == users)
            # Users this model holds no personal vector for are served by the shared tower.
            vector = vector + self.personal(slots.clamp(max=len(self.personal_users) - 1)) * (
                known.unsqueeze(-1).float())
        return F.normalize(vector, dim=-1)

    def cold_item_vectors(self, attributes: torch.Tensor) -> torch.Tensor:
        """Vectors of new items known only by their attributes (rows of attribute indices, 0
        pads): the item tower with the padding item's zero id vector in place of an id."""
        no_id = torch.full((len(attributes),), self.num_items, dtype=torch.long,
                           device=attributes.device)
        return self._item_vector(self.item_embedding(no_id), attributes)

    def _item_from_embedded(self, items: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return self._item_vector(embedded, self.item_attributes[items])

    def _item_vector(self, embedded: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        return self._vector(embedded, _masked_mean(self.attribute_embedding(attrs), attrs))

    def _vector(self, embedded: torch.Tensor, attr_mean: torch.Tensor) -> torch.Tensor:
        read = attr_mean if self.item_vectors_read == "attributes" else torch.cat(
            [embedded, attr_mean], dim=-1)
        return F.normalize(self.item_mlp(read), dim=-1)

    def personal_slot(self, user: int) -> int:
        """The row of ``user``'s personal vector."""
        slot = int(torch.searchsorted(self.personal_users, torch.tensor(user)))
        if slot >= len(self.personal_users) or int(self.personal_users[slot]) != user:
            raise KeyError(f"this model holds no personal vector for user {user}")
        return slot

    # ------------------------------------------------------------------ shared vs personal
    def shared_state(self) -> dict[str, torch.Tensor]:
        """The parameters a client may send: all but the personal embedding."""
        return {name: p.detach() for name, p in self.named_parameters()
                if not name.startswith(PERSONAL_PREFIX)}

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.shared_state())
        if set(state) != expected:
            raise ValueError(f"shared state keys differ: missing {sorted(expected - set(state))}"
                             f", unexpected {sorted(set(state) - expected)}")
        with torch.no_grad():
            params = dict(self.named_parameters())
            for name, value in state.items():
                params[name].copy_(torch.as_tensor(value))


class HistoryEncoder(nn.Module):
    """SASRec's reading of a history inside the user tower: learned positions and causal
    self-attention blocks (pre-norm), the shopper being the output at the most recent item.

    Histories are right-aligned (oldest first, padding on the left), so the last position is
    always the newest item. Every layer is a Linear, an Embedding or a LayerNorm called once per
    forward pass, which Opacus clips per example (ghost clipping included)."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        dim = cfg.embedding_dim
        self.max_history = cfg.max_history
        self.position_embedding = nn.Embedding(cfg.max_history, dim)
        self.blocks = nn.ModuleList(_AttentionBlock(dim, cfg.attention_heads, cfg.dropout)
                                    for _ in range(cfg.attention_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, embedded: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return self.states(embedded, known)[:, -1]

    def states(self, embedded: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """The representation at every position, (batch, length, dim): each one reads only the
        items up to it."""
        batch, length, _ = embedded.shape
        positions = torch.arange(self.max_history - length, self.max_history,
                                 device=embedded.device).expand(batch, length)
        x = (embedded + self.position_embedding(positions)) * known.unsqueeze(-1).float()
        causal = torch.ones(length, length, dtype=torch.bool, device=embedded.device).tril()
        # A position sees itself and the known items before it; padding sees only itself.
        allowed = (causal & known.unsqueeze(1)) | torch.eye(length, dtype=torch.bool,
                                                            device=embedded.device)
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1))
        return self.norm(x)


class _AttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(
            batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def _mlp(inputs: int, hidden: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, outputs))


def _masked_mean(embedded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding (index != 0) entries of the second-to-last axis."""
    mask = (index != 0).unsqueeze(-1).float()
    return (embedded * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)
