"""Popularity versus the two-tower model, centralized, on the shared real datasets.

    python scripts/benchmark_core.py [--data ../shared/data] [--epochs N] [extra overrides...]

Prints one table: sampled HR@10 and NDCG@10 (99 negatives), full Recall@20 and NDCG@20, and
wall time, for ML-100K and Amazon Beauty. Every run writes its usual outputs under --out.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from common import DEFAULT_DATA

from fedrec.centralized import run

DATASETS = {
    "ML-100K": ["dataset=movielens_100k", "dataset.path={data}/ml-100k"],
    "Beauty": ["dataset=sequence", "dataset.name=beauty",
               "dataset.path={data}/amazon-beauty/Beauty.txt"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding ml-100k/ and amazon-beauty/ (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="where runs write (default: temp)")
    parser.add_argument("--only", choices=list(DATASETS), action="append",
                        help="run only this dataset (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the two-tower runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedrec-bench-"))
    rows = []
    for name in args.only or DATASETS:
        base = [o.format(data=args.data.resolve()) for o in DATASETS[name]]
        for model, extra in (("popularity", ["model=popularity"]), ("two-tower", args.overrides)):
            print(f"running {model} on {name} ...", flush=True)
            summary = run([*base, *extra, f"output_dir={out}/{name}-{model}"])
            m = summary["metrics"]
            rows.append((name, model, m["sampled"]["hr@10"], m["sampled"]["ndcg@10"],
                         m["full"]["recall@20"], m["full"]["ndcg@20"], summary["wall_seconds"]))
    print()
    print("| data | model | HR@10 | NDCG@10 | Recall@20 | NDCG@20 | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.4f} | "
              f"{r[6]:.1f} |")
    for name in args.only or DATASETS:
        pop, tt = (r for r in rows if r[0] == name)
        print(f"{name}: two-tower / popularity HR@10 = {tt[2] / pop[2]:.2f}x")
    print(f"runs: {out}")


if __name__ == "__main__":
    main()
