"""The defaults on data nobody tuned them for: each dataset with its path and no other flag.

    python scripts/benchmark_defaults.py [--data ../shared/data] [--only beauty ml-100k]
        [--rows popularity centralized shops-10 shops-20 devices] [--seeds 0 1 2]
        [overrides for every run...]

Rows, for Amazon Beauty and ML-100K (``--only synthetic``: the built-in shop): the popularity
baseline, the centralized run, and FedAvg over 10 and 20 shops (Dirichlet over each shopper's
dominant category, the partition's defaults). ``--rows ... devices`` adds one client per shopper
on the pool, with the cross-device recipe for the dataset's kind of data (not the defaults: a
device holds one shopper's history, which the shops' recipe was not made for); it takes the
longest by far (Beauty: about 25 minutes). Every row reports the test HR@10 and NDCG@10 of
its epoch or round with the best validation HR@10, its ratio to the centralized row, the epochs
or rounds it ran and what stopped it (summary.json's ``stopped_by``), and its wall time. A
failed run is a row too.

``--seeds 0 1 2`` runs every row once per seed (``seed=``: the model's init and the centralized
run's shuffles; the split and the shops stay the same, and the shops draw their own secret
seeds): a row then gives the mean HR@10 with its lowest and highest, and the ratio of the means.
One run's test HR@10 on ML-100K's 943 shoppers moves by about 0.015 between seeds, as much as a
target's margin.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from statistics import fmean
from typing import Any

from common import DEFAULT_DATA, local_superlink, run_row

from fedrec.centralized import run as run_centralized

# Only what names the data: the loader and its path (none for the built-in synthetic shop).
DATASETS = {
    "beauty": ("dataset=sequence", "amazon-beauty/Beauty.txt"),
    "ml-100k": ("dataset=movielens_100k", "ml-100k"),
    # The shop is generated from dataset.seed, which follows seed: pinned, so --seeds varies the
    # model's seed over the same shop.
    "synthetic": ("dataset=synthetic dataset.seed=0", None),
}
# name: (federated?, overrides); {devices}: the dataset's cross-device recipe (DEVICES).
ROWS = {
    "popularity": (False, "model=popularity"),
    "centralized": (False, ""),
    "shops-10": (True, "partition=silo partition.num_silos=10"),
    "shops-20": (True, "partition=silo partition.num_silos=20"),
    "devices": (True, "{devices}"),
}
# The cross-device recipe named for each dataset's kind of data (fedrec/conf/experiment/).
DEVICES = {"beauty": "experiment=cross_device_sparse", "ml-100k": "experiment=cross_device",
           "synthetic": "experiment=cross_device"}


def run(name: str, overrides: str, federated: bool, out: Path) -> dict[str, Any] | str:
    started = time.perf_counter()
    print(f"{name} ...", flush=True)
    if federated:
        result = run_row(overrides, out / name)
    else:
        try:
            result = run_centralized(f"{overrides} output_dir={out / name}")
        except Exception as err:  # a failed run is a row of the table, not the end of it
            result = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if isinstance(result, dict):
        result["wall_seconds"] = time.perf_counter() - started
    return result


def row(dataset: str, name: str, results: list[dict[str, Any] | str],
        centralized: list[dict[str, Any] | str] | None) -> str:
    runs = [result for result in results if isinstance(result, dict)]
    if len(runs) < len(results):
        return f"| {dataset} | {name} | failed: {next(r for r in results if isinstance(r, str))} |"
    hr = [run["metrics"]["sampled"]["hr@10"] for run in runs]
    spread = f" ({min(hr):.4f} to {max(hr):.4f})" if len(hr) > 1 else ""
    reference = mean_hr(centralized or [])
    ratio = "-" if reference is None else f"{fmean(hr) / reference:.3f}x"
    ndcg = fmean(run["metrics"]["sampled"]["ndcg@10"] for run in runs)
    return (f"| {dataset} | {name} | {fmean(hr):.4f}{spread} | {ndcg:.4f} | {ratio} | "
            f"{', '.join(str(run['rounds']) for run in runs)} of {runs[0]['rounds_requested']} | "
            f"{', '.join(sorted({str(run.get('stopped_by')) for run in runs}))} | "
            f"{', '.join(str(run['selected_round']) for run in runs)} | "
            f"{sum(run['wall_seconds'] for run in runs) / len(runs):.0f} |")


def mean_hr(results: list[dict[str, Any] | str]) -> float | None:
    """A row's mean test HR@10 over its seeds; None without runs or when one failed."""
    runs = [result for result in results if isinstance(result, dict)]
    if not runs or len(runs) < len(results):
        return None
    return fmean(run["metrics"]["sampled"]["hr@10"] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="where runs write (default: temp)")
    parser.add_argument("--only", nargs="+", choices=list(DATASETS), default=["beauty", "ml-100k"])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        default=[name for name in ROWS if name != "devices"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="run every row once per seed and report the mean")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedrec-defaults-"))).resolve()
    lines = []
    with local_superlink():
        for dataset in args.only:
            loader, path = DATASETS[dataset]
            data = loader if path is None else f"{loader} dataset.path={args.data.resolve() / path}"
            if path is not None and not (args.data / path).exists():
                lines.append(f"| {dataset} | skipped: {args.data.resolve() / path} is absent "
                             "(data/README.md) |")
                continue
            results: dict[str, list[dict[str, Any] | str]] = {}
            for name in args.rows:
                federated, overrides = ROWS[name]
                overrides = overrides.format(devices=DEVICES[dataset])
                results[name] = [
                    run(f"{dataset}-{name}" + (f"-seed{seed}" if len(args.seeds) > 1 else ""),
                        " ".join([data, overrides, f"seed={seed}", *args.overrides]),
                        federated, out)
                    for seed in args.seeds]
                print(row(dataset, name, results[name], results.get("centralized")), flush=True)
            lines += [row(dataset, name, result, results.get("centralized"))
                      for name, result in results.items()]
    print(f"\nseeds: {' '.join(map(str, args.seeds))}")
    print("\n| dataset | run | HR@10 | NDCG@10 | / centralized | epochs or rounds run | "
          "stopped by | selected | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\nruns: {out}")


if __name__ == "__main__":
    main()
