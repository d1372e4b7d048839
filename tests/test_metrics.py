import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data.sequences import EvalCases, eval_cases, sample_negatives
from fedrec.metrics import VALID_PREFIX, RankingSums, evaluate_popularity, ranking_sums

L2 = 1 / math.log2(3)  # discount of the second position

SCORES = torch.tensor([
    [9.0, 1, 5, 6, 2, 1],  # user 0: knows item 0, holds out item 2
    [0.0, 4, 10, 3, 7, 5],  # user 1: knows items 0 and 2, holds out items 1 and 4
])


def hand_cases() -> EvalCases:
    t = torch.tensor
    return EvalCases(
        user=t([0, 1]), history=t([[6, 0], [0, 2]]),
        known_rows=t([0, 1, 1]), known_items=t([0, 0, 2]),
        heldout_rows=t([0, 1, 1]), heldout_items=t([2, 1, 4]),
        negatives=t([[3, 4], [3, 5]]),
    )


@pytest.mark.parametrize("batch_size", [1, 2])
def test_metrics_match_hand_computed_values(batch_size):
    sums = ranking_sums(lambda rows: SCORES[rows], hand_cases(), [1, 2], batch_size)
    means = sums.means()
    assert sums.counts == {"sampled": 3, "full": 2}
    expected_sampled = {"hr@1": 1 / 3, "hr@2": 1.0, "ndcg@1": 1 / 3, "ndcg@2": (2 * L2 + 1) / 3}
    expected_full = {"recall@1": 0.25, "recall@2": 0.75, "ndcg@1": 0.5,
                     "ndcg@2": (L2 + 1 / (1 + L2)) / 2}
    assert means["sampled"] == pytest.approx(expected_sampled)
    assert means["full"] == pytest.approx(expected_full)


def test_sums_add_up_like_one_evaluation():
    cases = hand_cases()
    whole = ranking_sums(lambda rows: SCORES[rows], cases, [1, 2], 2)
    parts = RankingSums()
    for row in range(2):
        sub = ranking_sums(lambda rows, r=row: SCORES[rows + r], _rows(cases, row), [1, 2], 1)
        parts = parts + sub
    assert parts.counts == whole.counts
    assert parts.sums == pytest.approx(whole.sums)
    assert RankingSums.from_flat(whole.flat()).means() == whole.means()
    # A client's evaluate reply carries validation and test sums in one flat record.
    other = ranking_sums(lambda rows: -SCORES[rows], cases, [1, 2], 2)
    reply = {**whole.flat(), **other.flat(VALID_PREFIX)}
    assert RankingSums.from_flat(reply).means() == whole.means()
    assert RankingSums.from_flat(reply, VALID_PREFIX).means() == other.means()
    assert other.means() != whole.means()


def _rows(cases: EvalCases, row: int) -> EvalCases:
    keep_h, keep_k = cases.heldout_rows == row, cases.known_rows == row
    return EvalCases(cases.user[row:row + 1], cases.history[row:row + 1],
                     cases.known_rows[keep_k] - row, cases.known_items[keep_k],
                     cases.heldout_rows[keep_h] - row, cases.heldout_items[keep_h],
                     cases.negatives[row:row + 1])


def test_ties_count_half():
    cases = EvalCases(torch.tensor([0]), torch.tensor([[3]]), torch.tensor([0]),
                      torch.tensor([0]), torch.tensor([0]), torch.tensor([1]),
                      torch.tensor([[2, 3]]))
    sums = evaluate_popularity(torch.tensor([5, 1, 1, 1]), cases, [1], 8)
    # rank = 0 higher + 0.5 * 2 ties = 1.0: not in the top 1
    assert sums.means()["sampled"]["hr@1"] == 0.0


def test_eval_cases_build_recent_history_and_true_negatives():
    known = pd.DataFrame({"user": [0, 0, 0, 1], "item": [5, 6, 7, 1], "order": [1, 2, 3, 1]})
    heldout = pd.DataFrame({"user": [0, 1], "item": [8, 2], "order": [4, 2]})
    interacted = pd.concat([known, heldout])
    cases = eval_cases(known, heldout, interacted, num_items=50, max_history=2,
                       num_negatives=10, seed=1)
    assert cases.history.tolist() == [[6, 7], [50, 1]]  # most recent last, padded with 50
    for row, user in enumerate(cases.user.tolist()):
        mine = set(interacted.loc[interacted["user"] == user, "item"])
        negs = set(cases.negatives[row].tolist())
        assert len(negs) == 10 and not negs & mine


def test_negatives_are_the_same_wherever_a_user_is_evaluated():
    interacted = pd.DataFrame({"user": [0, 1, 2], "item": [0, 1, 2]})
    together = sample_negatives(interacted, np.array([0, 1, 2]), 100, 20, seed=7)
    alone = sample_negatives(interacted, np.array([1]), 100, 20, seed=7)
    assert (together[1] == alone[0]).all()
    other_seed = sample_negatives(interacted, np.array([1]), 100, 20, seed=8)
    assert not (other_seed[0] == alone[0]).all()


def test_too_many_negatives_is_refused():
    interacted = pd.DataFrame({"user": [0, 0], "item": [0, 1]})
    with pytest.raises(ValueError, match=r"eval\.num_negatives=9"):
        sample_negatives(interacted, np.array([0]), 10, 9, seed=0)
