"""Privacy-utility table: a non-private federated run and each DP mechanism at each budget.

On ML-100K, Amazon Beauty or the synthetic shop at 100,000 shoppers, through the real Flower
runtime:

    python scripts/benchmark_privacy.py [--data ../shared/data]
        [--dataset ml-100k|beauty|synthetic-100k]
        [--partition silo user]
        [--epsilons 8 4 1] [--mechanisms dp_sgd central_dp] [--user "..."] [--silo "..."]
        [overrides...]

Each partition has its own recipe (--user, --silo: federated overrides), and every run of that
partition uses it, so a row differs from the non-private one only in `privacy`. Every row is the
server-side evaluation (simulation only) of the run's last round, on every shopper's validation
and test item: a private run picks no round by private figures, so the non-private one is
compared the same way. Prints the unit, epsilon spent and delta, validation and test HR@10,
test NDCG@10 and Recall@20, wall time, and the ratios of test HR@10 and wall time to the
non-private run. A run that fails is listed with its error; the others still run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import partition_parser, partition_runs, run_row

from fedrec.config import BUDGET_KEYS

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
        # Cross-device, each shopper's update is clipped where it is trained (its device, or
        # its pool node): the server never sees it alone.
        side = " privacy.side=client" if partition == "user" else ""
        runs = [("none", None, "privacy=none")] + [
            (mechanism, eps, f"privacy={mechanism} {BUDGET_KEYS[mechanism]}={eps}"
             f"{side if mechanism == 'central_dp' else ''}")
            for mechanism in args.mechanisms for eps in args.epsilons]
        results = []
        for mechanism, eps, privacy in runs:
            folder = out / f"{partition}-{mechanism}-{eps}"
            summary = run_row(f"{base} eval.server=true {privacy}", folder)
            results.append((mechanism, eps, summary if isinstance(summary, str)
                            else (summary, _last_round(folder))))
        _print_table(partition, base, results)


def _last_round(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


def _print_table(partition: str, base: str, results: list[tuple[str, float | None, Any]]) -> None:
    print(f"\npartition={partition}: {base}\n")
    print("| mechanism | unit | epsilon budget | epsilon spent | delta | valid HR@10 | HR@10 | "
          "NDCG@10 | Recall@20 | wall s | HR@10 / non-private | wall / non-private |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = results[0][2] if not isinstance(results[0][2], str) else None
    for mechanism, eps, result in results:
        budget = "inf" if eps is None else f"{eps:g}"
        if isinstance(result, str):
            print(f"| {mechanism} | | {budget} | failed: {result} | | | | | | | | |")
            continue
        summary, last = result
        test, valid = last["server"]["test"], last["server"].get("valid", {})
        privacy = summary["privacy"]
        spent, delta = privacy["epsilon"], privacy["delta"]
        ratios = ["", ""]
        if reference is not None:
            plain = reference[1]["server"]["test"]["sampled"]["hr@10"]
            ratios = [f"{test['sampled']['hr@10'] / plain:.3f}",
                      f"{summary['wall_seconds'] / reference[0]['wall_seconds']:.2f}"]
        print(f"| {mechanism} | {privacy['unit'] or '-'} | {budget} | "
              f"{'-' if spent is None else f'{spent:.3f}'} | "
              f"{'-' if delta is None else f'{delta:.2g}'} | "
              f"{valid.get('sampled', {}).get('hr@10', float('nan')):.4f} | "
              f"{test['sampled']['hr@10']:.4f} | {test['sampled']['ndcg@10']:.4f} | "
              f"{test['full']['recall@20']:.4f} | {summary['wall_seconds']:.1f} | "
              f"{ratios[0]} | {ratios[1]} |", flush=True)


if __name__ == "__main__":
    main()
