r"""python -m fedrec.audit.budgets <overrides>: the audit of one mechanism at every budget.

    python -m fedrec.audit.budgets dataset=movielens_100k dataset.path=/abs/ml-100k \
        partition=silo num_rounds=15 privacy=dp_sgd output_dir=/abs/audits/dp_sgd

Runs ``python -m fedrec.audit`` once at each epsilon of ``audit.epsilons`` (the overrides' own
mechanism, its budget key set: privacy.target_epsilon for dp_sgd, privacy.max_epsilon for
central_dp) and once with privacy=none, each into output_dir/epsilon-<e> (epsilon-inf without
privacy). Then writes budgets.json, budgets.md (one line per budget) and budgets.png (attack
AUCs and the empirical epsilon against the accountant's) into output_dir.

An audit that already wrote its audit.json is read, not run again, so the same command with the
same output_dir goes on where it stopped (the default output_dir is a new folder each time). An
audit that fails is reported and the others still run; the command then exits 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from fedrec.audit.__main__ import audit
from fedrec.audit.plots import plot_budgets
from fedrec.cli import command_arguments
from fedrec.config import BUDGET_KEYS, ConfigError, compose_config
from fedrec.simulation import SimulationError

log = logging.getLogger("fedrec.audit.budgets")


def budget_runs(overrides: list[str]) -> tuple[Path, list[tuple[str, list[str]]]]:
    """The output folder and, for each budget, its name and the audit's overrides."""
    cfg = compose_config(overrides)
    mechanism = cfg.privacy.mechanism
    if mechanism not in BUDGET_KEYS:
        raise ConfigError(f"privacy={mechanism}: python -m fedrec.audit.budgets audits a "
                          f"private mechanism at each budget; give privacy= one of "
                          f"{', '.join(BUDGET_KEYS)}")
    key = BUDGET_KEYS[mechanism]
    if any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides):
        raise ConfigError(f"{key} is set by audit.epsilons={list(cfg.audit.epsilons)}: leave it "
                          "out of the overrides")
    out = Path(cfg.output_dir).expanduser().resolve()
    kept = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith("output_dir")]
    runs = [(f"epsilon-{eps:g}", [*kept, f"{key}={eps}", f"output_dir={out / f'epsilon-{eps:g}'}"])
            for eps in cfg.audit.epsilons]
    # Without privacy: no privacy key of the mechanism's applies.
    plain = [o for o in kept if not o.split("=", 1)[0].lstrip("+~").startswith("privacy")]
    runs.append(("epsilon-inf", [*plain, "privacy=none", f"output_dir={out / 'epsilon-inf'}"]))
    return out, runs


def audit_budgets(overrides: list[str]) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """The output folder, every budget's audit report (read back when it exists), and the
    budgets that failed."""
    out, runs = budget_runs(overrides)
    reports, failed = [], []
    for k, (name, run) in enumerate(runs, 1):
        written = out / name / "audit.json"
        if written.exists():
            log.info("[%d/%d] %s: audited before, reading %s", k, len(runs), name, written)
            reports.append(json.loads(written.read_text()))
            continue
        log.info("[%d/%d] %s: auditing into %s", k, len(runs), name, out / name)
        try:
            reports.append(audit(run))
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError,
                SimulationError) as err:
            log.error("%s failed: %s", name, err)
            failed.append(f"{name}: {err}")
    if reports:
        (out / "budgets.json").write_text(json.dumps(
            [{key: r[key] for key in ("run", "privacy", "update_inference", "membership",
                                      "canaries", "audit_seconds")} for r in reports],
            indent=2) + "\n")
        (out / "budgets.md").write_text(budgets_table(reports))
        plot_budgets(reports, out / "budgets.png")
    return out, reports, failed


def budgets_table(reports: list[dict[str, Any]]) -> str:
    """One line per budget: the accountant's epsilon, the empirical one, and each attack's
    AUC (update inference: moved / calibrated, where the view has a calibration)."""
    views = [row["view"] for row in reports[0]["update_inference"]]
    lines = ["| accountant epsilon | empirical epsilon | "
             + " | ".join(f"update inference: {v}" for v in views)
             + " | membership (loss) | membership (calibrated) | canary AUC | audit s |",
             "|---" * (len(views) + 6) + "|"]
    for r in sorted(reports, key=lambda r: r["privacy"].get("epsilon") or float("inf")):
        eps = r["privacy"].get("epsilon")
        inference = {row["view"]: f"{row['moved']['auc']:.3f}" + (
            "" if row["calibrated"] is None else f" / {row['calibrated']['auc']:.3f}")
            for row in r["update_inference"]}
        lines.append(
            f"| {'none' if eps is None else f'{eps:.3f}'} | "
            f"{r['canaries']['epsilon_lower_bound']:.3f} | "
            + " | ".join(inference.get(v, "-") for v in views)
            + f" | {r['membership']['loss']['auc']:.3f} | "
            f"{r['membership']['calibrated']['auc']:.3f} | {r['canaries']['auc']:.3f} | "
            f"{r['audit_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = command_arguments(argv, __doc__)
    if argv is None:
        return 0
    try:
        out, reports, failed = audit_budgets(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for failure in failed:
        print(f"error: {failure}", file=sys.stderr)
    if reports:
        print(f"fedrec: {len(reports)} audits in {out} (budgets.md, budgets.png)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
