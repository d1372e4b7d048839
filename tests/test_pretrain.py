"""Pretraining on the public catalogue (fedrec.pretrain): before any shopper's data, the model
learns from the catalogue alone which items go together."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import federated_run_in_process, typed_config

from fedrec.config import ConfigError
from fedrec.data.synthetic import generate_shop
from fedrec.model import TwoTower
from fedrec.pretrain import MadeUpShoppers, pretrain_on_catalogue

SHOP = ("dataset.num_users=50", "dataset.num_items=160", "dataset.num_categories=8",
        "model.embedding_dim=16", "model.hidden_dim=32")


def _within_category(model: TwoTower, categories: np.ndarray) -> float:
    """The share of each one-item history's top 5 (the item itself left out) that is of that
    item's category."""
    model.eval()
    items = torch.arange(model.num_items)
    with torch.no_grad():
        scores = model.user_vectors(items[:, None]) @ model.item_vectors(items).T
    scores[items, items] = -torch.inf
    top = scores.topk(5, dim=1).indices.numpy()
    return float((categories[top] == categories[:, None]).mean())


@pytest.mark.parametrize("model", [(), ("model.item_vectors=attributes",
                                        "model.history_items=attributes")])
def test_the_catalogue_alone_teaches_which_items_go_together(model):
    cfg = typed_config(*SHOP, *model, "train.catalogue_pretraining.steps=150")
    shop = generate_shop(cfg.dataset)
    names = shop.attribute_names[shop.item_attributes]
    categories = np.array([next(n for n in row if str(n).startswith("category="))
                           for row in names])
    torch.manual_seed(0)
    net = TwoTower.for_dataset(cfg.model, shop)
    before = _within_category(net, categories)
    result = pretrain_on_catalogue(net, cfg.train.catalogue_pretraining,
                                   num_negatives=cfg.train.num_negatives, seed=0)
    after = _within_category(net, categories)
    # Eight categories put chance at 0.125.
    assert before < 0.3
    assert after > 0.7
    assert result is not None and result.steps == 150 and np.isfinite(result.loss)


def test_made_up_shoppers_browse_items_of_one_attribute(tiny_shop):
    attributes = torch.as_tensor(tiny_shop.item_attributes)
    shoppers = MadeUpShoppers(attributes, tiny_shop.num_items, history_length=4,
                              generator=torch.Generator().manual_seed(0))
    history, target = shoppers.draw(500)
    padding = history == tiny_shop.num_items
    lengths = (~padding).sum(1)
    assert history.shape == (500, 4) and lengths.min() == 1 and lengths.max() == 4
    # Right-aligned, as the training data: padding only on the left.
    assert torch.equal(padding, torch.arange(4).expand(500, 4) < (4 - lengths)[:, None])
    for row, item in zip(history.tolist(), target.tolist(), strict=True):
        shared = set(attributes[item].tolist()) - {0}
        for seen in row:
            if seen != tiny_shop.num_items:
                shared &= set(attributes[seen].tolist())
        assert shared, f"history {row} and target {item} share no attribute"


def test_no_steps_leave_the_initial_model_and_the_random_state_as_they_were(tiny_shop):
    cfg = typed_config()
    assert cfg.train.catalogue_pretraining.steps == 0
    torch.manual_seed(0)
    net = TwoTower.for_dataset(cfg.model, tiny_shop)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = torch.get_rng_state()
    assert pretrain_on_catalogue(net, cfg.train.catalogue_pretraining,
                                 num_negatives=8, seed=0) is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(state, torch.get_rng_state())


def test_pretraining_leaves_the_global_random_state_alone(tiny_shop):
    """It draws from its own generator, so a run's later draws are those of a run without it."""
    cfg = typed_config("train.catalogue_pretraining.steps=3")
    net = TwoTower.for_dataset(cfg.model, tiny_shop)
    state = torch.get_rng_state()
    pretrain_on_catalogue(net, cfg.train.catalogue_pretraining, num_negatives=8, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_a_catalogue_where_no_two_items_share_an_attribute_is_refused():
    cfg = typed_config("train.catalogue_pretraining.steps=5")
    attributes = np.arange(1, 11).reshape(10, 1)  # item i alone has attribute i + 1
    net = TwoTower(cfg.model, attributes, num_attributes=11)
    with pytest.raises(ValueError, match=r"no attribute is shared by two items.*steps=0"):
        pretrain_on_catalogue(net, cfg.train.catalogue_pretraining, num_negatives=4, seed=0)


@pytest.mark.parametrize("override, message", [
    ("train.catalogue_pretraining.steps=-1", "steps=-1"),
    ("train.catalogue_pretraining.batch_size=1", "batch_size=1"),
    ("train.catalogue_pretraining.lr=0", "lr=0"),
    ("train.catalogue_pretraining.history_length=0", "history_length=0"),
    ("train.catalogue_pretraining.steps=10 model.use_user_features=true",
     "model.use_user_features=True.*no real shopper's are public"),
])
def test_bad_pretraining_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        typed_config(*override.split())


def test_the_clients_receive_the_pretrained_model_at_round_0(tmp_path):
    """Round 0 is the clients' evaluation of the arrays the server sends first: with
    pretraining they rank held-out items better than the untrained model does, and the round's
    figures are those of the pretrained model, not of a model trained on any shopper."""
    shop = ("dataset.num_users=60 dataset.num_items=160 dataset.num_categories=8 "
            "model.embedding_dim=16 model.hidden_dim=32 partition=user strategy.fraction_train=0.2 "
            "num_rounds=1 eval.num_negatives=49")
    round_0 = {}
    for steps in (0, 300):
        out = tmp_path / f"steps-{steps}"
        out.mkdir()
        summary, _, _ = federated_run_in_process(
            f"{shop} train.catalogue_pretraining.steps={steps}", 2, out)
        assert (summary["catalogue_pretraining"] is None) == (steps == 0)
        first = json.loads((out / "pool-2" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["round"] == 0
        round_0[steps] = first["valid"]["sampled"]["hr@10"]
    # 49 negatives put chance at 0.2.
    assert round_0[0] < 0.35
    assert round_0[300] > round_0[0] + 0.15, round_0
