"""How well an attack's scores separate members from non-members: AUC, the true-positive rate at
a low false-positive rate, and precision among the top scores.

Higher score means "more likely a member" throughout. Ties count half, so an attack that cannot
tell two items apart gains nothing from the order they happen to be listed in.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _split(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, members = np.asarray(scores, dtype=float), np.asarray(members, dtype=bool)
    if scores.shape != members.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and members {members.shape}: expected two "
                         "vectors of the same length")
    if not np.isfinite(scores).all():
        raise ValueError("attack scores hold NaN or infinity")
    if members.all() or not members.any():
        raise ValueError(f"{int(members.sum())} members of {len(members)}: an attack is scored "
                         "on both members and non-members")
    return scores, members


def auc(scores: np.ndarray, members: np.ndarray) -> float:
    """P(a member outscores a non-member), ties counting half (the Mann-Whitney statistic)."""
    scores, members = _split(scores, members)
    ranks = rankdata(scores)  # ties share their mean rank
    positives = int(members.sum())
    negatives = len(members) - positives
    return float((ranks[members].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def roc_curve(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The false- and true-positive rates of every threshold (a threshold flags every score at
    or above it), from flagging nothing to flagging everything."""
    scores, members = _split(scores, members)
    thresholds = np.unique(scores)[::-1]
    outside = np.sort(scores[~members])
    inside = np.sort(scores[members])
    false_rate = 1 - np.searchsorted(outside, thresholds, side="left") / len(outside)
    true_rate = 1 - np.searchsorted(inside, thresholds, side="left") / len(inside)
    return np.concatenate([[0.0], false_rate]), np.concatenate([[0.0], true_rate])


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> float:
    """The largest share of members flagged by a threshold that flags at most ``fpr`` of the
    non-members."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr={fpr}: expected a rate in [0, 1)")
    false_rate, true_rate = roc_curve(scores, members)
    return float(true_rate[false_rate <= fpr + 1e-12].max())


def precision_at_k(scores: np.ndarray, members: np.ndarray, k: int) -> float:
    """The share of members among the ``k`` highest scores; ties at the cut are shared out by
    their share of members (the expected precision of breaking them at random)."""
    scores, members = _split(scores, members)
    if not 1 <= k <= len(scores):
        raise ValueError(f"k={k}: expected 1 <= k <= {len(scores)}")
    cut = np.sort(scores)[::-1][k - 1]
    above = scores > cut
    tied = scores == cut
    hits = members[above].sum() + (k - above.sum()) * members[tied].mean()
    return float(hits / k)
