"""Flower ClientApp: moves records between Flower and fedrec.node; no model or data logic here.

In a simulation the node's data is its partition (node_config partition-id/num-partitions); in a
deployment it is whatever the node's own ``data-path`` holds. The personal embedding, when
enabled, lives in Context.state and never enters a reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedrec.config import CentralDpConfig, DpSgdConfig
from fedrec.metrics import VALID_PREFIX
from fedrec.model import PERSONAL_PREFIX, TwoTower
from fedrec.node import NodeData, evaluate_node, load_config, load_node, node_model, train_round
from fedrec.privacy import BUDGET_EXHAUSTED, DpSgdLedger, plan_dp_sgd
from fedrec.secagg import secure_aggregation, starts_round

app = ClientApp()

PERSONAL_STATE = "fedrec.personal"
DP_SGD_STATE = "fedrec.dp_sgd"


def _node(context: Context) -> NodeData:
    config = context.node_config
    partition, partitions = config.get("partition-id"), config.get("num-partitions")
    data_path = config.get("data-path")
    return load_node(
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
    privacy = load_config(str(context.run_config["overrides"])).privacy
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
TRAIN_MODS = [dp_sgd_budget, secure_aggregation, client_side_clipping]


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    model = _model(node, msg, context)
    config = msg.content["config"]
    local_epochs, batch_size = int(config["local-epochs"]), int(config["batch-size"])
    ledger = None
    if isinstance(node.cfg.privacy, DpSgdConfig):
        ledger = _dp_sgd_ledger(node, node.cfg.privacy, context, local_epochs, batch_size,
                                int(config["dp-planned-rounds"]))
    # Flower counts a resumed run's rounds from 1 again: the offset keeps seeds distinct and
    # the lr on its schedule.
    run_round = int(config["server-round"]) + int(config.get("round-offset", 0))
    result = train_round(
        node, model,
        lr=float(config["lr"]) * float(config["lr-decay"]) ** (run_round - 1),
        local_epochs=local_epochs,
        batch_size=batch_size,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=int(config["seed"]) * 100003 + run_round,
        ledger=ledger,
    )
    if model.personal is not None:
        context.state[PERSONAL_STATE] = ArrayRecord(torch_state_dict={
            k: v for k, v in model.state_dict().items() if k.startswith(PERSONAL_PREFIX)})
    # unit-weight: DP-FedAvg averages the clients uniformly (see server_app).
    metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                            "unit-weight": 1})
    if ledger is not None:
        context.state[DP_SGD_STATE] = ledger.to_record()
        metrics.update({"epsilon": ledger.epsilon(), "delta": ledger.plan.delta,
                        "noise-multiplier": ledger.plan.noise_multiplier})
    reply = RecordDict({"arrays": ArrayRecord(torch_state_dict=model.shared_state()),
                        "metrics": metrics})
    return Message(content=reply, reply_to=msg)


def _dp_sgd_ledger(node: NodeData, cfg: DpSgdConfig, context: Context, local_epochs: int,
                   batch_size: int, planned_rounds: int) -> DpSgdLedger:
    """The node's budget as earlier rounds left it, or a new plan on its first round."""
    if DP_SGD_STATE in context.state:
        return DpSgdLedger.from_record(context.state.config_records[DP_SGD_STATE])
    plan = plan_dp_sgd(cfg, num_records=len(node.examples), batch_size=batch_size,
                       local_epochs=local_epochs, planned_rounds=planned_rounds)
    return DpSgdLedger(cfg.accountant, cfg.target_epsilon, plan, [])


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    valid, test = evaluate_node(node, _model(node, msg, context))
    metrics = MetricRecord({"num-examples": test.counts["sampled"], "unit-weight": 1,
                            **test.flat(), **valid.flat(VALID_PREFIX)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
