"""The shopping guide: a shopper's top-K items from a trained model.pt, computed where the
shopper's history is.

    python -m fedrec.recommend MODEL --history ID [ID ...] [--k 10] [--json]
    python -m fedrec.recommend MODEL --user ID [--k 10]
    python -m fedrec.recommend MODEL --batch HISTORIES.csv --out RECS.csv|RECS.json
    ... [--new-items ITEMS.csv]

--history ranks for one history of original item ids, oldest first. --user (demo) takes a
shopper's whole history from the dataset the model was trained on, read as model.pt's config
says. --batch reads a CSV of ``shopper,item`` rows (a shopper's rows in time order) and writes
one line per recommendation (CSV) or one object per shopper (JSON). --new-items adds catalogue
items known only by their attributes (CSV ``item,attributes[,title]``, attributes separated by
``|``, as a dataset catalogue): the item tower gives them a vector from their attributes alone,
and they are ranked with the rest.

Only model.pt is needed: the user tower turns the history into a vector here, and one matrix
product against the item vectors stored in model.pt ranks the whole catalogue exactly; items
already in the history are never recommended. The history never leaves the machine that runs
this.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedrec.config import ConfigError, TwoTowerConfig, config_from_spec, dataset_from_spec
from fedrec.model import TwoTower

# What serving reads from model.pt (fedrec.outputs.RunOutputs.save_model writes it).
REQUIRED = ("model_spec", "data_spec", "item_ids", "attribute_names", "item_attributes",
            "item_titles", "shared_state", "item_vectors")


class RecommendError(ValueError):
    """A model file, history or item that the guide cannot serve."""


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float  # cosine similarity of the shopper's and the item's vectors
    title: str | None
    attributes: list[str]


class Recommender:
    """A trained two-tower model's serving side: histories in, top-K items out."""

    def __init__(self, model: TwoTower, item_ids: Sequence[str], attribute_names: Sequence[str],
                 titles: Sequence[str | None] | None, item_vectors: torch.Tensor,
                 data_spec: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.data_spec = data_spec  # the dataset it was trained on, when loaded from model.pt
        self.item_ids = [str(i) for i in item_ids]
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.attribute_names = [str(a) for a in attribute_names]
        self.attribute_index = {name: i for i, name in enumerate(self.attribute_names)}
        self.titles = list(titles) if titles is not None else [None] * len(self.item_ids)
        self.item_attributes = [self._attributes(row) for row in
                                model.item_attributes[: model.num_items].tolist()]
        self.item_vectors = item_vectors.float().contiguous()
        self.num_catalogue_items = model.num_items  # items with an id vector (history items)

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        path = Path(path)
        payload = _read_model_file(path)
        spec = payload["model_spec"]
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind != "two_tower":
            raise RecommendError(f"{path} holds a model={kind!r}, which has no towers to serve "
                                 "from: train model=two_tower")
        if spec.get("use_user_features"):
            raise RecommendError(f"{path} was trained with model.use_user_features=true; the "
                                 "guide serves from a history alone: train without them")
        try:
            # Personal vectors never leave their client, so serving uses the shared tower.
            # model.pt files written before model.history_items existed read id rows; the
            # history id dropout acts in training only, so files from before it serve as 0;
            # files from before model.item_vectors read both.
            cfg = config_from_spec(TwoTowerConfig, {"history_items": "id",
                                                    "history_id_dropout": 0.0,
                                                    "item_vectors": "id_and_attributes", **spec,
                                                    "personal_embedding": False},
                                   f"{path}: model_spec")
        except ConfigError as err:
            raise RecommendError(str(err)) from err
        attributes = torch.as_tensor(payload["item_attributes"]).numpy()
        model = TwoTower(cfg, attributes, len(payload["attribute_names"]))
        try:
            model.load_shared_state(payload["shared_state"])
        except (ValueError, RuntimeError) as err:
            raise RecommendError(f"{path}: the shared parameters do not fit the model its "
                                 f"config describes: {err}") from err
        vectors = torch.as_tensor(payload["item_vectors"])
        if vectors.shape != (len(payload["item_ids"]), cfg.embedding_dim):
            raise RecommendError(f"{path}: item_vectors has shape {tuple(vectors.shape)}, "
                                 f"expected ({len(payload['item_ids'])}, {cfg.embedding_dim})")
        if not torch.isfinite(vectors).all():
            raise RecommendError(f"{path}: item_vectors holds NaN or infinite values: the run "
                                 "that wrote it diverged")
        return cls(model, payload["item_ids"], payload["attribute_names"],
                   payload["item_titles"], vectors, payload["data_spec"])

    # ------------------------------------------------------------------------ cold start
    def add_items(self, items: Sequence[tuple[str, Sequence[str], str | None]]) -> None:
        """Catalogue items known only by (id, attribute names, title): their vectors come from
        the attribute path of the item tower, with the zero id vector of the padding item."""
        if not items:
            return
        width = self.model.item_attributes.shape[1]
        rows, seen = [], set()
        for item, names, _ in items:
            if item in self.index or item in seen:
                raise RecommendError(f"new item {item!r} is already in the catalogue"
                                     + (" (listed twice)" if item in seen else ""))
            seen.add(item)
            unique = list(dict.fromkeys(names))
            # Index 0 is the padding attribute: it stands for no attribute at all.
            unknown = [n for n in unique if self.attribute_index.get(n, 0) == 0]
            if unknown:
                raise RecommendError(
                    f"new item {item!r}: attribute(s) {', '.join(map(repr, unknown))} unknown to "
                    f"the model ({len(self.attribute_names) - 1} attributes, e.g. "
                    f"{', '.join(map(repr, self.attribute_names[1:4]))})")
            if not unique:
                raise RecommendError(f"new item {item!r} has no attributes: a vector needs at "
                                     "least one")
            if len(unique) > width:
                raise RecommendError(f"new item {item!r} has {len(unique)} attributes; the "
                                     f"model's catalogue items have at most {width}")
            rows.append([self.attribute_index[n] for n in unique] + [0] * (width - len(unique)))
        with torch.no_grad():
            vectors = self.model.cold_item_vectors(torch.tensor(rows, dtype=torch.long))
        for item, names, title in items:
            self.index[item] = len(self.item_ids)
            self.item_ids.append(item)
            self.titles.append(title)
            self.item_attributes.append(list(dict.fromkeys(names)))
        self.item_vectors = torch.cat([self.item_vectors, vectors])

    # ---------------------------------------------------------------------------- serving
    def recommend(self, history: Sequence[str], k: int) -> list[Recommendation]:
        return self.recommend_many([history], k)[0]

    def recommend_many(self, histories: Sequence[Sequence[str]], k: int, *,
                       labels: Sequence[str] | None = None) -> list[list[Recommendation]]:
        """Top-``k`` for each history in one forward pass and one matrix product. ``labels``
        name the histories in errors (default: their position)."""
        if k < 1:
            raise RecommendError(f"k={k} is not allowed: expected an integer >= 1")
        if not histories:
            return []
        names = labels or [f"history {n + 1}" for n in range(len(histories))]
        indices = []
        for name, history in zip(names, histories, strict=True):
            try:
                items = self._history_indices(history)
            except RecommendError as err:
                raise RecommendError(f"{name}: {err}" if len(histories) > 1 else str(err)) \
                    from None
            left = len(self.item_ids) - len(set(items))
            if k > left:
                raise RecommendError(f"{name}: k={k} exceeds the {left} items left to "
                                     "recommend once its history is excluded")
            indices.append(items)
        length = self.model.max_history
        padded = torch.full((len(indices), length), self.model.num_items, dtype=torch.long)
        for row, items in enumerate(indices):
            # The most recent items, right-aligned as in training (oldest first).
            recent = items[-length:]
            padded[row, length - len(recent):] = torch.tensor(recent)
        with torch.no_grad():
            users = self.model.user_vectors(padded)
            scores = users @ self.item_vectors.T
        for row, items in enumerate(indices):
            scores[row, items] = -torch.inf  # never recommend what the shopper already has
        top = torch.topk(scores, k, dim=1)
        return [[self._recommendation(int(i), float(s)) for s, i in zip(values, ids,
                                                                         strict=True)]
                for values, ids in zip(top.values, top.indices, strict=True)]

    def describe(self, item: str) -> tuple[str | None, list[str]]:
        i = self.index[str(item)]
        return self.titles[i], self.item_attributes[i]

    def _recommendation(self, index: int, score: float) -> Recommendation:
        return Recommendation(self.item_ids[index], score, self.titles[index],
                              self.item_attributes[index])

    def _history_indices(self, history: Sequence[str]) -> list[int]:
        if not history:
            raise RecommendError("an empty history: a shopper needs at least one item")
        indices = []
        for item in history:
            index = self.index.get(str(item))
            if index is None:
                raise RecommendError(
                    f"item {item!r} is not in the model's catalogue of "
                    f"{len(self.item_ids)} items (ids such as "
                    f"{', '.join(map(repr, self.item_ids[:3]))})")
            if index >= self.num_catalogue_items:
                raise RecommendError(f"item {item!r} is a new item known only by its "
                                     "attributes: the user tower reads catalogue items")
            indices.append(index)
        return indices

    def _attributes(self, row: list[int]) -> list[str]:
        return [self.attribute_names[a] for a in row if a != 0]


def _read_model_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecommendError(f"model file {path} does not exist (a run writes model.pt into "
                             "its output_dir)")
    try:
        # Tensors and plain data only: a crafted pickle is refused, never run.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a truncated or foreign file
        raise RecommendError(f"model file {path} cannot be read ({type(err).__name__}: "
                             f"{err}); is it a fedrec model.pt?") from err
    if not isinstance(payload, dict):
        raise RecommendError(f"model file {path} holds a {type(payload).__name__}, not a "
                             "fedrec model.pt")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise RecommendError(f"model file {path} lacks {', '.join(missing)}: it is not a "
                             "trained two-tower model.pt (checkpoint.pt is not served)")
    return payload


# --------------------------------------------------------------------------------- inputs
def read_histories(path: Path) -> dict[str, list[str]]:
    """``shopper,item`` rows (a header line, then a shopper's rows in time order)."""
    histories: dict[str, list[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["shopper", "item"]:
                raise RecommendError(f"{path}: line 1 is {header!r}; expected the header "
                                     "shopper,item")
            for line, row in enumerate(rows, start=2):
                if len(row) < 2 or not row[0].strip() or not row[1].strip():
                    raise RecommendError(f"{path}, line {line}: {row!r}; expected shopper,item")
                histories.setdefault(row[0].strip(), []).append(row[1].strip())
    except OSError as err:
        raise RecommendError(f"cannot read histories from {path}: {err}") from err
    if not histories:
        raise RecommendError(f"{path} holds no shopper,item rows")
    return histories


def read_new_items(path: Path) -> list[tuple[str, list[str], str | None]]:
    """A catalogue CSV of new items: ``item,attributes[,title]``, attributes split by ``|``."""
    items = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = [h.strip() for h in next(rows, [])]
            if header[:2] != ["item", "attributes"]:
                raise RecommendError(f"{path}: line 1 is {header!r}; expected the header "
                                     "item,attributes[,title]")
            for line, row in enumerate(rows, start=2):
                if len(row) < 2 or not row[0].strip():
                    raise RecommendError(f"{path}, line {line}: {row!r}; expected "
                                         "item,attributes[,title]")
                names = [a.strip() for a in row[1].split("|") if a.strip()]
                title = row[2].strip() if len(row) > 2 and row[2].strip() else None
                items.append((row[0].strip(), names, title))
    except OSError as err:
        raise RecommendError(f"cannot read new items from {path}: {err}") from err
    return items


def dataset_history(guide: Recommender, user: str) -> list[str]:
    """The whole history (original item ids, oldest first) of ``user`` in the dataset the
    model was trained on, read again as the model's data spec says (plain keys, checked as a
    config is; nothing in it is composed or resolved)."""
    from fedrec.data.loaders import load_dataset

    try:
        dataset = load_dataset(dataset_from_spec(guide.data_spec, "the model's data_spec"))
    except (ConfigError, OSError, ValueError) as err:
        raise RecommendError(f"user={user!r} needs the dataset the model was trained on, which "
                             f"cannot be read again ({err}); pass --history instead") from err
    users = {str(u): i for i, u in enumerate(dataset.user_ids)}
    if user not in users:
        raise RecommendError(f"user={user!r} is not a shopper of {dataset.name} "
                             f"({dataset.num_users} shoppers, ids such as "
                             f"{', '.join(map(repr, list(users)[:3]))})")
    return dataset.history(users[user])


# -------------------------------------------------------------------------------- outputs
def format_recommendations(guide: Recommender, history: Sequence[str],
                           recommendations: list[Recommendation], *, shown: int = 5) -> str:
    """What a person reads: the recent history next to the top-K, with titles and
    attributes."""
    lines = [f"recent history ({min(shown, len(history))} of {len(history)} items, newest "
             "last):"]
    for item in history[-shown:]:
        lines.append(f"      {_item_line(item, *guide.describe(item))}")
    lines.append(f"top {len(recommendations)}:")
    for rank, r in enumerate(recommendations, start=1):
        lines.append(f"  {rank:>2}. {r.score:+.3f}  {_item_line(r.item, r.title, r.attributes)}")
    return "\n".join(lines)


def _item_line(item: str, title: str | None, attributes: list[str]) -> str:
    return f"{item:>8}  {title or '(no title)'}  [{', '.join(attributes)}]"


def write_batch(path: Path, results: dict[str, list[Recommendation]]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps([
            {"shopper": shopper, "recommendations": [
                {"rank": rank, "item": r.item, "score": r.score, "title": r.title,
                 "attributes": r.attributes} for rank, r in enumerate(recs, start=1)]}
            for shopper, recs in results.items()], indent=1) + "\n")
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["shopper", "rank", "item", "score", "title", "attributes"])
        for shopper, recs in results.items():
            for rank, r in enumerate(recs, start=1):
                writer.writerow([shopper, rank, r.item, f"{r.score:.6f}", r.title or "",
                                 "|".join(r.attributes)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedrec.recommend", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("model", type=Path, help="a trained model.pt")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", nargs="+", metavar="ID",
                        help="one shopper's item ids, oldest first")
    source.add_argument("--user", metavar="ID",
                        help="demo: this shopper's history in the model's own dataset")
    source.add_argument("--batch", type=Path, metavar="CSV",
                        help="histories to rank: shopper,item rows")
    parser.add_argument("--out", type=Path, help="with --batch: where to write (.csv or .json)")
    parser.add_argument("--new-items", type=Path, metavar="CSV",
                        help="cold-start items: item,attributes[,title]")
    parser.add_argument("--k", type=int, default=10, help="how many items (default: 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.batch is not None and (args.out is None or args.out.suffix not in (".csv", ".json")):
        parser.error("--batch needs --out ending in .csv or .json")
    if args.batch is None and args.out is not None:
        parser.error("--out writes a --batch's results; one shopper's go to the screen")
    if args.batch is not None and args.json:
        parser.error("--json prints one shopper's results; a --batch writes JSON with --out "
                     "RECS.json")
    try:
        guide = Recommender.load(args.model)
        if args.new_items is not None:
            guide.add_items(read_new_items(args.new_items))
        if args.batch is not None:
            histories = read_histories(args.batch)
            recommendations = guide.recommend_many(
                list(histories.values()), args.k,
                labels=[f"{args.batch}: shopper {s!r}" for s in histories])
            try:
                write_batch(args.out, dict(zip(histories, recommendations, strict=True)))
            except OSError as err:
                raise RecommendError(f"cannot write --out {args.out}: {err}") from err
            print(f"{len(histories)} shoppers, top {args.k} each: {args.out}")
            return 0
        history = args.history or dataset_history(guide, args.user)
        recommendations = guide.recommend(history, args.k)
    except RecommendError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([vars(r) for r in recommendations], indent=1))
    else:
        print(format_recommendations(guide, history, recommendations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
