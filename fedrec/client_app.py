"""Flower ClientApp: moves records between Flower and fedrec.node; no model or data logic here.

In a simulation the node's data is its partition (node_config partition-id/num-partitions); in a
deployment it is whatever the node's own ``data-path`` holds. The personal embedding, when
enabled, lives in Context.state and never enters a reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.model import PERSONAL_PREFIX, TwoTower
from fedrec.node import NodeData, evaluate_node, load_node, node_model, train_round

app = ClientApp()

PERSONAL_STATE = "fedrec.personal"


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    model = _model(node, msg, context)
    config = msg.content["config"]
    result = train_round(
        node, model,
        lr=float(config["lr"]),
        local_epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=int(config["seed"]) * 100003 + int(config["server-round"]),
    )
    if model.personal is not None:
        context.state[PERSONAL_STATE] = ArrayRecord(torch_state_dict={
            k: v for k, v in model.state_dict().items() if k.startswith(PERSONAL_PREFIX)})
    metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss})
    reply = RecordDict({"arrays": ArrayRecord(torch_state_dict=model.shared_state()),
                        "metrics": metrics})
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    sums = evaluate_node(node, _model(node, msg, context))
    metrics = MetricRecord({"num-examples": sums.counts["sampled"], **sums.flat()})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
