"""The centralized reference: the same model, data and loop, trained without federation.

    python -m fedrec.centralized dataset=movielens_100k dataset.path=/abs/ml-100k

Trains on all training data, evaluates on validation after every epoch, and reports test
metrics for the epoch with the best validation ``eval.select_by``. ``model=popularity`` reports
the popularity baseline in the same format. Federation-only keys are ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from typing import Any

import torch

from fedrec.cli import command_arguments
from fedrec.config import ConfigError, TwoTowerConfig, compose_config, to_typed
from fedrec.data.loaders import load_dataset
from fedrec.data.sequences import EvalCases, check_negatives, heldout_cases, training_examples
from fedrec.data.split import Split, split_dataset
from fedrec.metrics import evaluate_model, evaluate_popularity
from fedrec.model import TwoTower
from fedrec.outputs import RunOutputs
from fedrec.pretrain import PretrainResult, pretrain_on_catalogue
from fedrec.train import Objective, choose_weight_decay, make_loader, make_optimizer, train

log = logging.getLogger("fedrec.centralized")


def run(overrides: str | list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = compose_config(overrides)
    c = to_typed(cfg)
    if c.resume is not None:
        raise ConfigError(f"resume={c.resume}: the centralized reference keeps no checkpoint to "
                          "resume from (resume= takes a stopped federated run's output_dir); "
                          "run it again without resume")
    torch.manual_seed(c.seed)
    if c.train.num_threads:
        torch.set_num_threads(c.train.num_threads)

    dataset = load_dataset(c.dataset)
    split = split_dataset(dataset)
    check_negatives(c.eval.num_negatives, dataset.num_items, split, dataset.name)
    max_history = c.model.max_history if isinstance(c.model, TwoTowerConfig) else 1
    common = dict(num_items=dataset.num_items, max_history=max_history,
                  num_negatives=c.eval.num_negatives, seed=c.eval.seed)
    valid_cases = heldout_cases(split, "valid", **common)
    test_cases = heldout_cases(split, "test", **common)
    log.info("%d training interactions, %d validation and %d test users", len(split.train),
             len(valid_cases), len(test_cases))

    model: TwoTower | None = None
    pretrained: PretrainResult | None = None
    if isinstance(c.model, TwoTowerConfig):
        personal = (torch.arange(dataset.num_users).numpy() if c.model.personal_embedding
                    else None)
        model = TwoTower.for_dataset(c.model, dataset, personal_users=personal)
        pretrained = pretrain_on_catalogue(model, c.train.catalogue_pretraining,
                                           num_negatives=c.train.num_negatives, seed=c.seed)
    outputs = RunOutputs(c.output_dir, cfg)  # only once the data is known good: no empty run

    epochs, stopped_by = 0, None
    if model is not None:
        selected, metrics, epochs, stopped_by = _train_two_tower(
            c, model, split, valid_cases, test_cases, outputs)
    else:
        counts = torch.bincount(torch.tensor(split.train["item"].to_numpy()),
                                minlength=dataset.num_items)
        line: dict[str, Any] = {"round": 0, "train_loss": None}
        for part, cases in (("valid", valid_cases), ("test", test_cases)):
            if len(cases):
                line[part] = evaluate_popularity(counts, cases, list(c.eval.ks),
                                                 c.eval.batch_size).means()
        outputs.log_metrics({**line, "seconds": time.perf_counter() - started,
                             "bytes_up": 0, "bytes_down": 0})
        selected, metrics = 0, line.get("test", {})
    summary = {
        "mode": "centralized",
        "model": c.model.kind,
        "dataset": c.dataset.name,
        "num_users": dataset.num_users,
        "num_items": dataset.num_items,
        "num_clients": None,
        # As a federated summary: the epochs run, and the one whose model is reported (the
        # best by validation eval.select_by).
        "rounds": epochs,
        "rounds_requested": c.train.epochs if isinstance(c.model, TwoTowerConfig) else 0,
        # What ended training: train.epochs, or eval.patience (null for popularity).
        "stopped_by": stopped_by,
        "selected_round": selected,
        "select_by": c.eval.select_by,
        "metrics": metrics,
        "privacy": {"mechanism": "none", "epsilon": None, "delta": None, "secagg": False},
        "catalogue_pretraining": None if pretrained is None else dataclasses.asdict(pretrained),
        "communication": {"bytes_up": 0, "bytes_down": 0},
        "wall_seconds": time.perf_counter() - started,
    }
    outputs.write_summary(summary)
    outputs.save_model(model, dataset, cfg)
    print(f"{c.model.kind} on {c.dataset.name}: test "
          + " ".join(f"{p}.{k}={v:.4f}" for p, m in metrics.items() for k, v in m.items()))
    print(f"results: {outputs.path}")
    return summary


def _train_two_tower(c: Any, model: TwoTower, split: Split, valid_cases: EvalCases,
                     test_cases: EvalCases, outputs: RunOutputs,
                     ) -> tuple[int, dict[str, Any], int, str]:
    """Train ``model`` epoch by epoch, each evaluated on validation and test (one metrics line
    each), until train.epochs or, with eval.patience, until that many epochs in a row have not
    beaten the best validation ``eval.select_by``. Leaves ``model`` at the best epoch; returns
    that epoch's number and test metrics, the epochs run and why the run stopped."""
    examples = training_examples(split.train, model.num_items, c.model.max_history)
    objective = Objective.from_config(c.train, examples, model.num_items)
    loader = make_loader(examples, c.train.batch_size, c.seed)
    decay = choose_weight_decay(c.train, examples.user, federated=False)
    log.info(decay.why)
    optimizer = make_optimizer(model.parameters(), c.train.optimizer, lr=c.train.lr,
                               weight_decay=decay.weight_decay)
    protocol, metric = c.eval.select_by.split(".")
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, Any]] | None = None
    record: dict[str, Any] = {}
    stopped_by, epoch = "train.epochs", 0
    while epoch < c.train.epochs:
        epoch += 1
        began = time.perf_counter()
        result = train(model, optimizer, loader, objective, epochs=1,
                       seed=c.seed * 10007 + epoch)
        record = {"round": epoch, "train_loss": result.loss}
        if len(valid_cases):
            record["valid"] = evaluate_model(model, valid_cases, list(c.eval.ks),
                                             c.eval.batch_size).means()
        record["test"] = evaluate_model(model, test_cases, list(c.eval.ks),
                                        c.eval.batch_size).means()
        if len(valid_cases):
            score = record["valid"][protocol][metric]
            if best is None or score > best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()), record["test"])
        outputs.log_metrics({**record, "seconds": time.perf_counter() - began,
                             "bytes_up": 0, "bytes_down": 0})
        log.info("epoch %d/%d  loss %.4f  %s", epoch, c.train.epochs, result.loss,
                 _brief(record.get("valid", {})))
        if best is not None and c.eval.patience is not None and (
                epoch - best[1] >= c.eval.patience):
            stopped_by = "eval.patience"
            log.info("stopping after epoch %d: %d epochs without a better validation %s "
                     "(eval.patience=%d)", epoch, epoch - best[1], c.eval.select_by,
                     c.eval.patience)
            break
    if best is None:
        log.warning("%s has no validation interactions: reporting the last epoch",
                    c.dataset.name)
        return epoch, record["test"], epoch, stopped_by
    log.info("best validation %s %.4f at epoch %d", c.eval.select_by, best[0], best[1])
    model.load_state_dict(best[2])
    return best[1], best[3], epoch, stopped_by


def _brief(means: dict[str, Any]) -> str:
    return "  ".join(f"valid {p}.{k} {v:.4f}" for p in ("sampled", "full")
                     for k, v in means.get(p, {}).items())


def main(argv: list[str] | None = None) -> int:
    argv = command_arguments(argv, __doc__)
    if argv is None:
        return 0
    try:
        run(argv)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
