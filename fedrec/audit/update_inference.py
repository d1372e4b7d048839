"""Update inference: what an honest-but-curious server learns of a shopper's items from what a
round shows it.

The server sent the global model and gets back, without SecAgg+, each client's reply; with
SecAgg+, only the sum of the cohort's replies and of their weights (so their weighted mean);
under central DP, a noised aggregate. An item's id row moves when the round reads it (a history
item, a target, a sampled negative), and a shopper's own items are read in every example, so
the server ranks items by how far their rows moved and guesses the top ones were bought.

The views are made by the real ClientApp (``fedrec.client.app``), called in this process on a
pool node that holds every shopper: a message naming one shopper gets exactly the reply that
shopper's device would send, and one naming a cohort gets their weighted mean, the figure the
SecAgg+ sum and total weight reveal (less SecAgg+'s quantization, which only blurs it). Under
DP-FedAvg the round's release is made as the server makes it (``released``): every update
clipped, their mean, and the Gaussian noise the run's plan calibrated to its cohort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv
from flwr.supercore.task_identity import TaskIdentity

from fedrec.audit.attack_metrics import auc, precision_at_k
from fedrec.client.app import app as client_app
from fedrec.client.app import clipped_update
from fedrec.config import Config, ConfigError
from fedrec.data.federation import Federation
from fedrec.model import ITEM_TABLE, TwoTower
from fedrec.server.cohort import cohort_size
from fedrec.server.privacy import CentralDp
from fedrec.server.run import plan_privacy, train_request

# The node the audit's messages go to; Flower's runtime names the task it runs before a ClientApp
# handles a message, and the audit, which calls the ClientApp itself, must do the same.
AUDIT_NODE = 1


def node_context(overrides: str, partition_id: int, num_partitions: int) -> Context:
    """A simulated node of the run ``overrides`` describes (a shop, or a pool node of
    shoppers), with a fresh state: its own secret seeds, which the server never learns."""
    return Context(run_id=1, node_id=AUDIT_NODE, state=RecordDict(),
                   run_config={"overrides": overrides},
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions})


def pool_node(overrides: str) -> Context:
    """One pool node that holds every shopper of the run ``overrides`` describes."""
    return node_context(f"{overrides} partition=user partition.pool_nodes=1", 0, 1)


def server_train_request(cfg: Config, fed: Federation) -> tuple[ConfigRecord, CentralDp | None]:
    """The train request the run's server sends every round, its privacy plan's keys included
    (for a run that starts afresh), and DP-FedAvg's plan when the run has one."""
    request = train_request(cfg, 0)
    population = fed.num_clients if cfg.pooled else fed.num_nodes
    central, _ = plan_privacy(cfg, fed, population, cohort_size(
        population, cfg.strategy.fraction_train, cfg.strategy.min_train_nodes), request)
    if central is not None:
        if central.cfg.clipping != "fixed":
            raise ConfigError(f"privacy.clipping={central.cfg.clipping}: the audit makes the "
                              "server's release with a fixed clipping norm; audit "
                              "privacy.clipping=fixed")
        # As Flower's client-side wrapper sends it: with privacy.side=client the node's
        # fixedclipping_mod reads it; with side=server the node ignores it.
        request[KEY_CLIPPING_NORM] = central.cfg.clipping_norm
    return request, central


def released(global_state: dict[str, torch.Tensor], replies: list[dict[str, torch.Tensor]],
             central: CentralDp, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The model DP-FedAvg releases after a round whose replies are ``replies``: each update
    clipped to the norm (the server's clipping, or again what the client clipped already, which
    leaves it), their uniform mean, and Gaussian noise of Flower's standard deviation for the
    planned cohort; a pool node's reply, already the mean of its shoppers' clipped updates, is
    one reply."""
    norm = central.cfg.clipping_norm
    clipped = [clipped_update(reply, global_state, norm) for reply in replies]
    std = compute_stdv(central.noise_multiplier, norm, central.sample_size)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return {name: torch.stack([c[name] for c in clipped]).mean(dim=0)
            + std * torch.randn(start.shape, generator=generator, dtype=start.dtype)
            for name, start in global_state.items()}


def round_reply(node: Context, request: ConfigRecord, global_state: dict[str, torch.Tensor],
                server_round: int, shoppers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The model ``node`` sends back when the server asks it to train round ``server_round``
    from ``global_state`` with ``request``; on a pool node, naming ``shoppers``."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, AUDIT_NODE, server_round
    config = ConfigRecord({**request, "server-round": server_round})
    if shoppers is not None:
        config["cohort"] = [int(s) for s in shoppers]
    message = Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=global_state),
                                  "config": config}),
                      dst_node_id=AUDIT_NODE, message_type=MessageType.TRAIN)
    reply = client_app(message, node)
    if reply.has_error():
        raise RuntimeError(f"the client refused the audit's round: {reply.error.reason}")
    return reply.content["arrays"].to_torch_state_dict()


def item_scores(model: TwoTower, before: dict[str, torch.Tensor],
                after: dict[str, torch.Tensor]) -> np.ndarray:
    """Each item's score: how far its id row moved, less the part every row shares (weight
    decay shrinks every row towards zero in proportion to itself, which the server knows from
    the config; it is fitted here, over all rows, as one factor). With no id row in the model's
    update (item vectors from public attributes alone), how far the item's vector moved; the
    model is then left holding ``before``, which must not share its memory (``shared_state``
    does: clone it)."""
    if ITEM_TABLE in before and not torch.equal(before[ITEM_TABLE], after[ITEM_TABLE]):
        start = before[ITEM_TABLE][:-1].double()  # the last row: the padding item
        moved = after[ITEM_TABLE][:-1].double() - start
        shared = float((moved * start).sum() / (start * start).sum().clamp(min=1e-30))
        return (moved - shared * start).norm(dim=1).numpy()
    vectors = []
    with torch.no_grad():
        for state in (after, before):  # the model is left holding ``before``
            model.load_shared_state(state)
            vectors.append(model.item_vectors().double())
    return (vectors[0] - vectors[1]).norm(dim=1).numpy()


@dataclass(frozen=True)
class Inference:
    """How well the scores of one view pick out one target shopper's training items."""

    shopper: int
    cohort: int
    auc: float
    precision_at_10: float


def score_target(scores: np.ndarray, bought: np.ndarray, shopper: int, cohort: int) -> Inference:
    """``bought``: the items of the target's training history."""
    members = np.zeros(len(scores), dtype=bool)
    members[bought] = True
    return Inference(shopper, cohort, auc(scores, members), precision_at_k(scores, members, 10))

