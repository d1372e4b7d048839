"""What the benchmark scripts share: where the licensed data lives, one federated run as a table
row, and the local SuperLink (fedrec.simulation.local_superlink, re-exported here)."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrec.config import compose_config, federated_config
from fedrec.data.federation import Federation, build_federation
from fedrec.outputs import set_aside
from fedrec.simulation import local_superlink, run_federated

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_federation(overrides: str) -> Federation:
    """The federation a run of these overrides trains on, as its ServerApp builds it."""
    return build_federation(federated_config(compose_config(overrides)))


def run_row(overrides: str, output_dir: Path) -> dict[str, Any] | str:
    """One federated run on the SuperNodes its partition asks for: its summary.json, or its
    error (a failed run is a row of the table, not the end of it).

    Given the same --out again, a run that finished with the same overrides is read back, not
    run again: a long table survives a stopped command. A folder another command left (other
    overrides, or no summary) is moved aside, never overwritten."""
    done = output_dir.with_name(output_dir.name + ".overrides")
    summary = output_dir / "summary.json"
    if summary.exists() and done.exists() and done.read_text() == overrides:
        print(f"{output_dir.name}: finished before with these overrides, reading {summary}",
              flush=True)
        return json.loads(summary.read_text())
    log = output_dir.with_name(output_dir.name + ".flwr.log")
    if output_dir.exists():
        aside = set_aside(output_dir)
        if log.exists():  # the stopped run's log goes with it
            log.rename(aside.with_name(aside.name + ".flwr.log"))
        print(f"{output_dir.name}: {output_dir} holds an unfinished run or other overrides: "
              f"moved to {aside}", flush=True)
    fed = load_federation(overrides)
    print(f"{output_dir.name}: {fed.num_clients} clients on {fed.num_nodes} SuperNodes (log: "
          f"{log}) ...", flush=True)
    try:
        result = run_federated(overrides, num_supernodes=fed.num_nodes, output_dir=output_dir)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    done.write_text(overrides)
    return result


# A benchmark dataset: its overrides, given the folder that holds the licensed data.
DATASETS = {
    "ml-100k": "dataset=movielens_100k dataset.path={data}/ml-100k",
    "beauty": "dataset=sequence dataset.name=beauty "
              "dataset.path={data}/amazon-beauty/Beauty.txt",
    # The built-in shop at a real shop's population; needs no licensed data.
    "synthetic-100k": "dataset=synthetic dataset.num_users=100000",
}


def partition_parser(description: str, recipes: dict[str, str]) -> argparse.ArgumentParser:
    """Arguments of a benchmark that runs one dataset under one recipe per partition."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding ml-100k/ and amazon-beauty/ (default: %(default)s)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml-100k",
                        help="(default: %(default)s)")
    parser.add_argument("--partition", nargs="+", default=list(recipes), choices=list(recipes),
                        help="partitions to run (default: all)")
    for name, recipe in recipes.items():
        parser.add_argument(f"--{name}", default=recipe,
                            help=f"federated overrides for partition={name} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where runs write (default: temp); the same folder again reads "
                        "back the runs that finished")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return parser


def partition_runs(args: argparse.Namespace, prefix: str) -> Iterator[tuple[str, str, Path]]:
    """(partition, its overrides, the folder its runs write under), with the SuperLink managed."""
    logging.basicConfig(level=logging.WARNING)
    out = (args.out or Path(tempfile.mkdtemp(prefix=f"fedrec-{prefix}-"))).resolve()
    data = DATASETS[args.dataset].format(data=args.data.resolve())
    with local_superlink():
        for partition in args.partition:
            yield partition, f"{data} {getattr(args, partition)} {' '.join(args.overrides)}", out
    print(f"runs: {out}")
