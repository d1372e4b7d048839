"""Turn a ``dataset`` config into a ``Dataset``: pick the parser, then filter and re-index."""

from __future__ import annotations

from pathlib import Path

from fedrec.config import (
    CsvDatasetConfig,
    DatasetConfig,
    FileDatasetConfig,
    SequenceDatasetConfig,
)
from fedrec.data.dataset import Dataset, build_dataset
from fedrec.data.formats import (
    DataFormatError,
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
    return build_dataset(cfg.name, raw, min_rating=cfg.min_rating, kcore=cfg.kcore,
                         source=str(path))


def _existing(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise DataFormatError(f"{key}={value!r}: {path.resolve()} does not exist (relative "
                              f"paths resolve against {Path.cwd()}; see data/README.md)")
    return path
