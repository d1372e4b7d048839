"""The audit's figures: one audit's attacks (attacks.png), and attacks against epsilon across
budgets (budgets.png). Both are drawn from audit.json alone, so they can be redrawn later."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from fedrec.report import save_figure  # also selects matplotlib's file-only backend

# Where the run without privacy sits on an epsilon axis: one step past the largest budget.
NO_PRIVACY_STEP = 4.0


def plot_attacks(report: dict[str, Any], path: Path) -> Path:
    """Left: the ROC curves of membership inference and of the canaries, on log axes (what
    matters is the true-positive rate at a low false-positive rate). Right: each target's
    update-inference AUC in each of the server's views."""
    fig, (roc, views) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [(f"membership ({name})", report["membership"][name]["roc"])
              for name in ("loss", "calibrated")]
    curves.append(("canaries", report["canaries"]["roc"]))
    for name, (fpr, tpr) in curves:
        roc.plot(fpr, tpr, label=name)
    floor = 1e-3
    roc.plot([floor, 1], [floor, 1], linestyle=":", color="grey", label="chance")
    roc.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05),
            xlabel="false-positive rate", ylabel="true-positive rate",
            title="attacks on the trained guide")
    roc.grid(alpha=0.3)
    roc.legend(fontsize=8)
    rows = report["update_inference"]
    for k, row in enumerate(rows):
        aucs = row["target_aucs"]
        spread = [k + 0.25 * (j / max(len(aucs) - 1, 1) - 0.5) for j in range(len(aucs))]
        views.scatter(spread, aucs, s=12, alpha=0.7)
        views.hlines(row["moved"]["auc"], k - 0.3, k + 0.3, color="black")
    views.axhline(0.5, linestyle=":", color="grey")
    views.set_xticks(range(len(rows)), [row["view"] for row in rows], rotation=15, fontsize=8,
                     ha="right")
    views.set(ylim=(0, 1.02), ylabel="AUC per target as scored (bar: the cross-fitted mean)",
              title="update inference: the server's views")
    views.grid(alpha=0.3, axis="y")
    privacy = report["privacy"]
    eps = privacy.get("epsilon")
    fig.suptitle(f"privacy={privacy['mechanism']}, epsilon "
                 f"{'inf' if eps is None else f'{eps:.2f}'}", fontsize=10)
    return save_figure(fig, path)


def plot_budgets(reports: list[dict[str, Any]], path: Path) -> Path:
    """Attack AUCs and the empirical epsilon against the accountant's epsilon, the run without
    privacy at the right, past a break in the axis."""
    private = [r["privacy"]["epsilon"] for r in reports
               if r["privacy"].get("epsilon") is not None]
    last = max(private, default=1.0)
    inf_at = last * NO_PRIVACY_STEP

    def x_of(report: dict[str, Any]) -> float:
        eps = report["privacy"].get("epsilon")
        return inf_at if eps is None else eps

    ordered = sorted(reports, key=x_of)
    xs = [x_of(r) for r in ordered]
    fig, (attacks, empirical) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, list[tuple[float, float]]] = {}
    for r, x in zip(ordered, xs, strict=True):  # a view only some runs have (the noised
        for row in r["update_inference"]:       # release) is drawn where it is
            lines.setdefault(f"update inference: {row['view']}", []).append(
                (x, row["moved"]["auc"]))
        for name in ("loss", "calibrated"):
            lines.setdefault(f"membership ({name})", []).append(
                (x, r["membership"][name]["auc"]))
        lines.setdefault("canaries", []).append((x, r["canaries"]["auc"]))
    for name, points in lines.items():
        attacks.plot(*zip(*points, strict=True), marker="o", label=name)
    attacks.axhline(0.5, linestyle=":", color="grey")
    attacks.set(ylabel="attack AUC", title="attacks against the budget")
    empirical.plot(xs, [r["canaries"]["epsilon_lower_bound"] for r in ordered], marker="o",
                   label=f"empirical epsilon (lower bound, "
                         f"{ordered[0]['canaries']['confidence']:.0%})")
    line = [e for e in xs if e < inf_at]
    empirical.plot(line, line, linestyle="--", color="grey", label="accountant's epsilon")
    empirical.set(ylabel="epsilon", title="the one-run audit against the accountant")
    for ax in (attacks, empirical):
        ax.set_xscale("log")
        ticks = [e for e in xs if e < inf_at]
        labels = [f"{e:.3g}" for e in ticks]
        if inf_at in xs:  # the run without privacy (absent when it failed)
            ticks, labels = [*ticks, inf_at], [*labels, "no privacy"]
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        if private:
            ax.axvline(math.sqrt(last * inf_at), color="grey", linewidth=0.5)
        ax.set_xlabel("the accountant's epsilon (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
