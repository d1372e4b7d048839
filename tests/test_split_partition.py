import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset, typed_config

from fedrec.data.partition import assign_clients, client_split, num_clients
from fedrec.data.split import split_dataset


def test_leave_one_out_is_chronological_and_keeps_short_users_in_train():
    rows = [
        ("a", "i3", 30), ("a", "i1", 10), ("a", "i2", 20), ("a", "i4", 40),  # 4 items
        ("b", "i1", 5), ("b", "i2", 6),  # 2 items: all train
        ("c", "i4", 1),  # 1 item: train
        ("d", "i1", 1), ("d", "i2", 2), ("d", "i3", 3),  # exactly 3
    ]
    ds = make_dataset(rows)
    split = split_dataset(ds)
    name = dict(zip(ds.item_ids, range(ds.num_items), strict=True))
    user = dict(zip(ds.user_ids, range(ds.num_users), strict=True))
    test = dict(zip(split.test["user"], split.test["item"], strict=True))
    valid = dict(zip(split.valid["user"], split.valid["item"], strict=True))
    assert test == {user["a"]: name["i4"], user["d"]: name["i3"]}
    assert valid == {user["a"]: name["i3"], user["d"]: name["i2"]}
    train_users = split.train.groupby("user").size().to_dict()
    assert train_users == {user["a"]: 2, user["b"]: 2, user["c"]: 1, user["d"]: 1}
    assert len(split.train) + len(split.valid) + len(split.test) == 10


def test_ties_in_time_keep_file_order():
    ds = make_dataset([("u", "x", 1), ("u", "y", 5), ("u", "z", 5), ("u", "w", 5)])
    split = split_dataset(ds)
    assert ds.item_ids[split.test["item"].item()] == "w"
    assert ds.item_ids[split.valid["item"].item()] == "z"


def test_presplit_data_keeps_its_split():
    from fedrec.data.dataset import RawData, build_dataset

    frame = pd.DataFrame({"user": ["1", "1", "1", "2"], "item": ["a", "b", "c", "a"],
                          "order": [0, 1, 2, 0], "split": ["train", "test", "train", "test"]})
    ds = build_dataset("pre", RawData(frame), min_rating=None, kcore=0, source="pre")
    split = split_dataset(ds)
    assert len(split.train) == 2 and len(split.test) == 2 and len(split.valid) == 0


def test_user_partition_gives_exactly_one_users_rows(tiny_shop):
    split = split_dataset(tiny_shop)
    assignment = assign_clients(typed_config("partition=user").partition, tiny_shop, split)
    assert num_clients(assignment) == tiny_shop.num_users
    part = client_split(assignment, split, 7)
    for frame, full in zip((part.train, part.valid, part.test),
                           (split.train, split.valid, split.test), strict=True):
        assert set(frame["user"]) <= {7}
        assert len(frame) == (full["user"] == 7).sum()
    with pytest.raises(ValueError, match="client 60 does not exist"):
        client_split(assignment, split, 60)


@pytest.mark.parametrize("assignment", ["iid", "dirichlet"])
def test_silo_partition_is_disjoint_and_complete(tiny_shop, assignment):
    split = split_dataset(tiny_shop)
    cfg = typed_config("partition=silo", "partition.num_silos=5",
                       f"partition.assignment={assignment}").partition
    clients = assign_clients(cfg, tiny_shop, split)
    assert num_clients(clients) == 5
    seen = []
    for client in range(5):
        part = client_split(clients, split, client)
        users = set(part.train["user"]) | set(part.valid["user"]) | set(part.test["user"])
        assert users, "every silo holds at least one user"
        seen.append(users)
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == tiny_shop.num_users


def test_dirichlet_with_small_alpha_skews_categories(tiny_shop):
    split = split_dataset(tiny_shop)

    def category_spread(alpha):
        cfg = typed_config("partition=silo", "partition.num_silos=4",
                           f"partition.alpha={alpha}").partition
        clients = assign_clients(cfg, tiny_shop, split)
        category = tiny_shop.item_attributes[split.train["item"].to_numpy(), 0]
        frame = pd.DataFrame({"client": clients[split.train["user"].to_numpy()],
                              "category": category})
        shares = pd.crosstab(frame["client"], frame["category"], normalize="index")
        return float(shares.max(axis=1).mean())  # how dominated each silo is by one category

    assert category_spread(0.05) > category_spread(100.0) + 0.1


def test_silo_count_beyond_users_is_refused(tiny_shop):
    split = split_dataset(tiny_shop)
    cfg = typed_config("partition=silo", "partition.num_silos=61").partition
    with pytest.raises(ValueError, match="num_silos=61"):
        assign_clients(cfg, tiny_shop, split)


def test_synthetic_shop_is_deterministic_given_seed():
    from fedrec.data.synthetic import generate_shop

    a = generate_shop(typed_config("dataset.num_users=30", "seed=3").dataset)
    b = generate_shop(typed_config("dataset.num_users=30", "seed=3").dataset)
    c = generate_shop(typed_config("dataset.num_users=30", "seed=4").dataset)
    assert a.interactions.equals(b.interactions)
    assert not a.interactions.equals(c.interactions)
    assert a.num_users == 30
    assert {n.split("=")[0] for n in a.attribute_names[1:]} == {"category", "brand", "price"}
    assert all(a.item_titles)
    assert (np.diff(a.interactions["order"].to_numpy())[
        np.diff(a.interactions["user"].to_numpy()) == 0] >= 0).all()
