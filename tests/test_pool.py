"""Virtual shoppers on a pool of SuperNodes (partition=user in a simulation): each pool node
trains the round's sampled shoppers it owns, each alone from the global model, and replies with
their weighted mean and total weight. Flower's own strategy then averages the pool's replies,
which must give what one SuperNode per shopper gives."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    assert_wire_contract,
    federated_run_in_process,
    load_node,
    typed_config,
)
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.differential_privacy import compute_clip_model_update
from flwr.supercore.task_identity import TaskIdentity
from independent_accounting import replace_one_sampled_lower_bound

from fedrec.accounting import dp_sgd_epsilon, plan_dp_sgd
from fedrec.client import app as pool_client
from fedrec.client import one_step
from fedrec.client.app import PERSONAL_STATE, round_seed
from fedrec.client.app import _model as node_model_with_state
from fedrec.client.app import app as client_app
from fedrec.client.one_step import (
    one_step_shoppers,
    train_one_step_clipped,
    train_one_step_together,
)
from fedrec.client.shopper_update import moves_only_rows_read
from fedrec.client.task import ShopperRows, TrainRequest, node_model, shopper_data, train_round
from fedrec.config import ConfigError
from fedrec.data.federation import build_federation
from fedrec.server.cohort import Cohorts
from fedrec.server.privacy import PoolNoise, _epsilon_after
from fedrec.server.strategy import build_strategy, sum_metric_records

SHOPPERS = 8
POOL = (f"dataset.num_users={SHOPPERS} dataset.num_items=80 dataset.num_categories=3 "
        "partition=user eval.num_negatives=5 train.local_epochs=1 train.lr=0.05 "
        "train.batch_size=8 model.embedding_dim=8 model.hidden_dim=16 client_seed=3 "
        "strategy.fraction_train=0.5")
# Each shopper's round is one plain SGD step (its examples fit one batch): a pool node trains its
# shoppers together (fedrec.client.one_step).
ONE_STEP = "train.optimizer=sgd train.lr=0.5 train.batch_size=64 train.weight_decay=0.01"
# Plain SGD without decay: a shopper's round moves only the item rows it reads, and a pool node
# keeps just those (fedrec.client.shopper_update). Several steps per shopper (8 examples a batch).
ROWS_READ = "train.optimizer=sgd train.weight_decay=0.0"
# Each shopper keeps a personal vector, which never leaves its device (or its pool node).
PERSONAL = "model.personal_embedding=true"
DP = ("privacy=dp_sgd privacy.target_epsilon=50 privacy.planned_rounds=3 "
      "train.dp_sgd.steps_per_epoch=1 "
      "train.dp_sgd.examples_per_shopper=8")


@pytest.mark.slow  # twelve whole federations, in this process
@pytest.mark.parametrize("privacy", ["", DP, ONE_STEP, PERSONAL, ROWS_READ],
                         ids=["no privacy", "dp_sgd", "one step", "personal vectors",
                              "rows read"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_a_pool_gives_the_global_model_of_one_supernode_per_shopper(strategy, privacy,
                                                                     tmp_path):
    # seed=3: no shopper is in all three cohorts, while both pool nodes are asked every round
    overrides = f"{POOL} strategy={strategy} num_rounds=3 eval.every=3 seed=3 {privacy}"
    one_each, per_shopper, _ = federated_run_in_process(overrides, None, tmp_path)
    pooled_summary, pooled, _ = federated_run_in_process(overrides, 2, tmp_path)
    assert pooled_summary["rounds"] == one_each["rounds"] == 3
    torch.manual_seed(typed_config(*overrides.split()).seed)  # the initial model, as run's
    initial = node_model(load_node(f"{overrides} partition.pool_nodes=2", 0, 2)).shared_state()
    # Float tolerance: the two sum the same updates in another order, and three rounds of
    # training carry the rounding on; far below how far training moved the model. (FedAdam's
    # aggregate comes back in float64: Flower computes it in numpy.) FedProx with personal
    # vectors amplifies it most: gaps of 0.7e-4 to 1.4e-4 from one run to the next, where the
    # model moved 0.375.
    for name, value in per_shopper.items():
        gap = (pooled[name].double() - value.double()).abs().max().item()
        moved = (pooled[name].double() - initial[name].double()).abs().max().item()
        assert gap < 1e-3 and gap < moved / 100, (name, gap, moved)
    if privacy != DP:  # the same model, and each shopper's personal vector, evaluated
        for protocol, metrics in one_each["metrics"].items():
            assert pooled_summary["metrics"][protocol] == pytest.approx(metrics, rel=1e-4)
    if privacy == DP:  # the server states the epsilon of the shopper sampled most often
        cfg = typed_config(*f"{overrides} partition.pool_nodes=2".split())
        report = pooled_summary["privacy"]
        plan = plan_dp_sgd(cfg.privacy, cfg.train.dp_sgd, delta=report["delta"],
                           planned_rounds=report["planned_rounds"])
        cohorts = Cohorts(SHOPPERS, 4, 2, cfg.seed)
        most = max(Counter(s for r in (1, 2, 3) for s in cohorts.sample(r).tolist()).values())
        expected = dp_sgd_epsilon(plan, min(most, report["rounds_per_client_at_most"]),
                                  cfg.privacy.accountant)
        assert report["epsilon"] == pytest.approx(expected)
        assert one_each["privacy"]["epsilon"] == pytest.approx(expected)


@pytest.mark.parametrize("proximal_mu", [0.0, 0.1])
def test_shoppers_of_one_sgd_step_train_together_as_each_would_alone(proximal_mu, monkeypatch):
    node = load_node(f"{POOL} partition.pool_nodes=2 {ONE_STEP}", 0, 2)
    # A shopper who bought one item again: its logQ counts the item twice.
    target = node.examples.target.clone()
    again = (node.examples.user == node.users[0]).nonzero().squeeze(1)[:2]
    target[again[1]] = target[again[0]]
    node = replace(node, examples=replace(node.examples, target=target))
    shoppers = node.users.tolist()
    request = TrainRequest(run_round=1, lr=0.5, local_epochs=1, batch_size=64,
                           proximal_mu=proximal_mu, dp_steps_per_epoch=None, dp_delta=None,
                           dp_planned_rounds=None, cohort=tuple(shoppers))
    together, alone = one_step_shoppers(node, shoppers, request)
    assert together == shoppers and alone == []
    seeds = {shopper: 100 + shopper for shopper in shoppers}
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in node_model(node).shared_state().items()}
    model = node_model(node)
    model.load_shared_state(global_state)
    monkeypatch.setattr(one_step, "CHUNK_ROWS", 5)  # several passes, gradients summed
    mean, result = train_one_step_together(node, model, seeds, lr=0.5, proximal_mu=proximal_mu)
    # Each shopper alone, on its own data, through the one training loop.
    summed, losses, total = {}, 0.0, 0
    for shopper in shoppers:
        alone_model = node_model(node)
        alone_model.load_shared_state(global_state)
        trained = train_round(shopper_data(node, shopper), alone_model, lr=0.5, local_epochs=1,
                              batch_size=64, proximal_mu=proximal_mu, seed=seeds[shopper])
        for name, value in alone_model.shared_state().items():
            summed[name] = summed.get(name, 0) + trained.num_examples * value.double()
        losses += trained.loss * trained.num_examples
        total += trained.num_examples
    assert result.num_examples == total
    assert result.loss == pytest.approx(losses / total, rel=1e-5)
    for name, value in summed.items():
        moved = (value / total - global_state[name].double()).abs().max().item()
        gap = (mean[name].double() - value / total).abs().max().item()
        # float32 rounding, summed in another order; far below the step itself
        assert gap < 1e-5 and gap < moved / 1000, (name, gap, moved)


@pytest.mark.parametrize("model", ["", "model.history_items=id",
                                   "model.history_items=attributes model.item_vectors=attributes"])
@pytest.mark.parametrize("clipping_norm", [0.05, 1e6], ids=["binding", "not binding"])
def test_shoppers_of_one_sgd_step_are_clipped_together_as_each_alone(clipping_norm, model,
                                                                     monkeypatch):
    """Under user-level DP-FedAvg the one-step shoppers' mean is of updates each clipped on its
    own: here each shopper trains alone through the one training loop and is clipped by hand."""
    overrides = (f"{POOL} partition.pool_nodes=2 {CENTRAL} train.optimizer=sgd "
                 f"train.weight_decay=0.0 {model}")
    node = load_node(overrides, 0, 2)
    target = node.examples.target.clone()  # a shopper who bought one item again (logQ)
    again = (node.examples.user == node.users[0]).nonzero().squeeze(1)[:2]
    target[again[1]] = target[again[0]]
    node = replace(node, examples=replace(node.examples, target=target))
    shoppers = node.users.tolist()
    request = TrainRequest(run_round=1, lr=0.5, local_epochs=1, batch_size=64, proximal_mu=0.0,
                           dp_steps_per_epoch=None, dp_delta=None, dp_planned_rounds=None,
                           cohort=tuple(shoppers))
    assert one_step_shoppers(node, shoppers, request) == (shoppers, [])
    seeds = {shopper: 100 + shopper for shopper in shoppers}
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in node_model(node).shared_state().items()}
    model_ = node_model(node)
    model_.load_shared_state(global_state)
    monkeypatch.setattr(one_step, "CLIPPED_CHUNK_ROWS", 5)  # several chunks
    mean, result = train_one_step_clipped(node, model_, seeds, lr=0.5,
                                          clipping_norm=clipping_norm)
    assert all(torch.equal(v, global_state[k]) for k, v in model_.shared_state().items())
    updates, losses, total = [], 0.0, 0
    for shopper in shoppers:
        alone = node_model(node)
        alone.load_shared_state(global_state)
        trained = train_round(shopper_data(node, shopper), alone, lr=0.5, local_epochs=1,
                              batch_size=64, proximal_mu=0.0, seed=seeds[shopper])
        clipped = pool_client.clipped_update(alone.shared_state(), global_state, clipping_norm)
        updates.append(_flat_update(clipped, global_state))
        losses += trained.loss * trained.num_examples
        total += trained.num_examples
    norms = torch.stack([u.norm() for u in updates])
    assert (norms < clipping_norm * 1.0001).all()
    assert (norms > clipping_norm * 0.999).all() if clipping_norm < 1 else (norms > 0).all()
    assert result.num_examples == total
    assert result.loss == pytest.approx(losses / total, rel=1e-5)
    got = _flat_update(mean, global_state)
    expected = torch.stack(updates).mean(0)
    assert (got - expected).abs().max() < 1e-6 + 1e-4 * expected.abs().max(), (
        (got - expected).abs().max(), expected.abs().max())


def test_only_shoppers_of_one_plain_sgd_step_train_together():
    node = load_node(f"{POOL} partition.pool_nodes=2 {ONE_STEP}", 0, 2)
    shoppers = node.users.tolist()
    sizes = {s: int((node.examples.user == s).sum()) for s in shoppers}
    request = TrainRequest(run_round=1, lr=0.5, local_epochs=1, batch_size=min(sizes.values()),
                           proximal_mu=0.0, dp_steps_per_epoch=None, dp_delta=None,
                           dp_planned_rounds=None, cohort=tuple(shoppers))
    together, alone = one_step_shoppers(node, shoppers, request)
    assert together == [s for s in shoppers if sizes[s] == min(sizes.values())]
    assert alone == [s for s in shoppers if sizes[s] > min(sizes.values())] != []
    adam = load_node(f"{POOL} partition.pool_nodes=2", 0, 2)
    assert one_step_shoppers(adam, shoppers, request) == ([], shoppers)
    # User-level DP-FedAvg: together only when the step is -lr times the gradient.
    private = f"{POOL} partition.pool_nodes=2 {ONE_STEP} {CENTRAL}"
    for refused in ("train.weight_decay=0.01", "model.user_tower=attention"):
        assert one_step_shoppers(load_node(f"{private} {refused}", 0, 2), shoppers,
                                 request) == ([], shoppers)
    clipped = load_node(f"{private} train.weight_decay=0.0", 0, 2)
    assert one_step_shoppers(clipped, shoppers, request)[0] == together
    assert one_step_shoppers(clipped, shoppers, replace(request, proximal_mu=0.1)) == (
        [], shoppers)
    dropping = load_node(f"{POOL} partition.pool_nodes=2 {ONE_STEP} model.history_id_dropout=0.5",
                         0, 2)
    assert one_step_shoppers(dropping, shoppers, request) == ([], shoppers)


@pytest.mark.slow  # two whole federations, in this process
def test_each_virtual_shopper_keeps_and_is_evaluated_with_its_own_personal_vector(tmp_path):
    overrides = f"{POOL} {PERSONAL} num_rounds=2 eval.every=2 seed=3"
    _, _, one_each = federated_run_in_process(overrides, None, tmp_path)
    _, final, pooled = federated_run_in_process(overrides, 2, tmp_path)
    alone = {}
    for context in one_each.contexts.values():
        if PERSONAL_STATE in context.state:
            state = context.state[PERSONAL_STATE].to_torch_state_dict()
            alone[int(state["personal_users"][0])] = state["personal.weight"][0]
    on_pool = {int(key.rsplit(".", 1)[1]): context.state[key].to_torch_state_dict()["vector"]
               for context in pooled.contexts.values() for key in context.state
               if key.startswith(f"{PERSONAL_STATE}.")}
    assert sorted(on_pool) == sorted(alone) and 0 < len(alone) < SHOPPERS
    for shopper, vector in alone.items():
        assert vector.abs().sum() > 0
        assert torch.allclose(on_pool[shopper], vector, atol=1e-5), shopper
    # A pool node evaluates each of its shoppers with that shopper's vector (zeros if it never
    # trained, as a new shopper starts from the shared tower).
    context = pooled.contexts[1000]
    node = load_node(f"{overrides} partition.pool_nodes=2", 0, 2)
    model = node_model_with_state(node, final, context)
    for shopper in node.users.tolist():
        row = model.personal.weight[model.personal_slot(shopper)]
        expected = on_pool.get(shopper, torch.zeros_like(row))
        assert torch.equal(row.detach(), expected), shopper


@pytest.mark.slow  # two whole federations, in this process
def test_shoppers_out_of_budget_are_counted_one_by_one_on_a_pool(tmp_path):
    # Each shopper is budgeted for one round; four of the eight are asked each round.
    overrides = f"{POOL} {DP} privacy.planned_rounds=1 num_rounds=3 eval.every=3 seed=3"
    summary, _, _ = federated_run_in_process(overrides, 2, tmp_path)
    cohorts = Cohorts(SHOPPERS, 4, 2, typed_config(*overrides.split()).seed)
    asked = Counter(s for r in (1, 2, 3) for s in cohorts.sample(r).tolist())
    assert max(asked.values()) > 1  # so some shopper is asked past its budget
    assert summary["privacy"]["exhausted_clients"] == sum(n > 1 for n in asked.values())
    lines = [json.loads(line) for line in
             (tmp_path / "pool-2" / "metrics.jsonl").read_text().splitlines()]
    declined = [line["privacy"]["exhausted_this_round"] for line in lines]
    assert sum(declined) == sum(n - 1 for n in asked.values()) and declined[1] == 0
    # One SuperNode per shopper counts the same shoppers from their own refusals.
    one_each, _, _ = federated_run_in_process(overrides, None, tmp_path)
    assert one_each["privacy"]["exhausted_clients"] == summary["privacy"]["exhausted_clients"]


def test_a_cohort_is_sampled_over_every_shopper_and_reaches_only_its_owners():
    cohorts = Cohorts(population=1000, size=50, num_nodes=4, seed=0,
                      node_ids={0: 10, 1: 11, 2: 12, 3: 13})
    first, again, second = cohorts.sample(1), cohorts.sample(1), cohorts.sample(2)
    assert len(set(first.tolist())) == 50 and first.max() < 1000
    assert (first == again).all() and not (first == second).all()
    owned = cohorts.by_node(first)
    assert sorted(s for shoppers in owned.values() for s in shoppers) == sorted(first.tolist())
    assert all(s % 4 == node - 10 for node, shoppers in owned.items() for s in shoppers)
    # Over many rounds every shopper is drawn at about the cohort's rate.
    counts = torch.bincount(torch.tensor([s for r in range(1, 201)
                                          for s in cohorts.sample(r).tolist()]), minlength=1000)
    assert counts.float().mean() == pytest.approx(200 * 50 / 1000)
    assert counts.max() < 30 and counts.min() > 0


def test_a_pool_node_refuses_a_shopper_it_does_not_own():
    overrides = f"{POOL} partition.pool_nodes=2"
    node = load_node(overrides, 0, 2)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5, 1
    message = Message(RecordDict({
        "arrays": ArrayRecord(torch_state_dict=node_model(node).shared_state()),
        "config": ConfigRecord({"lr": 0.05, "lr-decay": 1.0, "local-epochs": 1,
                                "batch-size": 8, "server-round": 1, "cohort": [0, 1]})}),
        dst_node_id=5, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={"overrides": overrides})
    reply = client_app(message, context)
    assert reply.has_error() and "shoppers [1]" in reply.error.reason


# User-level DP-FedAvg: each shopper's update clipped to a norm that binds, where it is trained.
CENTRAL = ("privacy=central_dp privacy.side=client privacy.clipping_norm=0.05 "
           "privacy.noise_multiplier=0.5 privacy.max_epsilon=1000")


def _train_on_pool_node(overrides: str, shoppers: list[int],
                        global_state: dict[str, torch.Tensor]) -> tuple[Message, Context]:
    """Pool node 0 of 2's reply to one round's train message naming ``shoppers``."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5, 1
    message = Message(RecordDict({
        "arrays": ArrayRecord(torch_state_dict=global_state),
        "config": ConfigRecord({"lr": 0.05, "lr-decay": 1.0, "local-epochs": 1,
                                "batch-size": 8, "server-round": 1, "cohort": shoppers,
                                "clipping_norm": 0.05})}),
        dst_node_id=5, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={"overrides": overrides})
    return client_app(message, context), context


def _clipped_updates(overrides: str, shoppers: list[int], global_state: dict[str, torch.Tensor],
                     context: Context) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each shopper's update trained here as its node would train it, clipped by hand to 0.05
    and unclipped."""
    node, cfg = load_node(overrides, 0, 2), typed_config(*overrides.split())
    clipped, unclipped = [], []
    for shopper in shoppers:
        model = node_model(node)
        model.load_shared_state(global_state)
        train_round(shopper_data(node, shopper), model, lr=0.05, local_epochs=1, batch_size=8,
                    proximal_mu=0.0, seed=round_seed(context, cfg, 1, shopper))
        delta = _flat_update(model.shared_state(), global_state)
        assert delta.norm() > 0.05  # the norm binds
        unclipped.append(delta)
        clipped.append(delta * 0.05 / delta.norm())
    return clipped, unclipped


def _flat_update(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[name] - start[name]).flatten() for name in start])


@pytest.mark.parametrize("clipping_norm", [0.5, 100.0])  # binding, and not
def test_a_pool_shopper_is_clipped_as_flowers_clipping_mod_clips_a_device(clipping_norm):
    generator = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(30, 4, generator=generator), "b": torch.randn(7, generator=generator)}
    trained = {name: value + 0.1 * torch.randn(value.shape, generator=generator)
               for name, value in start.items()}
    flowers = [trained[name].numpy().copy() for name in start]
    compute_clip_model_update(flowers, [start[name].numpy() for name in start], clipping_norm)
    ours = pool_client.clipped_update(trained, start, clipping_norm)
    for name, expected in zip(start, flowers, strict=True):
        assert torch.allclose(ours[name], torch.from_numpy(expected), atol=1e-6)
    unclipped = float(_flat_update(trained, start).norm())
    assert float(_flat_update(ours, start).norm()) == pytest.approx(min(unclipped, clipping_norm),
                                                             rel=1e-5)


@pytest.mark.parametrize("training", ["", ROWS_READ], ids=["whole model", "rows read"])
def test_a_pool_node_clips_each_shopper_update_before_the_mean(training):
    """The node's reply under user-level DP-FedAvg is the mean of its shoppers' updates, each
    clipped on its own, computed here by hand: not the clip of their mean."""
    overrides = f"{POOL} partition.pool_nodes=2 {CENTRAL} {training}"
    node = load_node(overrides, 0, 2)
    shoppers = node.users.tolist()[:3]
    assert all(moves_only_rows_read(shopper_data(node, s)) == bool(training) for s in shoppers)
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in node_model(node).shared_state().items()}
    reply, context = _train_on_pool_node(overrides, shoppers, global_state)
    assert not reply.has_error() and reply.content["metrics"]["unit-weight"] == 3
    got = _flat_update(reply.content["arrays"].to_torch_state_dict(), global_state)
    clipped, unclipped = _clipped_updates(overrides, shoppers, global_state, context)
    assert torch.allclose(got, torch.stack(clipped).mean(0), atol=1e-6)
    assert got.norm() < 0.05 * 0.999  # the updates differ, so their mean is shorter
    mean_then_clip = torch.stack(unclipped).mean(0)
    assert not torch.allclose(got, mean_then_clip * 0.05 / mean_then_clip.norm(), atol=1e-4)


def test_a_pool_shopper_without_data_adds_a_zero_update_under_user_level_dp(monkeypatch):
    """The count of shoppers in the mean goes out with it: a shopper with nothing to train
    counts, with no update, instead of leaving the count one short."""
    overrides = f"{POOL} partition.pool_nodes=2 {CENTRAL}"
    node = load_node(overrides, 0, 2)
    shoppers = node.users.tolist()[:3]
    empty = shoppers[1]

    def without_data(node, shopper):
        data = shopper_data(node, shopper)
        if shopper != empty:
            return data
        examples = data.examples
        return replace(data, examples=type(examples)(examples.history[:0], examples.target[:0],
                                                     examples.user[:0]))

    monkeypatch.setattr(pool_client, "shopper_data", without_data)
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in node_model(node).shared_state().items()}
    reply, context = _train_on_pool_node(overrides, shoppers, global_state)
    assert not reply.has_error() and reply.content["metrics"]["unit-weight"] == 3
    got = _flat_update(reply.content["arrays"].to_torch_state_dict(), global_state)
    clipped, _ = _clipped_updates(overrides, [shoppers[0], shoppers[2]], global_state, context)
    assert torch.allclose(got, torch.stack(clipped).sum(0) / 3, atol=1e-6)
    # Without a privacy mechanism the shopper declines alone, as its device would.
    plain = f"{POOL} partition.pool_nodes=2"
    reply, _ = _train_on_pool_node(plain, shoppers, global_state)
    assert reply.content["metrics"]["unit-weight"] == 2


@pytest.mark.slow  # two whole federations, in this process
@pytest.mark.parametrize("training", ["", ROWS_READ, f"{ROWS_READ} train.batch_size=64"],
                         ids=["whole model", "rows read", "one step, clipped together"])
def test_user_level_dp_fedavg_on_a_pool_is_one_supernode_per_shoppers_run(training, tmp_path):
    """Same cohorts, same server noise: the pool gives the global model of one SuperNode per
    shopper, and states a shopper's epsilon over the cohort and the population."""
    overrides = f"{POOL} strategy=fedavg num_rounds=3 eval.every=3 seed=3 {CENTRAL} {training}"
    runs, wire = {}, tmp_path / "wire.jsonl"
    for pool in (None, 2):
        np.random.seed(0)  # the server's noise: Flower's function draws from numpy's generator
        logged = f"{overrides} wire_log={wire}" if pool else overrides
        runs[pool] = federated_run_in_process(logged, pool, tmp_path)
    # The pool's messages carry only what user-level DP-FedAvg's contract lists.
    assert_wire_contract(wire, f"{overrides} partition.pool_nodes=2")
    (one_each, per_shopper, _), (pooled_summary, pooled, _) = runs[None], runs[2]
    torch.manual_seed(typed_config(*overrides.split()).seed)
    initial = node_model(load_node(f"{overrides} partition.pool_nodes=2", 0, 2)).shared_state()
    for name, value in per_shopper.items():
        gap = (pooled[name].double() - value.double()).abs().max().item()
        moved = (pooled[name].double() - initial[name].double()).abs().max().item()
        assert gap < 1e-5 and gap < moved / 100, (name, gap, moved)
    report = pooled_summary["privacy"]
    assert (report["unit"], report["population"], report["sample_size"]) == ("shopper",
                                                                           SHOPPERS, 4)
    assert report["epsilon"] == pytest.approx(
        _epsilon_after(0.5, 3, SHOPPERS, 4, report["delta"]))
    # Checked apart from the accountant: one neighbouring pair's epsilon, integrated here.
    bound = replace_one_sampled_lower_bound(0.5, 4, SHOPPERS, 3, report["delta"])
    assert 0 < bound <= report["epsilon"]
    assert report["delta"] <= SHOPPERS ** -1.1
    assert one_each["privacy"]["epsilon"] == pytest.approx(report["epsilon"])


def test_pool_noise_is_gaussian_over_the_cohort_not_the_replies():
    """Two pool nodes reply for 3 and 1 shoppers with no update: what comes back is the noise
    alone, whose spread is noise_multiplier x C / cohort (cohort 4, not 2 replies)."""
    strategy = PoolNoise(build_strategy(typed_config(*POOL.split()).strategy,
                                        train_metrics=sum_metric_records,
                                        evaluate_metrics=sum_metric_records,
                                        weighted_by_key="unit-weight"),
                         noise_multiplier=2.0, clipping_norm=0.5, cohort=4)
    zeros = ArrayRecord(torch_state_dict={"w": torch.zeros(200_000)})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    replies = []
    for node, shoppers in ((5, 3), (6, 1)):
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": zeros, "metrics": MetricRecord(
            {"unit-weight": shoppers})}), reply_to=sent))
    arrays, _ = strategy.aggregate_train(1, replies)
    noise = arrays.to_torch_state_dict()["w"]
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert abs(noise.mean().item()) < 0.01


@pytest.mark.parametrize(("override", "named"), [
    ("privacy=central_dp", "privacy.side"),
    ("privacy=central_dp privacy.side=client privacy.clipping=adaptive", "privacy.clipping"),
    ("secagg=on", "secagg"),
    ("strategy=krum", "strategy"),
    ("strategy.fraction_evaluate=0.5", "strategy.fraction_evaluate"),
])
def test_what_needs_each_shoppers_reply_is_refused_on_a_pool(override, named):
    with pytest.raises(ConfigError, match=rf"^{named}=.*partition.pool_nodes=null"):
        typed_config(*f"{POOL} partition.pool_nodes=2 {override}".split())
    # One SuperNode per shopper: each reply is one shopper's.
    typed_config(*f"{POOL} partition.pool_nodes=null {override}".split())


def test_the_pool_size_is_the_number_of_supernodes():
    fed = build_federation(typed_config(*f"{POOL} partition.pool_nodes=3".split()))
    assert (fed.num_clients, fed.num_nodes) == (SHOPPERS, 3)
    assert [fed.node_users(k).tolist() for k in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    with pytest.raises(ConfigError, match='num-supernodes=3"'):
        fed.check_nodes(SHOPPERS)
    one_each = build_federation(typed_config(*f"{POOL} partition.pool_nodes=null".split()))
    assert one_each.num_nodes == SHOPPERS


@pytest.mark.slow  # starts the Flower runtime
def test_a_pooled_run_through_flower_keeps_the_wire_contract(flower, tmp_path):
    out, wire = tmp_path / "run", tmp_path / "wire.jsonl"
    overrides = f"{POOL} partition.pool_nodes=2 num_rounds=3"
    summary = flower(f"{overrides} wire_log={wire}", num_supernodes=2, output_dir=out)
    layouts = assert_wire_contract(wire, overrides)
    assert {"query", "train", "evaluate"} <= {x["type"] for x in layouts}
    assert summary["num_clients"] == SHOPPERS and summary["rounds"] == 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Round 1's cohort: 4 of the 8 shoppers, on however many of the 2 nodes own them.
    assert 1 <= lines[1]["train_clients"] <= 2
    assert lines[-1]["test"]["sampled"]["hr@10"] > 0


def test_shopper_rows_find_each_shoppers_examples_in_their_order():
    user = torch.tensor([5, 2, 5, 9, 2, 5])
    rows = ShopperRows.of(user)
    assert rows.count([5, 2, 7, 9]) == [3, 2, 0, 1]
    assert rows.rows([9, 7, 5, 2]).tolist() == [3, 0, 2, 5, 1, 4]
    assert rows.rows([7]).tolist() == [] and ShopperRows.of(user[:0]).count([1]) == [0]
    node = load_node(f"{POOL} partition.pool_nodes=2", 0, 2)
    for shopper in node.users.tolist():
        expected = (node.examples.user == shopper).nonzero().squeeze(1)
        assert torch.equal(node.shopper_rows.rows([shopper]), expected)
