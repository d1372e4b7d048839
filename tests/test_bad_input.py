"""What a user sees on bad input: exit code 2 and one line naming the key or file, the value and
what is allowed, before anything runs or any folder is made. Every case runs through both ways
to train, the centralized reference and the federated launcher (which must refuse before it
starts Flower), and the report's and the shopping guide's command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrec.centralized import main as centralized_main
from fedrec.report import main as report_main
from fedrec.simulation import main as simulation_main

TINY = ["dataset.num_users=40", "dataset.num_items=60", "dataset.num_categories=3",
        "eval.num_negatives=5", "partition.num_silos=2"]

# (overrides, what the line must say). {tmp} is the test's folder.
BAD_RUNS = [
    (["train.lrr=0.1"], "bad configuration: train.lrr: Key 'lrr' not in 'TrainConfig'"),
    (["+train.lrr=0.1"],
     "train.lrr is not a key of train; allowed: auto_decay, batch_size, catalogue_pretraining, dp"),
    (["+colour=red"],
     "colour is not a key of the config; allowed: audit, auto_rounds, client_seed"),
    (["dataset=nope"], "Could not find 'dataset/nope'; available options in 'dataset': csv, "
                       "lightgcn, movielens_100k, movielens_1m, sequence, synthetic"),
    (["model=nope"], "available options in 'model': popularity, two_tower"),
    (["train.lr=abc"], "train.lr: Error merging override train.lr=abc; Value 'abc' of type "
                       "'str' could not be converted to Float"),
    (["partition.num_silos=1.5"], "partition.num_silos: Error merging override"),
    (["train.lr=-1"], "train.lr=-1.0 is not allowed: expected a number > 0"),
    (["train.loss=hinge"], "train.loss='hinge' is not allowed: expected one of "
                           "sampled_softmax, bpr"),
    (["eval.ks=[]"], "eval.ks=[] is not allowed: expected a non-empty list of integers >= 1"),
    (["eval.select_by=full.recall@50"], "eval.select_by"),
    (["partition.alpha=0"], "partition.alpha=0.0 is not allowed: expected a number > 0"),
    (["num_rounds=0"],
     "num_rounds=0 is not allowed: expected null (auto_rounds decides) or an integer >= 1"),
    (["train.epochs=0"], "train.epochs=0 is not allowed: expected an integer >= 1"),
    (["mode=both"], "mode"),
    (["privacy=dp_sgd", "privacy.target_epsilon=-1"], "privacy.target_epsilon"),
    (["privacy=dp_sgd", "privacy.negatives_per_shopper=0"],
     "privacy.negatives_per_shopper=0 is not allowed: expected an integer >= 1"),
    (["privacy=dp_sgd", "train.loss=bpr"],
     "train.loss='bpr' is not allowed: expected sampled_softmax with privacy=dp_sgd "
     "privacy.unit=shopper"),
    (["dataset.path=/x"], "dataset.path: Key 'path' not in 'SyntheticDatasetConfig'"),
    (["dataset=movielens_100k"], "dataset.path must be set: it has no default"),
    (["dataset=movielens_100k", "dataset.path={tmp}/missing"],
     "dataset.path='{tmp}/missing': {tmp}/missing does not exist"),
    (["dataset=csv", "dataset.path={tmp}/ratings.csv"], "{tmp}/ratings.csv"),
    (["eval.num_negatives=100"], "eval.num_negatives=100 is more than the"),
]
# What only the federated launcher refuses.
BAD_FEDERATED = [
    (["--supernodes", "many"], "--supernodes takes a number, got 'many'"),
    (["federation=deployment"], "federation=deployment"),
    (["model=popularity"], "model=popularity has no parameters to federate"),
    (["resume={tmp}/missing"], "resume={tmp}/missing: no such folder"),
    (["resume={tmp}"], "resume={tmp}: {tmp}/checkpoint.pt does not exist"),
]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _fill(values: list[str], tmp: Path) -> list[str]:
    return [value.replace("{tmp}", str(tmp)) for value in values]


def _args(overrides: list[str], tmp: Path) -> list[str]:
    """The tiny shop and the case; a case that picks a dataset drops the shop's own keys."""
    picks = any(o.startswith("dataset=") for o in overrides)
    return [*(t for t in TINY if not (picks and t.startswith("dataset."))),
            *_fill(overrides, tmp), f"output_dir={tmp / 'run'}"]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "ratings.csv").write_text("shopper;item\nann;1\n")  # not comma-separated
    return tmp_path


@pytest.mark.parametrize(("overrides", "says"), BAD_RUNS, ids=[" ".join(o) for o, _ in BAD_RUNS])
def test_centralized_refuses_with_one_line(overrides, says, tmp, capsys):
    out = tmp / "run"
    assert centralized_main(_args(overrides, tmp)) == 2
    assert _fill([says], tmp)[0] in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("overrides", "says"), BAD_RUNS + BAD_FEDERATED,
                         ids=[" ".join(o) for o, _ in BAD_RUNS + BAD_FEDERATED])
def test_the_federated_launcher_refuses_with_one_line_before_flower_starts(
        overrides, says, tmp, capsys, monkeypatch):
    def no_flower(*args, **kwargs):
        raise AssertionError("the launcher went on to start Flower")

    monkeypatch.setattr("fedrec.simulation.ensure_superlink", no_flower)
    out = tmp / "run"
    assert simulation_main(["run", *_args(overrides, tmp)]) == 2
    assert _fill([says], tmp)[0] in _one_error_line(capsys)
    assert not out.exists()


def test_centralized_refuses_resume_of_anything(tmp, capsys):
    assert centralized_main([*TINY, f"resume={tmp}", f"output_dir={tmp / 'run'}"]) == 2
    assert _one_error_line(capsys).startswith(f"error: resume={tmp}: the centralized reference "
                                              "keeps no checkpoint")


@pytest.mark.parametrize(("folders", "says"), [
    (["{tmp}/missing"], "{tmp}/missing"),
    (["{tmp}"], "{tmp}"),
])
def test_report_refuses_what_is_not_a_run_with_one_line(folders, says, tmp, capsys):
    assert report_main(_fill(folders, tmp)) == 2
    line = _one_error_line(capsys)
    assert _fill([says], tmp)[0] in line
