"""One parser per on-disk format; each returns ``RawData`` keyed by the original ids.

Parsers only read: filtering, de-duplication and re-indexing happen once, in ``build_dataset``.
Files are split with numpy and pandas rather than field by field in Python, because the real sets
run to a million lines; every check still reports the first offending line by number, with its
content and what was expected, so a user can open the file and fix it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedrec.data.dataset import RawData

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """The data on disk does not match the format the configuration names."""


# The 19 genre flags of ML-100K's u.item, in column order (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
# ML-1M stores age and occupation as codes (see its README); features read better as labels.
ML1M_AGES = {1: "under18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
             56: "56+"}
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)

# Keeps a user's valid items after their train items, and test after valid, in one ``order``.
SPLIT_RANK = {"train": 0, "valid": 1, "test": 2}
SPLIT_STRIDE = 10**9

_SHOWN = 120  # characters of an offending line quoted in an error
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_UNIT = "\x1f"  # stands in for a multi-character separator while splitting
_SEPARATOR_NAMES = {"\t": "tab", "|": "'|'", "::": "'::'", ",": "comma"}
_PARQUET = (".parquet", ".pq")


# ------------------------------------------------------------------------------ file access
class _Text:
    """A file's bytes and line boundaries, so any check can quote the line it failed on."""

    def __init__(self, path: Path, encoding: str, expected: str, sep: str | None = None):
        self.path = path
        self.encoding = encoding
        self.sep = sep
        raw = path.read_bytes()
        if not raw.strip():
            raise DataFormatError(f"{path} is empty: expected {expected}")
        raw = raw.replace(b"\r\n", b"\n")
        if sep is not None and len(sep) > 1:
            raw = raw.replace(sep.encode(), _UNIT.encode())
        self.raw = raw
        self.bytes = np.frombuffer(raw, dtype=np.uint8)
        self.newlines = np.flatnonzero(self.bytes == 10)
        self.starts = np.r_[0, self.newlines + 1]
        self.ends = np.r_[self.newlines, len(raw)]
        try:
            self.text = raw.decode(encoding)
        except UnicodeDecodeError as err:
            line = int(np.searchsorted(self.newlines, err.start)) + 1
            raise self.error(line, f"not valid {encoding} text ({err.reason}); expected "
                                   f"{expected}") from None

    def full_line(self, number: int) -> str:
        content = self.raw[self.starts[number - 1]: self.ends[number - 1]]
        text = content.decode(self.encoding, errors="replace")
        return text.replace(_UNIT, self.sep) if self.sep and len(self.sep) > 1 else text

    def error(self, number: int, message: str) -> DataFormatError:
        text = self.full_line(number)
        shown = text if len(text) <= _SHOWN else text[:_SHOWN] + "..."
        return DataFormatError(f"{self.path} line {number}: {message}: {shown!r}")

    def nonblank(self) -> np.ndarray:
        """0-based indices of the lines holding anything but whitespace."""
        has_text = ~_WHITESPACE[self.bytes]
        starts = np.minimum(self.starts, len(self.bytes) - 1)
        filled = np.logical_or.reduceat(has_text, starts) & (self.ends > self.starts)
        return np.flatnonzero(filled)


class _Table:
    """A Parquet table: errors name a 1-based row, since there are no lines."""

    def __init__(self, path: Path, frame: pd.DataFrame):
        self.path = path
        self.frame = frame

    def error(self, number: int, message: str) -> DataFormatError:
        row = self.frame.iloc[number - 1].to_dict()
        return DataFormatError(f"{self.path} row {number}: {message}: {row!r:.{_SHOWN}}")


def _require(folder: Path, name: str, fmt: str, requires: str) -> Path:
    if not folder.is_dir():
        raise DataFormatError(f"{folder} is not a folder: the {fmt} format reads a folder "
                              f"holding {requires}")
    path = folder / name
    if not path.is_file():
        names = sorted(p.name for p in folder.iterdir())
        present = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") or "nothing"
        raise DataFormatError(f"{name} not found in {folder.resolve()} (it holds {present}): "
                              f"the {fmt} format requires {requires}")
    return path


def _optional(folder: Path, name: str, otherwise: str) -> Path | None:
    path = folder / name
    if path.is_file():
        return path
    log.info("%s: no %s, so %s", folder, name, otherwise)
    return None


def _file(path: Path, fmt: str, holds: str) -> Path:
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder: the {fmt} format reads one file holding "
                              f"{holds}")
    if not path.is_file():
        raise DataFormatError(f"{path} does not exist: the {fmt} format reads one file holding "
                              f"{holds}")
    return path


def _fields(text: _Text, count: int, layout: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Split every non-blank line into exactly ``count`` fields.

    Returns one object array per field and the 1-based line number of every row.
    """
    sep = text.sep or ""
    split_on = _UNIT if len(sep) > 1 else sep
    rows = text.nonblank()
    at = np.flatnonzero(text.bytes == ord(split_on))
    per_line = np.bincount(np.searchsorted(text.newlines, at), minlength=len(text.starts))
    wrong = rows[per_line[rows] != count - 1]
    if wrong.size:
        name = _SEPARATOR_NAMES.get(sep, repr(sep))
        raise text.error(int(wrong[0]) + 1, f"expected {count} {name}-separated fields "
                                            f"{layout}, got {int(per_line[wrong[0]]) + 1}")
    body = text.text
    if len(rows) == len(text.starts) - body.endswith("\n"):
        body = body.removesuffix("\n")
    else:  # blank lines in between: keep only the rows
        lines = body.split("\n")
        body = "\n".join(lines[i] for i in rows)
    flat = np.array(body.replace("\n", split_on).split(split_on), dtype=object)
    table = flat.reshape(len(rows), count)
    return [table[:, k] for k in range(count)], rows + 1


def _token_lines(text: _Text) -> list[tuple[int, list[str]]]:
    """The whitespace-separated tokens of every non-blank line, with its 1-based number."""
    rows = ((number, line.split()) for number, line in enumerate(text.text.split("\n"), 1))
    return [(number, tokens) for number, tokens in rows if tokens]


def _numbers(where: _Text | _Table, values: np.ndarray, lines: np.ndarray, field: str,
             layout: str) -> np.ndarray:
    """Parse a column as numbers; the first value that is not a finite number is an error."""
    parsed = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy()
    bad = np.flatnonzero(~np.isfinite(parsed.astype(np.float64)))
    if bad.size:
        row = int(bad[0])
        raise where.error(int(lines[row]), f"{field} {values[row]!r} is not a number; "
                                           f"expected {layout}")
    return parsed


def _not_empty(where: _Text | _Table, values: np.ndarray, lines: np.ndarray, field: str,
               layout: str) -> None:
    empty = np.flatnonzero(np.asarray(values, dtype=object) == "")
    if empty.size:
        raise where.error(int(lines[empty[0]]), f"empty {field}; expected {layout}")


def _unique(where: _Text | _Table, ids: np.ndarray, lines: np.ndarray, what: str) -> None:
    repeated = np.flatnonzero(pd.Series(ids, dtype=object).duplicated().to_numpy())
    if repeated.size:
        row = int(repeated[0])
        raise where.error(int(lines[row]), f"{what} {ids[row]!r} appears a second time; "
                                           f"expected one line per {what}")


def _coverage(source: Path, described: Iterable[str], used: Iterable[str], what: str) -> None:
    """Log metadata rows no interaction uses, and interacted ids that have no metadata."""
    described, used = set(described), set(used)
    unused = len(described - used)
    if unused:
        log.info("%s: ignored %d of %d %s entries: their ids have no interactions", source,
                 unused, len(described), what)
    missing = len(used - described)
    if missing:
        log.info("%s: %d of %d interacted ids have no %s entry", source, missing, len(used), what)


# --------------------------------------------------------------------------------- MovieLens
def _read_ratings(folder: Path, name: str, fmt: str, requires: str, layout: str, sep: str,
                  lines_are: str) -> pd.DataFrame:
    """Both MovieLens layouts: four fields a line, user item rating timestamp."""
    text = _Text(_require(folder, name, fmt, requires), "latin-1", f"{lines_are} {layout}",
                 sep=sep)
    (user, item, rating, stamp), lines = _fields(text, 4, layout)
    _not_empty(text, user, lines, "user id", layout)
    _not_empty(text, item, lines, "item id", layout)
    return pd.DataFrame({
        "user": user, "item": item,
        "order": _numbers(text, stamp, lines, "timestamp", layout),
        "rating": _numbers(text, rating, lines, "rating", layout),
    })


def read_movielens_100k(folder: Path) -> RawData:
    """The stock GroupLens ML-100K folder: ratings, genres as attributes, demographics.

    Ratings are kept as they are, so ``dataset.min_rating`` alone decides what is positive.
    """
    folder = Path(folder)
    requires = "u.data and u.item (u.user and u.genre are read when present)"
    interactions = _read_ratings(folder, "u.data", "movielens_100k", requires,
                                 '"user item rating timestamp"', "\t", "tab-separated lines")

    genres = list(ML100K_GENRES)
    genre_path = _optional(folder, "u.genre", "the standard 19 genre names are used")
    if genre_path is not None:
        genres = _read_genre_names(genre_path)
    item_layout = f'"id|title|release|video_release|url|{len(genres)} genre flags"'
    text = _Text(_require(folder, "u.item", "movielens_100k", requires), "latin-1",
                 f"'|'-separated lines {item_layout}", sep="|")
    columns, lines = _fields(text, 5 + len(genres), item_layout)
    ids, titles = columns[0], columns[1]
    _not_empty(text, ids, lines, "item id", item_layout)
    _unique(text, ids, lines, "item")
    flags = np.stack(columns[5:], axis=1)
    bad = np.flatnonzero(~np.isin(flags, ["0", "1"]).all(axis=1))
    if bad.size:
        raise text.error(int(lines[bad[0]]), f"genre flags must be 0 or 1; expected {item_layout}")
    names = np.array([f"genre={g}" for g in genres], dtype=object)
    attributes = {i: names[row].tolist() for i, row in zip(ids, flags == "1", strict=True)}
    _coverage(text.path, ids, interactions["item"].unique(), "u.item")

    features = None
    user_path = _optional(folder, "u.user", "no user features are read")
    if user_path is not None:
        features = _read_users(user_path, "|", '"user|age|gender|occupation|zip"',
                               (0, 1, 2, 3), _ml100k_features, interactions["user"])
    return RawData(interactions, item_attributes=attributes,
                   item_titles=dict(zip(ids.tolist(), titles.tolist(), strict=True)),
                   user_features=features)


def _read_genre_names(path: Path) -> list[str]:
    layout = '"name|index"'
    text = _Text(path, "latin-1", f"'|'-separated lines {layout}", sep="|")
    (names, index), lines = _fields(text, 2, layout)
    order = _numbers(text, index, lines, "genre index", layout)
    if sorted(order.tolist()) != list(range(len(names))):
        raise DataFormatError(f"{path}: genre indices must be 0..{len(names) - 1} once each, "
                              f"got {sorted(order.tolist())}")
    return [names[i] for i in np.argsort(order)]


def _ml100k_features(age: int, gender: str, occupation: str) -> list[str]:
    return [f"age={age // 10 * 10}s", f"gender={gender}", f"occupation={occupation}"]


def _ml1m_features(age: int, gender: str, occupation: str) -> list[str]:
    label = ML1M_AGES.get(age, f"{age // 10 * 10}s")
    code = int(occupation) if occupation.isdigit() else -1
    job = ML1M_OCCUPATIONS[code] if 0 <= code < len(ML1M_OCCUPATIONS) else occupation
    return [f"age={label}", f"gender={gender}", f"occupation={job}"]


def _read_users(path: Path, sep: str, layout: str, columns: tuple[int, int, int, int],
                features: Callable[[int, str, str], list[str]], users: pd.Series
                ) -> dict[str, list[str]]:
    """Demographics as "name=value" features; ``columns`` locates id, age, gender, occupation.

    The zip code is left out: nearly unique per user, it would identify rather than describe.
    """
    text = _Text(path, "latin-1", f"lines {layout}", sep=sep)
    fields, lines = _fields(text, 5, layout)
    ids, age, gender, occupation = (fields[k] for k in columns)
    _not_empty(text, ids, lines, "user id", layout)
    _unique(text, ids, lines, "user")
    ages = _numbers(text, age, lines, "age", layout).astype(np.int64)
    result = {
        u: features(int(a), g.strip(), o.strip())
        for u, a, g, o in zip(ids, ages, gender, occupation, strict=True)
    }
    _coverage(path, ids, users.unique(), path.name)
    return result


def read_movielens_1m(folder: Path) -> RawData:
    """The GroupLens ML-1M layout ("::"-separated); the metadata files are optional."""
    folder = Path(folder)
    interactions = _read_ratings(
        folder, "ratings.dat", "movielens_1m",
        "ratings.dat (movies.dat and users.dat are read when present)",
        '"UserID::MovieID::Rating::Timestamp"', "::", "lines")

    attributes = titles = features = None
    movies = _optional(folder, "movies.dat", "items get no titles or genres")
    if movies is not None:
        movie_layout = '"MovieID::Title::Genres" (genres separated by |)'
        text = _Text(movies, "latin-1", f"lines {movie_layout}", sep="::")
        (ids, names, genres), lines = _fields(text, 3, movie_layout)
        _not_empty(text, ids, lines, "movie id", movie_layout)
        _unique(text, ids, lines, "movie")
        attributes = {i: [f"genre={g.strip()}" for g in gs.split("|") if g.strip()]
                      for i, gs in zip(ids, genres, strict=True)}
        titles = dict(zip(ids.tolist(), names.tolist(), strict=True))
        _coverage(movies, ids, interactions["item"].unique(), "movies.dat")
    users = _optional(folder, "users.dat", "no user features are read")
    if users is not None:
        features = _read_users(users, "::", '"UserID::Gender::Age::Occupation::Zip"',
                               (0, 2, 1, 3), _ml1m_features, interactions["user"])
    return RawData(interactions, item_attributes=attributes, item_titles=titles,
                   user_features=features)


# ------------------------------------------------------------------------ LightGCN, sequence
def _histories(rows: list[tuple[int, list[str]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten "user item item ..." rows into (user, item, position in the user's history)."""
    counts = np.fromiter((len(tokens) - 1 for _, tokens in rows), dtype=np.int64,
                         count=len(rows))
    heads = np.array([tokens[0] for _, tokens in rows], dtype=object)
    users = np.repeat(heads, counts)
    items = np.array(list(chain.from_iterable(tokens[1:] for _, tokens in rows)), dtype=object)
    position = pd.Series(users, dtype=object).groupby(users, sort=False).cumcount()
    return users, items, position.to_numpy(dtype=np.int64)


def read_lightgcn(folder: Path) -> RawData:
    """LightGCN-style split files; the published split is kept in a ``split`` column.

    A user's items keep their order within a file, and valid follows train and test follows
    valid, so sequence models see them in that order.
    """
    folder = Path(folder)
    requires = "train.txt and test.txt (valid.txt is read when present)"
    layout = '"user item item ..." (space-separated non-negative integer ids)'
    frames, listed = [], set()
    for split in SPLIT_RANK:
        name = f"{split}.txt"
        if split == "valid":
            path = _optional(folder, name, "validation comes from the training users' histories")
            if path is None:
                continue
        else:
            path = _require(folder, name, "lightgcn", requires)
        text = _Text(path, "utf-8", f"lines {layout}")
        bad = re.search(rb"[^0-9 \t\n]", text.raw)
        if bad is not None:
            line = int(np.searchsorted(text.newlines, bad.start())) + 1
            raise text.error(line, f"unexpected character {chr(text.raw[bad.start()])!r}; "
                                   f"expected {layout}")
        rows = _token_lines(text)
        listed.update(tokens[0] for _, tokens in rows)
        users, items, position = _histories(rows)
        frames.append(pd.DataFrame({
            "user": users, "item": items,
            "order": SPLIT_RANK[split] * SPLIT_STRIDE + position, "split": split,
        }))
        if len(rows) > len(set(users)):
            log.info("%s: %d lines list %d users with items; lines of one user are joined",
                     path, len(rows), len(set(users)))
    interactions = pd.concat(frames, ignore_index=True)
    empty = len(listed - set(interactions["user"].unique()))
    if empty:
        log.info("%s: %d listed users have no items in any split and are left out", folder,
                 empty)
    return RawData(interactions)


def read_sequence(path: Path, attributes_path: Path | None) -> RawData:
    """One user's history per line (or one "user item" per line), as SASRec/S3-Rec publish.

    There are no timestamps: ``order`` is the position in the user's history, with a user's
    lines joined in file order.
    """
    layout = '"user item item ..." (space-separated, in time order)'
    path = _file(Path(path), "sequence", f"lines {layout}")
    text = _Text(path, "utf-8", f"lines {layout}")
    rows = _token_lines(text)
    short = next((number for number, tokens in rows if len(tokens) < 2), None)
    if short is not None:
        raise text.error(short, f"expected a user id followed by at least one item id, {layout}")
    users, items, position = _histories(rows)
    distinct = len(set(users))
    if len(rows) > distinct:
        log.info("%s: %d lines hold %d users; lines of one user are joined in file order",
                 path, len(rows), distinct)
    interactions = pd.DataFrame({"user": users, "item": items, "order": position})
    attributes = None
    if attributes_path is not None:
        attributes = _read_item2attributes(Path(attributes_path))
        _coverage(Path(attributes_path), attributes, set(items), "item2attributes")
    return RawData(interactions, item_attributes=attributes)


def _read_item2attributes(path: Path) -> dict[str, list[str]]:
    expected = 'a JSON object {"item_id": [attr_id, ...]}'
    _file(path, "item2attributes", expected)

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise DataFormatError(f"{path}: item {key!r} appears twice; expected {expected}")
            seen[key] = value
        return seen

    try:
        content = path.read_text(encoding="utf-8")
        if not content.strip():
            raise DataFormatError(f"{path} is empty: expected {expected}")
        data = json.loads(content, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path} line {err.lineno}: not valid JSON ({err.msg}); expected "
                              f"{expected}") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not valid utf-8 text ({err.reason}); expected "
                              f"{expected}") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected {expected}, got a JSON {type(data).__name__}")
    attributes = {}
    for item, values in data.items():
        if not isinstance(values, list) or not all(
                isinstance(v, (int, str)) and not isinstance(v, bool) for v in values):
            raise DataFormatError(f"{path}: item {item!r} maps to {values!r:.80}; expected "
                                  f"{expected}")
        attributes[item] = list(dict.fromkeys(f"attr={v}" for v in values))
    return attributes


def resolve_sequence_attributes(path: Path, setting: str | None) -> Path | None:
    """Where ``dataset.attributes_path`` points: null reads none, "auto" looks beside the file."""
    if setting is None:
        return None
    if setting == "auto":
        candidate = Path(path).with_name(f"{Path(path).stem}_item2attributes.json")
        if candidate.is_file():
            log.info("dataset.attributes_path=auto: reading item attributes from %s", candidate)
            return candidate
        log.info("dataset.attributes_path=auto: %s not found, so items get no attributes",
                 candidate)
        return None
    given = Path(setting).expanduser()
    if not given.is_file():
        raise DataFormatError(f"dataset.attributes_path={setting!r}: {given.resolve()} does not "
                              "exist; give the item2attributes JSON file, auto or null")
    return given


# ------------------------------------------------------------------------- generic tables
def _read_table(path: Path, layout: str, required: tuple[str, ...], optional: tuple[str, ...]
                ) -> tuple[_Text | _Table, dict[str, np.ndarray], np.ndarray]:
    """Columns of a CSV/TSV with a header line, or of a Parquet file, by lower-case name.

    Returns where errors point, the wanted columns and each row's line (or row) number.
    """
    if path.suffix.lower() in _PARQUET:
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several unrelated types
            raise DataFormatError(f"{path}: not a readable Parquet file ({err}); expected "
                                  f"columns {layout}") from None
        if frame.empty:
            raise DataFormatError(f"{path} has no rows: expected columns {layout}")
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        where: _Text | _Table = _Table(path, frame)
        header = list(frame.columns)
        columns = {name: frame[name] for name in header}
        lines = np.arange(1, len(frame) + 1)
    else:
        where, header, columns, lines = _read_delimited(path, layout)
    missing = [name for name in required if name not in header]
    if missing:
        unit = "the columns" if isinstance(where, _Table) else "line 1: the header"
        raise DataFormatError(f"{path} {unit} must name {', '.join(required)} (optionally "
                              f"{', '.join(optional)}); got {header}")
    ignored = [name for name in header if name not in required + optional]
    if ignored:
        log.info("%s: ignoring columns %s", path, ", ".join(ignored))
    return where, {n: columns[n] for n in required + optional if n in columns}, lines


def _read_delimited(path: Path, layout: str
                    ) -> tuple[_Text, list[str], dict[str, np.ndarray], np.ndarray]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    expected = f"a {_SEPARATOR_NAMES[sep]}-separated table whose header line names {layout}"
    text = _Text(path, "utf-8-sig", expected, sep=sep)
    if b'"' not in text.raw:  # no quoting: every line is one row, split by numpy
        first = int(text.nonblank()[0]) + 1
        header = [name.strip().lower() for name in text.full_line(first).split(sep)]
        values, lines = _fields(text, len(header), f"matching the header {header}")
        values, lines = [v[1:] for v in values], lines[1:]
    else:  # quoted fields may hold separators or newlines: let the csv module split them
        reader = csv.reader(io.StringIO(text.text, newline=""), delimiter=sep)
        rows, numbers, header = [], [], []
        try:
            for row in reader:
                if not any(field.strip() for field in row):
                    continue
                if not header:
                    header = [name.strip().lower() for name in row]
                elif len(row) != len(header):
                    raise text.error(reader.line_num, f"expected {len(header)} fields matching "
                                                      f"the header {header}, got {len(row)}")
                else:
                    rows.append(row)
                    numbers.append(reader.line_num)
        except csv.Error as err:
            raise text.error(reader.line_num, f"cannot split this line ({err})") from None
        table = np.array(rows, dtype=object).reshape(len(rows), len(header))
        values, lines = [table[:, k] for k in range(len(header))], np.array(numbers)
    if len(lines) == 0:
        raise DataFormatError(f"{path} has a header but no rows: expected {expected}")
    return text, header, dict(zip(header, values, strict=True)), lines


def _ids(where: _Text | _Table, values: Any, lines: np.ndarray, field: str,
         layout: str) -> np.ndarray:
    """Ids as stripped strings; integral floats (Parquet with nulls elsewhere) lose the ".0"."""
    series = pd.Series(values)
    missing = np.flatnonzero(series.isna().to_numpy())
    if missing.size:
        raise where.error(int(lines[missing[0]]), f"missing {field}; expected {layout}")
    if pd.api.types.is_float_dtype(series) and (series % 1 == 0).all():
        series = series.astype(np.int64)
    strings = series.astype(str).str.strip().to_numpy(dtype=object)
    _not_empty(where, strings, lines, field, layout)
    return strings


def _timestamps(where: _Text | _Table, values: Any, lines: np.ndarray, layout: str
                ) -> np.ndarray:
    series = pd.Series(values)
    if pd.api.types.is_datetime64_any_dtype(series):  # Parquet timestamps: seconds since 1970
        missing = np.flatnonzero(series.isna().to_numpy())
        if missing.size:
            raise where.error(int(lines[missing[0]]), f"missing timestamp; expected {layout}")
        if series.dt.tz is not None:
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        return series.astype("datetime64[s]").astype(np.int64).to_numpy()
    order = _numbers(where, series.to_numpy(dtype=object), lines, "timestamp",
                     f"{layout}, with timestamps as numbers such as seconds since 1970")
    if order.dtype.kind == "f" and (order % 1 != 0).any():
        # build_dataset stores order as int64; ranks keep fractional times in order.
        log.info("%s: fractional timestamps are replaced by their rank", where.path)
        order = pd.Series(order).rank(method="dense").to_numpy(dtype=np.int64)
    return order


def read_interactions_table(path: Path, items_path: Path | None,
                            attribute_separator: str) -> RawData:
    """Any interaction log with a ``user,item[,timestamp][,rating]`` header, ids as strings.

    CSV (TSV for a .tsv file) or Parquet (.parquet, .pq). Without a timestamp the row order is
    taken as time order.
    """
    layout = "user,item[,timestamp][,rating]"
    path = _file(Path(path), "csv", f"a table with columns {layout}")
    where, columns, lines = _read_table(path, layout, ("user", "item"), ("timestamp", "rating"))
    interactions = pd.DataFrame({
        "user": _ids(where, columns["user"], lines, "user", layout),
        "item": _ids(where, columns["item"], lines, "item", layout),
    })
    if "timestamp" in columns:
        interactions["order"] = _timestamps(where, columns["timestamp"], lines, layout)
    else:
        interactions["order"] = np.arange(len(interactions), dtype=np.int64)
    if "rating" in columns:
        values = pd.Series(columns["rating"]).to_numpy(dtype=object)
        interactions["rating"] = _numbers(where, values, lines, "rating", layout)

    attributes = titles = None
    if items_path is not None:
        attributes, titles = _read_items(Path(items_path), attribute_separator)
        _coverage(Path(items_path), attributes, interactions["item"].unique(), "item metadata")
    return RawData(interactions, item_attributes=attributes, item_titles=titles)


def read_catalogue(path: Path) -> tuple[dict[str, list[str]], dict[str, str] | None]:
    """The item catalogue nodes share: ``item,attributes[,title]``, attributes separated by |."""
    return _read_items(path, "|")


def _read_items(path: Path, separator: str) -> tuple[dict[str, list[str]], dict[str, str] | None]:
    """Item metadata ``item,attributes[,title]``; an empty attributes cell means none."""
    layout = f"item,attributes[,title] (attributes separated by {separator!r})"
    path = _file(path, "csv item metadata", f"a table with columns {layout}")
    where, columns, lines = _read_table(path, layout, ("item", "attributes"), ("title",))
    ids = _ids(where, columns["item"], lines, "item", layout)
    _unique(where, ids, lines, "item")
    attributes = {}
    for item, cell in zip(ids, pd.Series(columns["attributes"]), strict=True):
        if isinstance(cell, (list, tuple, np.ndarray)):  # a Parquet list column
            values = [str(v).strip() for v in cell]
        elif pd.isna(cell):
            values = []
        else:
            values = str(cell).split(separator) if separator else [str(cell)]
        attributes[item] = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    titles = None
    if "title" in columns:
        names = pd.Series(columns["title"]).fillna("").astype(str)
        titles = dict(zip(ids.tolist(), names.tolist(), strict=True))
    return attributes, titles
