"""The report's figures (fedrec.report), drawn with matplotlib into PNG files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: a sweep runs on machines without a display
import matplotlib.pyplot as plt
from matplotlib import ticker

from fedrec.report import KEY_COLUMNS

if TYPE_CHECKING:
    from fedrec.report import Row, Run

PER_ROUND = (("sampled", "hr@10", "HR@10 (sampled)"), ("sampled", "ndcg@10", "NDCG@10 (sampled)"),
             ("full", "recall@20", "Recall@20 (full)"))


def _save(fig: plt.Figure, path: Path) -> Path:
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
            (r["round"], r[protocol][metric]) for r in run.rounds
            if protocol in r and r[protocol].get(metric) is not None])
        ax.set(title=title, xlabel="round")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0][-1])
    return _save(fig, path)


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
                    curves.setdefault((strategy, mechanism, extra), []).append((spent[0], *stats))
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
    return _save(fig, path)


def plot_communication(runs: list[Run], path: Path) -> Path:
    """Megabytes sent to and received from the clients at every round, a line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (field, title) in zip(axes[0], (("bytes_down", "MB sent to clients"),
                                            ("bytes_up", "MB received from clients")),
                                  strict=True):
        _draw_runs(ax, _federated(runs), lambda run, field=field: [
            (r["round"], r[field] / 1e6) for r in run.rounds
            if r.get(field) is not None and r["round"] > 0])
        ax.set(title=title + " per round", xlabel="round", ylabel="MB")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0][-1])
    return _save(fig, path)


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
