"""What the server records every round: traffic, training loss and evaluation, as one line each.

Flower's strategy loop calls the aggregation functions and then ``evaluate_fn`` once per round;
``RoundLog`` hooks into exactly those calls, so a round's line is written (and logged) as soon
as the round ends, and a crash later keeps every finished round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # type: ignore[attr-defined]
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedrec.metrics import VALID_PREFIX, RankingSums
from fedrec.outputs import RunOutputs
from fedrec.server.privacy import PrivacyReport, clients_in
from fedrec.server.strategy import sum_metric_records
from fedrec.wire import BUDGET_EXHAUSTED, message_layout, starts_round

log = logging.getLogger("fedrec.server")
# How often the server asks the SuperLink for replies. A cross-device round on the pool takes
# one to two seconds, and after the last reply a poll waits half its interval on average.
POLL_SECONDS = 0.02


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: its arrays, metrics and configs."""
    return sum(_count_bytes(record) for record in content.values())


def _count_bytes(record: ArrayRecord | MetricRecord | ConfigRecord) -> int:
    if isinstance(record, ConfigRecord) and any(v == [] for v in record.values()):
        # Flower's ConfigRecord.count_bytes fails on an empty list (SecAgg+ sends some); an
        # empty list carries only its key.
        return ConfigRecord({k: v for k, v in record.items() if v != []}).count_bytes() + sum(
            len(k) for k, v in record.items() if v == [])
    return record.count_bytes()


class MeteredGrid(Grid):
    """The run's Grid, counting the payload bytes of every message sent and every reply, and
    which nodes were asked to train. With a ``wire_log`` path, it also appends the layout of
    every message (record names and keys, never values) as a JSON line: what the server really
    sends and receives, to check against the wire contract (fedrec.wire)."""

    def __init__(self, grid: Grid, wire_log: str | None = None) -> None:
        self._grid = grid
        self.bytes_down = 0
        self.bytes_up = 0
        self.errors: list[Message] = []  # error replies not yet reported by the round log
        self.unanswered = 0  # messages that timed out, not yet reported by the round log
        # The clients asked to train, not yet reported: a node, or on a pool each shopper a
        # node was asked to train (as ("shopper", id)), since each spends its own budget.
        self.train_requests: list[int | tuple[str, int]] = []
        self.wire_log = None if wire_log is None else Path(wire_log)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """As Flower's Grid, but polling for replies every POLL_SECONDS instead of every 3 s:
        SecAgg+ makes four exchanges a round, and each would otherwise wait out the interval."""
        messages = list(messages)
        self.bytes_down += sum(record_bytes(m.content) for m in messages)
        for m in messages:
            if m.metadata.message_type == MessageType.TRAIN and starts_round(m):
                cohort = m.content.config_records.get("config", {}).get("cohort")
                self.train_requests += ([m.metadata.dst_node_id] if cohort is None else
                                        [("shopper", int(s)) for s in cohort])  # type: ignore[union-attr]
        self._log_layouts("down", messages)
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self._grid.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if pending:
                time.sleep(POLL_SECONDS)
        if pending:
            log.warning("%d of %d nodes did not answer within %s s: they count as failed",
                        len(pending), len(messages), timeout)
            self.unanswered += len(pending)
        self.bytes_up += sum(record_bytes(r.content) for r in replies if not r.has_error())
        self.errors += [r for r in replies if r.has_error()]
        self._log_layouts("up", replies)
        return replies

    def _log_layouts(self, direction: str, messages: list[Message]) -> None:
        if self.wire_log is None or not messages:
            return
        with self.wire_log.open("a") as out:
            for msg in messages:
                out.write(json.dumps({"direction": direction, **message_layout(msg)}) + "\n")

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)


# The global model's (validation, test) sums over every shopper, on the server (simulation).
ServerEvaluation = Callable[[ArrayRecord], tuple[RankingSums, RankingSums]]


class RunStopped(Exception):
    """The run ends after ``server_round``, before num_rounds, for ``reason``: the config key
    that stopped it (privacy.max_epsilon, eval.patience)."""

    def __init__(self, server_round: int, arrays: ArrayRecord, reason: str) -> None:
        super().__init__(f"{reason} stopped the run after round {server_round}")
        self.server_round = server_round
        self.arrays = arrays
        self.reason = reason


class RoundLog:
    def __init__(self, outputs: RunOutputs, grid: MeteredGrid, num_rounds: int,
                 server_evaluation: ServerEvaluation | None, privacy: PrivacyReport,
                 select_by: str, resumed: dict[str, Any] | None = None, *,
                 federated_evaluation: bool = True, patience: int | None = None,
                 eval_every: int = 1) -> None:
        """``select_by``: the validation metric (protocol.metric) whose best evaluated round
        the run reports; ``resumed``: the checkpoint a resumed run starts from; Flower numbers
        the resumed rounds from 1 again, and the log adds the rounds done before.
        ``federated_evaluation``: False when the clients send no evaluation figures (a private
        run): the run then reports its last round, chosen by nothing private. ``patience``:
        stop after that many evaluated rounds in a row without a better ``select_by``.
        ``eval_every``: the server evaluates round 0, every eval_every-th round and the run's
        last, as the clients do (evaluating all of Beauty's shoppers costs more than a round)."""
        self.outputs = outputs
        self.done = 0 if resumed is None else int(resumed["round"])
        self.privacy = privacy
        self.grid = grid
        self.num_rounds = num_rounds
        self.server_evaluation = server_evaluation
        self.eval_every = eval_every
        self.select_by = select_by
        self.federated_evaluation = federated_evaluation
        self._round_began = time.perf_counter()
        self._train: dict[str, float] = {}
        self._federated: RankingSums | None = None
        self._valid: RankingSums | None = None
        self._bytes_seen = (0, 0)
        self._timed_from = (self.done, time.perf_counter())  # (round, time) the ETA counts from
        # The evaluated round the run reports: {"round", "record", "arrays"}.
        self.selected: dict[str, Any] | None = None if resumed is None else resumed.get("selected")
        self.patience = patience
        # Evaluated rounds since the selected one, which did not beat it.
        self.stale = 0 if resumed is None else int(resumed.get("stale_evaluations", 0))

    def aggregate_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """The round's mean training loss, where the clients send it (privacy=none without
        SecAgg+: fedrec.wire); the privacy accounting of the round's release."""
        metrics = [m for r in records for m in r.metric_records.values()]
        cohort = clients_in(records)
        self.privacy.trained(cohort)
        self._train = {"train_loss": None, "clients": len(records), "cohort": cohort}
        if metrics and all("train_loss" in m and weighting_key in m for m in metrics):
            weights = [float(m[weighting_key]) for m in metrics]  # type: ignore[arg-type]
            losses = [float(m["train_loss"]) for m in metrics]  # type: ignore[arg-type]
            self._train["train_loss"] = sum(w * x for w, x in zip(weights, losses, strict=True)
                                            ) / max(sum(weights), 1e-12)
            return MetricRecord({"train_loss": self._train["train_loss"]})
        return MetricRecord()

    def aggregate_evaluate(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        if not records:  # every client failed: the round's line counts them (failed_clients)
            self._federated = self._valid = None
            return MetricRecord()
        summed = dict(sum_metric_records(records, weighting_key))
        self._federated = RankingSums.from_flat(summed)
        self._valid = RankingSums.from_flat(summed, VALID_PREFIX)
        # Flower keeps and logs what this returns: the means read better than the raw sums.
        return MetricRecord({f"{protocol}.{metric}": value
                             for protocol, values in self._federated.means().items()
                             for metric, value in values.items()})

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: called after every round (and before the first, as round 0).
        Writes the round's line, then a checkpoint to resume from."""
        if self.done and server_round == 0:
            return None  # a resumed run's starting point is the checkpointed round's line
        server_round += self.done
        self.privacy.requested(self.grid.train_requests)
        self.grid.train_requests = []
        # One layout with the centralized run's lines (docs/outputs.md): test and valid
        # sub-objects, this round's seconds and bytes.
        record: dict[str, Any] = {"round": server_round, "train_loss": None}
        if self._federated is not None:
            if self._valid is not None and self._valid.counts["sampled"]:
                record["valid"] = self._valid.means()
            record["test"] = self._federated.means()
            record["evaluated_users"] = self._federated.counts["full"]
        out_of_budget = server_round < self.num_rounds and self.privacy.stop_before_next_round()
        last = server_round >= self.num_rounds or out_of_budget
        if self.server_evaluation is not None and (server_round % self.eval_every == 0 or last):
            valid, test = self.server_evaluation(arrays)
            record["server"] = {**({"valid": valid.means()} if valid.counts["sampled"] else {}),
                                "test": test.means()}
        if self._train:
            record["train_loss"] = self._train.get("train_loss")
            record["train_clients"] = self._train["clients"]
            record["cohort"] = self._train["cohort"]
        elif server_round > 0:
            record["aggregated"] = False
            log.warning("round %d aggregated no update (the model is unchanged): every client "
                        "failed, or SecAgg+ lost too many of them; see the Flower log",
                        server_round)
        exhausted = [e for e in self.grid.errors if e.error.code == BUDGET_EXHAUSTED]
        self.privacy.exhausted.update(e.metadata.src_node_id for e in exhausted)
        failed = len(self.grid.errors) - len(exhausted) + self.grid.unanswered
        if failed:
            record["failed_clients"] = failed
        self.grid.errors, self.grid.unanswered = [], 0
        if self.privacy.cfg.mechanism != "none":
            report = self.privacy.as_dict()
            record["epsilon"] = report["epsilon"]
            record["privacy"] = {**report,
                                 "exhausted_this_round": self.privacy.exhausted_now(
                                     len(exhausted))}
        up = self.grid.bytes_up - self._bytes_seen[0]
        down = self.grid.bytes_down - self._bytes_seen[1]
        self._bytes_seen = (self.grid.bytes_up, self.grid.bytes_down)
        now = time.perf_counter()
        record.update(seconds=round(now - self._round_began, 3), bytes_up=up, bytes_down=down)
        self._round_began = now
        if self._federated is not None or not self.federated_evaluation:
            self._consider(record, arrays)
            self.stale = 0 if self.selected["round"] == server_round else self.stale + 1  # type: ignore[index]
        self._train, self._federated, self._valid = {}, None, None
        self.outputs.log_metrics(record)
        self.outputs.save_checkpoint({"round": server_round, "arrays": arrays.to_torch_state_dict(),
                                      "selected": self.selected,
                                      "stale_evaluations": self.stale,
                                      "privacy_accountant": self.privacy.state()})
        log.info("round %d/%d %s%s", server_round, self.num_rounds, _brief(record),
                 self._eta(server_round))
        if server_round >= self.num_rounds:
            return None
        if out_of_budget:
            log.warning("privacy: round %d cost more than planned (clients failed), and another "
                        "round would take epsilon past privacy.max_epsilon=%s: the run stops "
                        "here", server_round, self.privacy.cfg.max_epsilon)  # type: ignore[attr-defined]
            raise RunStopped(server_round, arrays, "privacy.max_epsilon")
        if self.patience is not None and self.stale >= self.patience:
            log.info("stopping after round %d: %d evaluated rounds without a better validation "
                     "%s than round %d's (eval.patience=%d)", server_round, self.stale,
                     self.select_by, self.selected["round"], self.patience)  # type: ignore[index]
            raise RunStopped(server_round, arrays, "eval.patience")
        return None

    def _eta(self, server_round: int) -> str:
        """The run's remaining time at the mean pace of the rounds this process ran."""
        if server_round == self.done:
            self._timed_from = (server_round, time.perf_counter())
            return ""
        first, began = self._timed_from
        left = self.num_rounds - server_round
        if left <= 0:
            return ""
        pace = (time.perf_counter() - began) / (server_round - first)
        return f"  ETA {_duration(pace * left)}"

    def validation_score(self, record: dict[str, Any]) -> float | None:
        """The round's validation ``select_by``; None for a round without validation items."""
        protocol, metric = self.select_by.split(".")
        return record.get("valid", {}).get(protocol, {}).get(metric)

    def _consider(self, record: dict[str, Any], arrays: ArrayRecord) -> None:
        """Keep the evaluated round with the best validation ``select_by`` (the earliest of
        equals). A round without a score replaces any earlier choice, so a run without
        validation data reports its last round."""
        score = self.validation_score(record)
        best = None if self.selected is None else self.validation_score(self.selected["record"])
        if self.selected is None or score is None or best is None or score > best:
            self.selected = {"round": record["round"], "record": record,
                             "arrays": arrays.to_torch_state_dict()}


def _brief(record: dict[str, Any]) -> str:
    parts = []
    if "train_loss" in record and record["train_loss"] is not None:
        parts.append(f"loss {record['train_loss']:.4f}")
    for label, source in (("", record.get("test", {})), ("valid ", record.get("valid", {})),
                          ("server ", record.get("server", {}).get("test", {}))):
        for protocol, metric in (("sampled", "hr@10"), ("sampled", "ndcg@10"),
                                 ("full", "recall@20")):
            if protocol in source:
                parts.append(f"{label}{protocol}.{metric} {source[protocol][metric]:.4f}")
    if record.get("epsilon") is not None:
        parts.append(f"epsilon {record['epsilon']:.3f}")
    if "cohort" in record:
        parts.append(f"cohort {record['cohort']}")
    parts.append(f"{record['seconds']:.1f} s  up {record['bytes_up'] / 1e6:.2f} MB down "
                 f"{record['bytes_down'] / 1e6:.2f} MB")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
            if seconds < 7200 else f"{seconds / 3600:.1f} h")
