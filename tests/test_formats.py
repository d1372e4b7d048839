"""Every file format parses tiny hand-written fixtures correctly and rejects bad input clearly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import compose_config, to_typed
from fedrec.data.dataset import Dataset, RawData, build_dataset
from fedrec.data.formats import (
    ML100K_GENRES,
    DataFormatError,
    read_interactions_table,
    read_lightgcn,
    read_movielens_1m,
    read_movielens_100k,
    read_sequence,
    resolve_sequence_attributes,
)
from fedrec.data.loaders import load_dataset


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def build(raw: RawData, min_rating: float | None = None, kcore: int = 0) -> Dataset:
    return build_dataset("test", raw, min_rating=min_rating, kcore=kcore, source="test")


def history(dataset: Dataset, user: str) -> list[str]:
    """A user's items, as original ids, in the dataset's order."""
    index = int(np.flatnonzero(dataset.user_ids == user)[0])
    rows = dataset.interactions[dataset.interactions["user"] == index]
    return [dataset.item_ids[i] for i in rows["item"]]


def attributes_of(dataset: Dataset, item: str) -> set[str]:
    index = int(np.flatnonzero(dataset.item_ids == item)[0])
    return {dataset.attribute_names[a] for a in dataset.item_attributes[index] if a}


def features_of(dataset: Dataset, user: str) -> set[str]:
    assert dataset.user_features is not None and dataset.user_feature_names is not None
    index = int(np.flatnonzero(dataset.user_ids == user)[0])
    return {dataset.user_feature_names[f] for f in dataset.user_features[index] if f}


def dataset_config(*overrides: str):
    return to_typed(compose_config(list(overrides))).dataset


# ----------------------------------------------------------------------------- MovieLens 100K
def u_item_line(item: int, title: str, genres: tuple[str, ...]) -> str:
    flags = ["1" if g in genres else "0" for g in ML100K_GENRES]
    return "|".join([str(item), title, "01-Jan-1995", "", "http://example.org", *flags])


def ml100k(folder: Path, *, users: bool = True) -> Path:
    write(folder / "u.data", "".join([
        "1\t10\t5\t300\n",
        "1\t20\t3\t100\n",
        "2\t10\t4\t200\n",
        "2\t30\t1\t100\n",
        "3\t20\t2\t50\n",
        "1\t10\t4\t400\n",  # repeats (1, 10) later: dropped as a duplicate
    ]))
    write(folder / "u.item", "\n".join([
        u_item_line(10, "Toy Story (1995)", ("Animation", "Comedy")),
        u_item_line(20, "Heat (1995)", ("Action", "Crime", "Thriller")),
        u_item_line(30, "Fargo (1996)", ("Crime", "Drama")),
        u_item_line(40, "Never Rated (1990)", ("Drama",)),
    ]) + "\n")
    if users:
        write(folder / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n"
                                 "3|7|M|student|55117\n")
    return folder


def test_movielens_100k_loads_ratings_genres_titles_and_users(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    raw = read_movielens_100k(ml100k(tmp_path))
    assert len(raw.interactions) == 6
    dataset = build(raw)
    assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (3, 3, 5)
    assert list(dataset.user_ids) == ["1", "2", "3"]
    assert list(dataset.item_ids) == ["10", "20", "30"]
    # Ordered by timestamp; the later repeat of item 10 is gone.
    assert history(dataset, "1") == ["20", "10"]
    assert history(dataset, "2") == ["30", "10"]
    assert attributes_of(dataset, "20") == {"genre=Action", "genre=Crime", "genre=Thriller"}
    assert dataset.item_titles is not None
    assert dataset.item_titles[list(dataset.item_ids).index("30")] == "Fargo (1996)"
    assert features_of(dataset, "1") == {"age=20s", "gender=M", "occupation=technician"}
    assert features_of(dataset, "2") == {"age=50s", "gender=F", "occupation=other"}
    assert set(dataset.interactions["rating"]) == {5.0, 3.0, 4.0, 1.0, 2.0}
    assert "ignored 1 of 4 u.item entries" in caplog.text
    assert "dropped 1 of 6 rows: repeated (user, item) pairs" in caplog.text


def test_movielens_100k_genre_names_come_from_u_genre(tmp_path):
    write(tmp_path / "u.data", "1\t1\t5\t1\n")
    write(tmp_path / "u.genre", "Noir|1\nSpace|0\n\n")
    write(tmp_path / "u.item", "1|A Film|||url|1|1\n")
    dataset = build(read_movielens_100k(tmp_path))
    assert attributes_of(dataset, "1") == {"genre=Noir", "genre=Space"}
    assert dataset.user_features is None  # no u.user


def test_min_rating_and_duplicates_are_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    raw = read_movielens_100k(ml100k(tmp_path))
    dataset = build(raw, min_rating=3)
    assert len(dataset.interactions) == 3  # (1,10,5) (1,20,3) (2,10,4); (1,10,4) repeats
    assert (dataset.interactions["rating"] >= 3).all()
    assert "dropped 2 of 6 rows: rating < 3" in caplog.text
    assert "dropped 1 of 6 rows: repeated (user, item) pairs" in caplog.text



def test_kcore_filtering_is_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # Users a, b both rate items x, y; user c rates only x, so c (and nothing else) goes.
    frame = pd.DataFrame({"user": ["a", "a", "b", "b", "c"], "item": ["x", "y", "x", "y", "x"],
                          "order": [1, 2, 1, 2, 1]})
    dataset = build(RawData(frame), kcore=2)
    assert list(dataset.user_ids) == ["a", "b"]
    assert len(dataset.interactions) == 4
    assert "dropped 1 of 5 rows: 2-core filtering" in caplog.text


# ------------------------------------------------------------------------------ MovieLens 1M
def ml1m(folder: Path, *, metadata: bool = True) -> Path:
    write(folder / "ratings.dat", "1::100::5::978300760\n1::200::2::978300700\n"
                                  "2::100::4::978300800\n")
    if metadata:
        write(folder / "movies.dat", "100::Toy Story (1995)::Animation|Children's|Comedy\n"
                                     "200::Jumanji (1995)::Adventure|Fantasy\n"
                                     "300::Unrated (1999)::Drama\n".encode("latin-1"))
        write(folder / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    return folder


def test_movielens_1m_loads_with_metadata(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dataset = build(read_movielens_1m(ml1m(tmp_path)))
    assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (2, 2, 3)
    assert history(dataset, "1") == ["200", "100"]
    assert attributes_of(dataset, "100") == {"genre=Animation", "genre=Children's",
                                             "genre=Comedy"}
    assert dataset.item_titles is not None
    assert dataset.item_titles[list(dataset.item_ids).index("200")] == "Jumanji (1995)"
    assert features_of(dataset, "1") == {"age=under18", "gender=F", "occupation=K-12 student"}
    assert features_of(dataset, "2") == {"age=56+", "gender=M", "occupation=self-employed"}
    assert "ignored 1 of 3 movies.dat entries" in caplog.text


def test_movielens_1m_metadata_is_optional(tmp_path):
    dataset = build(read_movielens_1m(ml1m(tmp_path, metadata=False)))
    assert dataset.num_items == 2 and dataset.num_attributes == 1
    assert dataset.item_titles is None and dataset.user_features is None


def test_movielens_1m_keeps_latin1_titles(tmp_path):
    write(tmp_path / "ratings.dat", "1::1::5::1\n")
    write(tmp_path / "movies.dat", "1::Cité des enfants perdus, La (1995)::Drama\n"
          .encode("latin-1"))
    dataset = build(read_movielens_1m(tmp_path))
    assert dataset.item_titles is not None
    assert dataset.item_titles[0] == "Cité des enfants perdus, La (1995)"


# ---------------------------------------------------------------------------------- LightGCN
def lightgcn(folder: Path, *, valid: bool = True) -> Path:
    write(folder / "train.txt", "0 5 3 1\n1 2 3\n2\n3 4\n")
    if valid:
        write(folder / "valid.txt", "0 2\n1 4\n")
    write(folder / "test.txt", "0 4\n1 1 5\n3\n")
    return folder


def test_lightgcn_keeps_the_published_split(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dataset = build(read_lightgcn(lightgcn(tmp_path)))
    assert dataset.presplit
    assert list(dataset.user_ids) == ["0", "1", "3"]  # user 2 has no items anywhere
    assert list(dataset.item_ids) == ["1", "2", "3", "4", "5"]
    assert len(dataset.interactions) == 11
    counts = dataset.interactions["split"].value_counts().to_dict()
    assert counts == {"train": 6, "valid": 2, "test": 3}
    # Train in file order, then valid, then test.
    assert history(dataset, "0") == ["5", "3", "1", "2", "4"]
    rows = dataset.interactions[dataset.interactions["user"] == 0]
    assert list(rows["split"]) == ["train"] * 3 + ["valid", "test"]
    assert "1 listed users have no items in any split" in caplog.text


def test_lightgcn_valid_is_optional(tmp_path):
    dataset = build(read_lightgcn(lightgcn(tmp_path, valid=False)))
    assert set(dataset.interactions["split"]) == {"train", "test"}
    assert len(dataset.interactions) == 9


# ---------------------------------------------------------------------------------- sequence
def test_sequence_line_layouts_give_the_same_histories(tmp_path):
    whole = write(tmp_path / "whole.txt", "1 10 11 12\n2 11 13\n")
    pairs = write(tmp_path / "pairs.txt", "1 10\n2 11\n1 11\n\n1 12\n2 13\n")
    by_line, by_pair = build(read_sequence(whole, None)), build(read_sequence(pairs, None))
    for dataset in (by_line, by_pair):
        assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (2, 4, 5)
        assert history(dataset, "1") == ["10", "11", "12"]
        assert history(dataset, "2") == ["11", "13"]
        assert dataset.num_attributes == 1  # padding only
    assert list(by_pair.interactions["order"]) == [0, 1, 2, 0, 1]


def test_sequence_reads_item2attributes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = write(tmp_path / "Shop.txt", "1 10 11\n2 11 12\n")
    write(tmp_path / "Shop_item2attributes.json",
          json.dumps({"10": [1, 2], "11": [2], "12": [], "99": [3]}))
    found = resolve_sequence_attributes(path, "auto")
    assert found == tmp_path / "Shop_item2attributes.json"
    dataset = build(read_sequence(path, found))
    assert attributes_of(dataset, "10") == {"attr=1", "attr=2"}
    assert attributes_of(dataset, "12") == set()
    assert dataset.num_attributes - 1 == 2  # attr=3 belongs to an item nobody has
    assert "ignored 1 of 4 item2attributes entries" in caplog.text


def test_resolve_sequence_attributes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = write(tmp_path / "Beauty.txt", "1 2\n")
    assert resolve_sequence_attributes(path, None) is None
    assert resolve_sequence_attributes(path, "auto") is None
    assert "Beauty_item2attributes.json not found" in caplog.text
    other = write(tmp_path / "attrs.json", "{}")
    assert resolve_sequence_attributes(path, str(other)) == other
    with pytest.raises(DataFormatError, match=r"dataset.attributes_path.*does not exist"):
        resolve_sequence_attributes(path, str(tmp_path / "nope.json"))


# ------------------------------------------------------------------------------- CSV/Parquet
def test_csv_with_timestamp_rating_and_item_metadata(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = write(tmp_path / "log.csv", "user,item,timestamp,rating,store\n"
                                       "alice,sku-9,20,4.5,x\n"
                                       "alice,sku-1,10,2,x\n"
                                       "bob,sku-9,5,5,y\n")
    items = write(tmp_path / "items.csv", 'item,attributes,title\n'
                                          'sku-9,brand=Acme|cat=shoes,"Runner, blue"\n'
                                          'sku-1,,Plain socks\n'
                                          'sku-7,cat=hats,Never bought\n')
    dataset = build(read_interactions_table(path, items, "|"), min_rating=3)
    assert list(dataset.user_ids) == ["alice", "bob"]
    assert list(dataset.item_ids) == ["sku-9"]  # sku-1 only has a rating of 2
    assert attributes_of(dataset, "sku-9") == {"brand=Acme", "cat=shoes"}
    assert dataset.item_titles is not None and dataset.item_titles[0] == "Runner, blue"
    assert "ignoring columns store" in caplog.text
    assert "ignored 1 of 3 item metadata entries" in caplog.text

    everything = build(read_interactions_table(path, items, "|"))
    assert history(everything, "alice") == ["sku-1", "sku-9"]  # by timestamp


def test_csv_without_timestamp_uses_row_order(tmp_path):
    path = write(tmp_path / "log.csv", "item,user\n7,001\n3,001\n7,002\n")
    dataset = build(read_interactions_table(path, None, "|"))
    assert list(dataset.user_ids) == ["001", "002"]  # ids stay strings: "001" is not 1
    assert history(dataset, "001") == ["7", "3"]
    assert "rating" not in dataset.interactions.columns
    assert dataset.num_attributes == 1
    with pytest.raises(ValueError, match="has no ratings"):
        build(read_interactions_table(path, None, "|"), min_rating=4)


def test_csv_fractional_timestamps_keep_their_order(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,timestamp\nu,a,1.9\nu,b,1.2\nu,c,1.5\n")
    dataset = build(read_interactions_table(path, None, "|"))
    assert history(dataset, "u") == ["b", "c", "a"]


def test_parquet_and_tsv_tables(tmp_path):
    frame = pd.DataFrame({"user": [1, 1, 2], "item": [30, 10, 30],
                          "timestamp": pd.to_datetime(["2024-01-02", "2024-01-01", "2024-01-03"]),
                          "rating": [5.0, 4.0, 3.0]})
    path = tmp_path / "log.parquet"
    frame.to_parquet(path)
    items = tmp_path / "items.parquet"
    pd.DataFrame({"item": [10, 30], "attributes": ["a;b", "c"]}).to_parquet(items)
    dataset = build(read_interactions_table(path, items, ";"))
    assert list(dataset.user_ids) == ["1", "2"] and list(dataset.item_ids) == ["10", "30"]
    assert history(dataset, "1") == ["10", "30"]
    assert attributes_of(dataset, "10") == {"a", "b"}
    assert list(dataset.interactions["rating"]) == [4.0, 5.0, 3.0]

    tsv = write(tmp_path / "log.tsv", "user\titem\n1\t10\n2\t30\n")
    assert len(build(read_interactions_table(tsv, None, "|")).interactions) == 2


# -------------------------------------------------------------------------------- load_dataset
def test_load_dataset_dispatches_every_file_format(tmp_path, monkeypatch):
    ml100k(tmp_path / "ml-100k")
    ml1m(tmp_path / "ml-1m")
    lightgcn(tmp_path / "lgcn")
    write(tmp_path / "seq" / "Shop.txt", "1 10 11\n2 11\n")
    write(tmp_path / "seq" / "Shop_item2attributes.json", '{"10": [1]}')
    write(tmp_path / "log.csv", "user,item,rating\na,x,1\nb,x,5\n")
    write(tmp_path / "items.csv", "item,attributes\nx,red\n")
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory
    cases = {
        ("dataset=movielens_100k", "dataset.path=ml-100k", "dataset.min_rating=4"): (2, 1, 2),
        ("dataset=movielens_1m", f"dataset.path={tmp_path / 'ml-1m'}"): (2, 2, 3),
        ("dataset=lightgcn", "dataset.path=lgcn"): (3, 5, 11),
        ("dataset=sequence", "dataset.path=seq/Shop.txt"): (2, 2, 3),
        ("dataset=csv", "dataset.path=log.csv", "dataset.items_path=items.csv",
         "dataset.min_rating=3"): (1, 1, 1),
    }
    for overrides, (users, items, rows) in cases.items():
        dataset = load_dataset(dataset_config(*overrides))
        assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (
            users, items, rows), overrides
    seq = load_dataset(dataset_config("dataset=sequence", "dataset.path=seq/Shop.txt"))
    assert seq.num_attributes == 2
    assert load_dataset(dataset_config("dataset=csv", "dataset.path=log.csv",
                                       "dataset.items_path=items.csv")).num_attributes == 2


def test_load_dataset_names_a_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFormatError, match=r"dataset.path='nowhere'.*does not exist"):
        load_dataset(dataset_config("dataset=movielens_100k", "dataset.path=nowhere"))
    write(tmp_path / "log.csv", "user,item\na,x\n")
    with pytest.raises(DataFormatError, match=r"dataset.items_path='gone.csv'"):
        load_dataset(dataset_config("dataset=csv", "dataset.path=log.csv",
                                    "dataset.items_path=gone.csv"))


# ------------------------------------------------------------------------------------ errors
ITEM = u_item_line(1, "Film", ("Drama",))

MALFORMED = {
    "u.data fields": ({"u.data": "1\t2\t3\t4\n1\t2\t3\n", "u.item": ITEM},
                      read_movielens_100k, "u.data line 2", "expected 4 tab-separated fields"),
    "u.data too many": ({"u.data": "1\t2\t3\t4\t5\n", "u.item": ITEM},
                        read_movielens_100k, "u.data line 1", "got 5"),
    "u.data rating": ({"u.data": "1\t2\t3\t4\n\n1\t2\tfive\t4\n", "u.item": ITEM},
                      read_movielens_100k, "u.data line 3", "rating 'five' is not a number"),
    "u.data empty id": ({"u.data": "1\t2\t3\t4\n1\t\t3\t4\n", "u.item": ITEM},
                        read_movielens_100k, "u.data line 2", "empty item id"),
    "u.data timestamp": ({"u.data": "1\t2\t3\t\n", "u.item": ITEM},
                         read_movielens_100k, "u.data line 1", "timestamp '' is not a number"),
    "u.item fields": ({"u.data": "1\t1\t3\t4\n", "u.item": f"{ITEM}\n2|Short|x\n"},
                      read_movielens_100k, "u.item line 2", "expected 24 '|'-separated"),
    "u.item flags": ({"u.data": "1\t1\t3\t4\n", "u.item": ITEM.replace("|1|", "|2|")},
                     read_movielens_100k, "u.item line 1", "genre flags must be 0 or 1"),
    "u.item duplicate": ({"u.data": "1\t1\t3\t4\n", "u.item": f"{ITEM}\n{ITEM}\n"},
                         read_movielens_100k, "u.item line 2", "appears a second time"),
    "u.user age": ({"u.data": "1\t1\t3\t4\n", "u.item": ITEM, "u.user": "1|old|M|x|1\n"},
                   read_movielens_100k, "u.user line 1", "age 'old' is not a number"),
    "ratings.dat fields": ({"ratings.dat": "1::2::3::4\n1::2::3\n"},
                           read_movielens_1m, "ratings.dat line 2", "expected 4 '::'-separated"),
    "ratings.dat timestamp": ({"ratings.dat": "1::2::3::soon\n"},
                              read_movielens_1m, "ratings.dat line 1", "'1::2::3::soon'"),
    "movies.dat fields": ({"ratings.dat": "1::2::3::4\n", "movies.dat": "2::Title\n"},
                          read_movielens_1m, "movies.dat line 1", "expected 3 '::'-separated"),
    "users.dat age": ({"ratings.dat": "1::2::3::4\n", "users.dat": "1::F::x::10::1\n"},
                      read_movielens_1m, "users.dat line 1", "age 'x' is not a number"),
    "train.txt comma": ({"train.txt": "0 1 2\n1 2,3\n", "test.txt": "0 3\n"},
                        read_lightgcn, "train.txt line 2", "unexpected character ','"),
    "test.txt letter": ({"train.txt": "0 1\n", "test.txt": "0 3\n\n1 x\n"},
                        read_lightgcn, "test.txt line 3", "integer ids"),
    "valid.txt bytes": ({"train.txt": "0 1\n", "valid.txt": b"0 1\n\xff\n", "test.txt": "0 3\n"},
                        read_lightgcn, "valid.txt line 2", "not valid utf-8"),
}


@pytest.mark.parametrize("case", MALFORMED.keys())
def test_malformed_files_name_file_line_and_expectation(tmp_path, case):
    files, reader, where, what = MALFORMED[case]
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(DataFormatError) as err:
        reader(tmp_path)
    assert where in str(err.value) and what in str(err.value), str(err.value)


def test_malformed_sequence_files(tmp_path):
    path = write(tmp_path / "seq.txt", "1 2 3\n2 5\n3\n")
    with pytest.raises(DataFormatError, match=r"seq.txt line 3: expected a user id followed"):
        read_sequence(path, None)
    commas = write(tmp_path / "commas.txt", "1,2,3\n")
    with pytest.raises(DataFormatError, match=r"commas.txt line 1.*'1,2,3'"):
        read_sequence(commas, None)
    good = write(tmp_path / "good.txt", "1 2\n")
    bad_json = write(tmp_path / "a.json", '{"2": [1],\n "3": [2,]}')
    with pytest.raises(DataFormatError, match=r"a.json line 2: not valid JSON"):
        read_sequence(good, bad_json)
    nested = write(tmp_path / "b.json", '{"2": {"brand": 1}}')
    with pytest.raises(DataFormatError, match=r"b.json: item '2' maps to"):
        read_sequence(good, nested)
    repeated = write(tmp_path / "c.json", '{"2": [1], "2": [3]}')
    with pytest.raises(DataFormatError, match=r"c.json: item '2' appears twice"):
        read_sequence(good, repeated)
    with pytest.raises(DataFormatError, match=r"is a folder"):
        read_sequence(tmp_path, None)


CSV_MALFORMED = {
    "fields": ("user,item\na,b\na,b,c\n", "log.csv line 3", "expected 2 comma-separated"),
    "short": ("user,item,rating\na,b,1\na,b\n", "log.csv line 3", "got 2"),
    "quoted": ('user,item,title\na,"b, c",t\na,b\n', "log.csv line 3", "expected 3 fields"),
    "header": ("customer,product\na,b\n", "log.csv line 1", "must name user, item"),
    "timestamp": ("user,item,timestamp\na,b,1\na,c,2024-01-01\n", "log.csv line 3",
                  "timestamp '2024-01-01' is not a number"),
    "rating": ("user,item,rating\na,b,\n", "log.csv line 2", "rating '' is not a number"),
    "empty id": ("user,item\n,b\n", "log.csv line 2", "empty user"),
    "no rows": ("user,item\n", "log.csv", "no rows"),
}


@pytest.mark.parametrize("case", CSV_MALFORMED.keys())
def test_malformed_csv(tmp_path, case):
    content, where, what = CSV_MALFORMED[case]
    path = write(tmp_path / "log.csv", content)
    with pytest.raises(DataFormatError) as err:
        read_interactions_table(path, None, "|")
    assert where in str(err.value) and what in str(err.value), str(err.value)


def test_malformed_item_metadata_and_parquet(tmp_path):
    log_path = write(tmp_path / "log.csv", "user,item\na,x\n")
    items = write(tmp_path / "items.csv", "item,attributes\nx,red\ny,blue\nx,green\n")
    with pytest.raises(DataFormatError, match=r"items.csv line 4: item 'x' appears a second"):
        read_interactions_table(log_path, items, "|")
    no_attributes = write(tmp_path / "titles.csv", "item,title\nx,X\n")
    with pytest.raises(DataFormatError, match=r"titles.csv line 1.*must name item, attributes"):
        read_interactions_table(log_path, no_attributes, "|")
    table = tmp_path / "log.parquet"
    pd.DataFrame({"user": ["a", "b", "c"], "item": ["x", "y", "z"],
                  "rating": ["5", "4", "bad"]}).to_parquet(table)
    with pytest.raises(DataFormatError, match=r"log.parquet row 3: rating 'bad' is not a number"):
        read_interactions_table(table, None, "|")
    broken = write(tmp_path / "broken.parquet", b"not parquet at all")
    with pytest.raises(DataFormatError, match=r"broken.parquet: not a readable Parquet file"):
        read_interactions_table(broken, None, "|")


def test_empty_and_missing_files(tmp_path):
    write(tmp_path / "u.data", "\n  \n")
    write(tmp_path / "u.item", ITEM)
    with pytest.raises(DataFormatError, match=r"u.data is empty"):
        read_movielens_100k(tmp_path)
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(DataFormatError, match=r"empty.txt is empty"):
        read_sequence(empty, None)
    folder = tmp_path / "lgcn"
    write(folder / "train.txt", "0 1\n")
    with pytest.raises(DataFormatError) as err:
        read_lightgcn(folder)
    message = str(err.value)
    assert "test.txt not found in" in message and str(folder.resolve()) in message
    assert "requires train.txt and test.txt" in message
    with pytest.raises(DataFormatError, match=r"ratings.dat not found in .*requires ratings.dat"):
        read_movielens_1m(tmp_path)
    with pytest.raises(DataFormatError, match=r"is not a folder"):
        read_movielens_100k(tmp_path / "u.item")
