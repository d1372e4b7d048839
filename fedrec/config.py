"""Compose and validate the run configuration.

conf/ holds every default; the dataclasses below only give each group its keys, their types and
the values they allow. Hydra refuses a key the schema does not name, OmegaConf refuses a value of
the wrong type, and ``__post_init__`` refuses a value out of range, so a bad override fails here,
before any data is read or any model trained.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Inside the package: a plain (non-editable) install carries every default.
CONF_DIR = Path(__file__).resolve().parent / "conf"


class ConfigError(ValueError):
    """A configuration key holds a value fedrec cannot run with."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


# ---------------------------------------------------------------------------------- dataset
DATASET_FORMATS = ("synthetic", "movielens_100k", "movielens_1m", "lightgcn", "sequence", "csv")


@dataclass
class DatasetConfig:
    # Names the run and its outputs; format picks the reader.
    name: str = MISSING
    format: str = MISSING
    # Interactions with rating < min_rating are not positives; null keeps every row.
    min_rating: float | None = MISSING
    # Iteratively drop users and items with fewer than kcore interactions; 0 disables.
    kcore: int = MISSING

    def __post_init__(self) -> None:
        _check(self.format in DATASET_FORMATS, "dataset.format", self.format,
               f"one of {', '.join(DATASET_FORMATS)}")
        _check(self.kcore >= 0, "dataset.kcore", self.kcore, "an integer >= 0")


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    seed: int = MISSING
    num_users: int = MISSING
    num_items: int = MISSING
    num_categories: int = MISSING
    brands_per_category: int = MISSING
    num_price_bands: int = MISSING
    sessions_per_user: float = MISSING
    items_per_session: float = MISSING
    # Dirichlet concentration of a shopper's taste over categories: small means focused shoppers.
    taste_concentration: float = MISSING
    zipf_exponent: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_users", "num_items", "num_categories", "brands_per_category",
                    "num_price_bands"):
            value = getattr(self, key)
            _check(value >= 1, f"dataset.{key}", value, "an integer >= 1")
        _check(self.num_items >= self.num_categories, "dataset.num_items", self.num_items,
               f"at least dataset.num_categories ({self.num_categories}) items")
        for key in ("sessions_per_user", "items_per_session", "taste_concentration"):
            value = getattr(self, key)
            _check(value > 0, f"dataset.{key}", value, "a number > 0")
        _check(self.zipf_exponent >= 0, "dataset.zipf_exponent", self.zipf_exponent,
               "a number >= 0")


@dataclass
class FileDatasetConfig(DatasetConfig):
    # The folder (or file) that holds the data; relative paths resolve against the working dir.
    path: str = MISSING
    # The item catalogue every node shares (CSV item,attributes[,title], attributes separated
    # by "|"): it fixes the item ids and attributes, so that nodes reading only their own data
    # agree on them. null: the items the data itself names.
    catalogue: str | None = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.path), "dataset.path", self.path,
               "the folder or file holding the data (see data/README.md)")


@dataclass
class SequenceDatasetConfig(FileDatasetConfig):
    # "auto" looks for <stem>_item2attributes.json beside the file; null reads no attributes.
    attributes_path: str | None = MISSING


@dataclass
class CsvDatasetConfig(FileDatasetConfig):
    # Optional item metadata CSV with columns item,attributes[,title]; null reads none.
    items_path: str | None = MISSING
    # Separates the attributes inside the metadata's attributes column.
    attribute_separator: str = MISSING


# -------------------------------------------------------------------------------- partition
@dataclass
class PartitionConfig:
    kind: str = MISSING

    def __post_init__(self) -> None:
        _check(self.kind in ("user", "silo"), "partition.kind", self.kind, "'user' or 'silo'")


@dataclass
class SiloPartitionConfig(PartitionConfig):
    num_silos: int = MISSING
    assignment: str = MISSING
    alpha: float = MISSING
    seed: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_silos >= 1, "partition.num_silos", self.num_silos, "an integer >= 1")
        _check(self.assignment in ("iid", "dirichlet"), "partition.assignment", self.assignment,
               "'iid' or 'dirichlet'")
        _check(self.alpha > 0, "partition.alpha", self.alpha, "a number > 0")


@dataclass
class UserPartitionConfig(PartitionConfig):
    # Cross-device in a simulation: the shoppers are virtual clients spread over this many
    # SuperNodes (--federation-config "num-supernodes=N"), node k owning shoppers k, k + N,
    # ...; each round a node trains the sampled shoppers it owns. null: one SuperNode per
    # shopper. A deployment has one SuperNode per device and ignores it.
    pool_nodes: int | None = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.pool_nodes is None or self.pool_nodes >= 1, "partition.pool_nodes",
               self.pool_nodes, "an integer >= 1, or null for one SuperNode per shopper")


# ------------------------------------------------------------------------------------ model
MODEL_KINDS = ("two_tower", "popularity")


@dataclass
class ModelConfig:
    # popularity is the baseline: no parameters, every shopper gets the best sellers.
    kind: str = MISSING

    def __post_init__(self) -> None:
        _check(self.kind in MODEL_KINDS, "model.kind", self.kind,
               f"one of {', '.join(MODEL_KINDS)}")


USER_TOWERS = ("mean", "attention")
HISTORY_ITEMS = ("id", "id_and_attributes", "attributes")
ITEM_VECTORS = ("id_and_attributes", "attributes")


@dataclass
class TwoTowerConfig(ModelConfig):
    embedding_dim: int = MISSING
    hidden_dim: int = MISSING
    # How many of a shopper's most recent items the user tower sees.
    max_history: int = MISSING
    # Scores are cosine similarities divided by this temperature.
    temperature: float = MISSING
    dropout: float = MISSING
    use_user_features: bool = MISSING
    # A per-user vector that stays on the client and never enters the shared parameters.
    personal_embedding: bool = MISSING
    # How the user tower reads the history: mean (a bag of items) or attention (causal
    # self-attention with learned positions, as SASRec: the order counts).
    user_tower: str = MISSING
    # What the user tower reads for each history item: its id row (id), its id row plus the
    # mean of its attribute rows (id_and_attributes), or the attributes alone (attributes: no id
    # row, so a rarely bought item still says what it is, and the user tower learns nothing
    # from the private id table).
    history_items: str = MISSING
    # In training, a history item's id row is dropped (zeroed, the kept rows scaled by
    # 1 / (1 - p)) with this probability, so the user tower learns to read an item from its
    # attributes too: a rarely bought item's id row has seen few shoppers. Serving reads every
    # row. Needs history_items=id_and_attributes, the one reading with both. With the sampled
    # softmax (shared negatives) the user tower reads each distinct item of a batch once, so
    # the draw is per distinct item of the batch; with per-example candidates (BPR, DP-SGD),
    # per history entry. The measured figures (docs/configuration.md) are of the first.
    history_id_dropout: float = MISSING
    # What the item tower reads for each item: its id row and the mean of its attribute rows
    # (id_and_attributes), or the attributes alone (attributes). Under user-level DP the id
    # table is 90% of what gets noise on Beauty, and each row is read by few shoppers; an item
    # tower over the public catalogue alone learns from every shopper who bought anything that
    # shares an attribute.
    item_vectors: str = MISSING
    attention_layers: int = MISSING
    attention_heads: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("embedding_dim", "hidden_dim", "max_history", "attention_layers",
                    "attention_heads"):
            value = getattr(self, key)
            _check(value >= 1, f"model.{key}", value, "an integer >= 1")
        _check(self.user_tower in USER_TOWERS, "model.user_tower", self.user_tower,
               f"one of {', '.join(USER_TOWERS)}")
        _check(self.history_items in HISTORY_ITEMS, "model.history_items", self.history_items,
               f"one of {', '.join(HISTORY_ITEMS)}")
        _check(self.item_vectors in ITEM_VECTORS, "model.item_vectors", self.item_vectors,
               f"one of {', '.join(ITEM_VECTORS)}")
        _check(0 <= self.history_id_dropout < 1, "model.history_id_dropout",
               self.history_id_dropout, "a number in [0, 1)")
        _check(self.history_id_dropout == 0 or self.history_items == "id_and_attributes",
               "model.history_id_dropout", self.history_id_dropout,
               f"0 with model.history_items={self.history_items} (only id_and_attributes reads "
               "both an id row and attributes)")
        _check(self.embedding_dim % self.attention_heads == 0, "model.attention_heads",
               self.attention_heads, f"a divisor of model.embedding_dim={self.embedding_dim}")
        _check(self.temperature > 0, "model.temperature", self.temperature, "a number > 0")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")


# ------------------------------------------------------------------------------------ train
LOSSES = ("sampled_softmax", "bpr")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class DpSgdStepConfig:
    """How clients train under privacy=dp_sgd, in place of train's keys of the same names. The
    step is part of train so that an experiment sets both.

    Every value here is public and the same on every client, so the noise each client plans
    follows from the config alone: the server states every client's epsilon without any client
    sending it, and a client's reply says nothing about how much data it holds."""

    # Each DP-SGD step takes every protected unit (shopper, or example) of the client with
    # probability 1 / steps_per_epoch (Poisson sampling); an epoch is this many steps.
    steps_per_epoch: int = MISSING
    # privacy.unit=shopper: a sampled shopper's gradient is the mean loss over at most this many
    # of their examples, drawn afresh each step (a cap on the cost of heavy shoppers).
    examples_per_shopper: int = MISSING
    lr: float = MISSING
    local_epochs: int = MISSING
    round_lr_decay: float = MISSING
    # A number, never chosen from the data: a choice made from a client's shoppers would say
    # something about them that the noise does not cover.
    weight_decay: float = MISSING
    keep_optimizer_state: bool = MISSING

    def __post_init__(self) -> None:
        _check(self.weight_decay >= 0, "train.dp_sgd.weight_decay", self.weight_decay,
               "a number >= 0")
        _check(self.steps_per_epoch >= 1, "train.dp_sgd.steps_per_epoch", self.steps_per_epoch,
               "an integer >= 1")
        _check(self.examples_per_shopper >= 1, "train.dp_sgd.examples_per_shopper",
               self.examples_per_shopper, "an integer >= 1")
        _check_step(self, "train.dp_sgd")

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.steps_per_epoch

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.local_epochs


def _check_step(step: DpSgdStepConfig | TrainConfig, prefix: str) -> None:
    """The keys a client's round trains by, shared by train and train.dp_sgd."""
    _check(step.lr > 0, f"{prefix}.lr", step.lr, "a number > 0")
    _check(step.local_epochs >= 1, f"{prefix}.local_epochs", step.local_epochs,
           "an integer >= 1")
    _check(0 < step.round_lr_decay <= 1, f"{prefix}.round_lr_decay", step.round_lr_decay,
           "a number in (0, 1]")


@dataclass
class DecayPair:
    centralized: float = MISSING
    federated: float = MISSING


@dataclass
class AutoDecayConfig:
    """What train.weight_decay=null picks, from the median number of training interactions
    per shopper in the data an optimizer trains on."""

    short_history_below: float = MISSING
    short_histories: DecayPair = MISSING
    long_histories: DecayPair = MISSING

    def __post_init__(self) -> None:
        _check(self.short_history_below > 0, "train.auto_decay.short_history_below",
               self.short_history_below, "a number > 0")
        for kind in ("short_histories", "long_histories"):
            for where in ("centralized", "federated"):
                value = getattr(getattr(self, kind), where)
                _check(value >= 0, f"train.auto_decay.{kind}.{where}", value, "a number >= 0")


@dataclass
class CataloguePretrainingConfig:
    """Pretraining on the public catalogue before any shopper's data (fedrec.pretrain)."""

    # 0 skips it.
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    # The longest made-up history, in items.
    history_length: int = MISSING

    def __post_init__(self) -> None:
        prefix = "train.catalogue_pretraining"
        _check(self.steps >= 0, f"{prefix}.steps", self.steps, "an integer >= 0 (0 skips it)")
        _check(self.batch_size >= 2, f"{prefix}.batch_size", self.batch_size, "an integer >= 2")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "a number > 0")
        _check(self.history_length >= 1, f"{prefix}.history_length", self.history_length,
               "an integer >= 1")


@dataclass
class TrainConfig:
    # Epochs of the centralized reference.
    epochs: int = MISSING
    # Epochs each client trains per federated round.
    local_epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    # null: chosen from the data by auto_decay (fedrec.train.choose_weight_decay), and logged.
    weight_decay: float | None = MISSING
    auto_decay: AutoDecayConfig = MISSING
    optimizer: str = MISSING
    loss: str = MISSING
    # Uniformly sampled negatives shared by a batch (sampled softmax) or one per example (BPR).
    num_negatives: int = MISSING
    logq_correction: bool = MISSING
    # Threads torch may use; 0 keeps torch's choice.
    num_threads: int = MISSING
    # Federated round r trains the clients at lr x round_lr_decay^(r-1): early rounds move far,
    # late ones settle instead of each client dragging the model toward its own data. The
    # centralized reference ignores it.
    round_lr_decay: float = MISSING
    # A client keeps its optimizer's state (Adam's moments) in its own Context.state from one
    # round to its next, in place of a fresh optimizer each round; it never leaves the client.
    keep_optimizer_state: bool = MISSING
    dp_sgd: DpSgdStepConfig = MISSING
    catalogue_pretraining: CataloguePretrainingConfig = MISSING

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check_step(self, "train")
        _check(self.weight_decay is None or self.weight_decay >= 0, "train.weight_decay",
               self.weight_decay, "null (train.auto_decay picks it) or a number >= 0")
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer,
               f"one of {', '.join(OPTIMIZERS)}")
        _check(self.loss in LOSSES, "train.loss", self.loss, f"one of {', '.join(LOSSES)}")
        _check(self.num_negatives >= 1, "train.num_negatives", self.num_negatives,
               "an integer >= 1")
        _check(self.num_threads >= 0, "train.num_threads", self.num_threads, "an integer >= 0")


# ------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    num_negatives: int = MISSING
    ks: list[int] = MISSING
    # Seeds the sampled negatives; kept apart from the run seed so every run ranks the same lists.
    seed: int = MISSING
    # Users scored per matrix product.
    batch_size: int = MISSING
    # The validation metric that picks the reported epoch (centralized) or evaluated round
    # (federated), as protocol.metric.
    select_by: str = MISSING
    # Federated runs evaluate after every `every` rounds (and always after the last).
    every: int = MISSING
    # Also evaluate the global model on the server (simulation and benchmarks only: the server
    # then reads the whole dataset, which a real deployment does not have).
    server: bool = MISSING
    # Stop once this many evaluations in a row (epochs; federated: evaluated rounds) have not
    # beaten the best validation select_by so far; null: run every epoch or round.
    patience: int | None = MISSING

    def __post_init__(self) -> None:
        _check(self.num_negatives >= 1, "eval.num_negatives", self.num_negatives,
               "an integer >= 1")
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks", self.ks,
               "a non-empty list of integers >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")
        _check(self.every >= 1, "eval.every", self.every, "an integer >= 1")
        _check(self.patience is None or self.patience >= 1, "eval.patience", self.patience,
               "null (no early stop) or an integer >= 1")
        allowed = [f"sampled.{m}@{k}" for k in self.ks for m in ("hr", "ndcg")]
        allowed += [f"full.{m}@{k}" for k in self.ks for m in ("recall", "ndcg")]
        _check(self.select_by in allowed, "eval.select_by", self.select_by,
               f"one of {', '.join(allowed)}")


@dataclass
class AutoRoundsConfig:
    stops_on_validation: int = MISSING
    fixed: int = MISSING

    def __post_init__(self) -> None:
        for key in ("stops_on_validation", "fixed"):
            _check(getattr(self, key) >= 1, f"auto_rounds.{key}", getattr(self, key),
                   "an integer >= 1")


@dataclass
class AuditConfig:
    """What ``python -m fedrec.audit`` puts into the audited run and attacks; every run ignores
    it."""

    canaries: int = MISSING
    canary_length: int = MISSING
    shoppers: int = MISSING
    targets: int = MISSING
    cohorts: list[int] = MISSING
    confidence: float = MISSING
    seed: int = MISSING
    # python -m fedrec.audit.budgets: the epsilons it audits the run's mechanism at (and the
    # run without privacy).
    epsilons: list[float] = MISSING

    def __post_init__(self) -> None:
        _check(len(self.epsilons) >= 1 and all(e > 0 for e in self.epsilons), "audit.epsilons",
               self.epsilons, "a non-empty list of epsilons > 0")
        _check(len({float(e) for e in self.epsilons}) == len(self.epsilons), "audit.epsilons",
               self.epsilons, "distinct epsilons (each is audited into its own folder)")
        _check(self.canaries >= 2, "audit.canaries", self.canaries, "an integer >= 2")
        _check(self.canary_length >= 4, "audit.canary_length", self.canary_length,
               "an integer >= 4 (the split keeps a shopper's last two items for validation and "
               "test, and a training example reads an item before its own)")
        _check(self.shoppers >= 1, "audit.shoppers", self.shoppers, "an integer >= 1")
        _check(self.targets >= 1, "audit.targets", self.targets, "an integer >= 1")
        _check(len(self.cohorts) >= 1 and all(c >= 1 for c in self.cohorts), "audit.cohorts",
               self.cohorts, "a non-empty list of cohort sizes >= 1 (1: a shopper's own reply)")
        _check(0 < self.confidence < 1, "audit.confidence", self.confidence,
               "a probability in (0, 1), such as 0.95")


# --------------------------------------------------------------------------------- strategy
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
              "fedtrimmedavg", "fedmedian", "krum", "multikrum")
# Strategies whose aggregate is a weighted mean of the updates (the rest pick or trim updates).
MEAN_STRATEGIES = STRATEGIES[:6]
# Strategies whose aggregate is the weighted mean itself, with no server optimizer after it.
NOISED_MEAN_STRATEGIES = STRATEGIES[:2]
# Server optimizers that read the sent model afresh each round (Flower's FedOpt family), so the
# item table may take another step after theirs.
SERVER_OPTIMIZER_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")
ITEM_OPTIMIZERS = ("strategy", "sgd")


@dataclass
class StrategyConfig:
    name: str = MISSING
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    min_train_nodes: int = MISSING
    min_evaluate_nodes: int = MISSING
    min_available_nodes: int = MISSING
    # Keyword arguments of the Flower strategy class beyond the ones above (eta, beta, ...).
    params: dict[str, Any] = MISSING
    # Server step on the item table, as a multiple of the strategy's: the global item table moves
    # item_server_lr x (aggregate - current). A mean over clients dilutes an item's update by
    # the share of clients that hold it, which is tiny when every shopper is a client; the dense
    # layers, which every client trains, keep the strategy's step.
    item_server_lr: float = MISSING
    # Decoupled weight decay of the global item table, once a round after the step: the table
    # becomes stepped - item_decay x (the round's global table), as AdamW decays after Adam's
    # step. With Adam at the server, whose step is about as long for a rarely bought item's row
    # as for a common one's, it holds every row at the same small norm, as AdamW does centrally.
    item_decay: float = MISSING
    # What steps the item table: "strategy", the strategy's own step (times item_server_lr);
    # "sgd", plain SGD on the replies' weighted mean (current + item_server_lr x (mean -
    # current)) while a server optimizer steps the dense layers. Adam's per-coordinate scaling
    # suits the attention blocks, which every shopper trains, but not an item row, which few
    # shoppers move and whose mean the server lr already rescales.
    item_optimizer: str = MISSING

    def __post_init__(self) -> None:
        _check(self.name in STRATEGIES, "strategy.name", self.name,
               f"one of {', '.join(STRATEGIES)}")
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            _check(0 < value <= 1, f"strategy.{key}", value, "a number in (0, 1]")
        for key in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            value = getattr(self, key)
            _check(value >= 1, f"strategy.{key}", value, "an integer >= 1")
        _check(self.item_server_lr > 0, "strategy.item_server_lr", self.item_server_lr,
               "a number > 0")
        # FedAvgM keeps its own copy of the model between rounds, which a larger step on the item
        # table afterwards would contradict.
        _check(self.item_server_lr == 1 or self.name != "fedavgm", "strategy.item_server_lr",
               self.item_server_lr, "1.0 with strategy=fedavgm (use its server_learning_rate)")
        _check(0 <= self.item_decay < 1, "strategy.item_decay", self.item_decay,
               "a number in [0, 1)")
        _check(self.item_decay == 0 or self.name != "fedavgm", "strategy.item_decay",
               self.item_decay, "0.0 with strategy=fedavgm, which keeps its own copy of the model")
        _check(self.item_optimizer in ITEM_OPTIMIZERS, "strategy.item_optimizer",
               self.item_optimizer, f"one of {', '.join(ITEM_OPTIMIZERS)}")
        _check(self.item_optimizer == "strategy" or self.name in SERVER_OPTIMIZER_STRATEGIES,
               "strategy.item_optimizer", self.item_optimizer,
               f"strategy with strategy={self.name}: sgd replaces the step of a server optimizer "
               f"that reads the sent model afresh each round, one of "
               f"{', '.join(SERVER_OPTIMIZER_STRATEGIES)} (FedAvg's step already is SGD on the "
               f"mean; FedAvgM keeps its own copy of the model)")


# ---------------------------------------------------------------------------------- privacy
MECHANISMS = ("none", "dp_sgd", "central_dp")
# The key that sets each private mechanism's epsilon budget.
BUDGET_KEYS = {"dp_sgd": "privacy.target_epsilon", "central_dp": "privacy.max_epsilon"}


@dataclass
class PrivacyConfig:
    mechanism: str = MISSING

    def __post_init__(self) -> None:
        _check(self.mechanism in MECHANISMS, "privacy.mechanism", self.mechanism,
               f"one of {', '.join(MECHANISMS)}")


UNITS = ("shopper", "example")


def _check_relation(cfg: DpSgdConfig | CentralDpConfig, neighbouring: str, sampling: str,
                    why: str) -> None:
    """Each mechanism states the one relation and sampling its accountant is proved for."""
    _check(cfg.neighbouring == neighbouring, "privacy.neighbouring", cfg.neighbouring,
           f"{neighbouring} with privacy={cfg.mechanism} ({why})")
    _check(cfg.sampling == sampling, "privacy.sampling", cfg.sampling,
           f"{sampling} with privacy={cfg.mechanism} ({why})")


def _check_delta(delta: float | None) -> None:
    _check(delta is None or 0 < delta < 1, "privacy.delta", delta,
           "null (1 / n^1.1 for n protected units) or a number in (0, 1) below 1 / n")


@dataclass
class DpSgdConfig(PrivacyConfig):
    # What one (epsilon, delta) protects: shopper, a shopper's whole history in the client
    # (every example of theirs clipped as one); example, one training example (a history and
    # its next item), which does not protect an interaction (see docs/privacy.md).
    unit: str = MISSING
    # Stated, and checked against what the accountant assumes: add_remove and poisson.
    neighbouring: str = MISSING
    sampling: str = MISSING
    # The (epsilon, delta) bound on one unit of a client over the whole run.
    target_epsilon: float = MISSING
    # null: 1 / n^1.1 for n the federation's protected units (the server counts them in a
    # simulation; a deployment must set it). A client refuses a delta of 1 / (its units) or more.
    delta: float | None = MISSING
    max_grad_norm: float = MISSING
    accountant: str = MISSING
    # unit=example only: how Opacus computes per-example norms.
    grad_sample_mode: str = MISSING
    # Rounds a client plans its noise for; null: its expected share of num_rounds (the
    # strategy's sample size over the number of nodes). A client picked more often than
    # planned runs out of budget and refuses to train.
    planned_rounds: int | None = MISSING
    # unit=example: each example's own uniform negatives (DP-SGD cannot use other units'
    # targets), examples x this many item-tower passes per step.
    negatives_per_example: int = MISSING
    # unit=shopper: the uniform negatives a sampled shopper draws for a step, which all of that
    # shopper's examples share (they are one unit): read once per shopper, not per example.
    negatives_per_shopper: int = MISSING
    # unit=shopper: max_grad_norm split among groups of parameters ({name prefix: weight}), each
    # group's part of a shopper's gradient clipped to max_grad_norm x weight / sqrt(sum of the
    # weights squared): the whole still has max_grad_norm, so the noise and the accounting are
    # unchanged. A group of weight 0 does not train under DP-SGD (it keeps the public model's
    # values). Empty: one norm over all the parameters.
    clip_groups: dict[str, float] = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.unit in UNITS, "privacy.unit", self.unit, f"one of {', '.join(UNITS)}")
        if self.clip_groups:
            _check(self.unit == "shopper", "privacy.clip_groups", dict(self.clip_groups),
                   "{} with privacy.unit=example (groups are clipped by shopper only)")
            _check(all(w >= 0 for w in self.clip_groups.values())
                   and any(w > 0 for w in self.clip_groups.values()), "privacy.clip_groups",
                   dict(self.clip_groups), "{parameter-name prefix: weight >= 0}, a weight > 0")
        _check_relation(self, "add_remove", "poisson",
                        "Opacus' accountant bounds the Poisson-sampled Gaussian mechanism under"
                        " adding or removing one unit")
        _check(self.negatives_per_example >= 1, "privacy.negatives_per_example",
               self.negatives_per_example, "an integer >= 1")
        _check(self.negatives_per_shopper >= 1, "privacy.negatives_per_shopper",
               self.negatives_per_shopper, "an integer >= 1")
        _check(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon,
               "a number > 0")
        _check_delta(self.delta)
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm,
               "a number > 0")
        _check(self.accountant in ("rdp", "prv"), "privacy.accountant", self.accountant,
               "rdp or prv")
        _check(self.grad_sample_mode in ("hooks", "ghost"), "privacy.grad_sample_mode",
               self.grad_sample_mode, "hooks or ghost")
        _check(self.planned_rounds is None or self.planned_rounds >= 1,
               "privacy.planned_rounds", self.planned_rounds, "null or an integer >= 1")


@dataclass
class CentralDpConfig(PrivacyConfig):
    # Stated, and checked against what the accountant assumes: replace_one (a neighbouring
    # federation swaps one client's data for any other, so a sum of updates clipped to C moves
    # by up to 2C) and fixed_size (Flower samples a fixed number of clients without
    # replacement).
    neighbouring: str = MISSING
    sampling: str = MISSING
    # server: the server clips each update (it sees them unclipped); client: each client clips
    # its own update before sending it, the server only adds the noise.
    side: str = MISSING
    # fixed: every update clipped to clipping_norm; adaptive: the norm starts at clipping_norm
    # and follows the target_clipped_quantile of the update norms (Andrew et al., 2021).
    clipping: str = MISSING
    clipping_norm: float = MISSING
    # Noise standard deviation over clipping_norm, as Flower's wrappers take it (the accountant
    # sees it over the sensitivity, 2 x clipping_norm). null: the least that lets num_rounds
    # rounds fit in max_epsilon.
    noise_multiplier: float | None = MISSING
    # The run stops, and saves its model, before a round would take epsilon past this.
    max_epsilon: float = MISSING
    # null: 1 / n^1.1 for n the number of clients; 1 / n or more is refused.
    delta: float | None = MISSING
    target_clipped_quantile: float = MISSING
    clip_norm_lr: float = MISSING
    # Noise on the count of clipped updates (adaptive only); null: Flower's choice, the number
    # of sampled clients / 20.
    clipped_count_stddev: float | None = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_relation(self, "replace_one", "fixed_size",
                        "Flower samples a fixed number of clients without replacement, whose "
                        "accountant is proved for replacing one client")
        _check(self.side in ("server", "client"), "privacy.side", self.side, "server or client")
        _check(self.clipping in ("fixed", "adaptive"), "privacy.clipping", self.clipping,
               "fixed or adaptive")
        _check(self.clipping_norm > 0, "privacy.clipping_norm", self.clipping_norm,
               "a number > 0")
        _check(self.noise_multiplier is None or self.noise_multiplier > 0,
               "privacy.noise_multiplier", self.noise_multiplier, "null or a number > 0")
        _check(self.max_epsilon > 0, "privacy.max_epsilon", self.max_epsilon, "a number > 0")
        _check_delta(self.delta)
        _check(0 < self.target_clipped_quantile < 1, "privacy.target_clipped_quantile",
               self.target_clipped_quantile, "a number in (0, 1)")
        _check(self.clip_norm_lr > 0, "privacy.clip_norm_lr", self.clip_norm_lr,
               "a number > 0")
        _check(self.clipped_count_stddev is None or self.clipped_count_stddev > 0,
               "privacy.clipped_count_stddev", self.clipped_count_stddev,
               "null or a number > 0")


# ----------------------------------------------------------------------------------- secagg
@dataclass
class SecAggConfig:
    # off: the server sees every client's update; on: SecAgg+ (Flower's legacy workflow), the
    # server learns only their weighted sum.
    enabled: bool = MISSING
    # Each client secret-shares its mask seeds with this many neighbours. Odd: Flower's SecAgg+
    # crashes on an even count smaller than the round's sample.
    num_shares: int = MISSING
    # Shares needed to rebuild a dropped client's masks; fewer colluding neighbours learn nothing.
    reconstruction_threshold: int = MISSING
    # Values are clipped to +-clipping_range (after weighting) and quantized to
    # quantization_range levels before masking: the aggregate's rounding error is about
    # 2 * clipping_range / quantization_range per unit weight.
    clipping_range: float = MISSING
    quantization_range: int = MISSING
    # The largest client weight (training examples, or 1 under a privacy mechanism): updates
    # are scaled by weight / max_weight, so a client above it would overflow (it refuses and
    # drops out), and one far below it loses precision. null: twice the largest client's
    # examples, which the server knows only in simulation; every client receives it.
    max_weight: float | None = MISSING
    # Seconds the server waits for each SecAgg+ stage; a client slower than this drops out.
    # null waits for ever.
    timeout: float | None = MISSING

    def __post_init__(self) -> None:
        _check(self.num_shares >= 3 and self.num_shares % 2 == 1, "secagg.num_shares",
               self.num_shares, "an odd integer >= 3 (Flower's SecAgg+ fails on even counts)")
        _check(2 <= self.reconstruction_threshold < self.num_shares,
               "secagg.reconstruction_threshold", self.reconstruction_threshold,
               f"an integer from 2 to secagg.num_shares - 1 = {self.num_shares - 1}")
        _check(self.clipping_range > 0, "secagg.clipping_range", self.clipping_range,
               "a number > 0")
        _check(0 < self.quantization_range < 2**32, "secagg.quantization_range",
               self.quantization_range, "an integer in [1, 2**32)")
        _check(self.max_weight is None or self.max_weight > 0, "secagg.max_weight",
               self.max_weight, "null or a number > 0")
        _check(self.timeout is None or self.timeout > 0, "secagg.timeout", self.timeout,
               "null or a number of seconds > 0")


# ------------------------------------------------------------------------------------- root
@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    partition: PartitionConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    strategy: StrategyConfig = MISSING
    privacy: PrivacyConfig = MISSING
    secagg: SecAggConfig = MISSING
    # simulation: the ServerApp can read the whole dataset, and each simulated node takes its
    # partition of it. deployment: each SuperNode reads only its own node-config data-path, and
    # the server reads only the item catalogue.
    federation: str = MISSING
    # What a sweep job (fedrec.sweep) runs: a federated simulation, or the centralized reference.
    mode: str = MISSING
    # After a simulation, print the guide's top 10 for guide_shopper.
    guide_example: bool = MISSING
    # null: a made-up shopper whose history is drawn from the public catalogue (no real
    # shopper's history reaches the log); a user id names a real one explicitly.
    guide_shopper: str | None = MISSING
    # null: each client draws a secret seed for its own sampling (negatives, shuffles) that
    # never leaves it, so the server cannot replay it. An integer makes a simulation
    # reproducible, at the price of a seed the server knows.
    client_seed: int | None = MISSING
    # An absolute path: the server appends the layout of every message it sends and receives
    # (record names and keys, never values), to check against the wire contract.
    wire_log: str | None = MISSING
    # Seconds the server waits for a round's replies; a node silent that long counts as failed.
    round_timeout: float = MISSING
    # A stopped federated run's output_dir: go on from its last completed round, into it.
    resume: str | None = MISSING
    seed: int = MISSING
    # Federated rounds; null: auto_rounds' count for the run's kind (see stops_on_validation).
    num_rounds: int | None = MISSING
    auto_rounds: AutoRoundsConfig = MISSING
    # What python -m fedrec.audit attacks; every run ignores it.
    audit: AuditConfig = MISSING
    name: str = MISSING
    # Where a run writes config.yaml, metrics.jsonl, summary.json and model.pt.
    output_dir: str = MISSING

    def __post_init__(self) -> None:
        if self.num_rounds is None:
            self.num_rounds = (self.auto_rounds.stops_on_validation if self.stops_on_validation
                               else self.auto_rounds.fixed)
        _check(self.num_rounds >= 1, "num_rounds", self.num_rounds,
               "null (auto_rounds decides) or an integer >= 1")
        _check(self.client_seed is None or self.client_seed >= 0, "client_seed",
               self.client_seed, "null (a secret per client) or an integer >= 0")
        _check(self.round_timeout > 0, "round_timeout", self.round_timeout, "seconds > 0")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a directory path")
        if self.train.catalogue_pretraining.steps > 0:
            use_features = getattr(self.model, "use_user_features", False)
            _check(not use_features, "model.use_user_features", use_features,
                   "false with train.catalogue_pretraining.steps > 0: a made-up shopper has no "
                   "user features, and no real shopper's are public")
        if self.privacy.mechanism == "central_dp":
            # The noise is calibrated to a mean of clipped updates, and Flower's DP wrappers
            # (and PoolNoise) add it to what the wrapped strategy returns. That is the mean
            # only for FedAvg and FedProx (whose term acts on the clients). A server optimizer
            # (FedAdam, FedYogi, FedAdagrad, FedAvgM) returns its step, in which one client's
            # update can move a coordinate by the whole server lr: the noise would not cover it.
            _check(self.strategy.name in NOISED_MEAN_STRATEGIES, "strategy", self.strategy.name,
                   "with privacy=central_dp, a strategy whose aggregate is the mean the noise "
                   f"is calibrated to: one of {', '.join(NOISED_MEAN_STRATEGIES)} (a server "
                   "optimizer's step is not covered by noise added after it)")
        if self.secagg.enabled:
            self._check_secagg()
        _check(self.federation in ("simulation", "deployment"), "federation", self.federation,
               "simulation or deployment")
        _check(self.mode in ("federated", "centralized"), "mode", self.mode,
               "federated or centralized")
        if self.federation == "deployment":
            self._check_deployment()
        if isinstance(self.privacy, DpSgdConfig):
            personal = getattr(self.model, "personal_embedding", False)
            _check(not personal, "model.personal_embedding", personal,
                   "false with privacy=dp_sgd: the personal vector trains without noise and "
                   "then shapes the shared updates, which DP-SGD's accounting does not cover")
            _check(self.privacy.unit == "example" or self.train.loss == "sampled_softmax",
                   "train.loss", self.train.loss,
                   "sampled_softmax with privacy=dp_sgd privacy.unit=shopper: a sampled "
                   "shopper's examples share its negatives in one softmax (bpr: "
                   "privacy.unit=example)")
        if self.pool_nodes is not None:
            self._check_pool()
        if self.resume is not None:
            _check(self.privacy.mechanism != "dp_sgd", "resume", self.resume,
                   "null with privacy=dp_sgd: each client's spent budget lives in that run's "
                   "node state, which a new run cannot see")

    @property
    def stops_on_validation(self) -> bool:
        """Whether a federated run can end early on validation: only when the clients' validation
        figures reach the server, which no privacy mechanism and no SecAgg+ run of fedrec lets
        them do (nothing of either covers them). A run that cannot trains every round, as its
        noise is planned for them."""
        return self.privacy.mechanism == "none" and not self.secagg.enabled

    @property
    def pooled(self) -> bool:
        """Cross-device in a simulation: the shoppers are virtual clients on SuperNodes."""
        return self.federation == "simulation" and isinstance(self.partition,
                                                               UserPartitionConfig)

    @property
    def pool_nodes(self) -> int | None:
        """The pool's size when several shoppers share a SuperNode (None: one per shopper)."""
        return self.partition.pool_nodes if self.pooled else None  # type: ignore[attr-defined]

    def _check_pool(self) -> None:
        """What needs each shopper's reply on its own, which a pool node's mean is not."""
        alone = "each shopper's update on its own, but a pool node replies with its shoppers'"
        fix = "mean: set partition.pool_nodes=null (one SuperNode per shopper)"
        if isinstance(self.privacy, CentralDpConfig):
            # Each shopper's update is clipped on its pool node, as its device would clip it;
            # the server only sees the nodes' means of clipped updates.
            _check(self.privacy.side == "client", "privacy.side", self.privacy.side,
                   f"client with privacy=central_dp on a pool of nodes: server-side clipping "
                   f"needs {alone} {fix}")
            _check(self.privacy.clipping == "fixed", "privacy.clipping", self.privacy.clipping,
                   f"fixed with privacy=central_dp on a pool of nodes: adaptive clipping needs "
                   f"each shopper's clipped-or-not bit, but a pool node replies with its "
                   f"shoppers' {fix}")
        _check(not self.secagg.enabled, "secagg", "on",
               f"off on a pool of nodes: SecAgg+ would mask {alone} {fix}")
        _check(self.strategy.name in MEAN_STRATEGIES, "strategy", self.strategy.name,
               f"on a pool of nodes, a strategy that averages the updates (one of "
               f"{', '.join(MEAN_STRATEGIES)}): {self.strategy.name} needs {alone} {fix}")
        _check(self.strategy.fraction_evaluate == 1, "strategy.fraction_evaluate",
               self.strategy.fraction_evaluate,
               "1.0 on a pool of nodes, where each node evaluates every shopper it owns; or "
               "set partition.pool_nodes=null (one SuperNode per shopper)")

    def _check_deployment(self) -> None:
        """What a server that holds no shopper data cannot do."""
        catalogue = getattr(self.dataset, "catalogue", None)
        _check(catalogue is not None, "dataset.catalogue", catalogue,
               "with federation=deployment, the item catalogue every node shares (CSV "
               "item,attributes[,title]; scripts/split_nodes.py writes one)")
        _check(not self.eval.server, "eval.server", self.eval.server,
               "false with federation=deployment: the server holds no test data")
        use_features = getattr(self.model, "use_user_features", False)
        _check(not use_features, "model.use_user_features", use_features,
               "false with federation=deployment: each node would build its own vocabulary")
        if self.secagg.enabled:
            _check(self.secagg.max_weight is not None, "secagg.max_weight", None,
                   "a number with federation=deployment: the server cannot count the nodes' "
                   "examples; set at least the largest node's training examples (1 under a "
                   "privacy mechanism, whose clients all weigh 1)")

    def _check_secagg(self) -> None:
        """What cannot work when the server sees only the sum of the updates."""
        _check(self.strategy.name in MEAN_STRATEGIES, "strategy", self.strategy.name,
               f"with secagg=on, a strategy built on the weighted mean, which is all SecAgg+ "
               f"reveals (Krum, trimmed mean and median need each update): one of "
               f"{', '.join(MEAN_STRATEGIES)}")
        # Flower's legacy server optimizers keep their own copy of the model between rounds.
        _check(self.strategy.item_server_lr == 1 or self.strategy.name in ("fedavg", "fedprox"),
               "strategy.item_server_lr", self.strategy.item_server_lr,
               f"1.0 with secagg=on and strategy={self.strategy.name} (only fedavg and fedprox "
               "take a larger item-table step there)")
        _check(self.strategy.item_decay == 0 or self.strategy.name in ("fedavg", "fedprox"),
               "strategy.item_decay", self.strategy.item_decay,
               f"0.0 with secagg=on and strategy={self.strategy.name} (only fedavg and fedprox "
               "decay the item table there)")
        _check(self.strategy.item_optimizer == "strategy", "strategy.item_optimizer",
               self.strategy.item_optimizer,
               "strategy with secagg=on: Flower's legacy server optimizers step every parameter")
        privacy = self.privacy
        if isinstance(privacy, CentralDpConfig):
            _check(privacy.side == "client", "privacy.side", privacy.side,
                   "client with secagg=on: server-side clipping needs each update in the clear")
            _check(privacy.clipping == "fixed", "privacy.clipping", privacy.clipping,
                   "fixed with secagg=on: adaptive clipping sends each client's clipped-or-not "
                   "bit in the clear, next to the masked update")


_SCHEMAS = {
    "schema": {"fedrec": Config},
    "schema/dataset": {
        "synthetic": SyntheticDatasetConfig,
        "file": FileDatasetConfig,
        "sequence": SequenceDatasetConfig,
        "csv": CsvDatasetConfig,
    },
    "schema/partition": {"user": UserPartitionConfig, "silo": SiloPartitionConfig},
    "schema/model": {"two_tower": TwoTowerConfig, "popularity": ModelConfig},
    "schema/train": {"train": TrainConfig},
    "schema/eval": {"eval": EvalConfig},
    "schema/strategy": {"strategy": StrategyConfig},
    "schema/privacy": {"none": PrivacyConfig, "dp_sgd": DpSgdConfig,
                       "central_dp": CentralDpConfig},
    "schema/secagg": {"secagg": SecAggConfig},
}


def register_schemas() -> None:
    store = ConfigStore.instance()
    for group, nodes in _SCHEMAS.items():
        for name, node in nodes.items():
            store.store(group=group, name=name, node=node)


def parse_overrides(overrides: str | list[str] | tuple[str, ...]) -> list[str]:
    """Accept overrides as one shell-quoted string (as Flower's run_config carries them)."""
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


def override_key(override: str) -> str:
    """The key an override sets: ``privacy.side`` of ``+privacy.side=client``."""
    return override.split("=", 1)[0].lstrip("+~")


def compose_config(overrides: str | list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/ with the overrides and validate every value; raise ConfigError if bad."""
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config directory {CONF_DIR} is missing: this fedrec install is "
                          "incomplete; reinstall it (pip install fedrec, or -e . in a checkout)")
    setup_globals()  # registers Hydra's ${now:...} resolver used by output_dir
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=parse_overrides(overrides))
        OmegaConf.resolve(cfg)
        _refuse_unknown_keys(cfg)
        to_typed(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad configuration: {_explain(err)}") from err
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _refuse_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra's `+key=value` adds a key the schema does not have, and the typed config would
    drop it without a word: a misspelt `+train.lrr=0.1` must fail like `train.lrr=0.1` does."""
    schema = OmegaConf.get_type(node)
    known = ({f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema)
             else None)
    for key in node:
        if known is not None and key not in known:
            raise ConfigError(f"bad configuration: {prefix}{key} is not a key of "
                              f"{prefix.rstrip('.') or 'the config'}; allowed: "
                              f"{', '.join(sorted(known))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


# Lines of Hydra's and OmegaConf's messages that repeat the key, the search path, or advise
# what fedrec forbids (appending keys).
_NOISE = ("To append to your config", "reference_type=", "object_type=", "Could not override",
          "Set the environment variable HYDRA_FULL_ERROR", "provider=")


def _explain(err: BaseException) -> str:
    """One line from Hydra's messages, which wrap the useful OmegaConf one (which key, which
    type) in their cause and spread it over several lines with the key and the options."""
    lines = []
    while err is not None:
        lines += str(err).split("\nConfig search path")[0].splitlines()
        err = err.__cause__  # type: ignore[assignment]
    lines = [line.strip() for line in lines]
    key = next((line.split(":", 1)[1].strip() for line in lines
                if line.startswith("full_key:")), None)
    parts: list[str] = []
    options: list[str] | None = None
    for line in lines:
        if line.startswith("full_key:"):
            continue
        if line.startswith("Available options in"):
            options = []
            parts.append(line.replace("Available", "available"))
        elif options is not None and line and " " not in line:
            options.append(line)
            parts[-1] = parts[-1].split(":")[0] + ": " + ", ".join(options)
        elif "missing mandatory value" in line and key:
            parts.append(f"{key} must be set: it has no default")
        elif line and not line.startswith(_NOISE) and line not in parts:
            options = None
            parts.append(line)
    if key and key.startswith("privacy.clip_groups.") and any("is not in struct" in line
                                                              for line in lines):
        # Hydra merges a mapping into the default's keys, and that default holds none; any other
        # key "not in struct" is a typo, which this hint would mislead.
        parts.append("a mapping such as privacy.clip_groups takes new keys with ++, as in "
                     "++privacy.clip_groups={item_mlp:1,user_mlp:1}")
    text = "; ".join(parts)
    return f"{key}: {text}" if key and not text.startswith(key) else text


def to_typed(cfg: DictConfig) -> Config:
    """The validated, typed view of a composed config (runs every __post_init__ check)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def federated_config(composed: DictConfig) -> Config:
    """The typed config of a federated run, which needs a model with parameters to federate."""
    cfg = to_typed(composed)
    if not isinstance(cfg.model, TwoTowerConfig):
        raise ConfigError(f"model={cfg.model.kind} has no parameters to federate: "
                          "use model=two_tower (run the baseline with fedrec.centralized)")
    if not cfg.stops_on_validation:
        # The clients' validation figures never reach such a run's server, so nothing could
        # stop it early: it trains num_rounds, as its noise is planned (the server logs it).
        cfg.eval.patience = None
    return cfg


_PLAIN = (str, int, float, bool, type(None))


def config_from_spec(cls: type, spec: object, what: str) -> Any:
    """A config dataclass from a plain dict (as model.pt stores its model and data specs),
    checked as a composed one is: every field present, nothing else, plain values only. No
    Hydra composition and no interpolation: a stored ``${...}`` stays a string."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{what} is a {type(spec).__name__}, expected a mapping")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(spec) - fields), sorted(fields - set(spec))
    if unknown or missing:
        raise ConfigError(f"{what} does not describe a {cls.__name__}: unknown keys "
                          f"{unknown or 'none'}, missing keys {missing or 'none'}")
    for key, value in spec.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _PLAIN) for v in values):
            raise ConfigError(f"{what}.{key}={value!r} is not a plain value")
    return cls(**spec)


def dataset_from_spec(spec: object, what: str = "data spec") -> DatasetConfig:
    """The dataset config a data spec describes; its format picks the class."""
    fmt = spec.get("format") if isinstance(spec, dict) else None
    _check(fmt in DATASET_FORMATS, f"{what}.format", fmt, f"one of {', '.join(DATASET_FORMATS)}")
    cls = {"synthetic": SyntheticDatasetConfig, "sequence": SequenceDatasetConfig,
           "csv": CsvDatasetConfig}.get(str(fmt), FileDatasetConfig)
    return config_from_spec(cls, spec, what)
