"""The node's task: its shoppers' data, a round of training, evaluation.

``fedrec.client.app`` only moves Flower records in and out of these functions. Raw
interactions, user ids and personal vectors stay here: what leaves is listed, per mechanism, in
``fedrec.wire`` and docs/privacy.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedrec.accounting import check_delta, plan_dp_sgd
from fedrec.client.dp_sgd import DpSgdLedger, clip_groups, train_dp_sgd
from fedrec.config import Config, ConfigError, DpSgdConfig, compose_config, federated_config
from fedrec.data.dataset import Dataset
from fedrec.data.federation import Federation, build_federation
from fedrec.data.partition import client_users
from fedrec.data.sequences import EvalCases, TrainExamples, heldout_cases, training_examples
from fedrec.data.split import Split
from fedrec.metrics import RankingSums, evaluate_case_sets
from fedrec.model import TwoTower
from fedrec.train import (
    DecayChoice,
    Objective,
    TrainResult,
    choose_weight_decay,
    make_loader,
    make_optimizer,
    train,
)
from fedrec.wire import OUTSIDE_PLAN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShopperRows:
    """Where each shopper's training examples sit among a node's, found once: a round then
    finds its cohort's rows in time that grows with the cohort, not with the node's population."""

    shoppers: torch.Tensor  # sorted: the shoppers with at least one example
    starts: torch.Tensor  # where each one's rows begin in ``order``
    counts: torch.Tensor
    order: torch.Tensor  # the rows, shopper by shopper, each shopper's in their own order

    @classmethod
    def of(cls, user: torch.Tensor) -> ShopperRows:
        order = torch.argsort(user, stable=True)
        shoppers, counts = torch.unique_consecutive(user[order], return_counts=True)
        return cls(shoppers, torch.cumsum(counts, 0) - counts, counts, order)

    def count(self, shoppers: list[int]) -> list[int]:
        """Each shopper's number of examples (0 for one without any)."""
        return [int(self.counts[i]) if i >= 0 else 0 for i in self._index(shoppers)]

    def rows(self, shoppers: list[int]) -> torch.Tensor:
        """The rows of ``shoppers``, shopper after shopper in the order given."""
        spans = [self.order[int(self.starts[i]):int(self.starts[i] + self.counts[i])]
                 for i in self._index(shoppers) if i >= 0]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)

    def _index(self, shoppers: list[int]) -> list[int]:
        """Each shopper's place in ``self.shoppers``, -1 for one without examples."""
        if not len(self.shoppers):
            return [-1] * len(shoppers)
        asked = torch.tensor(shoppers, dtype=self.shoppers.dtype)
        found = torch.searchsorted(self.shoppers, asked).clamp(max=len(self.shoppers) - 1)
        hit = self.shoppers[found] == asked
        return [int(f) if h else -1 for f, h in zip(found.tolist(), hit.tolist(), strict=True)]


@dataclass(frozen=True)
class NodeData:
    cfg: Config
    dataset: Dataset  # the catalogue (ids, attributes) every node shares
    users: np.ndarray
    split: Split
    examples: TrainExamples
    objective: Objective
    valid_cases: EvalCases
    test_cases: EvalCases
    shopper_rows: ShopperRows
    weight_decay: float  # what this node's optimizer decays by (_client_decay), chosen once


@dataclass(frozen=True)
class TrainRequest:
    """What a train request asks of the node, read from its config record."""

    run_round: int  # Flower counts a resumed run's rounds from 1 again: plus the offset
    lr: float  # on its schedule: train.lr x round_lr_decay^(run_round - 1)
    local_epochs: int
    batch_size: int
    proximal_mu: float
    dp_steps_per_epoch: int | None
    dp_delta: float | None
    dp_planned_rounds: int | None
    # On a pool of virtual shoppers: the sampled shoppers this node owns (None: every client
    # the node holds, as a shop or a device is one).
    cohort: tuple[int, ...] | None

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> TrainRequest:
        run_round = int(config["server-round"]) + int(config.get("round-offset", 0))
        optional = {key: config.get(key) for key in
                    ("dp-steps-per-epoch", "dp-delta", "dp-planned-rounds")}
        return cls(run_round=run_round,
                   lr=float(config["lr"]) * float(config["lr-decay"]) ** (run_round - 1),
                   local_epochs=int(config["local-epochs"]),
                   batch_size=int(config.get("batch-size", 0)),
                   proximal_mu=float(config.get("proximal-mu", 0.0)),
                   dp_steps_per_epoch=_maybe(int, optional["dp-steps-per-epoch"]),
                   dp_delta=_maybe(float, optional["dp-delta"]),
                   dp_planned_rounds=_maybe(int, optional["dp-planned-rounds"]),
                   cohort=(None if config.get("cohort") is None else
                           tuple(int(c) for c in config["cohort"])))  # type: ignore[union-attr]


def _maybe(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


class Refusal(Exception):
    """The node declines a request, with Flower error ``code`` (fedrec.wire) and a reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class ShopperData:
    """One virtual shopper of a pool node, as the shopper's own device would hold it: the
    shopper's training examples, and the objective built from them alone."""

    cfg: Config
    dataset: Dataset
    users: np.ndarray  # the one shopper
    examples: TrainExamples
    objective: Objective
    weight_decay: float  # chosen from this shopper's history alone, as their device would


# What a round of training reads: a node's data, or one of its virtual shoppers'.
TrainingData = NodeData | ShopperData


def trainees(node: NodeData, request: TrainRequest) -> list[int] | None:
    """Who trains in this round on this node, each as its own client: the node itself (None: a
    shop, a device, a pool node of one shopper), or the sampled shoppers a pool node owns, each
    alone. A shopper the node does not own is refused (``Refusal``, OUTSIDE_PLAN): its state
    lives on another node."""
    owned = node.users  # sorted
    if not node.cfg.pooled or (len(owned) == 1 and set(request.cohort or owned.tolist())
                               == set(owned.tolist())):
        return None  # a node of one shopper is that shopper's device
    asked = owned.tolist() if request.cohort is None else list(request.cohort)
    place = np.searchsorted(owned, asked).clip(max=len(owned) - 1)
    strangers = [shopper for shopper, at in zip(asked, place, strict=True)
                 if owned[at] != shopper]
    if strangers:
        raise Refusal(OUTSIDE_PLAN, f"the request names shoppers {strangers[:5]} that this "
                                    "node does not hold")
    return asked


def shopper_data(node: NodeData, shopper: int) -> ShopperData:
    rows = node.shopper_rows.rows([shopper])
    examples = TrainExamples(node.examples.history[rows], node.examples.target[rows],
                             node.examples.user[rows])
    return ShopperData(node.cfg, node.dataset, np.array([shopper]), examples,
                       _objective(node.cfg, examples, node.dataset.num_items),
                       _client_decay(node.cfg, examples).weight_decay)


def dp_sgd_ledger(node: TrainingData, request: TrainRequest,
                  saved: DpSgdLedger | None) -> DpSgdLedger:
    """The node's DP-SGD budget as earlier rounds left it (``saved``), or its plan on its first
    round. The plan is the client's own: its steps come from its config, never from the
    request, and a request that asks for other steps, or a delta its data does not allow, is
    refused (``Refusal``, OUTSIDE_PLAN)."""
    cfg, step = node.cfg.privacy, node.cfg.train.dp_sgd
    assert isinstance(cfg, DpSgdConfig)
    asked = (request.local_epochs, request.dp_steps_per_epoch)
    if asked != (step.local_epochs, step.steps_per_epoch):
        raise Refusal(OUTSIDE_PLAN, (
            f"the request asks for local-epochs={asked[0]} dp-steps-per-epoch={asked[1]}, but "
            f"this client's DP-SGD plan trains local_epochs={step.local_epochs} "
            f"steps_per_epoch={step.steps_per_epoch} a round"))
    if saved is not None:
        return saved
    delta = cfg.delta if cfg.delta is not None else request.dp_delta
    if delta is None or request.dp_planned_rounds is None:
        raise Refusal(OUTSIDE_PLAN, "the request lacks dp-delta or dp-planned-rounds, the "
                                    "public inputs of this client's DP-SGD plan")
    try:
        check_delta(delta, protected_units(node), f"{cfg.unit}s on this client")
    except ConfigError as err:  # zero units is refused here too
        raise Refusal(OUTSIDE_PLAN, str(err)) from err
    plan = plan_dp_sgd(cfg, step, delta=delta, planned_rounds=request.dp_planned_rounds)
    return DpSgdLedger(cfg.accountant, cfg.target_epsilon, plan, [])


class NodeHolder:
    """What a ClientApp process keeps between messages, for one run at a time: the run's
    config, composed once, and each node's data, read once. A simulation process serves many
    virtual nodes of a run, so the dataset is loaded once and each node's slice cut once; a
    message of another run starts afresh, so files are read again and nothing of the last run's
    config carries over."""

    def __init__(self) -> None:
        self._run: tuple[int, str] | None = None  # (run id, overrides) of the run held
        self._cfg: Config | None = None
        self._federations: dict[str | None, Federation] = {}
        self._nodes: dict[tuple[int | None, int | None, str | None], NodeData] = {}
        self._shopper_models: dict[int, TwoTower] = {}  # by id of a pool node's NodeData

    def config(self, run_id: int, overrides: str) -> Config:
        if (run_id, overrides) != self._run or self._cfg is None:
            cfg = federated_config(compose_config(overrides))
            self._run, self._cfg = (run_id, overrides), cfg
            self._federations, self._nodes, self._shopper_models = {}, {}, {}
        return self._cfg

    def node(self, run_id: int, overrides: str, partition_id: int | None,
             num_partitions: int | None, data_path: str | None) -> NodeData:
        cfg = self.config(run_id, overrides)
        key = (partition_id, num_partitions, data_path)
        if key not in self._nodes:
            check_node_config(cfg, partition_id, num_partitions, data_path)
            if data_path not in self._federations:
                self._federations[data_path] = build_federation(cfg, data_path)
            self._nodes[key] = load_node(self._federations[data_path], partition_id,
                                         num_partitions, data_path)
        return self._nodes[key]

    def shopper_model(self, node: NodeData) -> TwoTower:
        """One model for the virtual shoppers of a pool node, loaded with the global model
        before each shopper trains: building one per shopper cost as much as training it."""
        if id(node) not in self._shopper_models:
            self._shopper_models[id(node)] = node_model(node)
        return self._shopper_models[id(node)]


def check_node_config(cfg: Config, partition_id: int | None, num_partitions: int | None,
                      data_path: str | None) -> None:
    """A node's own config (its Flower node config) against the run's federation."""
    if data_path is not None:
        if cfg.federation != "deployment":
            raise ConfigError(f"this node reads its own data-path={data_path!r}, but the run has"
                              " federation=simulation: add federation=deployment (and "
                              "dataset.catalogue) to the overrides")
    elif cfg.federation == "deployment":
        raise ConfigError("federation=deployment, but this node has no data-path in its "
                          "node config: start it with --node-config \"data-path='...'\"")
    elif partition_id is None or num_partitions is None:
        raise ConfigError("this node has neither partition-id/num-partitions (simulation) "
                          "nor data-path (deployment) in its node config")


def load_node(fed: Federation, partition_id: int | None, num_partitions: int | None,
              data_path: str | None = None) -> NodeData:
    """A simulated node's partition (partition_id of num_partitions) of ``fed``, or, in a
    deployment, everything in the node's own ``data_path`` (which ``fed`` was built from)."""
    if data_path is None:
        fed.check_nodes(num_partitions)
        return _node_data(fed, fed.node_users(partition_id))
    return _node_data(fed, client_users(fed.assignment, 0))


def _node_data(fed: Federation, users: np.ndarray) -> NodeData:
    cfg, dataset = fed.cfg, fed.dataset
    split = fed.split.for_users(users)
    examples = training_examples(split.train, dataset.num_items, cfg.model.max_history)
    valid_cases, test_cases = (
        heldout_cases(split, part, num_items=dataset.num_items, max_history=cfg.model.max_history,
                      num_negatives=cfg.eval.num_negatives, seed=cfg.eval.seed)
        for part in ("valid", "test"))
    objective = _objective(cfg, examples, dataset.num_items)
    decay = _client_decay(cfg, examples)
    log.info("node of %d shoppers: %s", len(users), decay.why)
    return NodeData(cfg, dataset, users, split, examples, objective, valid_cases, test_cases,
                    ShopperRows.of(examples.user), decay.weight_decay)


def _client_decay(cfg: Config, examples: TrainExamples) -> DecayChoice:
    """The weight decay a client trains with. Under DP-SGD, the public train.dp_sgd.weight_decay:
    a choice made from the client's shoppers would shape every step outside the noise."""
    if isinstance(cfg.privacy, DpSgdConfig):
        decay = cfg.train.dp_sgd.weight_decay
        return DecayChoice(decay, f"train.dp_sgd.weight_decay={decay:g}")
    return choose_weight_decay(cfg.train, examples.user, federated=True)


def _objective(cfg: Config, examples: TrainExamples, num_items: int) -> Objective:
    privacy = cfg.privacy
    if not isinstance(privacy, DpSgdConfig):
        return Objective.from_config(cfg.train, examples, num_items)
    if privacy.unit == "shopper":
        return Objective.from_config(cfg.train, examples, num_items,
                                     shopper_negatives=privacy.negatives_per_shopper)
    return Objective.from_config(cfg.train, examples, num_items,
                                 per_example_negatives=privacy.negatives_per_example)


def node_model(node: TrainingData) -> TwoTower:
    personal = node.users if node.cfg.model.personal_embedding else None
    return TwoTower.for_dataset(node.cfg.model, node.dataset, personal_users=personal)


def protected_units(node: TrainingData) -> int:
    """How many units DP-SGD protects on this node: its shoppers with training examples, or
    its examples."""
    privacy = node.cfg.privacy
    if isinstance(privacy, DpSgdConfig) and privacy.unit == "example":
        return len(node.examples)
    return int(torch.unique(node.examples.user).numel())


def train_round(
    node: TrainingData,
    model: TwoTower,
    *,
    lr: float,
    local_epochs: int,
    batch_size: int,
    proximal_mu: float,
    seed: int,
    ledger: DpSgdLedger | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` (already holding the global shared state) on the node's examples; with a
    ``ledger``, by DP-SGD on the ledger's plan (which fixes the steps: ``local_epochs`` and
    ``batch_size`` are unused), recording the round in the ledger. ``seed``: the client's own
    secret for the round, never the server's. Where the config keeps the optimizer's state,
    the optimizer starts from ``optimizer_state`` (the last round's, or None) and the result
    carries its state after the round."""
    after_step = proximal_step(model, lr * proximal_mu) if proximal_mu > 0 else None
    privacy = node.cfg.privacy
    trained = model.parameters()
    if ledger is not None:
        if model.personal is not None:  # refused when the config is composed; never here
            raise ValueError("DP-SGD does not cover a personal embedding")
        assert isinstance(privacy, DpSgdConfig)
        # A clipping group of weight 0 keeps the public model's values: no step moves it.
        names = {name for group, _ in clip_groups(model, privacy) for name in group}
        trained = (p for name, p in model.named_parameters() if name in names)
    optimizer = make_optimizer(trained, node.cfg.train.optimizer, lr=lr,
                               weight_decay=node.weight_decay)
    keep = (node.cfg.train.dp_sgd if ledger is not None else node.cfg.train).keep_optimizer_state
    if keep and optimizer_state is not None:
        load_optimizer_state(optimizer, optimizer_state)
    if ledger is None:
        loader = make_loader(node.examples, batch_size, seed)
        result = train(model, optimizer, loader, node.objective, epochs=local_epochs, seed=seed,
                       after_step=after_step)
    else:
        assert isinstance(privacy, DpSgdConfig)
        result = train_dp_sgd(model, optimizer, node.examples,
                              node.objective, ledger, privacy, node.cfg.train.dp_sgd, seed=seed,
                              noise_seed=None if node.cfg.client_seed is None else seed,
                              after_step=after_step)
    if not keep:
        return result
    return replace(result, optimizer_state=saved_optimizer_state(optimizer))


def saved_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (Adam's step and moments) as flat tensors, as a
    Context.state ArrayRecord holds them: ``"<parameter index>.<key>"``."""
    return {f"{index}.{key}": torch.as_tensor(value).clone()
            for index, state in optimizer.state_dict()["state"].items()
            for key, value in state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer,
                         saved: dict[str, torch.Tensor]) -> None:
    """``saved`` (``saved_optimizer_state``) into ``optimizer``, whose own hyper-parameters (this
    round's lr) stay."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in saved.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()
    sizes = [p.numel() for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state.items():
        moments = [v for k, v in entries.items() if k != "step"]
        if index >= len(sizes) or any(v.numel() != sizes[index] for v in moments):
            raise ValueError(f"the kept optimizer state does not fit this model's parameter "
                             f"{index}: was the model changed within the run?")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def proximal_step(model: TwoTower, strength: float) -> Callable[[], None]:
    """FedProx's proximal term mu/2 |w - w_global|^2, applied as its exact proximal step after
    each optimizer step. Being a separate step, it also works under DP-SGD, where Opacus
    builds the gradient from per-example gradients only (and it needs no data, so it costs no
    privacy)."""
    anchor = {name: p.detach().clone() for name, p in model.shared_state().items()}
    params = [(p, anchor[n]) for n, p in model.named_parameters() if n in anchor]
    shrink = strength / (1.0 + strength)

    def step() -> None:
        with torch.no_grad():
            for p, a in params:
                p.sub_(shrink * (p - a))

    return step


def evaluate_node(node: NodeData, model: TwoTower) -> tuple[RankingSums, RankingSums]:
    """Validation and test sums: the server reports the test metrics of the round that the
    validation metric picks (``eval.select_by``), as the centralized run picks its epoch."""
    valid, test = evaluate_case_sets(model, [node.valid_cases, node.test_cases],
                                     list(node.cfg.eval.ks), node.cfg.eval.batch_size)
    return valid, test
