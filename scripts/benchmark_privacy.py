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

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from fedrec.node import load_federation
from fedrec.simulation import run_federated, stop_local_superlink, superlink_pids

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPES = {
    "silo": "partition=silo num_rounds=15",
    "user": "experiment=cross_device",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding ml-100k/ (default: %(default)s)")
    parser.add_argument("--partition", nargs="+", default=["silo", "user"],
                        choices=sorted(RECIPES), help="partitions to run (default: both)")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 4.0, 1.0])
    parser.add_argument("--mechanisms", nargs="+", default=["dp_sgd", "central_dp"],
                        choices=["dp_sgd", "central_dp"])
    for name, recipe in RECIPES.items():
        parser.add_argument(f"--{name}", default=recipe,
                            help=f"federated overrides for partition={name} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="where runs write (default: temp)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedrec-privacy-"))).resolve()
    data = f"dataset=movielens_100k dataset.path={args.data.resolve()}/ml-100k"

    was_running = bool(superlink_pids())
    try:
        for partition in args.partition:
            base = f"{data} {getattr(args, partition)} {' '.join(args.overrides)}"
            runs = [("none", None, "privacy=none")] + [
                (mechanism, eps, f"privacy={mechanism} privacy."
                 f"{'target_epsilon' if mechanism == 'dp_sgd' else 'max_epsilon'}={eps}")
                for mechanism in args.mechanisms for eps in args.epsilons]
            results = [(m, eps, _run(f"{base} {privacy}", out / f"{partition}-{m}-{eps}"))
                       for m, eps, privacy in runs]
            _print_table(partition, base, results)
    finally:
        if not was_running:
            stop_local_superlink()
    print(f"runs: {out}")


def _run(overrides: str, output_dir: Path) -> dict[str, Any] | str:
    """The run's summary.json, or its error."""
    clients = load_federation(overrides).num_clients
    print(f"{output_dir.name}: {clients} clients (log: {output_dir}.flwr.log) ...", flush=True)
    try:
        return run_federated(overrides, num_supernodes=clients, output_dir=output_dir)
    except Exception as err:  # a failed run is a row of the table, not the end of it
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


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
