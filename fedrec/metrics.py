"""Ranking metrics for both protocols, as sums and counts so that clients' results add up exactly.

Sampled protocol (NCF): each held-out item is ranked among the user's sampled negatives; HR@K and
NDCG@K per held-out item. Full protocol: each user's held-out items are ranked against every item
the user has not already interacted with in what is known; Recall@K (hits / held-out items) and
NDCG@K per user. Scores come from one matrix product per block of users.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedrec.data.sequences import EvalCases

PROTOCOLS = {"sampled": ("hr", "ndcg"), "full": ("recall", "ndcg")}
# Marks a client's validation sums in the evaluate reply it shares with the test sums.
VALID_PREFIX = "valid."


@dataclass
class RankingSums:
    """Per-metric sums (keys like "sampled.hr@10") and per-protocol counts."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PROTOCOLS})

    def __add__(self, other: RankingSums) -> RankingSums:
        keys = set(self.sums) | set(other.sums)
        return RankingSums(
            {k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in keys},
            {p: self.counts.get(p, 0) + other.counts.get(p, 0) for p in PROTOCOLS},
        )

    def means(self) -> dict[str, dict[str, float]]:
        """{"sampled": {"hr@10": ...}, "full": {"recall@10": ...}} as DESIGN.md's summary has."""
        out: dict[str, dict[str, float]] = {p: {} for p in PROTOCOLS}
        for key in sorted(self.sums, key=_metric_order):
            protocol, metric = key.split(".", 1)
            count = self.counts[protocol]
            out[protocol][metric] = self.sums[key] / count if count else float("nan")
        return out

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Sums and counts under flat keys, the form a Flower MetricRecord carries; ``prefix``
        keeps two sets (validation and test) apart in one record."""
        return {**{f"{prefix}sum.{k}": v for k, v in self.sums.items()},
                **{f"{prefix}count.{p}": float(c) for p, c in self.counts.items()}}

    @classmethod
    def from_flat(cls, flat: dict[str, float], prefix: str = "") -> RankingSums:
        sums, counts = f"{prefix}sum.", f"{prefix}count."
        return cls({k[len(sums):]: float(v) for k, v in flat.items() if k.startswith(sums)},
                   {k[len(counts):]: int(v) for k, v in flat.items() if k.startswith(counts)})


def _metric_order(key: str) -> tuple[int, int, int]:
    protocol, metric = key.split(".", 1)
    name, k = metric.split("@")
    return list(PROTOCOLS).index(protocol), int(k), PROTOCOLS[protocol].index(name)


UserScorer = Callable[[torch.Tensor], torch.Tensor]  # case rows -> (rows, num_items) scores


def ranking_sums(score_users: UserScorer, cases: EvalCases, ks: list[int],
                 batch_size: int) -> RankingSums:
    """Both protocols over all cases, scoring ``batch_size`` users per call of score_users."""
    result = RankingSums()
    for start in range(0, len(cases), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(cases)))
        result = result + _block_sums(score_users(rows), rows, cases, ks)
    return result


def _block_sums(scores: torch.Tensor, rows: torch.Tensor, cases: EvalCases,
                ks: list[int]) -> RankingSums:
    start, stop = int(rows[0]), int(rows[-1]) + 1
    sums: dict[str, float] = {}

    # Sampled: rank of each held-out item among its user's negatives (ties count half).
    in_block = (cases.heldout_rows >= start) & (cases.heldout_rows < stop)
    h_rows = cases.heldout_rows[in_block] - start
    h_items = cases.heldout_items[in_block]
    positive = scores[h_rows, h_items].unsqueeze(1)
    negative = scores.gather(1, cases.negatives[start:stop])[h_rows]
    rank = (negative > positive).sum(1).float() + 0.5 * (negative == positive).sum(1).float()
    for k in ks:
        hit = rank < k
        sums[f"sampled.hr@{k}"] = float(hit.sum())
        sums[f"sampled.ndcg@{k}"] = float((hit / torch.log2(rank + 2)).sum())

    # Full: everything known is excluded, then the top max(ks) items are checked for hits.
    scores = scores.clone()
    k_block = (cases.known_rows >= start) & (cases.known_rows < stop)
    scores[cases.known_rows[k_block] - start, cases.known_items[k_block]] = -torch.inf
    relevant = torch.zeros_like(scores, dtype=torch.bool)
    relevant[h_rows, h_items] = True
    num_relevant = relevant.sum(1)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = relevant.gather(1, top).float()
    discount = 1.0 / torch.log2(torch.arange(top.shape[1], dtype=torch.float) + 2)
    has_heldout = num_relevant > 0
    for k in ks:
        found = hits[:, :k].sum(1)
        ideal = torch.cumsum(discount, 0)[(num_relevant.clamp(min=1, max=k) - 1)]
        dcg = (hits[:, :k] * discount[:k]).sum(1)
        sums[f"full.recall@{k}"] = float((found / num_relevant.clamp(min=1))[has_heldout].sum())
        sums[f"full.ndcg@{k}"] = float((dcg / ideal)[has_heldout].sum())

    return RankingSums(sums, {"sampled": len(h_items), "full": int(has_heldout.sum())})


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cases: EvalCases, ks: list[int],
                   batch_size: int) -> RankingSums:
    """Score the cases with a two-tower model: item vectors once, then user blocks."""
    return evaluate_case_sets(model, [cases], ks, batch_size)[0]


@torch.no_grad()
def evaluate_case_sets(model: torch.nn.Module, case_sets: Sequence[EvalCases], ks: list[int],
                       batch_size: int) -> list[RankingSums]:
    """Each set of cases scored against one pass of the item tower: on a one-shopper client
    that pass is half of an evaluation, so validation and test share it."""
    was_training = model.training
    model.eval()
    items = model.item_vectors()

    def scorer(cases: EvalCases) -> UserScorer:
        return lambda rows: model.user_vectors(cases.history[rows], cases.user[rows]) @ items.T

    try:
        return [ranking_sums(scorer(cases), cases, ks, batch_size) for cases in case_sets]
    finally:
        model.train(was_training)


def evaluate_popularity(item_counts: torch.Tensor, cases: EvalCases, ks: list[int],
                        batch_size: int) -> RankingSums:
    """The popularity baseline: every user gets the items ranked by training count."""
    return ranking_sums(lambda rows: item_counts.float().expand(len(rows), -1), cases, ks,
                        batch_size)
