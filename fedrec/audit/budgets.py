r"""python -m fedrec.audit.budgets <overrides>: the audit of one mechanism at every budget.

    python -m fedrec.audit.budgets dataset=movielens_100k dataset.path=/abs/ml-100k \
        partition=silo num_rounds=15 privacy=dp_sgd output_dir=/abs/audits/dp_sgd

Runs ``python -m fedrec.audit`` once at each epsilon of ``audit.epsilons`` (the overrides' own
mechanism, its budget key set: privacy.target_epsilon for dp_sgd, privacy.max_epsilon for
central_dp) and once with privacy=none, each into output_dir/epsilon-<e> (epsilon-inf without
privacy). Then writes budgets.json, budgets.md (one line per budget) and budgets.png (attack
AUCs and the empirical epsilon against the accountant's) into output_dir.

An audit that already wrote its audit.json is read, not run again, so the same command with the
same output_dir goes on where it stopped (the default output_dir is a new folder each time); one
written by other overrides is refused, and the folder of one that stopped part-way is moved
aside (<name>.incomplete-<time>) and the audit run again. An audit that fails is reported and
the others still run; the command then exits 1.
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
from fedrec.config import BUDGET_KEYS, ConfigError, compose_config, override_key
from fedrec.outputs import set_aside

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
    if any(override_key(o) == key for o in overrides):
        raise ConfigError(f"{key} is set by audit.epsilons={list(cfg.audit.epsilons)}: leave it "
                          "out of the overrides")
    out = Path(cfg.output_dir).expanduser().resolve()
    kept = [o for o in overrides if not override_key(o).startswith("output_dir")]
    runs = [(f"epsilon-{eps:g}", [*kept, f"{key}={eps}", f"output_dir={out / f'epsilon-{eps:g}'}"])
            for eps in cfg.audit.epsilons]
    # Without privacy: no privacy key of the mechanism's applies.
    plain = [o for o in kept if not override_key(o).startswith("privacy")]
    runs.append(("epsilon-inf", [*plain, "privacy=none", f"output_dir={out / 'epsilon-inf'}"]))
    return out, runs


def audit_budgets(overrides: list[str]) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """The output folder, every budget's audit report (read back when it exists), and the
    budgets that failed."""
    out, runs = budget_runs(overrides)
    reports, failed = [], []
    for k, (name, run) in enumerate(runs, 1):
        folder = out / name
        written = folder / "audit.json"
        if written.exists():
            report = json.loads(written.read_text())
            if report["overrides"] != run:
                failed.append(f"{name}: {written} was written by other overrides "
                              f"({' '.join(report['overrides'])}): remove {folder} or choose "
                              "another output_dir")
                log.error("%s", failed[-1])
                continue
            log.info("[%d/%d] %s: audited before, reading %s", k, len(runs), name, written)
            reports.append(report)
            continue
        if folder.exists():  # an audit that stopped part-way: kept aside, not overwritten
            aside = set_aside(folder)
            log.warning("%s holds an audit that did not finish: moved to %s, auditing again",
                        folder, aside)
        log.info("[%d/%d] %s: auditing into %s", k, len(runs), name, folder)
        try:
            reports.append(audit(run))
        except Exception as err:  # the other budgets still run; the command exits 1
            log.exception("%s failed", name)
            failed.append(f"{name}: {err}")
    if reports:
        (out / "budgets.json").write_text(json.dumps(
            [{key: r[key] for key in ("run", "privacy", "update_inference", "membership",
                                      "canaries", "audit_seconds")} for r in reports],
            indent=2) + "\n")
        (out / "budgets.md").write_text(budgets_table(reports))
        plot_budgets(reports, out / "budgets.png")
        if _powerless(reports):
            log.warning("the canaries prove no epsilon above 0 without privacy: the private "
                        "runs' empirical epsilons are no evidence (budgets.md says so)")
    return out, reports, failed


def budgets_table(reports: list[dict[str, Any]]) -> str:
    """One line per budget: the accountant's epsilon, the empirical one, and each attack's
    AUC (update inference: moved / calibrated, where the view has a calibration, and the
    same for shoppers outside the view)."""
    views = list(dict.fromkeys(row["view"] for r in reports for row in r["update_inference"]))
    powerless = _powerless(reports)
    lines = ["| epsilon spent (accountant) | empirical epsilon | "
             + " | ".join(f"update inference: {v}" for v in views)
             + " | membership (loss) | membership (calibrated) | canary AUC | audit s |",
             "|---" * (len(views) + 6) + "|"]
    for r in sorted(reports, key=_epsilon_order):
        eps = r["privacy"].get("epsilon")
        inference = {row["view"]: _inference_cell(row) for row in r["update_inference"]}
        lines.append(
            f"| {'none' if eps is None else f'{eps:.3f}'} | "
            f"{r['canaries']['epsilon_lower_bound']:.3f}"
            f"{' (no power)' if powerless and eps is not None else ''} | "
            + " | ".join(inference.get(v, "-") for v in views)
            + f" | {r['membership']['loss']['auc']:.3f} | "
            f"{r['membership']['calibrated']['auc']:.3f} | {r['canaries']['auc']:.3f} | "
            f"{r['audit_seconds']:.0f} |")
    if powerless:
        lines += ["", "No power: the canaries prove no epsilon above 0 even without privacy, so "
                  "an empirical epsilon of 0 under privacy says nothing about the guarantee."]
    return "\n".join(lines) + "\n"


def _epsilon_order(report: dict[str, Any]) -> float:
    eps = report["privacy"].get("epsilon")
    return float("inf") if eps is None else eps


def _inference_cell(row: dict[str, Any]) -> str:
    """AUC for the targets, and for shoppers outside the view (a score that finds popular
    items finds them for everyone): moved / calibrated."""
    scores = [row[name] for name in ("moved", "calibrated") if row[name] is not None]
    if scores[0]["auc_outside"] is None:  # the view holds every shopper
        return " / ".join(f"{m['auc']:.3f}" for m in scores)
    return (" / ".join(f"{m['auc']:.3f}" for m in scores) + " (outside "
            + " / ".join(f"{m['auc_outside']:.3f}" for m in scores) + ")")


def _powerless(reports: list[dict[str, Any]]) -> bool:
    """Whether the canaries of the run without privacy prove nothing: then the private runs'
    lower bounds of 0 are no evidence (the issue's rule: strengthen the attack before
    trusting the private rows)."""
    plain = [r for r in reports if r["privacy"].get("epsilon") is None]
    return bool(plain) and plain[0]["canaries"]["epsilon_lower_bound"] <= 0


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
