"""Pretraining on the public catalogue (fedrec.pretrain): before any shopper's data, the model
learns from the catalogue alone which items go together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import typed_config

from fedrec.config import ConfigError
from fedrec.data.synthetic import generate_shop
from fedrec.model import TwoTower
from fedrec.pretrain import pretrain_on_catalogue

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


def test_no_steps_leave_the_initial_model_as_it_was(tiny_shop):
    cfg = typed_config()
    assert cfg.train.catalogue_pretraining.steps == 0
    torch.manual_seed(0)
    net = TwoTower.for_dataset(cfg.model, tiny_shop)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert pretrain_on_catalogue(net, cfg.train.catalogue_pretraining,
                                 num_negatives=8, seed=0) is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


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
])
def test_bad_pretraining_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        typed_config(override)
