"""Cross-device at shop scale: the synthetic shop at growing populations, a fixed cohort of
shoppers a round, on a pool of SuperNodes, through the real Flower runtime.

    python scripts/benchmark_scale.py                       # 1,000, 10,000 and 100,000 shoppers
    python scripts/benchmark_scale.py --shoppers 1000 10000 --rounds 4

Prints one table: seconds per training round (the rounds without an evaluation), the round-0
evaluation of every shopper, peak memory (the resident memory of every process of the run,
sampled twice a second), and the bytes a shopper's device sends and receives a round (the
shared model each way, as a device would; the pool's own messages carry a node's mean).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from common import load_federation, local_superlink

from fedrec.model import TwoTower
from fedrec.simulation import descendants, run_federated, superlink_pids


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shoppers", nargs="+", type=int, default=[1_000, 10_000, 100_000])
    parser.add_argument("--cohort", type=int, default=500)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedrec-scale-"))).resolve()
    rows = []
    with local_superlink():
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
            training = [line for line in lines[1:] if "test" not in line]
            rows.append((shoppers, fed.num_nodes, lines[1].get("cohort"),
                         sum(x["seconds"] for x in training) / max(len(training), 1),
                         lines[0]["seconds"], memory.peak / 2**30, model_bytes / 1e6, wall,
                         summary["metrics"]["sampled"].get("hr@10")))
    print()
    print("| shoppers | SuperNodes | cohort | s / training round | s, round 0 (evaluate all) "
          "| peak memory GiB | MB per shopper each way | wall s | HR@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]:,} | {row[1]} | {row[2]} | {row[3]:.2f} | {row[4]:.1f} | {row[5]:.2f} "
              f"| {row[6]:.2f} | {row[7]:.0f} | {row[8]:.4f} |")
    print(f"\n{args.rounds} rounds each, {args.items:,} items, results in {out}")


if __name__ == "__main__":
    main()
