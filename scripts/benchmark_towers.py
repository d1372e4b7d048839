"""The mean and attention user towers, centralized, federated and private, in one table.

    python scripts/benchmark_towers.py [--data ../shared/data] [--only ML-100K] [--rows ...]
        [overrides for every run...]

Every run starts from its dataset and the defaults. Rows:
model.user_tower=mean|attention x {centralized; federated, one client per user
(experiment=cross_device, or
cross_device_attention for the attention tower); federated with dp_sgd
at epsilon 8 over 10 silos}, on ML-100K and Amazon Beauty. Columns: sampled HR@10 and NDCG@10
(99 negatives), full Recall@20 and NDCG@20, wall time, and each federated row's HR@10 over its
tower's centralized one (private rows: over the same tower's non-private 10-silo run, which
--rows silo adds). Targets (issue 9): centralized HR@10 >= 0.65 on ML-100K and >= 0.49 on
Beauty; federated >= 0.98x centralized; DP at epsilon 8 >= 0.90x non-private.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from common import DEFAULT_DATA, local_superlink, run_row

from fedrec.centralized import run as run_centralized

# Each dataset; the tower column sets the user tower.
DATASETS = {
    "ML-100K": ["dataset=movielens_100k", "dataset.path={data}/ml-100k"],
    "Beauty": ["dataset=sequence", "dataset.name=beauty",
               "dataset.path={data}/amazon-beauty/Beauty.txt"],
}
# Each tower's cross-device recipe (fedrec/conf/experiment/): the attention blocks need a lower lr.
CROSS_DEVICE = {"mean": "experiment=cross_device", "attention": "experiment=cross_device_attention"}
ROWS = {
    "centralized": None,
    "federated": "{cross_device}",
    "silo": "partition=silo num_rounds=15",
    "dp_sgd": "partition=silo num_rounds=15 privacy=dp_sgd_eps8",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="where runs write (default: temp)")
    parser.add_argument("--only", choices=list(DATASETS), action="append")
    parser.add_argument("--towers", nargs="+", default=["mean", "attention"],
                        choices=["mean", "attention"])
    parser.add_argument("--rows", nargs="+", default=["centralized", "federated", "dp_sgd"],
                        choices=list(ROWS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedrec-towers-"))).resolve()
    results: dict[tuple[str, str, str], dict[str, Any] | str] = {}
    with local_superlink():
        for name in args.only or DATASETS:
            base = [o.format(data=args.data.resolve()) for o in DATASETS[name]]
            for tower in args.towers:
                for row in args.rows:
                    overrides = [*base, f"model.user_tower={tower}", *args.overrides]
                    folder = out / f"{name}-{tower}-{row}"
                    print(f"{name}, {tower} tower, {row} ...", flush=True)
                    if ROWS[row] is None:
                        results[name, tower, row] = run_centralized(
                            [*overrides, f"output_dir={folder}"])
                    else:
                        recipe = ROWS[row].format(cross_device=CROSS_DEVICE[tower])
                        results[name, tower, row] = run_row(" ".join([*overrides, recipe]),
                                                            folder)
    _print_table(results)
    print(f"runs: {out}")


def _print_table(results: dict[tuple[str, str, str], dict[str, Any] | str]) -> None:
    print("\n| data | tower | run | HR@10 | NDCG@10 | Recall@20 | NDCG@20 | wall s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, tower, row), summary in results.items():
        if isinstance(summary, str):
            print(f"| {name} | {tower} | {row} | failed: {summary} | | | | | |")
            continue
        m = summary["metrics"]
        reference = results.get((name, tower, "silo" if row == "dp_sgd" else "centralized"))
        ratio = ""
        if row != "centralized" and isinstance(reference, dict):
            ratio = f"{m['sampled']['hr@10'] / reference['metrics']['sampled']['hr@10']:.3f}"
        print(f"| {name} | {tower} | {row} | {m['sampled']['hr@10']:.4f} | "
              f"{m['sampled']['ndcg@10']:.4f} | {m['full']['recall@20']:.4f} | "
              f"{m['full']['ndcg@20']:.4f} | {summary['wall_seconds']:.1f} | {ratio} |",
              flush=True)


if __name__ == "__main__":
    main()
