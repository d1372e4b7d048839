"""The wire contract: every record and key a message may carry, per message type, direction and
mechanism, and what covers it. docs/privacy.md lists the same table for users; the tests check the
layouts of real messages of real runs (``wire_log``) against ``allowed``.

Under a privacy mechanism nothing per-client leaves a client in the clear unless the run's
guarantee covers it: the shared arrays (noised by DP-SGD, clipped and then noised by DP-FedAvg,
or masked by SecAgg+) and a constant weight. Evaluation figures are not sent at all.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey

from fedrec.config import CentralDpConfig, Config, DpSgdConfig

# Error codes of a client's refusals (Flower's own codes are small integers): its budget cannot
# pay for another round; the request leaves the client's own plan; the request asks for what
# the run's guarantee does not cover; it holds no training example.
BUDGET_EXHAUSTED = 4001
OUTSIDE_PLAN = 4002
NOT_COVERED = 4003
NOTHING_TO_TRAIN = 4004

# The shared parameters: an "arrays" record may hold exactly the model's shared state.
SHARED = "<shared parameters>"

# What the server sends with a train request, and why each key is safe: all are run-level values
# the server chose, the same for every client.
TRAIN_CONFIG = {"lr", "lr-decay", "local-epochs", "batch-size", "round-offset", "server-round"}
FEDPROX_CONFIG = {"proximal-mu"}
# DP-SGD: the public inputs of every client's plan; a client checks them against its own.
DP_SGD_CONFIG = {"dp-planned-rounds", "dp-delta", "dp-steps-per-epoch"}
# Flower's client-side clipping wrappers: the clipping norm each client applies.
CLIENT_CLIPPING_CONFIG = {"clipping_norm"}
# Flower's adaptiveclipping_mod: whether the client's update was clipped, in the clear. Andrew
# et al.'s accounting covers it only as a noised count; Flower sends each bit (docs/privacy.md).
ADAPTIVE_CLIPPING_METRICS = {"norm_bit"}
EVALUATE_CONFIG = {"server-round"}
# On a pool of virtual shoppers (a simulation): the sampled shoppers a node owns, which a
# shopper's own device would know of itself.
POOL_CONFIG = {"cohort"}
# The one query of a pooled run: which pool slice a node simulates (simulation metadata).
POOL_QUERY_UP = {"pool": {"partition-id", "num-partitions"}}

# A train reply: the weight every client sends (a constant, 1), and under privacy=none without
# SecAgg+, the count and loss that FedAvg's weighting and the round log use. A pool node's
# weight counts the sampled shoppers it trained: the server chose them, and a shopper is left
# out only when its budget is spent (public: the plan and the server's own cohorts say when) or
# it has no training example, which a shopper on its own SuperNode reveals as an error reply.
PRIVATE_TRAIN_METRICS = {"unit-weight"}
PLAIN_TRAIN_METRICS = {"unit-weight", "num-examples", "train_loss"}

# SecAgg+ (Flower's legacy workflow): the protocol's own records. Down: the stage's config and,
# at the training stage, the legacy fit instructions; up: the stage's reply (public keys,
# encrypted shares, the masked vector, shares for unmasking) and the legacy fit result with a
# constant weight, no metrics and a status.
SECAGG_RECORD = RECORD_KEY_CONFIGS  # "secaggplus_configs"
SECAGG_DOWN = {"fitins.parameters": None, SECAGG_RECORD: None}
# Keys fedrec adds to SecAgg+'s legacy train config, so a client can translate it without its
# model: the arrays' names, the reply's weight key and the largest weight SecAgg+ can carry.
ARRAY_NAMES, WEIGHT_KEY, MAX_WEIGHT = "secagg-array-names", "secagg-weight-key", "secagg-max-weight"
SECAGG_TRAIN_CONFIG = {ARRAY_NAMES, WEIGHT_KEY, MAX_WEIGHT}
# Legacy strategies name their config keys differently from the new API's.
LEGACY_CONFIG_KEYS = {"proximal_mu": "proximal-mu"}
SECAGG_UP = {SECAGG_RECORD: None, "fitres.parameters": set(),
             "fitres.num_examples": {"num_examples"}, "fitres.metrics": set(),
             "fitres.status": {"code", "message"}}


def starts_round(msg: Message) -> bool:
    """Whether a train message opens a round: a plain one, or SecAgg+'s setup stage."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return configs is None or configs.get(SecAggKey.STAGE) == Stage.SETUP


def message_layout(msg: Message) -> dict[str, object]:
    """What a message carries, without any value: its type, error code, and each record's kind
    and keys."""
    layout: dict[str, object] = {"type": msg.metadata.message_type}
    if msg.has_error():
        layout["error"] = msg.error.code
        return layout
    records = {}
    for name, record in msg.content.items():
        kind = ("arrays" if isinstance(record, ArrayRecord) else
                "metrics" if isinstance(record, MetricRecord) else
                "config" if isinstance(record, ConfigRecord) else type(record).__name__)
        records[name] = {"kind": kind, "keys": sorted(record.keys())}
    layout["records"] = records
    return layout


def allowed(cfg: Config, message_type: str, direction: str) -> dict[str, set[str] | None]:
    """The records a message may hold, each with the keys it may hold (None: the protocol's
    own keys, SecAgg+'s; ``SHARED`` stands for the model's shared parameter names)."""
    private = cfg.privacy.mechanism != "none"
    if cfg.secagg.enabled and message_type == "train":
        if direction == "up":
            return dict(SECAGG_UP)
        # The legacy fit instructions carry the plain path's train config and the names the
        # client needs to translate them (fedrec.client.secagg).
        return {**SECAGG_DOWN, "fitins.config": _train_config(cfg) | SECAGG_TRAIN_CONFIG}
    if message_type == "query":
        return {} if direction == "down" else dict(POOL_QUERY_UP)
    if message_type == "evaluate":
        if direction == "down":
            return {"arrays": {SHARED}, "config": set(EVALUATE_CONFIG)}
        if private or cfg.secagg.enabled:
            return {}  # a client answers with an error, and no figures
        return {"metrics": None}  # ranking sums and counts (RankingSums.flat), test and valid.
    if direction == "down":
        return {"arrays": {SHARED}, "config": _train_config(cfg)}
    metrics = set(PRIVATE_TRAIN_METRICS if private else PLAIN_TRAIN_METRICS)
    if (isinstance(cfg.privacy, CentralDpConfig) and cfg.privacy.side == "client"
            and cfg.privacy.clipping == "adaptive"):
        metrics |= ADAPTIVE_CLIPPING_METRICS
    return {"arrays": {SHARED}, "metrics": metrics}


def _train_config(cfg: Config) -> set[str]:
    """The keys of a train request's config under ``cfg``'s mechanism."""
    config = set(TRAIN_CONFIG) | FEDPROX_CONFIG | (POOL_CONFIG if cfg.pooled else set())
    if isinstance(cfg.privacy, DpSgdConfig):
        config |= DP_SGD_CONFIG
    if isinstance(cfg.privacy, CentralDpConfig) and cfg.privacy.side == "client":
        config |= CLIENT_CLIPPING_CONFIG
    return config


def violations(cfg: Config, layout: dict[str, object], direction: str,
               shared_names: set[str]) -> list[str]:
    """How a logged message layout breaks the contract (empty: it keeps it)."""
    if "error" in layout:
        return []  # an error carries a code and a reason, no record
    rules = allowed(cfg, str(layout["type"]), direction)
    problems = []
    for name, record in layout["records"].items():  # type: ignore[union-attr]
        if name not in rules:
            problems.append(f"{direction} {layout['type']}: record {name!r} is not allowed")
            continue
        keys, rule = set(record["keys"]), rules[name]
        if rule is None:
            continue
        if SHARED in rule:
            rule = (rule - {SHARED}) | shared_names
        extra = keys - rule
        if extra:
            problems.append(f"{direction} {layout['type']}: {name} carries {sorted(extra)}")
    return problems
