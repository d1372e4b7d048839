"""The audit: its statistics, on hand-made score lists, against computations that share no code
with them (pairwise counts, binomial sums from math.comb, closed forms); and its attacks, on
tiny data through the real ClientApp."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import typed_config

from fedrec.audit.__main__ import main as audit_main
from fedrec.audit.attack_metrics import auc, precision_at_k, roc_curve, tpr_at_fpr
from fedrec.audit.audited_data import CANARY_PREFIX, write_audited_data
from fedrec.audit.budgets import main as budgets_main
from fedrec.audit.one_run import audit_canaries, epsilon_lower_bound, p_value
from fedrec.audit.update_inference import (
    item_scores,
    pool_node,
    released,
    round_reply,
    score_target,
    server_train_request,
)
from fedrec.config import parse_overrides
from fedrec.data.federation import build_federation
from fedrec.data.loaders import load_dataset
from fedrec.model import ITEM_TABLE, TwoTower


def test_auc_counts_member_over_non_member_pairs_ties_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    members = rng.random(40) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0)
             for a, b in itertools.product(scores[members], scores[~members])]
    assert auc(scores, members) == pytest.approx(sum(pairs) / len(pairs))
    assert auc(-scores, members) == pytest.approx(1 - sum(pairs) / len(pairs))


def test_tpr_at_fpr_and_precision_on_a_hand_made_list():
    scores = np.array([0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    members = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    # No non-member flagged: only 0.9 (1 of 4 members). One of six flagged (<= 1/6): down to 0.7.
    assert tpr_at_fpr(scores, members, 0.0) == pytest.approx(0.25)
    assert tpr_at_fpr(scores, members, 0.17) == pytest.approx(0.75)
    assert tpr_at_fpr(scores, members, 0.5) == pytest.approx(1.0)
    assert precision_at_k(scores, members, 4) == pytest.approx(0.75)
    # Ties at the cut share their members out: the top two are a member and a non-member tied.
    tied = np.array([1.0, 1.0, 0.5, 0.2])
    assert precision_at_k(tied, np.array([1, 0, 1, 0], dtype=bool), 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both members and non-members"):
        auc(scores, np.ones(10, dtype=bool))


def test_the_roc_curve_walks_the_hand_made_list_and_its_area_is_the_auc():
    scores = np.array([0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    members = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    fpr, tpr = roc_curve(scores, members)
    # One step per score, down the list: a member moves up, a non-member right.
    expected_fpr = np.concatenate([[0], np.cumsum(~members) / 6])
    expected_tpr = np.concatenate([[0], np.cumsum(members) / 4])
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    rng = np.random.default_rng(1)
    tied, labels = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.5
    fpr, tpr = roc_curve(tied, labels)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: ties count half
    assert area == pytest.approx(auc(tied, labels))


def _binomial_tail(r: int, q: float, v: int) -> float:
    return sum(math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(v, r + 1))


def test_p_value_is_the_binomial_tail_and_the_delta_term():
    for r, v, eps in [(20, 15, 1.0), (50, 30, 0.3), (7, 7, 2.0)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(100, r, v, eps, 0.0) == pytest.approx(_binomial_tail(r, q, v))
        slack = max((_binomial_tail(r, q, v - i) - _binomial_tail(r, q, v)) / i
                    for i in range(1, v + 1))
        assert p_value(100, r, v, eps, 1e-4) == pytest.approx(
            min(1.0, _binomial_tail(r, q, v) + 2 * 100 * 1e-4 * slack))


def test_every_guess_right_gives_the_closed_form_bound():
    """delta 0, v = r: P[Bin(r, q) >= r] = q^r = beta, so epsilon = logit(beta^(1/r))."""
    for r in (10, 40, 100):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0, 0.05) == pytest.approx(
            math.log(q / (1 - q)), rel=1e-9)
    # delta only weakens what the same guesses prove
    assert epsilon_lower_bound(1000, 40, 40, 1e-5, 0.05) < epsilon_lower_bound(
        1000, 40, 40, 0.0, 0.05)
    assert epsilon_lower_bound(1000, 40, 20, 0.0, 0.05) == 0.0  # chance level proves nothing


def test_canaries_perfectly_separated_reach_the_bound_of_every_guess_right():
    """100 canaries, 50 in, scored so that every member outscores every non-member: the best
    guess takes the top and bottom half (100 guesses, all right), tested at 0.05 over the
    pairs tried."""
    included = np.zeros(100, dtype=bool)
    included[::2] = True
    scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.1, 100)
    audit = audit_canaries(scores, included, delta=0.0)
    q = (0.05 / audit.pairs_tried) ** (1 / 100)
    assert (audit.guesses_in, audit.guesses_out, audit.correct) == (50, 50, 100)
    assert audit.epsilon == pytest.approx(math.log(q / (1 - q)), rel=1e-9)


def test_scores_that_ignore_the_canaries_prove_nothing_but_by_chance():
    """Under epsilon 0 (scores independent of inclusion) the bound is above 0 in at most a
    beta share of runs: the Bonferroni correction over the guesses tried keeps it sound."""
    rng = np.random.default_rng(1)
    positive = sum(audit_canaries(rng.random(200), rng.random(200) < 0.5,
                                  delta=1e-5).epsilon > 0 for _ in range(300))
    assert positive / 300 <= 0.05 + 0.03  # 0.05 plus three standard errors of 300 trials


SHOP = ("dataset.num_users=60 dataset.num_items=120 dataset.num_categories=4 "
        "partition=user partition.pool_nodes=1 train.num_negatives=8 eval.num_negatives=20 "
        "model.embedding_dim=16 model.hidden_dim=32 client_seed=3")


def test_update_inference_reads_a_shoppers_items_from_their_reply_not_from_a_cohorts_sum():
    """The server ranks items by how far their rows moved. From one shopper's plaintext reply
    it finds that shopper's training items; from the sum of the whole shop's replies (what
    SecAgg+ shows it) it does far worse, and little better for a shopper who was in the cohort
    than for one who was not."""
    cfg = typed_config(*SHOP.split())
    fed = build_federation(cfg)
    torch.manual_seed(cfg.seed)
    model = TwoTower.for_dataset(cfg.model, fed.dataset)
    start = model.shared_state()
    node = pool_node(SHOP)
    request, _ = server_train_request(cfg, fed)
    train = fed.split.train
    bought = {s: np.unique(train.loc[train.user == s, "item"].to_numpy()) for s in range(12)}
    alone = [score_target(item_scores(model, start, round_reply(node, request, start, 1, [s])),
                          bought[s], s, 1) for s in range(6)]
    assert np.mean([a.auc for a in alone]) >= 0.9
    assert np.mean([a.precision_at_10 for a in alone]) >= 0.4  # chance: about 0.12
    cohort = list(range(6)) + list(range(12, 60))  # shoppers 6..11 are not in it
    scores = item_scores(model, start, round_reply(node, request, start, 1, cohort))
    inside = np.mean([score_target(scores, bought[s], s, len(cohort)).auc for s in range(6)])
    outside = np.mean([score_target(scores, bought[s], s, 0).auc for s in range(6, 12)])
    # Measured: 0.97 alone; 0.63 inside the cohort of 54, 0.55 outside it (the sum still
    # says which items are popular, and a little of each of its 54 shoppers).
    assert inside <= 0.7 and inside - outside < 0.15
    assert inside < np.mean([a.auc for a in alone]) - 0.25


def test_the_audited_data_holds_the_included_canaries_and_lacks_the_held_out_pairs(tmp_path):
    """Written as the generic CSV format and read back by the product's own loader: every
    included canary and no other, the members kept and the non-members gone, and every other
    interaction as it was, with its items' attributes."""
    cfg = typed_config(*SHOP.split())
    dataset = build_federation(cfg).dataset
    data = write_audited_data(dataset, tmp_path, canaries=20, canary_length=6, shoppers=10,
                              seed=4)
    assert 0 < data.included.sum() < 20
    read = load_dataset(typed_config(*parse_overrides(data.overrides("audited"))).dataset)
    frame = read.interactions
    users, items = read.user_ids[frame["user"]], read.item_ids[frame["item"]]
    pairs = set(zip(users.astype(str), items.astype(str), strict=True))
    canaries = {u for u in users if str(u).startswith(CANARY_PREFIX)}
    assert canaries == {f"{CANARY_PREFIX}{k}" for k in np.flatnonzero(data.included)}
    for k in np.flatnonzero(data.included):
        assert read.history(list(read.user_ids).index(f"{CANARY_PREFIX}{k}")) == data.canaries[k]
    assert all((u, i) in pairs for u, i, _ in data.members.itertuples(index=False))
    assert not any((u, i) in pairs for u, i, _ in data.non_members.itertuples(index=False))
    for _, item, before in [*data.members.itertuples(index=False),
                            *data.non_members.itertuples(index=False)]:
        assert before and item not in before
    canary_rows = sum(len(data.canaries[k]) for k in np.flatnonzero(data.included))
    assert len(frame) == len(dataset.interactions) - len(data.non_members) + canary_rows
    item = str(dataset.item_ids[0])
    assert _attributes(read, item) == _attributes(dataset, item)


def _attributes(dataset, item: str) -> set[str]:
    row = dataset.item_attributes[list(dataset.item_ids).index(item)]
    return {str(dataset.attribute_names[a]) for a in row if a}


def test_the_audit_trains_through_flower_and_attacks_the_run(flower, tmp_path):
    """python -m fedrec.audit on a tiny cross-device shop without privacy: the audited run goes
    through flwr run, and the report holds every attack, with the plaintext reply's inference
    far above chance."""
    out = tmp_path / "audit"
    overrides = (f"{SHOP} partition.pool_nodes=2 num_rounds=2 eval.every=2 audit.canaries=20 "
                 "audit.canary_length=6 audit.shoppers=10 audit.targets=4 audit.cohorts=[1,20] "
                 f"output_dir={out}").split()
    assert audit_main(overrides) == 0
    report = json.loads((out / "audit.json").read_text())
    alone, cohort = report["update_inference"]
    assert (alone["cohort"], cohort["cohort"]) == (1, 20)
    assert alone["moved"]["auc"] > 0.8 > cohort["moved"]["auc"]
    assert report["membership"]["pairs"] == 20
    assert report["canaries"]["canaries"] == 20 and report["canaries"]["accountant_epsilon"] is None
    assert "membership (calibrated)" in (out / "results.md").read_text()


def test_an_attack_learns_its_direction_on_half_the_targets_and_scores_the_other_half():
    from fedrec.audit.__main__ import _cross_fitted

    assert _cross_fitted([0.2, 0.3, 0.25, 0.35]) == (pytest.approx(0.725), False)
    assert _cross_fitted([0.9, 0.8]) == (pytest.approx(0.85), True)
    # One half says rise, the other fall: each is scored by the other's direction.
    assert _cross_fitted([0.7, 0.4])[0] == pytest.approx((0.4 + 0.3) / 2)


def test_scoring_a_model_without_an_id_table_leaves_it_as_it_was():
    """With item vectors from attributes alone, item_scores loads both models into the one it
    is given: it must leave that one holding the model the round started from."""
    cfg = typed_config(*SHOP.split(), "model.item_vectors=attributes",
                       "model.history_items=attributes")
    torch.manual_seed(0)
    model = TwoTower.for_dataset(cfg.model, build_federation(cfg).dataset)
    start = {name: value.clone() for name, value in model.shared_state().items()}
    after = {name: value if name == ITEM_TABLE else value + 0.01 * torch.randn_like(value)
             for name, value in start.items()}  # the id table: frozen, nothing reads it
    scores = item_scores(model, start, after)
    assert scores.shape == (model.num_items,) and (scores > 0).all()
    for name, value in model.shared_state().items():
        assert torch.equal(value, start[name])


def test_the_release_under_dp_fedavg_is_the_clipped_mean_plus_the_planned_noise():
    """``released`` against numpy: every update scaled to norm at most C over all its arrays,
    their uniform mean, and noise whose spread is noise_multiplier x C / cohort; and the
    attack that reads a shopper's reply cannot read the same shopper from the release at
    epsilon 1."""
    overrides = (f"{SHOP} privacy=central_dp privacy.side=client privacy.max_epsilon=1 "
                 "privacy.clipping_norm=0.5 num_rounds=20 strategy.fraction_train=0.5")
    cfg = typed_config(*overrides.split())
    fed = build_federation(cfg)
    torch.manual_seed(cfg.seed)
    model = TwoTower.for_dataset(cfg.model, fed.dataset)
    start = {name: value.clone() for name, value in model.shared_state().items()}
    request, central = server_train_request(cfg, fed)
    assert central is not None and central.sample_size == 30
    rng = np.random.default_rng(5)
    replies = [{n: v + torch.from_numpy(rng.normal(0, scale, v.shape)).float()
                for n, v in start.items()} for scale in (1e-4, 0.01, 0.1)]
    names = list(start)
    expected = []
    for reply in replies:
        update = [reply[n].numpy().astype(float) - start[n].numpy() for n in names]
        norm = math.sqrt(sum(float((u ** 2).sum()) for u in update))
        expected.append([u * min(1.0, 0.5 / norm) for u in update])
    mean = [np.mean([e[k] for e in expected], axis=0) for k in range(len(names))]
    draws = [released(start, replies, central, np.random.default_rng(k)) for k in range(3)]
    noise = np.concatenate([(d[n].numpy() - start[n].numpy() - m).ravel()
                            for d in draws for n, m in zip(names, mean, strict=True)])
    assert noise.std() == pytest.approx(central.noise_multiplier * 0.5 / 30, rel=0.02)
    assert abs(noise.mean()) < 3 * noise.std() / math.sqrt(len(noise))
    # Without noise, the release is the clipped mean itself: the noise above would hide a
    # wrong clip (the unclipped mean moves the spread by 0.5%).
    exact = released(start, replies, dataclasses.replace(central, noise_multiplier=0.0), rng)
    for name, m in zip(names, mean, strict=True):
        np.testing.assert_allclose(exact[name].numpy() - start[name].numpy(), m, atol=1e-6)
    assert max(math.sqrt(sum(float((e ** 2).sum()) for e in update)) for update in expected) \
        == pytest.approx(0.5)  # the large replies were clipped, so the check has teeth

    node = pool_node(overrides)
    train = fed.split.train
    bought = {s: np.unique(train.loc[train.user == s, "item"].to_numpy()) for s in range(6)}
    alone = [score_target(item_scores(model, start, round_reply(node, request, start, 1, [s])),
                          bought[s], s, 1).auc for s in range(6)]
    release = [score_target(item_scores(model, start, released(
        start, [round_reply(pool_node(overrides), request, start, 1, [s, *range(30, 59)])],
        central, np.random.default_rng(s))), bought[s], s, 30).auc for s in range(6)]
    # Measured: 0.97 from a reply, 0.55 from the release (noise multiplier 19.9).
    assert np.mean(alone) >= 0.85 and abs(np.mean(release) - 0.5) <= 0.1, (alone, release)


def test_the_budgets_audit_runs_each_epsilon_and_none_and_goes_on_where_it_stopped(
        flower, tmp_path, caplog, capsys):
    """python -m fedrec.audit.budgets over three shops under SecAgg+ and DP-FedAvg: an audit at
    the budget and one without privacy (SecAgg+ kept), through flwr run; a shop's reply is
    labelled as hidden by SecAgg+, and the noised release is a view of the private run only; a
    second call reads both audits back instead of training again."""
    out = tmp_path / "budgets"
    overrides = ("dataset.num_users=60 dataset.num_items=120 dataset.num_categories=4 "
                 "partition=silo partition.num_silos=3 train.num_negatives=8 "
                 "eval.num_negatives=20 model.embedding_dim=16 model.hidden_dim=32 "
                 "num_rounds=2 eval.every=2 audit.canaries=20 audit.canary_length=6 "
                 "audit.shoppers=10 audit.targets=4 audit.epsilons=[2] secagg=on "
                 "privacy=central_dp privacy.side=client privacy.clipping_norm=0.5 "
                 f"output_dir={out}").split()
    plain_overrides = [o for o in overrides if not o.startswith("privacy")]
    assert budgets_main([*plain_overrides, "privacy=none"]) == 2
    assert "privacy=none" in capsys.readouterr().err
    assert budgets_main(overrides) == 0
    private = json.loads((out / "epsilon-2" / "audit.json").read_text())
    plain = json.loads((out / "epsilon-inf" / "audit.json").read_text())
    assert 0 < private["privacy"]["epsilon"] <= 2 and plain["privacy"]["mechanism"] == "none"
    hidden = "a shop's reply (hidden by secagg=on)"
    assert [r["view"] for r in private["update_inference"]] == [
        hidden, "the sum of every shop's reply", "the noised release of 3 shops"]
    assert [r["view"] for r in plain["update_inference"]] == [
        hidden, "the sum of every shop's reply"]
    assert plain["privacy"]["secagg"] and private["privacy"]["secagg"]
    for name in ("budgets.json", "budgets.md", "budgets.png", "epsilon-2/attacks.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "budgets.md").read_text()
    assert "| none |" in table
    # Canaries that prove nothing without privacy mark the private bounds as no evidence.
    assert ("No power" in table) == (plain["canaries"]["epsilon_lower_bound"] <= 0)
    caplog.clear()
    with caplog.at_level("INFO", logger="fedrec.audit"):
        assert budgets_main(overrides) == 0
    assert sum("audited before" in r.message for r in caplog.records) == 2
    assert not any("training the audited run" in r.message for r in caplog.records)


def test_update_inference_that_cannot_draw_its_cohorts_is_refused_before_training():
    from fedrec.audit.__main__ import check_update_inference

    cfg = typed_config(*SHOP.split(), "audit.targets=20", "audit.cohorts=[1,30]")
    with pytest.raises(ValueError, match=r"audit.cohorts: a cohort of 30 .* at most 20"):
        check_update_inference(cfg, build_federation(cfg))
    cfg = typed_config(*SHOP.split(), "audit.targets=30")
    with pytest.raises(ValueError, match=r"audit.targets=30: .* at most 29"):
        check_update_inference(cfg, build_federation(cfg))


def test_an_audit_of_per_example_privacy_refuses_canaries_of_more_than_one_example(tmp_path,
                                                                                  capsys):
    """Under privacy.unit=example the canary is one training example (a shopper of 4 items),
    so the per-example epsilon bounds it; a longer canary is refused before any data is
    written."""
    out = tmp_path / "audit"
    overrides = [*SHOP.split(), "privacy=dp_sgd", "privacy.unit=example",
                 "audit.canary_length=6", f"output_dir={out}"]
    assert audit_main(overrides) == 2
    assert "audit.canary_length=6 with privacy.unit=example" in capsys.readouterr().err
    assert not out.exists()
