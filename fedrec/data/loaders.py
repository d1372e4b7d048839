"""Turn a ``dataset`` config into a ``Dataset``: pick the parser, then filter and re-index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedrec.config import (
    CsvDatasetConfig,
    DatasetConfig,
    FileDatasetConfig,
    SequenceDatasetConfig,
)
from fedrec.data.dataset import Dataset, build_dataset, catalogue_dataset
from fedrec.data.formats import (
    DataFormatError,
    read_catalogue,
    read_interactions_table,
    read_lightgcn,
    read_movielens_1m,
    read_movielens_100k,
    read_sequence,
    resolve_sequence_attributes,
)

_FOLDER_READERS = {
    "movielens_100k": read_movielens_100k,
    "movielens_1m": read_movielens_1m,
    "lightgcn": read_lightgcn,
}


def load_dataset(cfg: DatasetConfig) -> Dataset:
    """Read the data ``cfg`` names; file formats resolve ``dataset.path`` against the cwd."""
    if cfg.format == "synthetic":
        from fedrec.data.synthetic import generate_shop

        return generate_shop(cfg)
    assert isinstance(cfg, FileDatasetConfig)
    path = _existing(cfg.path, "dataset.path")
    if cfg.format in _FOLDER_READERS:
        raw = _FOLDER_READERS[cfg.format](path)
    elif cfg.format == "sequence":
        assert isinstance(cfg, SequenceDatasetConfig)
        raw = read_sequence(path, resolve_sequence_attributes(path, cfg.attributes_path))
    elif cfg.format == "csv":
        assert isinstance(cfg, CsvDatasetConfig)
        items = _existing(cfg.items_path, "dataset.items_path") if cfg.items_path else None
        raw = read_interactions_table(path, items, cfg.attribute_separator)
    else:  # DatasetConfig.__post_init__ allows only the formats above
        raise DataFormatError(f"dataset.format={cfg.format!r} has no reader")
    catalogue = None
    if cfg.catalogue is not None:
        catalogue_path = _existing(cfg.catalogue, "dataset.catalogue")
        raw.item_attributes, raw.item_titles = read_catalogue(catalogue_path)
        catalogue = np.array(list(raw.item_attributes), dtype=object)
        unknown = set(raw.interactions["item"].astype(str)) - set(raw.item_attributes)
        if unknown:
            raise DataFormatError(
                f"{path}: {len(unknown)} item ids are not in dataset.catalogue={cfg.catalogue!r}"
                f" (e.g. {', '.join(sorted(unknown)[:5])}): every node must use the catalogue's "
                "ids")
    return build_dataset(cfg.name, raw, min_rating=cfg.min_rating, kcore=cfg.kcore,
                         source=str(path), catalogue=catalogue)


def load_catalogue(cfg: DatasetConfig) -> Dataset:
    """The items alone, for a server that holds no interactions (a deployment)."""
    if not isinstance(cfg, FileDatasetConfig) or cfg.catalogue is None:
        raise DataFormatError("a server without data needs the item catalogue: set "
                              "dataset.catalogue (CSV item,attributes[,title])")
    attributes, titles = read_catalogue(_existing(cfg.catalogue, "dataset.catalogue"))
    return catalogue_dataset(cfg.name, attributes, titles)


def _existing(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise DataFormatError(f"{key}={value!r}: {path.resolve()} does not exist (relative "
                              f"paths resolve against {Path.cwd()}; see data/README.md)")
    return path
