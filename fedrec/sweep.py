"""Hydra sweeps: one federated simulation (or centralized reference) per job, then a report.

    python -m fedrec.sweep -m privacy=none,dp_sgd_eps4 strategy=fedavg,fedprox seed=0,1,2
    python -m fedrec.sweep -m mode=centralized dataset=movielens_100k dataset.path=... seed=0,1,2

A job runs exactly what `flwr run .` runs, through the real Flower runtime (a managed local
SuperLink, which the sweep stops at its end unless it was already running), or with
mode=centralized what `python -m fedrec.centralized` runs, into its own numbered folder of the
sweep directory (fedrec/conf/sweep.yaml). Every job's config is composed and checked before the
first one starts, so a misspelt key or a bad value fails at once, with one line (exit 2). A job
that fails at run time writes failed.json (its overrides and error) and the sweep goes on: a
sweep of hours is not lost to one bad job. The sweep ends with fedrec.report and exits 1 when a
job failed; each job returns its HR@10 (NaN when it failed) for a tuning sweeper.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedrec.config import ConfigError, compose_config, federated_config, register_schemas, to_typed
from fedrec.simulation import local_superlink, run_federated

log = logging.getLogger("fedrec.sweep")

FAILED = "failed.json"


@hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
def job(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    overrides = [*hydra_cfg.overrides.task, f"output_dir={run_dir}"]
    number = hydra_cfg.job.get("num", 0)
    (run_dir / FAILED).unlink(missing_ok=True)  # left by an earlier sweep into this folder
    started = time.perf_counter()
    try:
        summary = _run(cfg, overrides, run_dir)
        hr = summary["metrics"].get("sampled", {}).get("hr@10")
    except Exception as err:  # the sweep goes on; the failure is recorded
        error = f"{type(err).__name__}: {err}"
        (run_dir / FAILED).write_text(json.dumps({
            "overrides": list(hydra_cfg.overrides.task), "error": error,
            "traceback": traceback.format_exc()}, indent=2) + "\n")
        log.error("job %s failed after %.0f s: %s (recorded in %s)", number,
                  time.perf_counter() - started, error.splitlines()[0], run_dir / FAILED)
        return math.nan
    log.info("job %s done in %.0f s: HR@10 %s (%s)", number, time.perf_counter() - started,
             "not measured" if hr is None else f"{hr:.4f}", run_dir)
    return math.nan if hr is None else float(hr)


def _run(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    typed = to_typed(cfg)  # a bad value (negative lr, ...) fails here, as this job's failure
    if typed.mode == "centralized":
        from fedrec.centralized import run as run_centralized

        return run_centralized(overrides)
    from fedrec.data.federation import build_federation

    fed = build_federation(typed)
    log.info("federated: %d clients on %d SuperNodes, %d rounds (Flower log: %s)",
             fed.num_clients, fed.num_nodes, typed.num_rounds, run_dir / "flwr.log")
    # A job may take as long as its rounds may: round_timeout bounds each of them.
    return run_federated(overrides, num_supernodes=fed.num_nodes, output_dir=run_dir,
                         log_path=run_dir / "flwr.log",
                         timeout=typed.num_rounds * typed.round_timeout + 600)


class ReportAtEnd(Callback):
    """Write the sweep's report when its last job has run (fedrec/conf/sweep.yaml registers it)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(Path(config.hydra.run.dir))

    # Hydra turns a callback's exception into a warning; main() fails the sweep on this.
    failed: str | None = None

    failed_jobs: list[Path] = []  # noqa: RUF012  (filled once, read by main())

    @staticmethod
    def _report(sweep_dir: Path) -> None:
        from fedrec.report import write_report

        ReportAtEnd.failed_jobs = sorted(sweep_dir.glob(f"*/{FAILED}"))

        try:
            written = write_report([sweep_dir], sweep_dir)
        except Exception as err:
            ReportAtEnd.failed = f"{type(err).__name__}: {err}"
            log.error("the sweep's report failed: %s", ReportAtEnd.failed)
            raise
        log.info("report: %s", ", ".join(str(p) for p in written))


def check_jobs(argv: list[str]) -> set[str] | None:
    """Compose and validate every job's config before the first one starts, so that a bad
    value (a negative lr in one of twenty jobs) stops the sweep at once with one line, instead
    of failing its job hours in. The modes the jobs run in; None when Hydra's basic sweeper is not
    the one expanding them (another sweeper, or Hydra's own flags), and each job checks itself."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in argv) or any(
            arg.startswith("hydra/sweeper=") for arg in argv):
        return None
    overrides = [arg for arg in argv if not arg.startswith(("-", "hydra.", "hydra/"))]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except HydraException as err:
        raise ConfigError(f"bad sweep: {err}") from err
    modes = set()
    for number, overrides in enumerate(jobs):
        try:
            composed = compose_config(overrides)
            mode = to_typed(composed).mode
            if mode != "centralized":
                federated_config(composed)
            modes.add(mode)
        except ConfigError as err:
            raise ConfigError(f"job {number} ({' '.join(overrides)}): {err}") from err
    return modes


def main() -> None:
    register_schemas()
    try:
        modes = check_jobs(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # The federated jobs share the local SuperLink; one this sweep starts, it stops, and only
    # that one.
    flower = nullcontext() if modes == {"centralized"} else local_superlink()
    with flower:
        job()
    # Hydra builds the callback from "fedrec.sweep.ReportAtEnd": under `python -m fedrec.sweep`
    # that is another module than __main__, so its findings are read there.
    from fedrec.sweep import ReportAtEnd as report

    if report.failed is not None:
        sys.exit(f"error: the sweep's report failed: {report.failed}")
    if report.failed_jobs:
        sys.exit(f"error: {len(report.failed_jobs)} job(s) of the sweep failed; why: "
                 + ", ".join(str(path) for path in report.failed_jobs))


if __name__ == "__main__":
    sys.exit(main())
