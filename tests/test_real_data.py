"""The loaders reproduce the published counts of the real benchmark sets.

The data is not shipped with fedrec (its terms forbid redistribution); these tests run only when
a checkout sits next to a ``shared/data`` folder holding it (see data/README.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedrec.config import compose_config, to_typed
from fedrec.data.dataset import Dataset
from fedrec.data.formats import DataFormatError
from fedrec.data.loaders import load_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real datasets not found at {DATA}")


def load(*overrides: str) -> Dataset:
    started = time.perf_counter()
    dataset = load_dataset(to_typed(compose_config(list(overrides))).dataset)
    print(f"{overrides[0]}: loaded in {time.perf_counter() - started:.2f}s")
    return dataset


def needs(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def test_movielens_100k():
    dataset = load("dataset=movielens_100k", f"dataset.path={needs('ml-100k')}",
                   "dataset.min_rating=null")
    assert dataset.num_users == 943
    assert dataset.num_items == 1682
    assert len(dataset.interactions) == 100_000
    assert dataset.num_attributes - 1 == 19  # genres
    assert dataset.item_titles is not None and all(dataset.item_titles != "")
    assert dataset.user_features is not None and dataset.user_features.shape == (943, 3)
    assert sorted(dataset.interactions["rating"].unique()) == [1, 2, 3, 4, 5]
    # Contiguous original ids map to index = id - 1.
    assert list(dataset.user_ids[:3]) == ["1", "2", "3"]
    assert dataset.item_ids[-1] == "1682"


def test_movielens_100k_min_rating():
    dataset = load("dataset=movielens_100k", f"dataset.path={needs('ml-100k')}",
                   "dataset.min_rating=4")
    assert len(dataset.interactions) == 34_174 + 21_201


def test_ml1m_lightgcnpp_keeps_its_split():
    dataset = load("dataset=lightgcn", f"dataset.path={needs('ml-1m-lightgcnpp')}")
    assert dataset.num_users == 6_039
    assert dataset.num_items == 3_628
    assert len(dataset.interactions) == 836_478
    counts = dataset.interactions["split"].value_counts().to_dict()
    assert counts == {"train": 590_733, "valid": 80_897, "test": 164_848}


def test_amazon_beauty_sequence_with_attributes():
    dataset = load("dataset=sequence", f"dataset.path={needs('amazon-beauty', 'Beauty.txt')}",
                   "dataset.attributes_path=auto")
    assert dataset.num_users == 22_363
    assert dataset.num_items == 12_101
    assert len(dataset.interactions) == 198_502
    assert dataset.num_attributes - 1 == 637
    assert (dataset.item_attributes[:, 0] > 0).all()  # every item has an attribute


def test_ml1m_metadata_without_ratings_is_refused():
    with pytest.raises(DataFormatError, match=r"ratings\.dat not found"):
        load("dataset=movielens_1m", f"dataset.path={needs('ml-1m')}")
