"""The attention user tower (model.user_tower=attention): causal, order-aware, and private."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    TINY,
    assert_opacus_per_example_gradients,
    load_node,
    per_example_batch,
    typed_config,
)

from fedrec.accounting import plan_dp_sgd
from fedrec.client.dp_sgd import DpSgdLedger
from fedrec.client.task import node_model, train_round
from fedrec.model import TwoTower

SMALL = ("model.embedding_dim=16", "model.hidden_dim=32", "model.max_history=6")
PAD = 30


def _model(tower: str) -> TwoTower:
    torch.manual_seed(0)
    cfg = typed_config(*SMALL, f"model.user_tower={tower}").model
    attributes = np.random.default_rng(0).integers(1, 5, (PAD, 2))
    return TwoTower(cfg, attributes, 5).eval()


def test_a_later_item_does_not_change_an_earlier_position():
    model = _model("attention")
    history = torch.tensor([[PAD, 1, 2, 3, 4, 5]])
    changed = history.clone()
    changed[0, 4] = 17  # the second most recent item
    with torch.no_grad():
        states = [model.history_encoder.states(model.item_embedding(h), h != PAD)
                  for h in (history, changed)]
    assert torch.allclose(states[0][0, :4], states[1][0, :4], atol=1e-6)
    assert not torch.allclose(states[0][0, 4:], states[1][0, 4:], atol=1e-4)


def test_reordering_moves_the_attention_tower_and_not_the_mean_tower():
    history = torch.tensor([[PAD, PAD, 3, 4, 5, 6]])
    reordered = torch.tensor([[PAD, PAD, 6, 5, 4, 3]])
    with torch.no_grad():
        attention, mean = _model("attention"), _model("mean")
        assert not torch.allclose(attention.user_vectors(history),
                                  attention.user_vectors(reordered), atol=1e-4)
        assert torch.allclose(mean.user_vectors(history), mean.user_vectors(reordered),
                              atol=1e-6)
        # Padding is no item: a shorter history is not changed by where the padding sits.
        assert torch.isfinite(attention.user_vectors(torch.tensor([[PAD] * 5 + [3]]))).all()


ATTENTION_DP = (f"{TINY} model.user_tower=attention privacy=dp_sgd_eps4 "
                "privacy.negatives_per_example=8 privacy.grad_sample_mode=ghost")
# Example-level DP-SGD goes through Opacus' ghost clipping, which must see through attention.
ATTENTION_DP_EXAMPLE = f"{ATTENTION_DP} privacy.unit=example"


def test_opacus_gives_each_example_its_own_gradient_through_attention():
    node = load_node(ATTENTION_DP, 0, 3)
    torch.manual_seed(0)
    model = node_model(node)
    assert_opacus_per_example_gradients(model, per_example_batch(node, 6, 4), (2,),
                                        only="history_encoder", atol=1e-5)


@pytest.mark.parametrize("overrides", [ATTENTION_DP, ATTENTION_DP_EXAMPLE])
def test_attention_tower_trains_under_dp_sgd(overrides):
    node = load_node(overrides, 0, 3)
    cfg = node.cfg.privacy
    plan = plan_dp_sgd(cfg, node.cfg.train.dp_sgd, delta=1e-3, planned_rounds=2)
    ledger = DpSgdLedger(cfg.accountant, cfg.target_epsilon, plan, [])
    model = node_model(node)
    before = {n: p.clone() for n, p in model.shared_state().items()}
    result = train_round(node, model, lr=0.01, local_epochs=1, batch_size=0, proximal_mu=0.0,
                         seed=0, ledger=ledger)
    assert np.isfinite(result.loss) and 0 < ledger.epsilon() <= 4.0
    moved = [n for n, p in model.shared_state().items() if not torch.equal(p, before[n])]
    assert any(n.startswith("history_encoder.blocks.1.") for n in moved)
    assert "history_encoder.position_embedding.weight" in moved


@pytest.mark.parametrize("tower", ["mean", "attention"])
def test_guide_serves_the_same_user_tower(tower, tmp_path):
    """fedrec.recommend rebuilds the tower from model.pt: the same vectors as in training."""
    from fedrec.centralized import run as run_centralized
    from fedrec.recommend import Recommender

    out = tmp_path / tower
    run_centralized([*TINY.split(), *SMALL, f"model.user_tower={tower}", "train.epochs=1",
                     f"output_dir={out}"])
    guide = Recommender.load(out / "model.pt")
    history = guide.item_ids[:3]
    assert guide.model.history_encoder is not None if tower == "attention" else \
        guide.model.history_encoder is None
    newest_first = guide.recommend(history[::-1], 5)
    if tower == "attention":  # the latest items move the recommendations
        assert [r.score for r in guide.recommend(history, 5)] != [r.score for r in newest_first]
