"""Split a dataset into one folder per node, for trying a deployment on one machine.

    python scripts/split_nodes.py OUT_DIR [overrides...]
    python scripts/split_nodes.py /tmp/shops dataset=movielens_100k \\
        dataset.path=/abs/ml-100k partition=silo partition.num_silos=10

The dataset and partition come from the same Hydra overrides a run takes. Writes
OUT_DIR/catalogue.csv (item,attributes,title: the items every node shares) and
OUT_DIR/node-<k>/interactions.csv (user,item,timestamp[,rating], original ids, after the
dataset's filtering) for each client k of the partition. A node then runs with

    overrides  dataset=csv dataset.catalogue=OUT_DIR/catalogue.csv
    node config  data-path=OUT_DIR/node-k/interactions.csv

Pre-split data (LightGCN) is written without its split: nodes split it leave-one-out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from fedrec.config import compose_config, to_typed
from fedrec.data.loaders import load_dataset
from fedrec.data.partition import assign_clients, client_users, num_clients
from fedrec.data.split import split_dataset


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    out, overrides = Path(argv[0]).resolve(), argv[1:]
    cfg = to_typed(compose_config(overrides))
    dataset = load_dataset(cfg.dataset)
    assignment = assign_clients(cfg.partition, dataset, split_dataset(dataset))
    out.mkdir(parents=True, exist_ok=True)

    names = dataset.attribute_names
    titles = dataset.item_titles if dataset.item_titles is not None else [""] * dataset.num_items
    pd.DataFrame({
        "item": dataset.item_ids,
        "attributes": ["|".join(names[a] for a in row if a) for row in dataset.item_attributes],
        "title": titles,
    }).to_csv(out / "catalogue.csv", index=False)

    rows = dataset.interactions
    table = pd.DataFrame({"user": dataset.user_ids[rows["user"].to_numpy()],
                          "item": dataset.item_ids[rows["item"].to_numpy()],
                          "timestamp": rows["order"].to_numpy()})
    if "rating" in rows.columns:
        table["rating"] = rows["rating"].to_numpy()
    clients = num_clients(assignment)
    for client in range(clients):
        folder = out / f"node-{client}"
        folder.mkdir(exist_ok=True)
        mine = rows["user"].isin(client_users(assignment, client)).to_numpy()
        table[mine].to_csv(folder / "interactions.csv", index=False)
        print(f"{folder}/interactions.csv: {int(mine.sum())} interactions", flush=True)
    print(f"{clients} nodes; catalogue: {out / 'catalogue.csv'} ({dataset.num_items} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
