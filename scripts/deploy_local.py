"""Run fedrec on a real Flower deployment on this machine, with TLS and node authentication.

A SuperLink with TLS and SuperNode authentication, and one SuperNode per data folder, each on
its own port:

    python scripts/deploy_local.py --data DIR [--nodes N] [--out DIR] [overrides...]
    python scripts/split_nodes.py /tmp/shops dataset=movielens_100k dataset.path=/abs/ml-100k
    python scripts/deploy_local.py --data /tmp/shops --out /tmp/run1 num_rounds=5

--data is a folder as scripts/split_nodes.py writes it: catalogue.csv and node-<k>/
interactions.csv. The script makes a CA, a SuperLink certificate and a key pair per node,
registers the node keys, starts everything, runs `flwr run` with the overrides (plus
federation=deployment, dataset=csv and the catalogue), waits for the result and stops every
process it started, on success, on failure and on Ctrl-C. The run's results and every
process's log (OUT/logs/) land in --out.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from fedrec.deployment import LocalDeployment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with catalogue.csv and node-<k>/interactions.csv")
    parser.add_argument("--nodes", type=int, default=None,
                        help="SuperNodes to start (default: one per node-<k> folder)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the run's output_dir, logs included (default: a new folder "
                             "under ~/fedrec-runs)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    data = args.data.resolve()
    folders = sorted(data.glob("node-*/interactions.csv"),
                     key=lambda p: int(p.parent.name.split("-")[1]))
    if not (data / "catalogue.csv").exists() or not folders:
        parser.error(f"--data {data} holds no catalogue.csv and node-<k>/interactions.csv: "
                     "write them with scripts/split_nodes.py")
    if args.nodes is not None:
        if not 1 <= args.nodes <= len(folders):
            parser.error(f"--nodes {args.nodes}: {data} has {len(folders)} node folders")
        folders = folders[: args.nodes]
    out = (args.out or Path.home() / "fedrec-runs" / time.strftime("%Y-%m-%d/%H-%M-%S-deploy"))
    out = out.resolve()
    overrides = ["dataset=csv", f"dataset.path={folders[0]}",
                 f"dataset.catalogue={data / 'catalogue.csv'}", *args.overrides]

    # Ctrl-C and SIGTERM both unwind through the with-block, which stops every process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with LocalDeployment(out, folders) as deployment:
            print(f"{len(folders)} SuperNodes online; logs in {deployment.logs}", flush=True)
            summary = deployment.run(overrides, out, timeout=args.timeout, echo=True)
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"deployment failed: {err}", file=sys.stderr)
        return 1
    sampled = summary["metrics"]["sampled"]
    print(f"deployed run: {summary['rounds']} rounds on {summary['num_clients']} nodes, "
          f"HR@10 {sampled.get('hr@10', float('nan')):.4f} in {summary['wall_seconds']:.1f} s; "
          f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
