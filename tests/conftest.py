"""Shared fixtures: tiny hand-made datasets, and where the licensed real data lives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import compose_config, to_typed
from fedrec.data.dataset import Dataset, RawData, build_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_dataset(rows: list[tuple[str, str, int]], attributes: dict[str, list[str]] | None = None,
                 name: str = "tiny") -> Dataset:
    """A dataset from (user, item, time) rows, through the same build step as every loader."""
    frame = pd.DataFrame(rows, columns=["user", "item", "order"])
    return build_dataset(name, RawData(frame, item_attributes=attributes), min_rating=None,
                         kcore=0, source=name)


def typed_config(*overrides: str):
    return to_typed(compose_config(list(overrides)))


@pytest.fixture
def tiny_shop():
    """A small synthetic shop, the product's own default data, shrunk for speed."""
    from fedrec.data.synthetic import generate_shop

    cfg = typed_config("dataset.num_users=60", "dataset.num_items=40",
                       "dataset.num_categories=4")
    return generate_shop(cfg.dataset)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
