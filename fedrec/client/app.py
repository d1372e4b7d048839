"""Flower ClientApp: moves records between Flower and the node's task (fedrec.client.task); no
model or data logic here.

In a simulation the node's data is its partition (node_config partition-id/num-partitions); in a
deployment it is whatever the node's own ``data-path`` holds. The personal embedding, when
enabled, lives in Context.state and never enters a reply.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedrec.client.dp_sgd import DpSgdLedger
from fedrec.client.one_step import (
    one_step_shoppers,
    train_one_step_clipped,
    train_one_step_together,
)
from fedrec.client.secagg import secure_aggregation_mod
from fedrec.client.shopper_update import (
    ShopperUpdate,
    clip_scale,
    moves_only_rows_read,
    train_for_update,
)
from fedrec.client.task import (
    NodeData,
    NodeHolder,
    Refusal,
    TrainingData,
    TrainRequest,
    dp_sgd_ledger,
    evaluate_node,
    node_model,
    shopper_data,
    train_round,
    trainees,
)
from fedrec.config import CentralDpConfig, Config, DpSgdConfig
from fedrec.metrics import VALID_PREFIX
from fedrec.model import ITEM_TABLE, PERSONAL_PREFIX, TwoTower
from fedrec.train import TrainResult
from fedrec.wire import BUDGET_EXHAUSTED, NOT_COVERED, NOTHING_TO_TRAIN, OUTSIDE_PLAN, starts_round

app = ClientApp()
# This process's run config and node data, kept between messages.
NODES = NodeHolder()

PERSONAL_STATE = "fedrec.personal"
DP_SGD_STATE = "fedrec.dp_sgd"
# A client's optimizer state between its rounds (train.keep_optimizer_state): never sent.
OPTIMIZER_STATE = "fedrec.optimizer"
SECRET_STATE = "fedrec.secret"


def _config(context: Context) -> Config:
    return NODES.config(context.run_id, str(context.run_config["overrides"]))


def _node(context: Context) -> NodeData:
    config = context.node_config
    partition, partitions = config.get("partition-id"), config.get("num-partitions")
    data_path = config.get("data-path")
    return NODES.node(
        context.run_id,
        str(context.run_config["overrides"]),
        None if partition is None else int(partition),
        None if partitions is None else int(partitions),
        str(data_path) if data_path else None,
    )


def _model(node: TrainingData, global_state: dict[str, torch.Tensor],
           context: Context) -> TwoTower:
    """The model a node trains or evaluates: the global shared state, and the personal vectors
    of its shoppers as their earlier rounds left them (a pool keeps one per shopper)."""
    model = node_model(node)
    model.load_shared_state(global_state)
    if model.personal is None:
        return model
    if PERSONAL_STATE in context.state:
        personal = context.state[PERSONAL_STATE].to_torch_state_dict()
        model.load_state_dict(personal, strict=False)
    for shopper in node.users.tolist() if node.cfg.pooled else []:
        if f"{PERSONAL_STATE}.{shopper}" in context.state:  # a pool's shopper that trained
            _load_personal(model, context, shopper)
    return model


def _load_personal(model: TwoTower, context: Context, shopper: int) -> None:
    """A pool's shopper's personal vector into its row of ``model`` (zeros before its first
    round, as a new shopper starts from the shared tower)."""
    assert model.personal is not None
    key = f"{PERSONAL_STATE}.{shopper}"
    row = (context.state[key].to_torch_state_dict()["vector"] if key in context.state
           else torch.zeros(model.personal.embedding_dim))
    with torch.no_grad():
        model.personal.weight[model.personal_slot(shopper)] = row


def client_side_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """privacy=central_dp with side=client: clip the update here, with Flower's mod for the
    configured clipping, before it leaves the node."""
    privacy = _config(context).privacy
    if not isinstance(privacy, CentralDpConfig) or privacy.side != "client":
        return call_next(msg, context)
    mod = fixedclipping_mod if privacy.clipping == "fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


def dp_sgd_budget(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """privacy=dp_sgd: a node whose next round would pass its target epsilon declines at once
    (with secagg=on, at SecAgg+'s setup stage, before it joins the round)."""
    if DP_SGD_STATE not in context.state or not starts_round(msg):
        # No round trained yet (the plan fits at least one), or a later SecAgg+ stage of a
        # round this node already joined.
        return call_next(msg, context)
    ledger = DpSgdLedger.from_record(context.state.config_records[DP_SGD_STATE])
    if ledger.can_train():
        return call_next(msg, context)
    return Message(Error(BUDGET_EXHAUSTED, (
        f"privacy budget exhausted: epsilon {ledger.epsilon():.4f} spent, another round would "
        f"reach {ledger.epsilon(with_next_round=True):.4f} > target {ledger.target_epsilon}")),
        reply_to=msg)


# Outermost first. secure_aggregation hands the plain train message on, so the clipping mod
# and train() are the same with and without secagg.
TRAIN_MODS = [dp_sgd_budget, secure_aggregation_mod(_config), client_side_clipping]


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Train each client this node holds in the round (itself, or on a pool the sampled
    shoppers it owns, each alone from the global model) and reply with their weighted mean and
    total weight: Flower's strategy then averages the replies exactly as if each shopper had
    replied alone."""
    node = _node(context)
    request = TrainRequest.read(msg.content["config"])
    weight_key = "num-examples" if node.cfg.privacy.mechanism == "none" else "unit-weight"
    try:
        shoppers = trainees(node, request)
    except Refusal as refusal:
        return Message(Error(refusal.code, refusal.reason), reply_to=msg)
    # Read once: each of a pool's shoppers starts from the same global model.
    global_state = msg.content["arrays"].to_torch_state_dict()
    together, alone = ([], [None]) if shoppers is None else one_step_shoppers(node, shoppers,
                                                                              request)
    mean = WeightedMean(global_state)
    if together:
        model = NODES.shopper_model(node)
        model.load_shared_state(global_state)
        seeds = {s: round_seed(context, node.cfg, request.run_round, s) for s in together}
        if isinstance(node.cfg.privacy, CentralDpConfig):  # each shopper clipped, weighing 1
            state, result = train_one_step_clipped(node, model, seeds, lr=request.lr,
                                                   clipping_norm=node.cfg.privacy.clipping_norm)
            mean.add(state, len(together), len(together), result)
        else:
            state, result = train_one_step_together(node, model, seeds, lr=request.lr,
                                                    proximal_mu=request.proximal_mu)
            mean.add(state, result.num_examples, len(together), result)
    refusals = []
    holds_global = False  # whether the pool's shopper model holds the global model
    for client in alone:
        data = node if client is None else shopper_data(node, client)
        try:
            if client is not None and moves_only_rows_read(data):
                if len(data.examples) == 0:
                    raise Refusal(NOTHING_TO_TRAIN, f"shopper {client} has no training example")
                model = NODES.shopper_model(node)
                if not holds_global:
                    model.load_shared_state(global_state)
                    holds_global = True
                update, result = train_for_update(model, global_state, partial(
                    train_round, data, model, lr=request.lr, local_epochs=request.local_epochs,
                    batch_size=request.batch_size, proximal_mu=request.proximal_mu,
                    seed=round_seed(context, data.cfg, request.run_round, client)))
                if isinstance(node.cfg.privacy, CentralDpConfig):
                    update = update.clipped(node.cfg.privacy.clipping_norm)
                mean.add_update(update, result.num_examples if weight_key == "num-examples"
                                else 1, result)
                continue
            holds_global = False
            state, result = _train_client(node, data, client, global_state, request, context)
        except Refusal as refusal:
            if client is not None and refusal.code == NOTHING_TO_TRAIN and isinstance(
                    node.cfg.privacy, CentralDpConfig):
                # User-level DP-FedAvg releases how many shoppers its mean holds: a shopper
                # without data sends the global model back (a zero update, within the clip), so
                # that whether a shopper has data changes no count.
                mean.add(global_state, 1, 1, TrainResult(loss=0.0, num_examples=0))
                continue
            # A virtual shopper declines alone (its budget is spent, it has nothing to train
            # on), as its own device would; the node's other shoppers train.
            refusals.append(refusal)
            continue
        if client is not None and isinstance(node.cfg.privacy, CentralDpConfig):
            state = clipped_update(state, global_state, node.cfg.privacy.clipping_norm)
        # A private run averages uniformly: a client's count is data no guarantee covers.
        mean.add(state, result.num_examples if weight_key == "num-examples" else 1, 1, result)
    if not mean.clients:
        return Message(Error(refusals[0].code, refusals[0].reason), reply_to=msg)
    metrics = MetricRecord({"unit-weight": mean.clients})
    if weight_key == "num-examples":
        metrics.update({"num-examples": mean.weight,
                        "train_loss": mean.loss_sum / max(mean.weight, 1)})
    reply = RecordDict({"arrays": ArrayRecord(torch_state_dict=mean.state()),
                        "metrics": metrics})
    return Message(content=reply, reply_to=msg)


def clipped_update(state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor],
                   clipping_norm: float) -> dict[str, torch.Tensor]:
    """A pool's shopper's model with its update clipped to ``clipping_norm``, as Flower's
    fixedclipping_mod clips a device's reply (``compute_clip_model_update``: the update scaled
    by min(1, norm / its L2 norm over every array)), before it joins the node's mean. In torch,
    not with Flower's numpy function, which took 6 of the 7 ms a Beauty shopper's clip cost.
    The norm is the node's own config, never the server's request: user-level DP-FedAvg on a
    pool (the mean of clipped updates has norm at most the norm, so the node's own clipping mod
    leaves it unchanged)."""
    update = {name: state[name] - start for name, start in global_state.items()}
    scale = clip_scale(list(update.values()), clipping_norm)
    return {name: global_state[name] + scale * u for name, u in update.items()}


class WeightedMean:
    """The weighted mean of the models a node's clients trained, summed as each one finishes:
    a pool's shoppers share one model object, which the next shopper overwrites. Whole models
    (``add``) are summed as they are; a shopper's update (``add_update``) as its change from
    the global model, so that it costs the rows it moved, not the whole item table."""

    def __init__(self, global_state: dict[str, torch.Tensor]) -> None:
        self.global_state = global_state
        self.clients, self.weight, self.loss_sum = 0, 0, 0.0
        self._first: dict[str, torch.Tensor] = {}  # sent as trained when it is the only one
        self._first_weight = 0
        self._sum: dict[str, torch.Tensor] = {}  # float64: weighted whole models, and changes
        self._update_weight = 0  # the weight of the updates, whose start is the global model

    def add(self, state: dict[str, torch.Tensor], weight: int, clients: int,
            result: TrainResult) -> None:
        """``state``: the mean of ``clients`` clients' models, of total ``weight``."""
        if not self.clients:
            self._first = {name: value.clone() for name, value in state.items()}
            self._first_weight = weight
        else:
            self._fold_first()
            for name, value in state.items():
                self._sum[name] += weight * value.double()
        self._count(weight, clients, result)

    def add_update(self, update: ShopperUpdate, weight: int, result: TrainResult) -> None:
        """One shopper's update, of ``weight``."""
        self._fold_first()
        self._sum[ITEM_TABLE].index_add_(0, update.rows, update.table.double(), alpha=weight)
        for name, change in update.dense.items():
            self._sum[name] += weight * change.double()
        self._update_weight += weight
        self._count(weight, 1, result)

    def _count(self, weight: int, clients: int, result: TrainResult) -> None:
        self.clients, self.weight = self.clients + clients, self.weight + weight
        self.loss_sum += result.loss * result.num_examples

    def _fold_first(self) -> None:
        if not self._sum:
            self._sum = {name: torch.zeros_like(value, dtype=torch.float64)
                         for name, value in self.global_state.items()}
        if self._first:
            for name, value in self._first.items():
                self._sum[name] += self._first_weight * value.double()
            self._first = {}

    def state(self) -> dict[str, torch.Tensor]:
        if self._first:  # the only one
            return self._first
        total = max(self.weight, 1e-12)
        return {name: ((self._sum[name] + self._update_weight * start.double()) / total).float()
                for name, start in self.global_state.items()}


def _train_client(node: NodeData, data: TrainingData, client: int | None,
                  global_state: dict[str, torch.Tensor], request: TrainRequest,
                  context: Context) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One client's round: from the global model and its own state (personal vectors, DP-SGD
    ledger), kept in the node's Context.state under the client's key."""
    suffix = "" if client is None else f".{client}"
    if client is not None and len(data.examples) == 0:
        raise Refusal(NOTHING_TO_TRAIN, f"shopper {client} has no training example")
    if client is None:
        model = _model(data, global_state, context)
    else:  # a pool's shoppers share one model object, reset to the global model each time
        model = NODES.shopper_model(node)
        model.load_shared_state(global_state)
        if model.personal is not None:
            _load_personal(model, context, client)
    ledger = None
    if isinstance(data.cfg.privacy, DpSgdConfig):
        saved = context.state.config_records.get(DP_SGD_STATE + suffix)
        ledger = dp_sgd_ledger(data, request,
                               None if saved is None else DpSgdLedger.from_record(saved))
        if client is not None and not ledger.can_train():  # a node checks in dp_sgd_budget
            raise Refusal(BUDGET_EXHAUSTED, f"shopper {client}'s privacy budget is exhausted")
    kept = context.state.array_records.get(OPTIMIZER_STATE + suffix)
    result = train_round(data, model, lr=request.lr, local_epochs=request.local_epochs,
                         batch_size=request.batch_size, proximal_mu=request.proximal_mu,
                         seed=round_seed(context, data.cfg, request.run_round, client),
                         ledger=ledger,
                         optimizer_state=None if kept is None else kept.to_torch_state_dict())
    if result.optimizer_state is not None:
        context.state[OPTIMIZER_STATE + suffix] = ArrayRecord(
            torch_state_dict=result.optimizer_state)
    if model.personal is not None and client is None:
        context.state[PERSONAL_STATE] = ArrayRecord(torch_state_dict={
            k: v for k, v in model.state_dict().items() if k.startswith(PERSONAL_PREFIX)})
    elif model.personal is not None:  # one vector per virtual shopper: its own state
        context.state[f"{PERSONAL_STATE}.{client}"] = ArrayRecord(torch_state_dict={
            "vector": model.personal.weight[model.personal_slot(client)].detach().clone()})
    if ledger is not None:
        context.state[DP_SGD_STATE + suffix] = ledger.to_record()
    return model.shared_state(), result


def round_seed(context: Context, cfg: Config, run_round: int, client: int | None = None) -> int:
    """The seed of a client's own sampling in a round (shuffles, negatives), from a secret
    drawn once on the node and kept in its Context.state: it never enters a reply, so the server
    can neither know nor replay it. ``client_seed`` replaces it when a simulation must be
    reproducible. ``client``: a virtual shopper of a pool node, who gets a seed of its own."""
    if cfg.client_seed is not None:
        partition = (context.node_config.get("partition-id", context.node_id) if client is None
                     else client)
        secret = (cfg.client_seed * 1_000_003 + int(partition)) % 2**62
    else:
        if SECRET_STATE not in context.state:
            context.state[SECRET_STATE] = ConfigRecord(
                {"seed": int.from_bytes(os.urandom(7), "little")})
        secret = int(context.state.config_records[SECRET_STATE]["seed"])  # type: ignore[arg-type]
        if client is not None:
            secret = (secret * 1_000_003 + client) % 2**62
    return (secret * 100_003 + run_round) % 2**62


@app.query()
def pool_slice(msg: Message, context: Context) -> Message:
    """Which slice of a pool of virtual shoppers this node simulates: its partition, which the
    simulation set in its node config (no shopper's data)."""
    config = context.node_config
    if "partition-id" not in config or not _config(context).pooled:
        return Message(Error(OUTSIDE_PLAN, "this node is not part of a pool of virtual "
                                           "shoppers"), reply_to=msg)
    return Message(RecordDict({"pool": ConfigRecord({
        "partition-id": int(config["partition-id"]),  # type: ignore[arg-type]
        "num-partitions": int(config["num-partitions"])})}), reply_to=msg)  # type: ignore[arg-type]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    if node.cfg.privacy.mechanism != "none" or node.cfg.secagg.enabled:
        # Per-client ranking sums in the clear would expose held-out items (a one-shopper
        # client's NDCG gives the test item's rank); no mechanism here covers them.
        return Message(Error(NOT_COVERED, (
            f"this run has privacy={node.cfg.privacy.mechanism} secagg="
            f"{'on' if node.cfg.secagg.enabled else 'off'}: this client sends no evaluation "
            "figures, which no mechanism of the run would cover")), reply_to=msg)
    valid, test = evaluate_node(node, _model(node, msg.content["arrays"].to_torch_state_dict(),
                                             context))
    metrics = MetricRecord({"num-examples": test.counts["sampled"], "unit-weight": 1,
                            **test.flat(), **valid.flat(VALID_PREFIX)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
