"""A run's output folder: config.yaml, metrics.jsonl, summary.json and model.pt (DESIGN.md).

A run never writes into a folder that already holds another run's results, and every metrics
line is flushed as it is written, so a crash keeps what was measured up to it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedrec.data.dataset import Dataset
from fedrec.model import TwoTower

log = logging.getLogger(__name__)

RESULT_FILES = ("metrics.jsonl", "summary.json", "model.pt")


CHECKPOINT = "checkpoint.pt"


class RunOutputs:
    def __init__(self, output_dir: str | Path, cfg: DictConfig) -> None:
        self.started_at = _now()
        self.path = Path(output_dir).expanduser().resolve()
        taken = [name for name in RESULT_FILES if (self.path / name).exists()]
        if taken:
            raise FileExistsError(f"output_dir={self.path} already holds a run ({', '.join(taken)})"
                                  ": choose another output_dir")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        log.info("writing results to %s", self.path)

    @classmethod
    def resume(cls, run_dir: str | Path, cfg: DictConfig) -> tuple[RunOutputs, dict[str, Any]]:
        """A stopped run's folder and its last checkpoint. Metric lines written after that
        checkpoint (a round that ended as the run was stopped) are dropped: the resumed run
        writes them again, so every round appears once."""
        outputs = cls.__new__(cls)
        outputs.started_at = _now()
        outputs.path = resumable(run_dir)
        _check_same_model(run_dir, outputs.path / "config.yaml", cfg)
        checkpoint_path = outputs.path / CHECKPOINT
        try:  # tensors and plain data only: a crafted pickle is refused, never run
            checkpoint = torch.load(checkpoint_path, weights_only=True)
        except Exception as err:  # torch raises many kinds for a foreign or crafted file
            raise ValueError(f"resume={run_dir}: {checkpoint_path} is not a fedrec checkpoint "
                             f"of tensors and plain data ({type(err).__name__})") from err
        metrics = outputs.path / "metrics.jsonl"
        kept = [line for line in metrics.read_text().splitlines()
                if json.loads(line)["round"] <= checkpoint["round"]]
        metrics.write_text("".join(f"{line}\n" for line in kept))
        (outputs.path / f"config.resumed-{checkpoint['round']}.yaml").write_text(
            OmegaConf.to_yaml(cfg))
        log.info("resuming %s after round %d", outputs.path, checkpoint["round"])
        return outputs, checkpoint

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Written after every round, atomically: a stop at any moment leaves the last one."""
        partial = self.path / f"{CHECKPOINT}.partial"
        torch.save(state, partial)
        partial.replace(self.path / CHECKPOINT)

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary`` with what made the run: fedrec's version, the git commit of its source
        (when that is a checkout) and when this run (or this resumed part of it) started."""
        summary = {**summary, "fedrec_version": importlib.metadata.version("fedrec"),
                   "git_commit": source_commit(), "started_at": self.started_at}
        (self.path / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")

    def save_model(self, model: TwoTower | None, dataset: Dataset, cfg: DictConfig,
                   extra: dict[str, Any] | None = None) -> None:
        """The shared parameters plus what serving needs: item vectors and the id maps."""
        payload: dict[str, Any] = {
            "config": OmegaConf.to_container(cfg),  # for the record; serving reads the specs
            # What serving reads: the model's and the data's keys, plain and resolved.
            "model_spec": OmegaConf.to_container(cfg.model, resolve=True),
            "data_spec": OmegaConf.to_container(cfg.dataset, resolve=True),
            "item_ids": list(dataset.item_ids),
            "attribute_names": list(dataset.attribute_names),
            "item_attributes": torch.as_tensor(dataset.item_attributes),
            "item_titles": None if dataset.item_titles is None else list(dataset.item_titles),
            **(extra or {}),
        }
        if model is not None:
            with torch.no_grad():
                model.eval()
                payload["shared_state"] = model.shared_state()
                payload["item_vectors"] = model.item_vectors()
        torch.save(payload, self.path / "model.pt")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def set_aside(folder: Path) -> Path:
    """Move a folder a stopped command left to ``<name>.incomplete-<time>`` beside it, so a new
    run neither overwrites it nor mistakes it for finished; the new path."""
    aside = folder.with_name(f"{folder.name}.incomplete-{dt.datetime.now():%Y%m%d-%H%M%S}")
    folder.rename(aside)
    return aside


def resumable(run_dir: str | Path) -> Path:
    """The folder of a stopped federated run that ``resume=`` may continue; raises, naming
    ``resume=``, for a folder that is missing, not a run, or a finished run."""
    path = Path(run_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"resume={run_dir}: no such folder (resume takes the "
                                "output_dir of a stopped federated run)")
    if not (path / CHECKPOINT).exists():
        raise FileNotFoundError(f"resume={run_dir}: {path / CHECKPOINT} does not exist (only "
                                "a federated run that finished a round leaves one)")
    if (path / "summary.json").exists():
        raise FileExistsError(f"resume={run_dir}: that run finished (summary.json exists)")
    return path


def _check_same_model(run_dir: str | Path, stored: Path, cfg: DictConfig) -> None:
    """A checkpoint's parameters mean what the stopped run's model config said. The same
    shapes load under another config (a changed default, a forgotten override) and would
    silently train a different model, so any difference is refused, naming the keys."""
    if not stored.exists():
        raise FileNotFoundError(f"resume={run_dir}: {stored} does not exist, so the model the "
                                "checkpoint holds is unknown")
    before = OmegaConf.to_container(OmegaConf.load(stored).get("model", {}))
    now = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(before, dict) and isinstance(now, dict)
    differ = [f"model.{key}={before.get(key, '(absent)')} in the stopped run, {now.get(key)} "
              "now" for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if differ:
        raise ValueError(f"resume={run_dir}: the model differs from the stopped run's: "
                         f"{'; '.join(differ)}. Give the stopped run's overrides "
                         "(its config.yaml)")


def source_commit() -> str | None:
    """The git commit of the checkout fedrec was installed from, with ``-dirty`` when it has
    uncommitted changes; None when it was not installed from one. A federated run's ServerApp
    runs from a copy of the project without .git, so the installed distribution names the
    checkout (an editable install records its folder)."""
    candidates = [Path(__file__).resolve().parent.parent]
    try:
        url = importlib.metadata.distribution("fedrec").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        url = None
    if url and json.loads(url).get("url", "").startswith("file://"):
        candidates.append(Path(json.loads(url)["url"][len("file://"):]))
    for folder in candidates:
        try:
            commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel",
                                     "HEAD"], capture_output=True, text=True, timeout=10)
            top, _, head = commit.stdout.strip().partition("\n")
            # Only the project's own checkout: not a repository the copy happens to sit in.
            if commit.returncode != 0 or Path(top).resolve() != folder.resolve():
                continue
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        return head + ("-dirty" if dirty else "")
    return None


def _jsonable(value: Any) -> Any:
    """NaN is not JSON; a metric with nothing to average is written as null."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
