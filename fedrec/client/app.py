"""Flower ClientApp: moves records between Flower and the node's task (fedrec.client.task); no
model or data logic here.

In a simulation the node's data is its partition (node_config partition-id/num-partitions); in a
deployment it is whatever the node's own ``data-path`` holds. The personal embedding, when
enabled, lives in Context.state and never enters a reply.
"""

from __future__ import annotations

import os

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
from fedrec.client.secagg import secure_aggregation_mod
from fedrec.client.task import (
    NodeData,
    NodeHolder,
    Refusal,
    TrainRequest,
    dp_sgd_ledger,
    evaluate_node,
    node_model,
    train_round,
)
from fedrec.config import CentralDpConfig, Config, DpSgdConfig
from fedrec.metrics import VALID_PREFIX
from fedrec.model import PERSONAL_PREFIX, TwoTower
from fedrec.wire import BUDGET_EXHAUSTED, NOT_COVERED, starts_round

app = ClientApp()
# This process's run config and node data, kept between messages.
NODES = NodeHolder()

PERSONAL_STATE = "fedrec.personal"
DP_SGD_STATE = "fedrec.dp_sgd"
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


def _model(node: NodeData, msg: Message, context: Context) -> TwoTower:
    model = node_model(node)
    model.load_shared_state(msg.content["arrays"].to_torch_state_dict())
    if model.personal is not None and PERSONAL_STATE in context.state:
        personal = context.state[PERSONAL_STATE].to_torch_state_dict()
        model.load_state_dict(personal, strict=False)
    return model


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
    node = _node(context)
    model = _model(node, msg, context)
    request = TrainRequest.read(msg.content["config"])
    ledger = None
    if isinstance(node.cfg.privacy, DpSgdConfig):
        saved = context.state.config_records.get(DP_SGD_STATE)
        try:
            ledger = dp_sgd_ledger(node, request,
                                   None if saved is None else DpSgdLedger.from_record(saved))
        except Refusal as refusal:
            return Message(Error(refusal.code, refusal.reason), reply_to=msg)
    result = train_round(node, model, lr=request.lr, local_epochs=request.local_epochs,
                         batch_size=request.batch_size, proximal_mu=request.proximal_mu,
                         seed=round_seed(context, node.cfg, request.run_round), ledger=ledger)
    if model.personal is not None:
        context.state[PERSONAL_STATE] = ArrayRecord(torch_state_dict={
            k: v for k, v in model.state_dict().items() if k.startswith(PERSONAL_PREFIX)})
    if ledger is not None:
        context.state[DP_SGD_STATE] = ledger.to_record()
    # unit-weight: the mean over clients that a private run takes (a client's count would be
    # data the guarantee does not cover); the loss and count go only where nothing is claimed.
    metrics = MetricRecord({"unit-weight": 1})
    if node.cfg.privacy.mechanism == "none":
        metrics.update({"num-examples": result.num_examples, "train_loss": result.loss})
    reply = RecordDict({"arrays": ArrayRecord(torch_state_dict=model.shared_state()),
                        "metrics": metrics})
    return Message(content=reply, reply_to=msg)


def round_seed(context: Context, cfg: Config, run_round: int) -> int:
    """The seed of the client's own sampling in a round (shuffles, negatives), from a secret
    drawn once on the node and kept in its Context.state: it never enters a reply, so the server
    can neither know nor replay it. ``client_seed`` replaces it when a simulation must be
    reproducible."""
    if cfg.client_seed is not None:
        partition = context.node_config.get("partition-id", context.node_id)
        secret = (cfg.client_seed * 1_000_003 + int(partition)) % 2**62
    else:
        if SECRET_STATE not in context.state:
            context.state[SECRET_STATE] = ConfigRecord(
                {"seed": int.from_bytes(os.urandom(7), "little")})
        secret = int(context.state.config_records[SECRET_STATE]["seed"])  # type: ignore[arg-type]
    return (secret * 100_003 + run_round) % 2**62


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
    valid, test = evaluate_node(node, _model(node, msg, context))
    metrics = MetricRecord({"num-examples": test.counts["sampled"], "unit-weight": 1,
                            **test.flat(), **valid.flat(VALID_PREFIX)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
