"""Privacy-utility table on ML-100K: a non-private federated run and each DP mechanism at each
budget, through the real Flower runtime.

    python scripts/benchmark_privacy.py [--data ../shared/data] [--partition silo user]
        [--epsilons 8 4 1] [--mechanisms dp_sgd central_dp] [--user "..."] [--silo "..."]
        [overrides...]

Each partition has its own recipe (--user, --silo: federated overrides), and every run of that
partition uses it, so a row differs from the non-private one only in `privacy`. Prints HR@10,
NDCG@10, Recall@20, epsilon spent, wall time, and the ratios of HR@10 and wall time to the
non-private run. A run that fails is listed with its error; the others still run.
"""

from __future__ import annotations

from typing import Any

from common import partition_parser, partition_runs, run_row

RECIPES = {
    "silo": "partition=silo num_rounds=15",
    "user": "experiment=cross_device",
}


def main() -> None:
    parser = partition_parser(__doc__.split("\n")[0], RECIPES)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 4.0, 1.0])
    parser.add_argument("--mechanisms", nargs="+", default=["dp_sgd", "central_dp"],
                        choices=["dp_sgd", "central_dp"])
    args = parser.parse_args()
    for partition, base, out in partition_runs(args, "privacy"):
        runs = [("none", None, "privacy=none")] + [
            (mechanism, eps, f"privacy={mechanism} privacy."
             f"{'target_epsilon' if mechanism == 'dp_sgd' else 'max_epsilon'}={eps}")
            for mechanism in args.mechanisms for eps in args.epsilons]
        results = [(m, eps, run_row(f"{base} {privacy}", out / f"{partition}-{m}-{eps}"))
                   for m, eps, privacy in runs]
        _print_table(partition, base, results)


def _print_table(partition: str, base: str, results: list[tuple[str, float | None, Any]]) -> None:
    print(f"\npartition={partition}: {base}\n")
    print("| mechanism | epsilon budget | epsilon spent | HR@10 | NDCG@10 | Recall@20 | wall s "
          "| HR@10 / non-private | wall / non-private |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = results[0][2] if isinstance(results[0][2], dict) else None
    for mechanism, eps, summary in results:
        budget = "inf" if eps is None else f"{eps:g}"
        if isinstance(summary, str):
            print(f"| {mechanism} | {budget} | failed: {summary} | | | | | | |")
            continue
        sampled, full = summary["metrics"]["sampled"], summary["metrics"]["full"]
        spent = summary["privacy"]["epsilon"]
        ratios = ["", ""]
        if reference is not None:
            ratios = [f"{sampled['hr@10'] / reference['metrics']['sampled']['hr@10']:.3f}",
                      f"{summary['wall_seconds'] / reference['wall_seconds']:.2f}"]
        print(f"| {mechanism} | {budget} | {'-' if spent is None else f'{spent:.3f}'} | "
              f"{sampled['hr@10']:.4f} | {sampled['ndcg@10']:.4f} | {full['recall@20']:.4f} | "
              f"{summary['wall_seconds']:.1f} | {ratios[0]} | {ratios[1]} |", flush=True)


if __name__ == "__main__":
    main()
