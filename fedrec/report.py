"""Collect runs into one results table and its plots.

    python -m fedrec.report SWEEP_DIR [MORE_DIRS ...] [--out DIR]

Every folder below the given ones that holds a summary.json is a run; one that holds a sweep
job's failed.json is a failed run. Runs that differ only in their seed form one row of
results.csv and results.md (mean and standard deviation over the seeds of HR@10, NDCG@10,
Recall@20, epsilon spent, wall time and bytes); failed runs are listed under the table. The PNGs
next to them: each metric per round for every federated run (metrics_per_round.png); the
privacy-utility curve, HR@10 and NDCG@10 against epsilon, one line per mechanism, with the
non-private and centralized means as horizontal lines (privacy_utility.png); and the bytes each
round moved (communication_per_round.png). `python -m fedrec.sweep` writes this report into
its sweep folder when its last job ends.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")  # files only: a sweep runs on machines without a display
import matplotlib.pyplot as plt
from matplotlib import ticker

# The columns a row is told apart by. Any other override whose value differs between runs adds
# its own column; the seed never does, and these overrides are what the key columns show.
KEY_COLUMNS = ("dataset", "mode", "strategy", "mechanism", "epsilon budget")
COVERED_OVERRIDES = frozenset({
    "seed", "output_dir", "hydra.sweep.dir", "mode", "dataset", "dataset.name", "strategy",
    "strategy.name", "privacy", "privacy.mechanism", "privacy.target_epsilon",
    "privacy.max_epsilon"})
METRICS = (("HR@10", "sampled", "hr@10"), ("NDCG@10", "sampled", "ndcg@10"),
           ("Recall@20", "full", "recall@20"))


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    key: dict[str, str]
    summary: dict[str, Any] | None = None
    error: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    row_label: str = ""  # how the plots name its row of the table (its seeds share it)

    @property
    def seed(self) -> str:
        return self.overrides.get("seed", "")

    def value(self, name: str) -> float | None:
        """One figure of the run's summary, by its column name."""
        if self.summary is None:
            return None
        for column, protocol, metric in METRICS:
            if column == name:  # a run may not have measured every metric (eval.ks)
                return self.summary["metrics"].get(protocol, {}).get(metric)
        if name == "epsilon spent":
            return self.summary["privacy"].get("epsilon")
        if name == "wall s":
            return self.summary["wall_seconds"]
        if name == "MB up":
            return self.summary["communication"]["bytes_up"] / 1e6
        if name == "MB down":
            return self.summary["communication"]["bytes_down"] / 1e6
        raise KeyError(name)


FIGURES = (*(m[0] for m in METRICS), "epsilon spent", "wall s", "MB up", "MB down")


class ReportError(ValueError):
    """The folders hold nothing to report, or a run's files cannot be read."""


# ------------------------------------------------------------------------------ collect
def collect_runs(folders: Iterable[Path]) -> list[Run]:
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder of runs")
        finished = {p.parent for p in folder.rglob("summary.json")}
        failed = {p.parent for p in folder.rglob("failed.json")} - finished
        runs += [_read_run(path, failed=path in failed) for path in sorted(finished | failed)]
    if not runs:
        below = ", ".join(map(str, folders))
        raise ReportError(f"no run (a folder with summary.json or failed.json) below {below}")
    return runs


def _read_run(path: Path, *, failed: bool) -> Run:
    overrides = _overrides(path)
    try:
        if failed:
            record = json.loads((path / "failed.json").read_text())
            # Hydra saved the job's composed config even when the job could not run it.
            config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
            key = _key_from_config({"dataset": config["dataset"]["name"],
                                    "mode": config["mode"]}, config)
            return Run(path, overrides, key, error=record["error"])
        summary = json.loads((path / "summary.json").read_text())
        config = yaml.safe_load((path / "config.yaml").read_text())
        rounds = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
                  if line.strip()]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        # One unreadable folder must not cost the report of the others: it is listed instead.
        return Run(path, overrides, dict.fromkeys(KEY_COLUMNS, "?"),
                   error=f"unreadable run: {type(err).__name__}: {err}")
    return Run(path, overrides, _key_from_config(summary, config), summary=summary,
               rounds=rounds)


def _overrides(path: Path) -> dict[str, str]:
    """A sweep job's overrides (Hydra records them in .hydra/overrides.yaml); {} otherwise."""
    recorded = path / ".hydra" / "overrides.yaml"
    if not recorded.exists():
        return {}
    overrides = {}
    for override in yaml.safe_load(recorded.read_text()) or []:
        name, _, value = str(override).partition("=")
        overrides[name.lstrip("+~")] = value
    return overrides


def _key_from_config(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    privacy = config.get("privacy", {})
    mechanism = privacy.get("mechanism", "none")
    budget = {"dp_sgd": privacy.get("target_epsilon"),
              "central_dp": privacy.get("max_epsilon")}.get(mechanism)
    centralized = summary["mode"] == "centralized"
    return {"dataset": summary["dataset"], "mode": summary["mode"],
            "strategy": "-" if centralized else config["strategy"]["name"],
            "mechanism": "none" if centralized else mechanism,
            "epsilon budget": "inf" if budget is None or centralized else f"{budget:g}"}


# -------------------------------------------------------------------------------- table
@dataclass
class Row:
    key: dict[str, str]
    runs: list[Run]

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.summary is not None]

    def stats(self, name: str) -> tuple[float, float | None] | None:
        """Mean and standard deviation over the row's finished runs (None for one run)."""
        values = [v for v in (r.value(name) for r in self.done) if v is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def group_rows(runs: list[Run]) -> tuple[list[str], list[Row]]:
    """Rows of runs that differ only in their seed; the key columns, extended by every other
    override that varies between the runs."""
    # Compared within a mode: a centralized run leaves the federation's keys (num_rounds,
    # partition, ...) unset, which does not make them vary between the federated runs.
    by_mode: dict[str, list[Run]] = {}
    for run in runs:
        by_mode.setdefault(run.key["mode"], []).append(run)
    varying = sorted(
        name for name in {k for r in runs for k in r.overrides}
        if name not in COVERED_OVERRIDES and any(
            len({r.overrides.get(name) for r in same}) > 1 for same in by_mode.values()))
    columns = [*KEY_COLUMNS, *varying]
    several_datasets = len({r.key["dataset"] for r in runs}) > 1
    rows: dict[tuple[str, ...], Row] = {}
    for run in runs:
        key = {**run.key, **{name: run.overrides.get(name, "-") for name in varying}}
        run.row_label = " ".join(
            [*([key["dataset"]] if several_datasets else []),
             "centralized" if key["mode"] == "centralized" else key["strategy"],
             key["mechanism"] if key["mechanism"] == "none" else
             f"{key['mechanism']} ε={key['epsilon budget']}",
             *(f"{name}={key[name]}" for name in varying)])
        rows.setdefault(tuple(key[c] for c in columns), Row(key, [])).runs.append(run)
    ordered = sorted(rows.values(), key=lambda row: tuple(
        _sortable(row.key[c]) for c in columns))
    return columns, ordered


def _sortable(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def write_report(folders: list[Path], out: Path) -> list[Path]:
    """results.csv, results.md and the plots of every run below ``folders``, into ``out``."""
    runs = collect_runs(folders)
    columns, rows = group_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_csv(out / "results.csv", columns, rows),
               _write_markdown(out / "results.md", columns, rows, runs)]
    written += [plot_per_round(runs, out / "metrics_per_round.png"),
                plot_privacy_utility(rows, out / "privacy_utility.png"),
                plot_communication(runs, out / "communication_per_round.png")]
    return [path for path in written if path is not None]


def _write_csv(path: Path, columns: list[str], rows: list[Row]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "runs", "failed",
                         *(f"{name} {part}" for name in FIGURES for part in ("mean", "std"))])
        for row in rows:
            figures = []
            for name in FIGURES:
                stats = row.stats(name)
                figures += ["", ""] if stats is None else [
                    f"{stats[0]:.6g}", "" if stats[1] is None else f"{stats[1]:.6g}"]
            writer.writerow([*(row.key[c] for c in columns), len(row.done),
                             len(row.runs) - len(row.done), *figures])
    return path


def _write_markdown(path: Path, columns: list[str], rows: list[Row], runs: list[Run]) -> Path:
    header = [*columns, "runs", *FIGURES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.key[c] for c in columns]
        failed = len(row.runs) - len(row.done)
        cells.append(f"{len(row.done)}" + (f" ({failed} failed)" if failed else ""))
        for name in FIGURES:
            stats = row.stats(name)
            cells.append("-" if stats is None else _mean_std(name, *stats))
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in runs if r.error is not None]
    if failures:
        lines += ["", f"Failed runs ({len(failures)}):", "",
                  "| run | overrides | error |", "|---|---|---|"]
        lines += [f"| {r.path} | {' '.join(f'{k}={v}' for k, v in r.overrides.items())} | "
                  f"{r.error.splitlines()[0][:300].replace('|', '/')} |" for r in failures]
    lines += ["", "Mean ± standard deviation over seeds (a row of one run: its value); "
              f"{len(runs)} runs from {len({r.path.parent for r in runs})} folder(s)."]
    path.write_text("\n".join(lines) + "\n")
    return path


def _mean_std(name: str, mean: float, std: float | None) -> str:
    digits = {"epsilon spent": 3, "wall s": 1, "MB up": 2, "MB down": 2}.get(name, 4)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


# ------------------------------------------------------------------------------ plots
PER_ROUND = (("sampled", "hr@10", "HR@10 (sampled)"), ("sampled", "ndcg@10", "NDCG@10 (sampled)"),
             ("full", "recall@20", "Recall@20 (full)"))


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _federated(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.summary is not None and r.summary["mode"] == "federated"]


def _draw_runs(ax: plt.Axes, runs: list[Run], points_of) -> None:
    """A line per run, one colour per row of the table (its seeds share it, named once)."""
    rows = sorted({r.row_label for r in runs})
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    named: set[str] = set()
    for run in runs:
        points = points_of(run)
        if points:
            label = None if run.row_label in named else run.row_label
            named.add(run.row_label)
            ax.plot(*zip(*points, strict=True), marker=".", alpha=0.8,
                    color=colours(rows.index(run.row_label) % colours.N), label=label)


def plot_per_round(runs: list[Run], path: Path) -> Path:
    """Each metric at every evaluated round, a line per federated run."""
    fig, axes = plt.subplots(1, len(PER_ROUND), figsize=(5 * len(PER_ROUND), 4), squeeze=False)
    for ax, (protocol, metric, title) in zip(axes[0], PER_ROUND, strict=True):
        _draw_runs(ax, _federated(runs), lambda run, protocol=protocol, metric=metric: [
            (r["round"], r["test"][protocol][metric]) for r in run.rounds
            if r.get("test", {}).get(protocol, {}).get(metric) is not None])
        ax.set(title=title, xlabel="round")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(fig, axes[0][-1])
    return save_figure(fig, path)


def plot_privacy_utility(rows: list[Row], path: Path) -> Path:
    """HR@10 and NDCG@10 against the epsilon spent, a line per mechanism and strategy, with
    the non-private federated runs (dashed, in their strategy's colour) and the centralized
    reference (dotted) as horizontal lines; one line of plots per dataset."""
    rows = [row for row in rows if row.key["dataset"] != "?"]  # unreadable runs: no curve
    datasets = sorted({row.key["dataset"] for row in rows}) or ["no runs"]
    strategies = sorted({row.key["strategy"] for row in rows})
    colour = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    markers = {"dp_sgd": "o", "central_dp": "s"}
    metrics = (("HR@10", "HR@10 (sampled)"), ("NDCG@10", "NDCG@10 (sampled)"))
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(11, 4 * len(datasets)),
                             squeeze=False)
    for line_axes, dataset in zip(axes, datasets, strict=True):
        here = [row for row in rows if row.key["dataset"] == dataset and row.done]
        for ax, (name, title) in zip(line_axes, metrics, strict=True):
            curves: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
            for row in here:
                stats, spent = row.stats(name), row.stats("epsilon spent")
                if stats is None:
                    continue
                strategy, mechanism = row.key["strategy"], row.key["mechanism"]
                # Other swept keys (lr, ...) make curves of their own.
                extra = " ".join(f"{c}={v}" for c, v in row.key.items()
                                 if c not in KEY_COLUMNS and v != "-")
                if row.key["mode"] == "centralized":
                    ax.axhline(stats[0], linestyle=":", color="grey",
                               label=f"centralized {extra}".strip())
                elif mechanism == "none":
                    ax.axhline(stats[0], linestyle="--", color=colour[strategy],
                               label=f"{strategy} non-private {extra}".strip())
                elif spent is not None:  # the epsilon the run reached
                    # A row of one run has no spread: its error bar is empty.
                    curves.setdefault((strategy, mechanism, extra), []).append(
                        (spent[0], stats[0], stats[1] or 0.0))
            for (strategy, mechanism, extra), points in sorted(curves.items()):
                xs, means, stds = zip(*sorted(points), strict=True)
                ax.errorbar(xs, means, yerr=stds, marker=markers.get(mechanism, "^"),
                            color=colour[strategy], capsize=3,
                            linestyle="-" if mechanism == "dp_sgd" else "-.",
                            label=f"{strategy} {mechanism} {extra}".strip())
            if curves:
                ax.set_xscale("log")
                budgets = {row.key["epsilon budget"] for row in here
                           if row.key["mechanism"] not in ("none", "-")}
                ax.set_xticks(sorted(float(b) for b in budgets if b not in ("inf", "?")))
                ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            else:
                ax.text(0.5, 0.5, "no private runs", transform=ax.transAxes, ha="center")
            ax.set(title=f"{dataset}: {title}", xlabel="epsilon spent (log scale)")
            ax.grid(alpha=0.3)
        _legend(fig, line_axes[-1])
    return save_figure(fig, path)


def plot_communication(runs: list[Run], path: Path) -> Path:
    """Megabytes sent to and received from the clients at every round, a line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], (("bytes_down", "MB sent to clients"),
                                          ("bytes_up", "MB received from clients")),
                                strict=True):
        _draw_runs(ax, _federated(runs), lambda run, key=key: [
            (r["round"], r[key] / 1e6) for r in run.rounds
            if r.get(key) is not None and r["round"] > 0])
        ax.set(title=title + " per round", xlabel="round", ylabel="MB")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(fig, axes[0][-1])
    return save_figure(fig, path)


def _legend(fig: plt.Figure, ax: plt.Axes) -> None:
    handles, labels = [], []
    for axis in fig.axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        columns = max(1, math.ceil(len(labels) / 20))
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1),
                  ncol=columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep or run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: the first folder)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folders, args.out or args.folders[0])
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
