"""Hydra sweeps (fedrec.sweep) through the real Flower runtime, and their report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from PIL import Image

from fedrec.report import collect_runs, group_rows, write_report

PLOTS = ("metrics_per_round.png", "privacy_utility.png", "communication_per_round.png")


def _sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedrec.sweep", "-m", *TINY.split(), "num_rounds=2",
         f"hydra.sweep.dir={sweep_dir}", *overrides],
        capture_output=True, text=True, env=env, timeout=1800)


def _assert_images(folder: Path) -> None:
    for name in PLOTS:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.slow  # starts the Flower runtime
def test_two_by_two_sweep_writes_four_runs_a_table_and_plots(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = _sweep(sweep_dir, "strategy=fedavg,fedprox", "privacy=none,central_dp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert {(s["strategy"], s["privacy"]["mechanism"]) for s in summaries} == {
        ("fedavg", "none"), ("fedavg", "central_dp"), ("fedprox", "none"),
        ("fedprox", "central_dp")}
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(row["runs"] == "1" and row["failed"] == "0" for row in rows)
    private = [row for row in rows if row["mechanism"] == "central_dp"]
    assert all(0 < float(row["epsilon spent mean"]) <= 8 for row in private)
    assert len((sweep_dir / "results.md").read_text().splitlines()) >= 6
    _assert_images(sweep_dir)


def test_a_bad_value_in_any_job_stops_the_sweep_before_the_first_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = _sweep(sweep_dir, "mode=centralized", "train.lr=0.01,-1")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: job 1 (") and "train.lr=-1 " in line
    assert line.endswith("): train.lr=-1.0 is not allowed: expected a number > 0")
    assert not sweep_dir.exists()


@pytest.mark.slow  # trains
def test_a_failed_job_is_listed_the_others_reported_and_the_sweep_exits_1(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # More negatives than a shopper has unseen items: a data error, found when the job runs.
    done = _sweep(sweep_dir, "mode=centralized", "train.epochs=2", "eval.num_negatives=10,100")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: 1 job(s) of the sweep failed; why: {sweep_dir / '1' / 'failed.json'}")
    failed = json.loads((sweep_dir / "1" / "failed.json").read_text())
    assert "eval.num_negatives=100" in failed["overrides"]
    assert "set eval.num_negatives <=" in failed["error"]
    assert (sweep_dir / "0" / "summary.json").exists()
    with open(sweep_dir / "results.csv") as f:
        rows = {row["eval.num_negatives"]: row for row in csv.DictReader(f)}
    assert rows["10"]["runs"] == "1" and float(rows["10"]["HR@10 mean"]) > 0
    assert rows["100"]["runs"] == "0" and rows["100"]["failed"] == "1"
    report = (sweep_dir / "results.md").read_text()
    assert "Failed runs (1)" in report and "eval.num_negatives=100" in report
    _assert_images(sweep_dir)


def _fake_run(folder: Path, seed: int, hr: float, epsilon: float | None) -> None:
    """A run folder as a sweep job leaves it (what the report reads of it)."""
    (folder / ".hydra").mkdir(parents=True)
    mechanism = "none" if epsilon is None else "dp_sgd"
    (folder / ".hydra" / "overrides.yaml").write_text(
        f"- seed={seed}\n- privacy={'none' if epsilon is None else 'dp_sgd'}\n")
    privacy = {"mechanism": mechanism} | ({} if epsilon is None else {"target_epsilon": 8.0})
    (folder / "config.yaml").write_text(json.dumps({"strategy": {"name": "fedavg"},
                                                    "privacy": privacy}))
    metrics = {"sampled": {"hr@10": hr, "ndcg@10": hr / 2},
               "full": {"recall@10": hr / 3, "recall@20": hr / 4}}
    (folder / "summary.json").write_text(json.dumps({
        "mode": "federated", "dataset": "shop", "metrics": metrics, "wall_seconds": 10.0 + seed,
        "privacy": {"mechanism": mechanism, "epsilon": epsilon},
        "communication": {"bytes_up": 2e6, "bytes_down": 4e6}}))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "test": metrics,
                                                      "bytes_up": 2e6, "bytes_down": 4e6}) + "\n")


def test_report_groups_seeds_into_mean_and_std(tmp_path):
    for job, (seed, hr, eps) in enumerate([(0, 0.5, None), (1, 0.7, None), (0, 0.2, 7.9),
                                           (1, 0.4, 8.0)]):
        _fake_run(tmp_path / str(job), seed, hr, eps)
    columns, rows = group_rows(collect_runs([tmp_path]))
    assert columns == ["dataset", "mode", "strategy", "mechanism", "epsilon budget"]
    by_mechanism = {row.key["mechanism"]: row for row in rows}
    assert by_mechanism["none"].stats("HR@10") == pytest.approx((0.6, 0.1414213), abs=1e-6)
    assert by_mechanism["dp_sgd"].stats("epsilon spent") == pytest.approx((7.95, 0.0707107))
    assert by_mechanism["dp_sgd"].key["epsilon budget"] == "8"
    written = write_report([tmp_path], tmp_path / "report")
    assert {p.name for p in written} == {"results.csv", "results.md", *PLOTS}
    _assert_images(tmp_path / "report")


def test_report_without_runs_names_the_folder(tmp_path):
    from fedrec.report import ReportError

    with pytest.raises(ReportError, match=str(tmp_path)):
        collect_runs([tmp_path])


def test_report_gives_every_other_swept_key_a_column(tmp_path):
    """model.embedding_dim is not the mode, and a run without Recall@20 is still reported."""
    for job, (dim, seed) in enumerate([(16, 0), (16, 1), (32, 0)]):
        folder = tmp_path / str(job)
        _fake_run(folder, seed, 0.5 + dim / 100, None)
        (folder / ".hydra" / "overrides.yaml").write_text(
            f"- seed={seed}\n- model.embedding_dim={dim}\n")
    summary = json.loads((tmp_path / "2" / "summary.json").read_text())
    del summary["metrics"]["full"]["recall@20"]
    (tmp_path / "2" / "summary.json").write_text(json.dumps(summary))
    columns, rows = group_rows(collect_runs([tmp_path]))
    assert columns[-1] == "model.embedding_dim"
    assert [(row.key["model.embedding_dim"], len(row.done)) for row in rows] == [("16", 2),
                                                                                  ("32", 1)]
    assert rows[1].stats("Recall@20") is None and rows[1].stats("HR@10")[0] == pytest.approx(0.82)
    write_report([tmp_path], tmp_path / "report")
    table = (tmp_path / "report" / "results.md").read_text().splitlines()
    one_run = next(line for line in table if "| 32 |" in line)
    assert "| 0.8200 |" in one_run and "±" not in one_run  # a row of one run: its value
    two_runs = next(line for line in table if "| 16 |" in line)
    assert "0.6600 ± 0.0000" in two_runs


def test_report_of_single_private_runs_draws_every_plot(tmp_path):
    """A sweep with one seed: every row is one run, private ones included."""
    for job, (hr, eps) in enumerate([(0.5, None), (0.3, 7.9)]):
        _fake_run(tmp_path / str(job), 0, hr, eps)
    written = write_report([tmp_path], tmp_path / "report")
    assert {p.name for p in written} == {"results.csv", "results.md", *PLOTS}
    _assert_images(tmp_path / "report")

