"""Cross-device at shop scale: each round's cohort of shoppers, sampled by the server over the
whole population, and the pool nodes that simulate them.

In a simulation with ``partition=user`` the shoppers are virtual clients on a pool of SuperNodes,
node k owning shoppers k, k + N, ... (``Federation.node_clients``). A round sends one message to
each node that owns a sampled shopper, naming them; the node trains each alone and replies with
their weighted mean and total weight (``fedrec.client.app.train``). So the round's cost follows
its cohort, not the population, and Flower's strategy aggregates what the shoppers' own replies
would have given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid


@dataclass
class Cohorts:
    """The sampler of a pooled run: ``size`` of ``population`` shoppers a round, without
    replacement, from the run seed and the round (the server's randomness, never a client's),
    so a run's cohorts can be replayed and compared across pool sizes."""

    population: int
    size: int
    num_nodes: int
    seed: int
    node_ids: dict[int, int] = field(default_factory=dict)  # pool index -> Flower node id

    def sample(self, run_round: int) -> np.ndarray:
        generator = np.random.default_rng([self.seed, run_round])
        return np.sort(generator.choice(self.population, self.size, replace=False))

    def by_node(self, shoppers: Iterable[int]) -> dict[int, list[int]]:
        """The Flower node id of each pool node owning any of ``shoppers``, with those."""
        owned: dict[int, list[int]] = {}
        for shopper in shoppers:
            owned.setdefault(self.node_ids[int(shopper) % self.num_nodes], []).append(
                int(shopper))
        return owned

    def map_nodes(self, grid: Grid, timeout: float) -> None:
        """Ask every node which pool slice it simulates (its partition-id, simulation metadata
        and nothing of a shopper), once before the first round."""
        nodes = list(grid.get_node_ids())
        replies = list(grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
             for node in nodes], timeout=timeout))
        found: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not say which pool "
                                   f"slice it holds: {reply.error.reason}")
            pool = reply.content["pool"]
            if int(pool["num-partitions"]) != self.num_nodes:  # type: ignore[arg-type]
                raise RuntimeError(f"node {reply.metadata.src_node_id} holds a pool of "
                                   f"{pool['num-partitions']} nodes, the run {self.num_nodes}")
            found[int(pool["partition-id"])] = reply.metadata.src_node_id  # type: ignore[arg-type]
        missing = sorted(set(range(self.num_nodes)) - set(found))
        if missing:
            raise RuntimeError(f"no node answered for pool slices {missing[:10]} within "
                               f"{timeout:.0f} s (round_timeout): their shoppers cannot train")
        self.node_ids = found


def with_cohort(messages: Iterable[Message], owned: dict[int, list[int]]) -> list[Message]:
    """The strategy's messages (one per pool node, with its config) cut down to the nodes that
    own a sampled shopper, each naming those shoppers."""
    cut = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in owned:
            continue
        content = RecordDict({name: record for name, record in message.content.items()})
        content["config"] = ConfigRecord({**message.content["config"], "cohort": owned[node]})
        cut.append(Message(content, dst_node_id=node,
                           message_type=message.metadata.message_type,
                           group_id=message.metadata.group_id))
    return cut


def cohort_size(population: int, fraction: float, minimum: int) -> int:
    """A round's cohort, sized as Flower sizes a round's sample of nodes."""
    return min(population, max(int(population * fraction), minimum))
