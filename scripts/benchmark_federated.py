"""Centralized versus federated training in one run, through the real Flower runtime.

    python scripts/benchmark_federated.py [--data ../shared/data] [--dataset "..."] [--fed "..."]
        [overrides...]

Default: ML-100K with the attention user tower, FedAvg with the attention tower's cross-device
recipe (fedrec/conf/experiment/cross_device_attention.yaml: every shopper is a client, 600 short
rounds). Both runs report the
epoch or evaluated round with the best validation HR@10. Prints sampled HR@10 and NDCG@10, full
Recall@20, wall time and bytes up/down, and the federated/centralized HR@10 ratio. Positional
overrides apply to both runs; --fed overrides only the federated one (the centralized reference
keeps its own recipe). The mean tower: --dataset "dataset=movielens_100k
dataset.path={data}/ml-100k" --fed "experiment=cross_device strategy=fedavg".
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from common import DEFAULT_DATA, load_federation, local_superlink

from fedrec.centralized import run as run_centralized
from fedrec.simulation import run_federated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding ml-100k/ (default: %(default)s)")
    parser.add_argument("--dataset", default="dataset=movielens_100k model.user_tower=attention "
                        "dataset.path={data}/ml-100k",
                        help="dataset overrides; {data} expands to --data")
    parser.add_argument("--fed", default="experiment=cross_device_attention strategy=fedavg",
                        help="overrides for the federated run only (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="where runs write (default: temp)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedrec-fedbench-"))).resolve()
    data = args.dataset.format(data=args.data.resolve()).split()
    common = [*data, *args.overrides]
    federated = [*common, *args.fed.split()]
    fed_cfg = load_federation(" ".join(federated))
    num_clients, strategy = fed_cfg.num_clients, fed_cfg.cfg.strategy.name

    print(f"centralized on {data[0]} ...", flush=True)
    central = run_centralized([*common, f"output_dir={out}/centralized"])
    print(f"federated: {strategy}, partition={fed_cfg.cfg.partition.kind}, {num_clients} "
          f"clients on {fed_cfg.num_nodes} SuperNodes, {fed_cfg.cfg.num_rounds} rounds (log: "
          f"{out}/federated.flwr.log) ...", flush=True)
    with local_superlink():
        fed = run_federated(federated, num_supernodes=fed_cfg.num_nodes,
                            output_dir=out / "federated")

    print()
    # Both report the epoch or round with the best validation eval.select_by.
    print("| run | reported epoch or round | HR@10 | NDCG@10 | Recall@20 | wall s | MB up "
          "| MB down |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in (("centralized", central), (f"federated {strategy}", fed)):
        m, c = s["metrics"], s["communication"]
        print(f"| {name} | {s.get('selected_round', s['rounds'])} | "
              f"{m['sampled']['hr@10']:.4f} | {m['sampled']['ndcg@10']:.4f} | "
              f"{m['full']['recall@20']:.4f} | {s['wall_seconds']:.1f} | "
              f"{c['bytes_up'] / 1e6:.1f} | {c['bytes_down'] / 1e6:.1f} |")
    ratio = fed["metrics"]["sampled"]["hr@10"] / central["metrics"]["sampled"]["hr@10"]
    print(f"federated / centralized HR@10 = {ratio:.3f} (target >= 0.95)")
    print(f"runs: {out}")


if __name__ == "__main__":
    main()
