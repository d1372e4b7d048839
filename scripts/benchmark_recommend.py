"""Latency of the shopping guide (fedrec.recommend) on synthetic catalogues.

    python scripts/benchmark_recommend.py [--items 10000 100000 1000000] [--requests 300]

For each catalogue size: a two-tower model with that many items (random weights, the model's
default sizes from fedrec/conf/model/two_tower.yaml, random attributes), its item vectors computed
once as a trained model.pt stores them. One thread. Prints the p50 and p99 latency of one
request (a 20-item history, top 10, history excluded) and the throughput of batches of 256
histories. Target: p99 < 20 ms at 10^5 items.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedrec.config import compose_config, to_typed
from fedrec.model import TwoTower
from fedrec.recommend import Recommender

HISTORY = 20
BATCH = 256


def build_guide(num_items: int, seed: int = 0) -> Recommender:
    rng = np.random.default_rng(seed)
    cfg = to_typed(compose_config([])).model
    num_attributes = 200
    attributes = rng.integers(1, num_attributes, (num_items, 3))
    model = TwoTower(cfg, attributes, num_attributes).eval()
    with torch.no_grad():
        vectors = torch.cat([model.item_vectors(torch.arange(start, min(start + 65536,
                                                                        num_items)))
                             for start in range(0, num_items, 65536)])
    names = ["<pad>", *(f"attribute-{a}" for a in range(1, num_attributes))]
    return Recommender(model, [str(i) for i in range(num_items)], names, None, vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    print("| catalogue items | build s | p50 ms | p99 ms | batch of 256: shoppers/s |")
    print("|---|---|---|---|---|")
    for num_items in args.items:
        started = time.perf_counter()
        guide = build_guide(num_items)
        build = time.perf_counter() - started
        histories = [[str(i) for i in rng.integers(0, num_items, HISTORY)]
                     for _ in range(args.requests)]
        guide.recommend(histories[0], 10)  # warm-up
        latencies = []
        for history in histories:
            started = time.perf_counter()
            guide.recommend(history, 10)
            latencies.append((time.perf_counter() - started) * 1e3)
        batches = [histories[i:i + BATCH] for i in range(0, len(histories), BATCH)
                   if len(histories[i:i + BATCH]) == BATCH] or [histories]
        started = time.perf_counter()
        served = sum(len(guide.recommend_many(b, 10)) for b in batches)
        throughput = served / (time.perf_counter() - started)
        p50, p99 = np.percentile(latencies, [50, 99])
        print(f"| {num_items:,} | {build:.1f} | {p50:.2f} | {p99:.2f} | {throughput:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
