"""Cross-device at shop scale: the synthetic shop at growing populations, a fixed cohort of
shoppers a round, and the real datasets with one client per shopper, on a pool of SuperNodes,
through the real Flower runtime.

    python scripts/benchmark_scale.py                       # every row below
    python scripts/benchmark_scale.py --shoppers 1000 10000 --rounds 4 --real
    python scripts/benchmark_scale.py --shoppers --real beauty -- num_rounds=300
    python scripts/benchmark_scale.py --shoppers --real ml-100k --seeds 0 1 2

The synthetic table: seconds of round 1 (each node process's warm-up included) and per later
training round (those without an evaluation: median and slowest), the round-0 evaluation of
every shopper, peak memory (the resident memory of every process of the run, sampled twice a
second), and the bytes a shopper's device sends and receives a round (the shared model each way,
as a device would; the pool's own messages carry a node's mean).

The real-data table (``--real``; rows skip when ../shared/data lacks the dataset): the
cross-device recipe against the centralized run of the same dataset and model, and round 0,
the evaluation of every shopper (with each node's first loading of its data). Both report
the test metrics of the round or epoch with the best validation HR@10. With several
``--seeds`` each dataset gets a pair of runs per seed and a row with the ratio of their means:
one run's test HR@10 on ML-100K moves by about 0.01 between neighbouring evaluations. "pass"
is the training time of one pass of every shopper (the median later training round x
population / cohort) against one centralized epoch of training over the same examples, timed
alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import DATASETS, DEFAULT_DATA, load_federation, local_superlink

from fedrec.centralized import run as run_centralized
from fedrec.data.sequences import training_examples
from fedrec.model import TwoTower
from fedrec.simulation import descendants, run_federated, superlink_pids
from fedrec.train import Objective, choose_weight_decay, make_loader, make_optimizer, train

# name: (the dataset with its centralized model, the cross-device recipe for its kind of data).
REAL = {
    "beauty": (DATASETS["beauty"], "experiment=cross_device_sparse"),
    "ml-100k": (f"{DATASETS['ml-100k']} model.user_tower=attention",
                "experiment=cross_device_attention"),
}


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # the process ended
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakMemory:
    """The largest total resident memory of this process, the SuperLink and their children."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            roots = [os.getpid(), *superlink_pids()]
            self.peak = max(self.peak, rss_bytes(sorted(set(roots + descendants(roots)))))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def centralized_epoch_seconds(overrides: str) -> float:
    """One epoch of the centralized run's training over every training example, timed alone
    (the centralized run's own epochs include an evaluation)."""
    fed = load_federation(overrides)
    cfg = fed.cfg
    examples = training_examples(fed.split.train, fed.dataset.num_items, cfg.model.max_history)
    model = TwoTower.for_dataset(cfg.model, fed.dataset)
    objective = Objective.from_config(cfg.train, examples, fed.dataset.num_items)
    loader = make_loader(examples, cfg.train.batch_size, cfg.seed)
    started = time.perf_counter()
    decay = choose_weight_decay(cfg.train, examples.user, federated=False).weight_decay
    optimizer = make_optimizer(model.parameters(), cfg.train.optimizer, lr=cfg.train.lr,
                               weight_decay=decay)
    train(model, optimizer, loader, objective, epochs=1, seed=cfg.seed)
    return time.perf_counter() - started


def synthetic_rows(args: argparse.Namespace, out: Path) -> list[str]:
    rows = []
    for shoppers in args.shoppers:
        overrides = [f"dataset.num_users={shoppers}", f"dataset.num_items={args.items}",
                     "partition=user", f"partition.pool_nodes={args.pool}",
                     f"strategy.fraction_train={args.cohort / shoppers}",
                     f"num_rounds={args.rounds}", f"eval.every={args.rounds}",
                     "experiment=cross_device", "guide_example=false", *args.overrides]
        fed = load_federation(" ".join(overrides))
        model = TwoTower.for_dataset(fed.cfg.model, fed.dataset)
        model_bytes = sum(t.numel() * t.element_size() for t in model.shared_state().values())
        print(f"{shoppers} shoppers on {fed.num_nodes} SuperNodes ...", flush=True)
        started = time.perf_counter()
        with PeakMemory() as memory:
            summary = run_federated(overrides, num_supernodes=fed.num_nodes,
                                    output_dir=out / str(shoppers),
                                    log_path=out / f"{shoppers}.flwr.log")
        wall = time.perf_counter() - started
        lines = [json.loads(line) for line in
                 (out / str(shoppers) / "metrics.jsonl").read_text().splitlines()]
        first, later, slowest = training_seconds(lines)
        rows.append(f"| {shoppers:,} | {fed.num_nodes} | {lines[1].get('cohort')} | {first:.2f} "
                    f"| {later:.2f} | {slowest:.2f} | {lines[0]['seconds']:.1f} | "
                    f"{memory.peak / 2**30:.2f} | {model_bytes / 1e6:.2f} | {wall:.0f} | "
                    f"{summary['metrics']['sampled'].get('hr@10'):.4f} |")
        print(rows[-1], flush=True)  # each row as it lands: a later failure keeps it
    return rows


def training_seconds(lines: list[dict]) -> tuple[float, float, float]:
    """Seconds of the first round, which includes each node process's warm-up (its first
    shopper model, its first pass), and the median and the slowest of the later rounds that
    trained and did not evaluate. Flower's simulation hands a node's message to whichever
    ClientApp process is free, so the first time a process serves a node it loads that node's
    slice: seconds at 100,000 shoppers, once per process and node."""
    later = sorted(line["seconds"] for line in lines[2:] if "test" not in line) or [math.nan]
    return lines[1]["seconds"], statistics.median(later), later[-1]


def real_rows(args: argparse.Namespace, out: Path) -> list[str]:
    rows: list[str] = []
    for name in args.real:
        data, recipe = REAL[name]
        data = data.format(data=args.data.resolve())
        path = data.split("dataset.path=")[1].split()[0]
        if not Path(path).exists():
            rows.append(f"| {name} | skipped: {path} is absent (data/README.md) |")
            continue
        epoch = centralized_epoch_seconds(data)
        ratios: list[tuple[float, float]] = []  # (cross-device, centralized) HR@10 by seed
        for seed in args.seeds:
            row, result = real_row(args, out, name, data, recipe, seed, epoch)
            rows.append(row)
            print(row, flush=True)  # each row as it lands: a later failure keeps it
            if result is not None:
                ratios.append(result)
        if len(ratios) > 1:
            each = [hr / central for hr, central in ratios]
            hr, central = (statistics.mean(column) for column in zip(*ratios, strict=True))
            rows.append(f"| {name} | mean of {len(ratios)} seeds | | | | {hr:.4f} | | "
                        f"{central:.4f} | **{hr / central:.4f}x** (seeds {min(each):.3f}x to "
                        f"{max(each):.3f}x) | | | | | | |")
            print(rows[-1], flush=True)
    return rows


def real_row(args: argparse.Namespace, out: Path, name: str, data: str, recipe: str,
             seed: int, epoch: float) -> tuple[str, tuple[float, float] | None]:
    """One seed of a dataset: the table row and its (cross-device, centralized) test HR@10;
    a failed run's row says why, with no figures."""
    data = f"{data} seed={seed}"
    print(f"{name}, seed {seed}: centralized ...", flush=True)
    reference = run_centralized(f"{data} output_dir={out}/{name}-central-{seed}")
    overrides = [*data.split(), *recipe.split(), f"partition.pool_nodes={args.pool}",
                 "guide_example=false", *args.overrides]
    fed = load_federation(" ".join(overrides))
    log_path = out / f"{name}-{seed}.flwr.log"
    print(f"{name}, seed {seed}: cross-device, {fed.num_clients} shoppers on {fed.num_nodes} "
          f"SuperNodes (log: {log_path}) ...", flush=True)
    started = time.perf_counter()
    try:
        summary = run_federated(overrides, num_supernodes=fed.num_nodes,
                                output_dir=out / f"{name}-{seed}", log_path=log_path,
                                timeout=3 * 3600)
    except Exception as err:  # a failed run is a row of the table, not the end of it
        return f"| {name} | seed {seed} failed: {str(err).splitlines()[0][:200]} |", None
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (out / f"{name}-{seed}" / "metrics.jsonl").read_text()
             .splitlines()]
    cohort = lines[1]["cohort"]
    per_pass = training_seconds(lines)[1] * fed.num_clients / cohort
    hr = summary["metrics"]["sampled"]["hr@10"]
    central_hr = reference["metrics"]["sampled"]["hr@10"]
    row = (f"| {name} | {fed.num_clients:,} | {cohort} | `{recipe} seed={seed}` | "
           f"{summary['selected_round']} of {summary['rounds']} | {hr:.4f} | "
           f"{summary['metrics']['sampled']['ndcg@10']:.4f} | {central_hr:.4f} | "
           f"{hr / central_hr:.3f}x | {wall:.0f} | {reference['wall_seconds']:.0f} | "
           f"{lines[0]['seconds']:.1f} | {per_pass:.1f} | {epoch:.1f} | "
           f"{per_pass / epoch:.2f}x |")
    return row, (hr, central_hr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shoppers", nargs="*", type=int, default=[1_000, 10_000, 100_000],
                        help="synthetic populations (none: no synthetic rows)")
    parser.add_argument("--cohort", type=int, default=500)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="of each synthetic run")
    parser.add_argument("--real", nargs="*", default=list(REAL), choices=list(REAL),
                        help="real datasets, cross-device against centralized (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="seeds of each real dataset's pair of runs; several add a row "
                             "with the ratio of their mean HR@10s")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding the datasets (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedrec-scale-"))).resolve()
    with local_superlink():
        real = real_rows(args, out)
        synthetic = synthetic_rows(args, out)
    if synthetic:
        print("\n| shoppers | SuperNodes | cohort | s, round 1 | s / later training round, "
              "median | slowest | s, round 0 (evaluate all) | peak memory GiB | MB per shopper "
              "each way | wall s | HR@10 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(synthetic))
        print(f"\n{args.rounds} rounds each, {args.items:,} items")
    if real:
        print("\n| dataset | shoppers | cohort | recipe | selected round | HR@10 | NDCG@10 "
              "| centralized HR@10 | ratio | wall s | centralized wall s | s, round 0 (evaluate "
              "all) | s, pass over every shopper | s, centralized epoch | pass / epoch |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(real))
    print(f"\nresults in {out}")


if __name__ == "__main__":
    main()
