"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

m canaries (units of what the run protects: shoppers, or examples) are each put into the
training data with probability 1/2, independently. After training, an auditor scores every
canary and guesses "in" for its top k+ scores and "out" for its bottom k-, abstaining on the rest.
If training is (epsilon, delta)-DP, the number W of correct guesses among r = k+ + k- is
dominated by a Binomial(r, e^eps / (1 + e^eps)) plus a delta term (their Theorem 5.2):

    P[W >= v] <= P[Bin(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v > Bin(r, q) >= v - i] / i.

So an epsilon under which v correct guesses are less likely than beta is refuted at confidence
1 - beta, and the largest refuted epsilon is the lower bound. Several (k+, k-) pairs are tried;
each is tested at beta / their number (Bonferroni), so the bound holds whichever pair wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The largest probability any (epsilon, delta)-DP training gives of ``v`` or more correct
    guesses out of ``r``, with ``m`` canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"v={v}, r={r}, m={m}: expected 0 <= v <= r <= m")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon={epsilon}, delta={delta}: expected epsilon >= 0, delta in "
                         "[0, 1]")
    q = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # P[v > Bin >= v - i] / i, for i = 1 .. v: its largest value.
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q).cumsum()
    slack = float((below / np.arange(1, v + 1)).max())
    return min(1.0, tail + 2 * m * delta * slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` refute at confidence
    1 - ``beta`` (0 when they refute none)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta}: expected a probability in (0, 1)")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    # As epsilon grows, r correct guesses become certain and the p-value reaches 1: this ends.
    while p_value(m, r, v, high, delta) <= beta:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) <= beta:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class Audit:
    """The best-supported lower bound over the guesses tried, and the guess that gave it."""

    epsilon: float  # the lower bound, at confidence 1 - beta
    canaries: int
    guesses_in: int  # k+
    guesses_out: int  # k-
    correct: int
    beta: float
    delta: float
    pairs_tried: int


def audit_canaries(scores: np.ndarray, included: np.ndarray, *, delta: float,
                   beta: float = 0.05,
                   fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5)) -> Audit:
    """The lower bound from canary ``scores`` (higher: more likely trained on) and whether
    each canary was ``included``. Tries guessing "in" for the top fraction and, separately,
    "in" for the top and "out" for the bottom fraction, for each of ``fractions``."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"scores {scores.shape}, included {included.shape}: expected two "
                         "vectors of the same length, at least 2")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores hold NaN or infinity")
    m = len(scores)
    # Ties broken by a fixed order that depends on nothing private: the canary's position.
    order = np.lexsort((np.arange(m), -scores))
    pairs = sorted({(max(1, round(f * m)), k) for f in fractions
                    for k in (0, max(1, round(f * m)))
                    if max(1, round(f * m)) + k <= m})
    level = beta / len(pairs)
    best = None
    for top, bottom in pairs:
        correct = int(included[order[:top]].sum()) + int((~included[order[m - bottom:]]).sum()
                                                         if bottom else 0)
        bound = epsilon_lower_bound(m, top + bottom, correct, delta, level)
        if best is None or bound > best.epsilon:
            best = Audit(bound, m, top, bottom, correct, beta, delta, len(pairs))
    assert best is not None
    return best
