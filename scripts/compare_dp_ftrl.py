"""DP-FTRL with tree aggregation against sampled DP-FedAvg: the noise each leaves in the model
at the same user-level (epsilon, delta), for a cohort plan.

    python scripts/compare_dp_ftrl.py [--plan NAME:POPULATION:COHORT:ROUNDS ...]
        [--epsilons 1 4 8] [--delta D]

No training runs: at a fixed clip C and server learning rate 1, the model after round t is the
global model minus the sum of the first t rounds' mean clipped updates plus noise, and the
table gives that noise's per-coordinate standard deviation over C, after the last round and
averaged over the rounds. Both mechanisms protect one shopper's whole history under replacing
it by another's (sensitivity 2C of a round's sum), at the same delta (fedrec's default,
1/population^1.1, unless --delta).

- Sampled DP-FedAvg: fedrec's own plan (``privacy=central_dp``): each round a fixed-size cohort
  sampled without replacement, Gaussian noise of stddev z C on the sum, accounted with
  amplification by sampling. The noise of t rounds adds up: sqrt(t) z C / cohort.
- DP-FTRL (Kairouz et al., ICML 2021) needs no sampling: the shoppers are shuffled into
  disjoint cohorts, so each takes part at most once per epoch of floor(population / cohort)
  rounds, and the tree restarts every epoch. A round releases the noisy prefix sum of its
  epoch, built from one noisy node per set bit of its index, each node of stddev s x 2C.
  Accounted by dp_accounting's ``SingleEpochTreeAggregationDpEvent`` (appendix D of Kairouz
  et al.), composed once per epoch.

Both are RDP bounds, as fedrec accounts. The table also gives DP-FTRL's epsilon at its planned
noise by privacy loss distributions, an independent and tighter accountant: a check on the tree
accounting, and how much an exact accounting would give back. dp_accounting's PLD accountant
has no sampling without replacement, so there is no such column for DP-FedAvg.
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedrec.accounting import default_delta
from fedrec.config import compose_config
from fedrec.server.privacy import CENTRAL_ORDERS, least_noise, plan_central_dp

PLANS = ["beauty:22363:1118:600", "synthetic-100k:100000:2000:100", "ml-100k:943:18:1200"]


def ftrl_epsilon(node_noise: float, epoch_rounds: int, epochs: int, last_rounds: int,
                 delta: float) -> float:
    """Epsilon of ``epochs`` full trees of ``epoch_rounds`` leaves and one of ``last_rounds``,
    each shopper in at most one leaf of each, at ``node_noise`` over the sensitivity."""
    accountant = rdp_privacy_accountant.RdpAccountant(
        CENTRAL_ORDERS, dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    tree = dp_accounting.SingleEpochTreeAggregationDpEvent(node_noise, epoch_rounds)
    accountant.compose(dp_accounting.SelfComposedDpEvent(tree, epochs))
    if last_rounds:
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(node_noise,
                                                                           last_rounds))
    return accountant.get_epsilon(delta)


def ftrl_exact_epsilon(node_noise: float, epoch_rounds: int, epochs: int, last_rounds: int,
                       delta: float) -> float:
    """The same trees by another accountant, as the Gaussian mechanisms they are: a shopper's
    leaf reaches ceil(log2(leaves + 1)) nodes of a tree, each of noise ``node_noise`` over its
    sensitivity, so a tree is one Gaussian of noise node_noise / sqrt(nodes). Composed by
    dp_accounting's privacy loss distributions (no RDP conversion)."""
    accountant = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.REPLACE_SPECIAL, value_discretization_interval=1e-3)
    for leaves, count in ((epoch_rounds, epochs), (last_rounds, 1 if last_rounds else 0)):
        if count:
            nodes = math.ceil(math.log2(leaves + 1))
            accountant.compose(dp_accounting.GaussianDpEvent(node_noise / math.sqrt(nodes)),
                               count)
    return accountant.get_epsilon(delta)


def ftrl_noise_after(round_index: int, epoch_rounds: int) -> int:
    """Noisy tree nodes in the model after ``round_index`` rounds (1-based): every finished
    epoch's whole-tree prefix, and the running epoch's prefix."""
    done, running = divmod(round_index, epoch_rounds)
    return done * epoch_rounds.bit_count() + running.bit_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", nargs="+", default=PLANS,
                        help="NAME:POPULATION:COHORT:ROUNDS (default: %(default)s)")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--delta", type=float, default=None,
                        help="(default: 1/population^1.1 for each plan)")
    args = parser.parse_args()
    print("| plan | population | cohort | rounds | epsilon | delta | DP-FedAvg z | DP-FTRL s | "
          "epochs | DP-FTRL epsilon, PLD | DP-FedAvg noise, last round | "
          "DP-FTRL noise, last round | "
          "DP-FedAvg noise, mean over rounds | DP-FTRL noise, mean over rounds | "
          "DP-FTRL / DP-FedAvg, last round |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for plan in args.plan:
        try:
            name, population, cohort, rounds = plan.split(":")
            population, cohort, rounds = int(population), int(cohort), int(rounds)
        except ValueError:
            parser.error(f"--plan {plan!r}: expected NAME:POPULATION:COHORT:ROUNDS, integers")
        if not 0 < cohort <= population or rounds < 1:
            parser.error(f"--plan {plan!r}: expected 0 < COHORT <= POPULATION and ROUNDS >= 1")
        delta = args.delta if args.delta is not None else default_delta(population)
        epoch_rounds = population // cohort
        epochs, last_rounds = divmod(rounds, epoch_rounds)
        for epsilon in args.epsilons:
            cfg = compose_config(f"privacy=central_dp privacy.max_epsilon={epsilon} "
                                 f"privacy.delta={delta}").privacy
            z = plan_central_dp(cfg, population=population, sample_size=cohort,
                                num_rounds=rounds).noise_multiplier
            s = least_noise(partial(ftrl_epsilon, epoch_rounds=epoch_rounds, epochs=epochs,
                                    last_rounds=last_rounds, delta=delta), epsilon,
                            tolerance=1e-3)
            if s is None:
                parser.error(f"--plan {plan!r}: no DP-FTRL noise meets epsilon {epsilon:g}")
            exact = ftrl_exact_epsilon(s, epoch_rounds, epochs, last_rounds, delta)
            # Per coordinate, over C: replacing a shopper moves a round's sum by up to 2C.
            fedavg = [math.sqrt(t) * z / cohort for t in range(1, rounds + 1)]
            ftrl = [math.sqrt(ftrl_noise_after(t, epoch_rounds)) * 2 * s / cohort
                    for t in range(1, rounds + 1)]
            print(f"| {name} | {population:,} | {cohort:,} | {rounds} | {epsilon:g} | "
                  f"{delta:.2e} | {z:.3f} | {s:.3f} | {epochs + bool(last_rounds)} | {exact:.3f} | "
                  f"{fedavg[-1]:.4f} | {ftrl[-1]:.4f} | {sum(fedavg) / rounds:.4f} | "
                  f"{sum(ftrl) / rounds:.4f} | {ftrl[-1] / fedavg[-1]:.2f}x |")


if __name__ == "__main__":
    main()
