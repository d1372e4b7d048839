"""Differential privacy with the real Opacus and Flower: the shopper as DP-SGD's unit, budgets
that hold across rounds and that a client enforces against the server, randomness the server
cannot replay, DP-FedAvg accounted with the replace-one sensitivity, and every reported epsilon
checked against a computation that does not use the accountant it was reported with."""

from __future__ import annotations

import copy
import dataclasses
import json
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY,
    assert_opacus_per_example_gradients,
    assert_wire_contract,
    load_node,
    per_example_batch,
    train_message,
    typed_config,
)
from flwr.app import ConfigRecord
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from independent_accounting import (
    gaussian_composition_epsilon,
    poisson_gaussian_pld_epsilon,
    poisson_gaussian_prv_epsilon,
    replace_one_sampled_lower_bound,
)
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedrec.accounting import DpSgdPlan, default_delta, dp_sgd_epsilon, plan_dp_sgd
from fedrec.client.app import DP_SGD_STATE, OPTIMIZER_STATE
from fedrec.client.app import app as client_app
from fedrec.client.dp_sgd import (
    DpSgdLedger,
    clip_groups,
    clipped_sum,
    embedding_norm_sample,
    shopper_gradients,
    shopper_term,
    train_dp_sgd,
)
from fedrec.client.shopper_objective import ShopperObjective
from fedrec.client.task import node_model, protected_units, train_round
from fedrec.config import ConfigError
from fedrec.model import ATTRIBUTE_TABLE, ITEM_TABLE
from fedrec.server.privacy import (
    _epsilon_after,
    _rdp_accountant,
    accounted_noise,
    plan_central_dp,
)
from fedrec.wire import BUDGET_EXHAUSTED, NOT_COVERED, OUTSIDE_PLAN

DP = f"{TINY} privacy=dp_sgd_eps4 privacy.negatives_per_shopper=16"
# What a server sends with a DP-SGD train request: the public inputs of each client's plan.
DP_REQUEST = {"dp-planned-rounds": 3, "dp-delta": 1e-3, "dp-steps-per-epoch": 2,
              "local-epochs": 1}


def _ledger(overrides: str, planned_rounds: int, delta: float = 1e-3) -> DpSgdLedger:
    node = load_node(overrides, 0, 3)
    cfg = node.cfg.privacy
    plan = plan_dp_sgd(cfg, node.cfg.train.dp_sgd, delta=delta, planned_rounds=planned_rounds)
    return DpSgdLedger(cfg.accountant, cfg.target_epsilon, plan, [])


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.shared_state().values()])


@pytest.mark.parametrize("unit", ["shopper", "example"])
def test_dp_sgd_budget_composes_across_rounds_and_then_stops(unit):
    overrides = f"{DP} privacy.unit={unit}"
    node = load_node(overrides, 0, 3)
    ledger = _ledger(overrides, planned_rounds=3)
    model = node_model(node)
    spent = []
    for round_ in range(3):
        assert ledger.can_train()
        train_round(node, model, lr=0.01, local_epochs=1, batch_size=0, proximal_mu=0.0,
                    seed=round_, ledger=ledger)
        spent.append(ledger.epsilon())
        # The server states the same epsilon from the public plan, without asking the client.
        assert dp_sgd_epsilon(ledger.plan, round_ + 1, "rdp") == pytest.approx(spent[-1])
    assert 0 < spent[0] < spent[1] < spent[2] <= 4.0 * (1 + 1e-6)
    assert spent[2] > 4.0 * 0.95  # the plan spends the budget, not a fraction of it
    assert not ledger.can_train()  # a fourth round would pass the target
    assert DpSgdLedger.from_record(ledger.to_record()).epsilon() == pytest.approx(spent[2])


def test_the_noise_is_real_and_not_derived_from_the_seed():
    overrides = f"{DP} train.optimizer=sgd"  # Adam would normalise the noise away
    node = load_node(overrides, 0, 3)
    ledger = _ledger(overrides, planned_rounds=3)
    assert ledger.plan.noise_multiplier > 0
    torch.manual_seed(0)
    start = node_model(node)

    def trained(plan=ledger.plan) -> torch.Tensor:
        model = copy.deepcopy(start)
        fresh = DpSgdLedger(ledger.accountant, ledger.target_epsilon, plan, [])
        train_round(node, model, lr=0.01, local_epochs=1, batch_size=0, proximal_mu=0.0,
                    seed=0, ledger=fresh)
        return _flat(model)

    # Even the client's own seed fixes neither the noise nor the Poisson sampling.
    assert not torch.allclose(trained(), trained())
    origin = _flat(start)
    silent = (trained(dataclasses.replace(ledger.plan, noise_multiplier=0.0)) - origin).norm()
    loud = (trained(dataclasses.replace(ledger.plan, noise_multiplier=100.0)) - origin).norm()
    assert loud > 10 * silent > 0


def test_a_shopper_is_clipped_as_one_unit():
    """Without noise and with every shopper in the step, removing one shopper (all of their
    examples) moves a DP-SGD step by at most the clipping norm, whatever their history's size;
    unclipped, the same shopper moves it far more."""
    overrides = f"{DP} train.optimizer=sgd train.dp_sgd.examples_per_shopper=1000"
    node = load_node(overrides, 0, 3)
    cfg = node.cfg.privacy
    torch.manual_seed(0)
    start = node_model(node)
    users = node.examples.user
    heavy = int(torch.mode(users).values)  # the shopper with the most examples
    assert int((users == heavy).sum()) > 5
    keep = users != heavy
    without = dataclasses.replace(node.examples, history=node.examples.history[keep],
                                  target=node.examples.target[keep], user=users[keep])

    def step(examples, clip: float) -> torch.Tensor:
        model = copy.deepcopy(start)
        plan = DpSgdPlan(0.0, 1.0, 1, 1e-3, 1)
        ledger = DpSgdLedger("rdp", 4.0, plan, [])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_dp_sgd(model, optimizer, examples, node.objective, ledger,
                     dataclasses.replace(cfg, max_grad_norm=clip), node.cfg.train.dp_sgd, seed=3)
        return _flat(model)

    clip = 0.01
    assert (step(node.examples, clip) - step(without, clip)).norm() <= clip * (1 + 1e-4)
    unclipped = (step(node.examples, 1e6) - step(without, 1e6)).norm()
    assert unclipped > 10 * clip


def test_each_clipping_group_bounds_a_shoppers_part():
    """With privacy.clip_groups, removing one shopper moves each group of parameters by at most
    its own part of max_grad_norm (no noise, every shopper in the step, through the round a
    client trains), and a group of weight 0 not at all; unclipped, the same shopper moves each
    trained group further."""
    overrides = (f"{DP} model.item_vectors=attributes model.history_items=attributes "
                 "train.optimizer=sgd train.dp_sgd.examples_per_shopper=1000 "
                 "++privacy.clip_groups={attribute_embedding:0,item_mlp:1,user_mlp:3}")
    node = load_node(overrides, 0, 3)
    torch.manual_seed(0)
    start = node_model(node)
    users = node.examples.user
    heavy = int(torch.mode(users).values)
    keep = users != heavy
    without = dataclasses.replace(node.examples, history=node.examples.history[keep],
                                  target=node.examples.target[keep], user=users[keep])

    def step(examples, clip: float) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(start)
        ledger = DpSgdLedger("rdp", 4.0, DpSgdPlan(0.0, 1.0, 1, 1e-3, 1), [])
        privacy = dataclasses.replace(node.cfg.privacy, max_grad_norm=clip)
        train_round(dataclasses.replace(node, examples=examples,
                                        cfg=dataclasses.replace(node.cfg, privacy=privacy)),
                    model, lr=1.0, local_epochs=1, batch_size=0, proximal_mu=0.0, seed=3,
                    ledger=ledger)
        return {group: torch.cat([p.detach().flatten() for name, p in model.named_parameters()
                                  if name.startswith(group)])
                for group in ("attribute_embedding", "item_mlp", "user_mlp")}

    clip = 0.01
    parts = {"attribute_embedding": 0.0, "item_mlp": clip / 10 ** 0.5,
             "user_mlp": 3 * clip / 10 ** 0.5}
    with_all, with_fewer = step(node.examples, clip), step(without, clip)
    unclipped = {group: (a - b).norm() for (group, a), b in
                 zip(step(node.examples, 1e6).items(), step(without, 1e6).values(), strict=True)}
    first = torch.cat([p.detach().flatten() for name, p in start.named_parameters()
                       if name.startswith("attribute_embedding")])
    assert torch.equal(with_all["attribute_embedding"], first)
    for group, part in parts.items():
        assert (with_all[group] - with_fewer[group]).norm() <= part * (1 + 1e-4)
        if part > 0:
            assert unclipped[group] > 10 * part


def test_clip_groups_must_cover_the_model():
    """A group that names no parameter, or a parameter in no group, is refused by name."""
    node = load_node(f"{DP} ++privacy.clip_groups={{item_mlp:1,user_mlp:1,item_table:1}}", 0, 3)
    with pytest.raises(ConfigError, match=r"no parameter in: \['item_table'\]; in no group: "
                                          r"\['item_embedding.weight', 'attribute_embedding"):
        clip_groups(node_model(node), node.cfg.privacy)


@pytest.mark.parametrize("model", ["", "model.user_tower=attention",
                                   "model.item_vectors=attributes model.history_items=attributes",
                                   "model.dropout=0.1"])
def test_shopper_gradients_are_each_shoppers_own(model):
    """DP-SGD by shopper takes the sampled shoppers' gradients apart in one vmap pass, shoppers
    of different sizes padded together: each equals that shopper's gradient of ``Objective``
    on a batch of their examples alone (their negatives shared by those examples), the id
    table's included, and so does their loss. Without dropout the item tower runs once for
    all of them and its backward by hand (``ItemTower``); with dropout it runs inside vmap,
    here with the dropout switched off (eval mode) so that the two sides draw alike."""
    node = load_node(f"{DP} {model}", 0, 3)
    assert not node.objective.per_example and node.objective.num_negatives == 16
    torch.manual_seed(0)
    net = node_model(node)
    net.train("dropout" not in model)
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert (ITEM_TABLE in params) == ("attributes" not in model)
    users = node.examples.user
    shoppers = torch.unique(users)[:7]
    cap = int(torch.bincount(users)[shoppers].median())  # some shoppers capped, some not
    terms, references = [], []
    for shopper in shoppers.tolist():
        rows = (users == shopper).nonzero().flatten()
        terms.append(shopper_term(rows, node.objective, cap,
                                  torch.Generator().manual_seed(shopper)))
        generator = torch.Generator().manual_seed(shopper)
        if len(rows) > cap:
            rows = rows[torch.randperm(len(rows), generator=generator)[:cap]]
        batch = (node.examples.history[rows], node.examples.target[rows], users[rows])
        loss = node.objective(net, batch, generator)
        references.append((torch.autograd.grad(loss, list(params.values())),
                           float(loss.detach())))
    assert len({len(term.rows) for term in terms}) > 1  # the padding is exercised
    by_size = sorted(range(len(terms)), key=lambda i: len(terms[i].rows))
    objective = ShopperObjective(net, node.examples, logq=False)
    chunks = [(_per_shopper_tables(g, params), g.losses)
              for g in shopper_gradients(objective, params, terms)]
    grads = {name: torch.cat([g[name] for g, _ in chunks]) for name in params}
    losses = torch.cat([loss for _, loss in chunks])
    for slot, index in enumerate(by_size):
        expected, expected_loss = references[index]
        assert float(losses[slot]) == pytest.approx(expected_loss, rel=1e-5)
        for name, want in zip(params, expected, strict=True):
            torch.testing.assert_close(grads[name][slot], want, rtol=1e-4, atol=1e-6)


def _per_shopper_tables(grads, params) -> dict[str, torch.Tensor]:
    """Each shopper's gradient on every parameter as a tensor of the parameter's shape, the
    tables' rows laid into a table per shopper: what Opacus reads as per-sample gradients."""
    dense, items = dict(grads.dense), grads.items
    if grads.id_rows is not None:
        table = params[ITEM_TABLE]
        dense[ITEM_TABLE] = table.new_zeros((len(items), *table.shape)).index_put_(
            (torch.arange(len(items)).unsqueeze(1).expand_as(items), items), grads.id_rows,
            accumulate=True)
    if grads.attribute_rows is not None:
        owner, attribute, attribute_grads = grads.attribute_rows
        table = params[ATTRIBUTE_TABLE]
        dense[ATTRIBUTE_TABLE] = table.new_zeros((len(items), *table.shape)).index_put_(
            (owner, attribute), attribute_grads, accumulate=True)
    return dense


@pytest.mark.parametrize("groups", ["", "++privacy.clip_groups={item_embedding:2,"
                                        "attribute_embedding:1,item_mlp:1,user_mlp:3}"])
def test_clipped_sum_is_what_opacus_clips(groups):
    """The sum DP-SGD by shopper clips from the rows each shopper reached equals the sum that
    Opacus' own DPOptimizer.clip_and_accumulate makes of the same gradients laid out as dense
    per-sample tensors, the id and attribute tables included; with clipping groups, each
    group's part scaled to its norm first. A clip small enough that every shopper is cut."""
    node = load_node(f"{DP} privacy.max_grad_norm=0.05 {groups}", 0, 3)
    torch.manual_seed(0)
    net = node_model(node)
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert {ITEM_TABLE, ATTRIBUTE_TABLE} <= set(params)
    cut = clip_groups(net, node.cfg.privacy)
    assert len(cut) == (4 if groups else 1)
    users = node.examples.user
    terms = [shopper_term((users == shopper).nonzero().flatten(), node.objective, 8,
                          torch.Generator().manual_seed(shopper))
             for shopper in torch.unique(users)[:9].tolist()]
    objective = ShopperObjective(net, node.examples, logq=False)
    [grads] = list(shopper_gradients(objective, params, terms))
    ours = clipped_sum(grads, params, cut)

    per_sample = _per_shopper_tables(grads, params)
    norms = {name: per_sample[name].flatten(1).norm(dim=1) for name in params}
    assert (torch.stack(list(norms.values())).norm(dim=0) > node.cfg.privacy.max_grad_norm).all()
    if groups:
        for names, norm in cut:
            group = torch.stack([norms[name] for name in names]).norm(dim=0)
            for name in names:
                per_sample[name] = per_sample[name] * (norm / (group + 1e-6)).clamp(
                    max=1.0).view(-1, *[1] * (per_sample[name].dim() - 1))
    optimizer = DPOptimizer(torch.optim.SGD(params.values(), lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=node.cfg.privacy.max_grad_norm, expected_batch_size=1)
    for name, p in params.items():
        p.grad_sample = per_sample[name]
    optimizer.clip_and_accumulate()
    for name, p in params.items():
        torch.testing.assert_close(ours[name], p.summed_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("unit", ["shopper", "example"])
def test_dp_sgd_leaves_an_id_table_nothing_reads_alone(unit):
    """Item vectors and histories read from the public attributes alone: nothing reads the id
    table, so DP-SGD neither steps it nor noises it, and the item tower still trains."""
    overrides = (f"{DP} privacy.unit={unit} model.item_vectors=attributes "
                 "model.history_items=attributes")
    node = load_node(overrides, 0, 3)
    torch.manual_seed(0)
    model = node_model(node)
    table = model.item_embedding.weight.detach().clone()
    item_layer = model.item_mlp[0].weight.detach().clone()
    train_round(node, model, lr=0.01, local_epochs=1, batch_size=0, proximal_mu=0.0, seed=0,
                ledger=_ledger(overrides, planned_rounds=3))
    assert torch.equal(model.item_embedding.weight, table)
    assert not torch.equal(model.item_mlp[0].weight, item_layer)


def test_opacus_sees_each_example_alone_and_clips_it():
    """privacy.unit=example: per-example candidates keep the batch axis through the model, so
    Opacus' per-sample gradients are each example's own, and clipping bounds what one adds."""
    node = load_node(DP, 0, 3)
    torch.manual_seed(0)
    model = node_model(node)
    history, candidates, labels = batch = per_example_batch(node, 8, 6)
    assert_opacus_per_example_gradients(model, batch, (0, 5))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])

    def step(rows: list[int], clip: float | None) -> torch.Tensor:
        m = copy.deepcopy(model)
        if clip is None:
            optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
        else:
            m = GradSampleModule(m)
            optimizer = DPOptimizer(torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=0.0,
                                    max_grad_norm=clip, expected_batch_size=8)
        F.cross_entropy(m(history[rows], candidates[rows]), labels[rows]).backward()
        optimizer.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()]) - before

    everyone, without_5 = list(range(8)), [0, 1, 2, 3, 4, 6, 7]
    clip = 0.01
    assert (step(everyone, clip) - step(without_5, clip)).norm() <= clip / 8 * (1 + 1e-4)
    alone = (8 * step(everyone, None) - 7 * step(without_5, None)).norm()
    assert alone > 10 * clip


def test_faster_embedding_norms_equal_opacus_own():
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample

    layer = torch.nn.Embedding(30, 4)
    ids = torch.randint(0, 30, (6, 9))
    ids[0, :3] = 7  # an id repeated within one example sums before the norm
    backprops = torch.randn(6, 9, 4)
    ours = embedding_norm_sample(layer, [ids], backprops)[layer.weight]
    theirs = compute_embedding_norm_sample(layer, [ids], backprops)[layer.weight]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_client_refuses_a_server_that_asks_past_its_plan():
    """The attack: after round 1, a server asks for 10 local epochs (which drove a client to
    epsilon 7.59 against a target of 4). The client refuses and spends nothing."""
    message, context = train_message(DP, **DP_REQUEST)
    first = client_app(message, context)
    assert not first.has_error()
    spent = DpSgdLedger.from_record(context.state.config_records[DP_SGD_STATE]).epsilon()
    greedy, _ = train_message(DP, **{**DP_REQUEST, "local-epochs": 10})
    refused = client_app(greedy, context)
    assert refused.has_error() and refused.error.code == OUTSIDE_PLAN
    assert "local-epochs=10" in refused.error.reason
    faster, _ = train_message(DP, **{**DP_REQUEST, "dp-steps-per-epoch": 20})
    assert client_app(faster, context).error.code == OUTSIDE_PLAN
    ledger = DpSgdLedger.from_record(context.state.config_records[DP_SGD_STATE])
    assert ledger.epsilon() == pytest.approx(spent) and len(ledger.history) == 1
    # Nor does a fresh client accept a delta that would let it publish a shopper's data.
    loose, fresh = train_message(DP, **{**DP_REQUEST, "dp-delta": 0.5})
    reply = client_app(loose, fresh)
    assert reply.has_error() and reply.error.code == OUTSIDE_PLAN
    assert "privacy.delta=0.5" in reply.error.reason


def test_a_dp_sgd_client_keeps_adams_moments_and_never_sends_them():
    """Under DP-SGD (train.dp_sgd.keep_optimizer_state=true) a client's Adam moments stay in
    its own Context.state from one round to the next; the reply holds the model alone."""
    message, context = train_message(DP, **DP_REQUEST)
    reply = client_app(message, context)
    assert not reply.has_error()
    kept = context.state.array_records[OPTIMIZER_STATE].to_torch_state_dict()
    assert any(name.endswith("exp_avg_sq") for name in kept)
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content["arrays"]) == set(node_model(load_node(DP, 0, 3)).shared_state())
    second, _ = train_message(DP, **{**DP_REQUEST, "server-round": 2})
    assert not client_app(second, context).has_error()
    moved = context.state.array_records[OPTIMIZER_STATE].to_torch_state_dict()
    assert all(float(moved[name]) == 2 * float(kept[name]) for name in kept
               if name.endswith(".step"))


def test_exhausted_client_replies_with_an_error_and_keeps_its_ledger():
    message, context = train_message(DP, **{**DP_REQUEST, "dp-planned-rounds": 1})
    first = client_app(message, context)
    assert not first.has_error()
    assert dict(first.content["metrics"]) == {"unit-weight": 1}  # no epsilon, count or loss
    again, _ = train_message(DP, **{**DP_REQUEST, "dp-planned-rounds": 1})
    second = client_app(again, context)  # same context: the node remembers round 1
    assert second.has_error() and second.error.code == BUDGET_EXHAUSTED
    ledger = DpSgdLedger.from_record(context.state.config_records[DP_SGD_STATE])
    assert 0 < ledger.epsilon() <= 4.0 * (1 + 1e-6)


def test_replaying_the_server_seed_does_not_reproduce_a_client_update():
    """The attack: the server knows every seed it sends and its config; a client's negatives
    and shuffles come from a secret of the node, so the same request to the same data gives
    another update on another node (or a new run), unless a reproducible client_seed is asked
    for."""
    def update(overrides: str, **request: Any) -> torch.Tensor:
        torch.manual_seed(0)  # the same starting model and dropout draws in every call
        message, context = train_message(overrides, **request)
        reply = client_app(message, context)
        assert "seed" not in message.content["config"]
        return torch.cat([torch.from_numpy(a).flatten()
                          for a in reply.content["arrays"].to_numpy_ndarrays()])

    assert not torch.equal(update(TINY), update(TINY))
    assert torch.equal(update(f"{TINY} client_seed=5"), update(f"{TINY} client_seed=5"))
    # DP-SGD's sampling and noise: fresh OS randomness, unless client_seed fixes them too.
    assert not torch.equal(update(DP, **DP_REQUEST), update(DP, **DP_REQUEST))
    assert torch.equal(update(f"{DP} client_seed=5", **DP_REQUEST),
                       update(f"{DP} client_seed=5", **DP_REQUEST))


def test_a_private_client_sends_no_evaluation_figures():
    message, context = train_message(DP, **DP_REQUEST)
    message.metadata.message_type = "evaluate"
    reply = client_app(message, context)
    assert reply.has_error() and reply.error.code == NOT_COVERED


def test_client_side_clipping_bounds_the_update_it_sends():
    overrides = f"{TINY} privacy=central_dp privacy.side=client"
    message, context = train_message(overrides, clipping_norm=0.05, lr=0.5)
    sent = message.content["arrays"].to_numpy_ndarrays()
    reply = client_app(message, context)
    received = reply.content["arrays"].to_numpy_ndarrays()
    norm = np.sqrt(sum(float(((r - s) ** 2).sum()) for r, s in zip(received, sent, strict=True)))
    assert 0 < norm <= 0.05 * (1 + 1e-5)
    assert set(reply.content["metrics"]) == {"unit-weight"}


@pytest.mark.parametrize("overrides, key", [
    ("privacy=dp_sgd model.personal_embedding=true", "model.personal_embedding"),
    ("privacy=dp_sgd privacy.neighbouring=replace_one", "privacy.neighbouring"),
    ("privacy=central_dp privacy.sampling=poisson", "privacy.sampling"),
    ("privacy=central_dp privacy.neighbouring=add_remove", "privacy.neighbouring"),
    ("privacy=dp_sgd privacy.unit=interaction", "privacy.unit"),
    ("privacy=central_dp privacy.side=client strategy=fedadam", "strategy"),
    ("privacy=central_dp privacy.side=client strategy=fedavgm", "strategy"),
    ("privacy=central_dp privacy.side=client strategy=fedyogi secagg=on", "strategy"),
])
def test_guarantees_that_cannot_hold_are_refused_at_composition(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        typed_config(*overrides.split())


def test_delta_defaults_below_one_over_n_and_one_over_n_is_refused():
    cfg = typed_config("privacy=central_dp_eps4").privacy
    assert plan_central_dp(cfg, population=943, sample_size=94,
                           num_rounds=5).delta == pytest.approx(943 ** -1.1)
    loose = typed_config("privacy=central_dp_eps4", "privacy.delta=0.01").privacy
    with pytest.raises(ConfigError, match=r"privacy\.delta=0\.01 is not below 1 / 100"):
        plan_central_dp(loose, population=100, sample_size=10, num_rounds=5)
    assert default_delta(10) < 1 / 10


@pytest.mark.slow  # searches noise multipliers numerically
def test_central_dp_plans_its_noise_and_rounds():
    cfg = typed_config("privacy=central_dp_eps4").privacy
    planned = plan_central_dp(cfg, population=943, sample_size=94, num_rounds=50)
    assert planned.rounds == 50
    spent = _epsilon_after(planned.noise_multiplier, 50, 943, 94, planned.delta)
    assert 4.0 * 0.97 <= spent <= 4.0
    fixed = typed_config("privacy=central_dp_eps4", "privacy.noise_multiplier=1.6").privacy
    cut = plan_central_dp(fixed, population=943, sample_size=94, num_rounds=500)
    assert 1 <= cut.rounds < 500
    assert _epsilon_after(1.6, cut.rounds, 943, 94, cut.delta) <= 4.0
    assert _epsilon_after(1.6, cut.rounds + 1, 943, 94, cut.delta) > 4.0


# ------------------------------------------------------------------ independent accounting
@pytest.mark.parametrize("budget", [1, 4, 8])
def test_central_dp_epsilon_is_at_least_the_exact_gaussian_composition(budget):
    """Full participation (3 of 3 shops, the tiny federation): no sampling, so the exact
    epsilon of the composed Gaussian mechanisms is a closed form. The accountant must see the
    noise over the replace-one sensitivity 2C; seeing it over C (the audited bug) reports
    about half the closed form's epsilon, and this test fails."""
    cfg = typed_config(f"privacy=central_dp_eps{budget}").privacy
    central = plan_central_dp(cfg, population=3, sample_size=3, num_rounds=15)
    for _ in range(15):
        central.compose_round()
    exact = gaussian_composition_epsilon([central.noise_multiplier / 2] * 15, central.delta)
    assert exact <= central.epsilon() <= budget * (1 + 1e-9)
    assert central.epsilon() < 3 * exact  # and RDP's slack is modest
    bugged = gaussian_composition_epsilon([central.noise_multiplier] * 15, central.delta)
    assert bugged < 0.75 * exact


@pytest.mark.slow  # integrates a privacy curve numerically
@pytest.mark.parametrize("budget", [1, 4, 8])
def test_central_dp_sampled_epsilon_is_at_least_a_neighbouring_pairs(budget):
    """Cross-device ML-100K as the auditor ran it: 18 of 943 a round, 1200 rounds."""
    cfg = typed_config(f"privacy=central_dp_eps{budget}").privacy
    central = plan_central_dp(cfg, population=943, sample_size=18, num_rounds=1200)
    reported = _epsilon_after(central.noise_multiplier, 1200, 943, 18, central.delta)
    bound = replace_one_sampled_lower_bound(central.noise_multiplier, 18, 943, 1200,
                                            central.delta)
    assert 0 <= bound <= reported <= budget * (1 + 1e-9)
    if budget > 1:
        assert bound > 0.1 * reported  # the pair is not a vacuous bound


@pytest.mark.parametrize("budget", [1, 4, 8])
@pytest.mark.parametrize("steps_per_epoch", [1, 2])
def test_dp_sgd_epsilon_is_at_least_two_independent_accountants(budget, steps_per_epoch):
    """The plan fedrec reports (Opacus' RDP) against the privacy loss distribution
    (dp_accounting) and the PRV accountant of the same Poisson-subsampled Gaussian; at rate 1
    against the closed form too."""
    overrides = [f"privacy=dp_sgd_eps{budget}", f"train.dp_sgd.steps_per_epoch={steps_per_epoch}"]
    cfg = typed_config(*overrides)
    delta = default_delta(943)
    plan = plan_dp_sgd(cfg.privacy, cfg.train.dp_sgd, delta=delta, planned_rounds=15)
    steps = 15 * plan.steps_per_round
    reported = dp_sgd_epsilon(plan, 15, "rdp")
    assert budget * 0.95 <= reported <= budget * (1 + 1e-6)
    noise, rate = plan.noise_multiplier, plan.sample_rate
    pld = poisson_gaussian_pld_epsilon(noise, rate, steps, delta)
    prv = poisson_gaussian_prv_epsilon(noise, rate, steps, delta)
    assert pld <= reported and prv <= reported
    assert reported < 1.5 * pld  # the same mechanism, not a different one
    if rate == 1:
        assert gaussian_composition_epsilon([noise] * steps, delta) <= reported


def test_central_dp_round_with_failed_clients_costs_its_real_strength():
    cfg = typed_config("privacy=central_dp", "privacy.noise_multiplier=2.0",
                       "privacy.max_epsilon=50").privacy
    full, short = (plan_central_dp(cfg, population=3, sample_size=3, num_rounds=5)
                   for _ in range(2))
    full.compose_round(3)
    short.compose_round(2)  # one of three failed: the mean of 2 moves by 2C / 2
    assert short.epsilon() > full.epsilon()
    # The round was the Gaussian mechanism with noise z x 2 / (2 x 3) over the sensitivity.
    exact = gaussian_composition_epsilon([2.0 * 2 / 6], short.delta)
    assert exact <= short.epsilon()
    assert accounted_noise(2.0) == 1.0


# --------------------------------------------------------------------------- real runs
@pytest.mark.slow  # starts the Flower runtime
def test_dp_sgd_run_states_its_guarantee_and_keeps_the_wire_contract(flower, tmp_path):
    out, wire = tmp_path / "dp_sgd", tmp_path / "wire.jsonl"
    overrides = f"{DP} num_rounds=3 eval.every=2"
    summary = flower(f"{overrides} wire_log={wire}", num_supernodes=3, output_dir=out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    spent = [line["epsilon"] for line in lines]
    assert spent[0] == 0 and 0 < spent[1] < spent[2] < spent[3] <= 4.0 * (1 + 1e-6)
    privacy = summary["privacy"]
    assert {k: privacy[k] for k in ("mechanism", "unit", "neighbouring", "sampling")} == {
        "mechanism": "dp_sgd", "unit": "shopper", "neighbouring": "add_remove",
        "sampling": "poisson"}
    assert privacy["epsilon"] == spent[3]
    assert privacy["delta"] == pytest.approx(60 ** -1.1)  # 60 shoppers in the federation
    # The server's statement is the plan every client makes from the same public values...
    cfg = typed_config(*overrides.split())
    plan = plan_dp_sgd(cfg.privacy, cfg.train.dp_sgd, delta=60 ** -1.1, planned_rounds=3)
    assert privacy["noise_multiplier"] == plan.noise_multiplier
    # ... and at least what an independent accountant gives for what ran.
    assert poisson_gaussian_pld_epsilon(plan.noise_multiplier, plan.sample_rate,
                                        3 * plan.steps_per_round, plan.delta) <= spent[3]
    # A private run reports the server's own evaluation of its last round, labelled so.
    assert summary["metrics_source"] == "server" and summary["selected_round"] == 3
    assert summary["metrics"] == lines[3]["server"]["test"] and "test" not in lines[3]
    # The server evaluates as eval.every says, and always the last round.
    assert ["server" in line for line in lines] == [True, False, True, True]
    layouts = assert_wire_contract(wire, overrides)
    assert not [x for x in layouts if x["type"] == "evaluate"]  # none asked for
    replies = [x for x in layouts if x["direction"] == "up"]
    assert len(replies) == 9 and all(
        x["records"]["metrics"]["keys"] == ["unit-weight"] for x in replies)
    log = out.with_name("dp_sgd.flwr.log").read_text()
    assert "the shopping guide for a made-up shopper" in log


@pytest.mark.slow  # starts the Flower runtime
def test_clients_out_of_budget_skip_rounds_and_the_run_goes_on(flower, tmp_path):
    out = tmp_path / "exhausted"
    # Two of three clients a round for four rounds, each client budgeted for one round: from
    # the second round on, clients picked again refuse, and the others still train.
    summary = flower(f"{DP} num_rounds=4 strategy.fraction_train=0.67 privacy.planned_rounds=1",
                     num_supernodes=3, output_dir=out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3, 4]
    refused = sum(line["privacy"]["exhausted_this_round"] for line in lines)
    trained = sum(line.get("train_clients", 0) for line in lines)
    assert lines[1]["train_clients"] == 2 and trained <= 3 and refused == 8 - trained
    assert summary["privacy"]["exhausted_clients"] >= 2
    # Each client trained once: the server states the one-round epsilon, not four rounds'.
    assert summary["privacy"]["epsilon"] == pytest.approx(lines[1]["epsilon"])
    assert summary["privacy"]["epsilon"] <= 4.0 * (1 + 1e-6)


@pytest.mark.slow  # starts the Flower runtime
def test_central_dp_stops_at_its_budget_and_keeps_the_wire_contract(flower, tmp_path):
    out, wire = tmp_path / "central", tmp_path / "wire.jsonl"
    delta = 3 ** -1.1
    budget = (_epsilon_after(2.0, 2, 3, 3, delta) + _epsilon_after(2.0, 3, 3, 3, delta)) / 2
    overrides = (f"{TINY} num_rounds=4 privacy=central_dp privacy.side=client "
                 f"privacy.noise_multiplier=2.0 privacy.max_epsilon={budget}")
    summary = flower(f"{overrides} wire_log={wire}", num_supernodes=3, output_dir=out)
    assert summary["rounds"] == 2 and summary["rounds_requested"] == 4
    assert summary["stopped_by"] == "privacy.max_epsilon"
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "central_dp" and privacy["noise_multiplier"] == 2.0
    assert (privacy["unit"], privacy["neighbouring"], privacy["sampling"]) == (
        "client", "replace_one", "fixed_size")
    assert privacy["epsilon"] == pytest.approx(_epsilon_after(2.0, 2, 3, 3, delta))
    assert gaussian_composition_epsilon([1.0, 1.0], delta) <= privacy["epsilon"] <= budget
    assert privacy["delta"] == pytest.approx(delta)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert 0 < lines[1]["epsilon"] < lines[2]["epsilon"]
    assert (out / "model.pt").exists()
    assert_wire_contract(wire, overrides)


FAILING_CLIENT = '''
import time

from flwr.clientapp import ClientApp

from fedrec.client import app as fedrec_client


def hang_once(msg, context, call_next):
    """Partition 0 answers its round-2 training only after the server stopped waiting."""
    if (int(context.node_config["partition-id"]) == 0
            and int(msg.content["config"]["server-round"]) == 2):
        time.sleep(30)
    return call_next(msg, context)


app = ClientApp(mods=[hang_once])
app.train(mods=fedrec_client.TRAIN_MODS)(fedrec_client.train)
app.evaluate()(fedrec_client.evaluate)
'''


@pytest.mark.slow  # starts the Flower runtime
def test_central_dp_round_with_a_failed_client_is_charged_and_the_run_stops(flower, tmp_path):
    """A client that does not answer in time: round 2 releases the noised mean of 2 updates,
    not 3. The server charges it at that strength, and stops once another full round would
    pass max_epsilon. (A round with an error reply releases nothing: Flower's FedAvg skips
    it.)"""
    from test_secagg import FAULTY_PROJECT

    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        textwrap.dedent(FAULTY_PROJECT).replace("faulty_client", "failing_client"))
    (project / "failing_client.py").write_text(textwrap.dedent(FAILING_CLIENT))
    cfg = typed_config("privacy=central_dp", "privacy.noise_multiplier=2.0",
                       "privacy.max_epsilon=100").privacy
    central = plan_central_dp(cfg, population=3, sample_size=3, num_rounds=3)
    central.compose_round(3)
    central.compose_round(2)
    after_two = central.epsilon()
    central.compose_round(3)
    # Room for round 2 at its real cost, not for a third round after it.
    budget = (after_two + central.epsilon()) / 2
    delta = central.delta
    summary = flower(f"{TINY} num_rounds=3 privacy=central_dp privacy.noise_multiplier=2.0 "
                     f"privacy.max_epsilon={budget} round_timeout=20", num_supernodes=3,
                     output_dir=tmp_path / "run", project_dir=project)
    lines = [json.loads(line)
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train_clients"] == 3 and "failed_clients" not in lines[1]
    assert lines[2]["failed_clients"] == 1 and lines[2]["train_clients"] == 2
    assert summary["rounds"] == 2 and summary["rounds_requested"] == 3
    assert summary["privacy"]["epsilon"] == pytest.approx(after_two)
    assert summary["privacy"]["epsilon"] > _epsilon_after(2.0, 2, 3, 3, delta)
    # Round 1 at noise 2 x 3 / 6 over the sensitivity, round 2 at 2 x 2 / 6: the exact
    # composition of what ran, against the epsilon stated.
    assert gaussian_composition_epsilon([1.0, 2 / 3], delta) <= summary["privacy"]["epsilon"]


def test_central_dp_refuses_a_short_release_that_would_pass_the_budget():
    cfg = typed_config("privacy=central_dp", "privacy.noise_multiplier=2.0").privacy
    budget = _epsilon_after(2.0, 2, 3, 3, 3 ** -1.1) * 1.001  # two full rounds fit
    central = plan_central_dp(dataclasses.replace(cfg, max_epsilon=budget), population=3,
                              sample_size=3, num_rounds=2)
    central.compose_round(3)
    assert central.release_fits(3) and not central.release_fits(2)


def test_central_dp_release_check_composes_the_ledger_as_a_replay_does():
    """The ledger sums each distinct release's RDP curve, computed once; Flower's
    RdpAccountant, composing one release at a time, must give the same epsilon, and the same
    answer on both sides of the budget."""
    cfg = typed_config("privacy=central_dp", "privacy.noise_multiplier=1.0").privacy
    central = plan_central_dp(dataclasses.replace(cfg, max_epsilon=1e9), population=50,
                              sample_size=10, num_rounds=8)
    replay = _rdp_accountant(50, central.delta)
    for replies in (10, 7, 10, 10, 7, 9):
        central.compose_round(replies)
        replay.compose(GaussianPrivacyEvent(accounted_noise(central.noise_multiplier) * replies
                                            / 10, 10, 50))
        assert central.epsilon() == pytest.approx(replay.get_epsilon(central.delta), rel=1e-12)
    replay.compose(GaussianPrivacyEvent(accounted_noise(central.noise_multiplier) * 8 / 10,
                                        10, 50))
    exact = replay.get_epsilon(central.delta)
    for budget, fits in ((exact * 1.001, True), (exact * 0.999, False)):
        central.cfg = dataclasses.replace(cfg, max_epsilon=budget)
        assert central.release_fits(8) == fits


def test_dp_sgd_refuses_a_deployment_without_delta():
    from fedrec.server.run import plan_privacy

    cfg = typed_config("privacy=dp_sgd")
    with pytest.raises(ConfigError, match=r"privacy\.delta=null"):
        plan_privacy(cfg, None, 10, 10, ConfigRecord())


def test_protected_units_count_shoppers_or_examples():
    shoppers = load_node(DP, 0, 3)
    examples = load_node(f"{DP} privacy.unit=example", 0, 3)
    assert protected_units(shoppers) == len(torch.unique(shoppers.examples.user))
    assert protected_units(examples) == len(examples.examples) > protected_units(shoppers)


def test_a_secagg_client_never_trains_on_a_plain_request():
    """An untrusted server could skip SecAgg+'s stages and ask for a plain update."""
    message, context = train_message(f"{TINY} secagg=on")
    reply = client_app(message, context)
    assert reply.has_error() and reply.error.code == NOT_COVERED
    assert "secagg=on" in reply.error.reason


def test_a_resumed_dp_fedavg_run_keeps_its_accountant_or_is_refused():
    from fedrec.server.privacy import PrivacyReport

    cfg = typed_config("privacy=central_dp", "privacy.noise_multiplier=2.0",
                       "privacy.max_epsilon=50").privacy
    first = plan_central_dp(cfg, population=3, sample_size=3, num_rounds=5)
    first.compose_round(3)
    first.compose_round(2)  # a short round, dearer than a full one
    report = PrivacyReport(cfg, central=first)
    resumed = PrivacyReport(cfg, central=plan_central_dp(cfg, population=3, sample_size=3,
                                                         num_rounds=5))
    resumed.resume(report.state())
    assert resumed.epsilon == pytest.approx(first.epsilon())
    spent = dataclasses.replace(cfg, max_epsilon=first.epsilon() * 1.0001)
    with pytest.raises(ConfigError, match="leaves no room"):
        PrivacyReport(spent, central=plan_central_dp(spent, population=3, sample_size=3,
                                                     num_rounds=1)).resume(report.state())
    # A checkpoint written before the ledger (2026-12-02) holds Flower's accountant state.
    flower_state = _rdp_accountant(3, first.delta)
    for replies in (3, 2):
        flower_state.compose(GaussianPrivacyEvent(
            accounted_noise(first.noise_multiplier) * replies / 3, 3, 3))
    old = PrivacyReport(cfg, central=plan_central_dp(cfg, population=3, sample_size=3,
                                                     num_rounds=5))
    old.resume(flower_state.state_dict())
    assert old.epsilon == pytest.approx(first.epsilon())
    with pytest.raises(ConfigError, match="population of 3"):
        plan_central_dp(cfg, population=4, sample_size=3, num_rounds=5).load(report.state())
