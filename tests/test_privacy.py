"""Differential privacy with the real Opacus and Flower: budgets that hold across rounds,
per-example clipping, clients that run out, and DP-FedAvg that stops at its budget."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY,
    assert_opacus_per_example_gradients,
    per_example_batch,
    train_message,
    typed_config,
)
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedrec.client_app import DP_SGD_STATE
from fedrec.client_app import app as client_app
from fedrec.config import ConfigError
from fedrec.node import load_node, node_model, train_round
from fedrec.privacy import (
    BUDGET_EXHAUSTED,
    DpSgdLedger,
    _epsilon_after,
    embedding_norm_sample,
    plan_central_dp,
    plan_dp_sgd,
)

DP = f"{TINY} privacy=dp_sgd_eps4 privacy.negatives_per_example=8"


def _ledger(overrides: str, planned_rounds: int, batch_size: int = 16) -> DpSgdLedger:
    node = load_node(overrides, 0, 3)
    cfg = node.cfg.privacy
    plan = plan_dp_sgd(cfg, num_records=len(node.examples), batch_size=batch_size,
                       local_epochs=node.cfg.train.local_epochs, planned_rounds=planned_rounds)
    return DpSgdLedger(cfg.accountant, cfg.target_epsilon, plan, [])


@pytest.mark.parametrize("extra", ["privacy.grad_sample_mode=hooks",
                                   "privacy.accountant=prv privacy.grad_sample_mode=ghost "
                                   "model.personal_embedding=true"])
def test_dp_sgd_budget_composes_across_rounds_and_then_stops(extra):
    overrides = f"{DP} {extra}"
    node = load_node(overrides, 0, 3)
    ledger = _ledger(overrides, planned_rounds=3)
    model = node_model(node)
    spent = []
    for round_ in range(3):
        assert ledger.can_train()
        train_round(node, model, lr=0.01, local_epochs=node.cfg.train.local_epochs,
                    batch_size=16, proximal_mu=0.0, seed=round_, ledger=ledger)
        spent.append(ledger.epsilon())
    assert 0 < spent[0] < spent[1] < spent[2] <= 4.0 * (1 + 1e-6)
    assert spent[2] > 4.0 * 0.95  # the plan spends the budget, not a fraction of it
    assert not ledger.can_train()  # a fourth round would pass the target
    # The history survives the trip through Context.state.
    assert DpSgdLedger.from_record(ledger.to_record()).epsilon() == pytest.approx(spent[2])


def test_the_noise_is_real_and_not_derived_from_the_round_seed():
    overrides = f"{DP} train.optimizer=sgd"  # Adam would normalise the noise away
    node = load_node(overrides, 0, 3)
    ledger = _ledger(overrides, planned_rounds=3)
    assert ledger.plan.noise_multiplier > 0
    torch.manual_seed(0)
    start = node_model(node)

    def trained(plan=ledger.plan) -> torch.Tensor:
        model = copy.deepcopy(start)
        fresh = DpSgdLedger(ledger.accountant, ledger.target_epsilon, plan, [])
        train_round(node, model, lr=0.01, local_epochs=1, batch_size=16, proximal_mu=0.0,
                    seed=0, ledger=fresh)
        return torch.cat([p.flatten() for p in model.shared_state().values()])

    # The server sends the seed; the noise and the Poisson sampling must not follow from it.
    assert not torch.allclose(trained(), trained())
    # The engine adds the plan's noise: loud noise moves the model far more than none.
    origin = torch.cat([p.flatten() for p in start.shared_state().values()])
    silent = (trained(dataclasses.replace(ledger.plan, noise_multiplier=0.0)) - origin).norm()
    loud = (trained(dataclasses.replace(ledger.plan, noise_multiplier=100.0)) - origin).norm()
    assert loud > 10 * silent > 0


def test_opacus_sees_each_example_alone_and_clips_it():
    """Per-example candidates keep the batch axis through the model, so Opacus' per-sample
    gradients are each example's own gradient, and clipping bounds what one example adds."""
    node = load_node(DP, 0, 3)
    torch.manual_seed(0)
    model = node_model(node)
    history, candidates, labels = batch = per_example_batch(node, 8, 6)
    assert_opacus_per_example_gradients(model, batch, (0, 5))

    before = torch.cat([p.detach().flatten() for p in model.parameters()])

    def step(rows: list[int], clip: float | None) -> torch.Tensor:
        """The change one SGD step (lr 1) on ``rows`` makes, DP-SGD without noise if clipped."""
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
    # DP-SGD divides the sum of clipped gradients by the expected batch size, 8.
    assert (step(everyone, clip) - step(without_5, clip)).norm() <= clip / 8 * (1 + 1e-4)
    # Unclipped, the same example's gradient is far larger: the bound is not vacuous.
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


def test_exhausted_client_replies_with_an_error_and_keeps_its_ledger():
    message, context = train_message(DP, **{"dp-planned-rounds": 1})
    first = client_app(message, context)
    assert not first.has_error()
    metrics = first.content["metrics"]
    assert 0 < metrics["epsilon"] <= 4.0 * (1 + 1e-6) and metrics["noise-multiplier"] > 0
    again, _ = train_message(DP, **{"dp-planned-rounds": 1})
    second = client_app(again, context)  # same context: the node remembers round 1
    assert second.has_error() and second.error.code == BUDGET_EXHAUSTED
    assert "budget" in second.error.reason
    ledger = DpSgdLedger.from_record(context.state.config_records[DP_SGD_STATE])
    assert ledger.epsilon() == pytest.approx(metrics["epsilon"])


def test_client_side_clipping_bounds_the_update_it_sends():
    overrides = f"{TINY} privacy=central_dp privacy.side=client"
    message, context = train_message(overrides, clipping_norm=0.05, lr=0.5)
    sent = message.content["arrays"].to_numpy_ndarrays()
    reply = client_app(message, context)
    received = reply.content["arrays"].to_numpy_ndarrays()
    norm = np.sqrt(sum(float(((r - s) ** 2).sum()) for r, s in zip(received, sent, strict=True)))
    assert 0 < norm <= 0.05 * (1 + 1e-5)


def test_central_dp_plans_its_noise_and_rounds():
    cfg = typed_config("privacy=central_dp_eps4").privacy
    planned = plan_central_dp(cfg, population=943, sample_size=94, num_rounds=50)
    assert planned.rounds == 50
    spent = _epsilon_after(planned.noise_multiplier, 50, 943, 94, planned.delta)
    assert 4.0 * 0.97 <= spent <= 4.0
    fixed = typed_config("privacy=central_dp_eps4", "privacy.noise_multiplier=0.8").privacy
    cut = plan_central_dp(fixed, population=943, sample_size=94, num_rounds=500)
    assert 1 <= cut.rounds < 500
    assert _epsilon_after(0.8, cut.rounds, 943, 94, cut.delta) <= 4.0
    assert _epsilon_after(0.8, cut.rounds + 1, 943, 94, cut.delta) > 4.0
    adaptive = typed_config("privacy=central_dp_eps1", "privacy.clipping=adaptive").privacy
    with pytest.raises(ConfigError, match=r"privacy\.clipped_count_stddev"):
        plan_central_dp(adaptive, population=3, sample_size=3, num_rounds=5)


def test_central_dp_epsilon_matches_an_independent_computation():
    """Flower's accountant, as fedrec drives it, against dp_accounting called directly."""
    from dp_accounting import dp_event, privacy_accountant, rdp

    cfg = typed_config("privacy=central_dp", "privacy.noise_multiplier=1.3",
                       "privacy.max_epsilon=100").privacy
    central = plan_central_dp(cfg, population=943, sample_size=94, num_rounds=30)
    for _ in range(30):
        central.compose_round()
    direct = rdp.RdpAccountant(
        neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_event.SampledWithoutReplacementDpEvent(
        943, 94, dp_event.GaussianDpEvent(1.3)), 30)
    assert central.epsilon() == pytest.approx(direct.get_epsilon(1 / 9430), rel=1e-9)
    # Sanity: amplification by sampling works, and more rounds cost more.
    assert 0 < central.epsilon() < _epsilon_after(1.3, 30, 94, 94, 1 / 9430)
    assert central.epsilon() < _epsilon_after(1.3, 60, 943, 94, 1 / 9430)


def test_central_dp_refuses_strategies_that_do_not_average():
    with pytest.raises(ConfigError, match=r"strategy='krum'.*central_dp"):
        typed_config("privacy=central_dp", "strategy=krum")


def test_dp_sgd_run_reports_a_budget_that_grows_and_holds(flower, tmp_path):
    out = tmp_path / "dp_sgd"
    recipe = "train.dp_sgd.batch_size=8 train.dp_sgd.local_epochs=2 train.dp_sgd.lr=0.02"
    summary = flower(f"{DP} num_rounds=3 {recipe}", num_supernodes=3, output_dir=out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    spent = [line["epsilon"] for line in lines]
    assert spent[0] == 0 and 0 < spent[1] < spent[2] < spent[3] <= 4.0 * (1 + 1e-6)
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "dp_sgd" and privacy["epsilon"] == spent[3]
    assert 0 < privacy["delta"] < 1 / 50 and privacy["noise_multiplier"] > 0
    assert privacy["clipping_norm"] == 1.0 and privacy["exhausted_clients"] == 0
    # The clients trained by train.dp_sgd's step, not train's own (batch 256, which would make every
    # tiny client's sampling rate 1): their plans are the ones for batches of 8, 2 epochs.
    plans = [plan_dp_sgd(node.cfg.privacy, num_records=len(node.examples), batch_size=8,
                         local_epochs=2, planned_rounds=3)
             for node in (load_node(f"{DP} {recipe}", i, 3) for i in range(3))]
    assert privacy["noise_multiplier"] == pytest.approx(min(p.noise_multiplier for p in plans))
    assert all(p.sample_rate < 1 for p in plans)


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
    assert summary["privacy"]["epsilon"] <= 4.0 * (1 + 1e-6)
    assert (out / "model.pt").exists()


def test_central_dp_stops_at_its_budget_and_saves_the_model(flower, tmp_path):
    out = tmp_path / "central"
    delta = 1 / 30  # the default: 1 / (10 x 3 clients)
    budget = (_epsilon_after(2.0, 2, 3, 3, delta) + _epsilon_after(2.0, 3, 3, 3, delta)) / 2
    summary = flower(f"{TINY} num_rounds=4 privacy=central_dp privacy.noise_multiplier=2.0 "
                     f"privacy.max_epsilon={budget}", num_supernodes=3, output_dir=out)
    assert summary["rounds"] == 2 and summary["rounds_requested"] == 4
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "central_dp" and privacy["noise_multiplier"] == 2.0
    assert privacy["epsilon"] == pytest.approx(_epsilon_after(2.0, 2, 3, 3, delta))
    assert privacy["epsilon"] <= budget and privacy["delta"] == pytest.approx(delta)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert 0 < lines[1]["epsilon"] < lines[2]["epsilon"]
    assert (out / "model.pt").exists()
