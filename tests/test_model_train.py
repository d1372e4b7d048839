import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, load_node, typed_config
from opacus.data_loader import DPDataLoader

from fedrec.client.task import node_model, train_round
from fedrec.config import ConfigError
from fedrec.data.sequences import heldout_cases, training_examples
from fedrec.data.split import split_dataset
from fedrec.metrics import evaluate_model, evaluate_popularity
from fedrec.model import TwoTower
from fedrec.train import Objective, choose_weight_decay, make_loader, make_optimizer, train


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The config's optimizer and lr without decay, so these tests see the gradient steps alone."""
    return make_optimizer(model.parameters(), cfg.train.optimizer, lr=cfg.train.lr,
                          weight_decay=0.0)


def build(tiny_shop, *overrides, personal=False):
    cfg = typed_config(*overrides)
    users = np.arange(tiny_shop.num_users) if personal else None
    torch.manual_seed(0)
    return cfg, TwoTower.for_dataset(cfg.model, tiny_shop, personal_users=users)


@pytest.mark.parametrize("history_items", ["id", "id_and_attributes", "attributes"])
def test_shapes_and_one_score_path(tiny_shop, history_items):
    cfg, model = build(tiny_shop, "model.embedding_dim=8", "model.hidden_dim=16",
                       "model.max_history=5", f"model.history_items={history_items}")
    model.eval()
    history = torch.full((3, 5), tiny_shop.num_items)
    history[:, -2:] = torch.tensor([[1, 2], [3, 4], [5, 6]])
    shared = model(history, torch.arange(7))
    per_row = model(history, torch.arange(7).expand(3, 7))
    assert shared.shape == per_row.shape == (3, 7)
    direct = model.user_vectors(history) @ model.item_vectors(torch.arange(7)).T
    assert torch.allclose(shared, direct / cfg.model.temperature, atol=1e-5)
    assert torch.allclose(shared, per_row, atol=1e-5)
    assert model.item_vectors().shape == (tiny_shop.num_items, 8)


@pytest.mark.parametrize(("history_items", "reads_ids", "reads_attributes"),
                         [("id", True, False), ("id_and_attributes", True, True),
                          ("attributes", False, True)])
def test_the_user_tower_reads_what_history_items_names(tiny_shop, history_items, reads_ids,
                                                        reads_attributes):
    _, model = build(tiny_shop, f"model.history_items={history_items}")
    history = torch.tensor([[tiny_shop.num_items, 1, 2], [3, 4, 5]])
    assert _moved_by_ids_then_attributes(model, lambda: model.user_vectors(history)) == (
        reads_ids, reads_attributes)


def _moved_by_ids_then_attributes(model: TwoTower, vectors) -> tuple[bool, bool]:
    """Whether ``vectors()`` moves when items 0 to 5's id rows move, then when every attribute
    row moves."""
    model.eval()
    before = vectors()
    with torch.no_grad():
        model.item_embedding.weight[:6] += 1.0
    after_ids = vectors()
    with torch.no_grad():
        model.attribute_embedding.weight[1:] += 1.0
    return not torch.allclose(before, after_ids), not torch.allclose(after_ids, vectors())


@pytest.mark.parametrize(("item_vectors", "reads_ids"), [("id_and_attributes", True),
                                                         ("attributes", False)])
def test_the_item_tower_reads_what_item_vectors_names(tiny_shop, item_vectors, reads_ids):
    _, model = build(tiny_shop, f"model.item_vectors={item_vectors}")
    items = torch.arange(6)
    assert _moved_by_ids_then_attributes(model, lambda: model.item_vectors(items)) == (
        reads_ids, True)
    # Items with the same attributes get the same vector when ids are not read.
    attributes = model.item_attributes[:-1]
    same = [(i, j) for i in range(len(attributes)) for j in range(i)
            if torch.equal(attributes[i], attributes[j])]
    assert same
    i, j = same[0]
    vectors = model.item_vectors(torch.tensor([i, j]))
    assert torch.allclose(vectors[0], vectors[1]) == (not reads_ids)


def test_item_vectors_from_attributes_need_attributes(tiny_shop):
    import dataclasses

    cfg = typed_config("model.item_vectors=attributes")
    bare = dataclasses.replace(tiny_shop, item_attributes=np.zeros_like(tiny_shop.item_attributes),
                               attribute_names=tiny_shop.attribute_names[:1])
    with pytest.raises(ValueError, match=r"model\.item_vectors=attributes"):
        TwoTower.for_dataset(cfg.model, bare)


def test_history_id_dropout_drops_whole_id_rows_in_training_only(tiny_shop):
    _, model = build(tiny_shop, "model.history_id_dropout=0.5")
    _, plain = build(tiny_shop)
    plain.load_shared_state(model.shared_state())
    items = torch.arange(tiny_shop.num_items).repeat(20)
    embedded, attr_mean = model._item_parts(items)
    model.train()
    read = model._history_read(embedded, attr_mean)
    # Each row is its attributes alone, or its id row scaled by 1 / (1 - p) plus its attributes.
    dropped = torch.isclose(read, attr_mean, atol=1e-6).all(-1)
    kept = torch.isclose(read, 2 * embedded + attr_mean, atol=1e-6).all(-1)
    assert bool((dropped ^ kept).all())
    assert 0.4 < dropped.float().mean().item() < 0.6
    model.eval()
    plain.eval()
    history = torch.tensor([[tiny_shop.num_items, 1, 2], [3, 4, 5]])
    assert torch.equal(model.user_vectors(history), plain.user_vectors(history))


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.history_id_dropout=1.0"], r"model\.history_id_dropout=1\.0.*\[0, 1\)"),
    (["model.history_items=attributes", "model.history_id_dropout=0.5"],
     r"model\.history_id_dropout=0\.5.*0 with model\.history_items=attributes"),
])
def test_history_id_dropout_refuses_what_it_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        typed_config(*overrides)


def test_personal_embedding_is_not_shared(tiny_shop):
    _, model = build(tiny_shop, "model.personal_embedding=true", personal=True)
    shared = model.shared_state()
    assert shared and not any(k.startswith("personal") for k in shared)
    assert any(k.startswith("personal") for k, _ in model.named_parameters())
    _, plain = build(tiny_shop)
    assert set(shared) == set(plain.shared_state())
    plain.load_shared_state({k: v + 1 for k, v in shared.items()})
    assert torch.allclose(plain.item_mlp[0].bias, model.item_mlp[0].bias + 1)
    with pytest.raises(ValueError, match="missing"):
        plain.load_shared_state({})


def test_prefix_examples_never_see_their_target():
    train_rows = pd.DataFrame({"user": [0, 0, 0, 1], "item": [3, 1, 2, 0], "order": [1, 2, 3, 1]})
    ex = training_examples(train_rows, num_items=4, max_history=2)
    assert ex.target.tolist() == [1, 2]
    assert ex.history.tolist() == [[4, 3], [3, 1]]
    assert ex.user.tolist() == [0, 0]


def test_loader_batches_every_example_once_an_epoch_and_poisson_keeps_empty_draws_shaped():
    train_rows = pd.DataFrame({"user": [0] * 6 + [1] * 5, "item": list(range(6)) + list(range(5)),
                               "order": list(range(6)) + list(range(5))})
    ex = training_examples(train_rows, num_items=6, max_history=3)
    loader = make_loader(ex, batch_size=4, seed=0)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 1]
    history, target, user = (torch.cat(parts).tolist() for parts in zip(*batches, strict=True))
    rows = sorted(zip(history, target, user, strict=True))
    assert rows == sorted(zip(ex.history.tolist(), ex.target.tolist(), ex.user.tolist(),
                              strict=True))
    # Opacus' Poisson sampler reuses the dataset and collate; a draw of no examples must stay
    # a batch of the same structure, or the DP-SGD step would crash or see the wrong shapes.
    dp_loader = DPDataLoader.from_data_loader(
        make_loader(ex, batch_size=1, seed=0), generator=torch.Generator().manual_seed(1))
    sizes = []
    for _ in range(5):
        for history, target, user in dp_loader:
            assert history.shape == (len(target), 3) and len(user) == len(target)
            sizes.append(len(target))
    assert 0 in sizes and max(sizes) > 0


@pytest.mark.parametrize("loss", ["sampled_softmax", "bpr"])
def test_training_beats_popularity_on_the_shop(tiny_shop, loss):
    cfg, model = build(tiny_shop, f"train.loss={loss}", "model.embedding_dim=16",
                       "model.hidden_dim=32", "train.lr=0.01", "train.num_negatives=16")
    split = split_dataset(tiny_shop)
    test = heldout_cases(split, "test", num_items=tiny_shop.num_items, max_history=50,
                         num_negatives=10, seed=0)
    examples = training_examples(split.train, tiny_shop.num_items, 50)
    before = evaluate_model(model, test, [5], 64).means()["sampled"]["hr@5"]
    result = train(model, _optimizer(model, cfg),
                   make_loader(examples, 32, 0),
                   Objective.from_config(cfg.train, examples, tiny_shop.num_items),
                   epochs=15, seed=0)
    after = evaluate_model(model, test, [5], 64).means()["sampled"]["hr@5"]
    counts = torch.bincount(torch.tensor(split.train["item"].to_numpy()),
                            minlength=tiny_shop.num_items)
    popularity = evaluate_popularity(counts, test, [5], 64).means()["sampled"]["hr@5"]
    assert result.num_examples == len(examples) and np.isfinite(result.loss)
    assert after > before
    assert after > popularity


def test_after_step_changes_the_update(tiny_shop):
    cfg, model = build(tiny_shop, "model.embedding_dim=8", "model.hidden_dim=8")
    split = split_dataset(tiny_shop)
    examples = training_examples(split.train, tiny_shop.num_items, 50)
    objective = Objective.from_config(cfg.train, examples, tiny_shop.num_items)
    start = copy.deepcopy(model)

    def run(shrink):
        m = copy.deepcopy(start)

        def after_step():
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1 - shrink)

        train(m, _optimizer(m, cfg), make_loader(examples, 64, 0),
              objective, epochs=1, seed=0, after_step=after_step)
        return torch.cat([p.flatten() for p in m.shared_state().values()])

    plain, again = run(0.0), run(0.0)
    assert torch.equal(plain, again)  # deterministic given the seed
    assert not torch.allclose(plain, run(0.1))


def test_diverging_loss_is_reported(tiny_shop):
    cfg, model = build(tiny_shop)
    split = split_dataset(tiny_shop)
    examples = training_examples(split.train, tiny_shop.num_items, 50)

    def poison():
        with torch.no_grad():
            model.user_mlp[0].weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"train\.lr"):
        train(model, _optimizer(model, cfg),
              make_loader(examples, 64, 0),
              Objective.from_config(cfg.train, examples, tiny_shop.num_items), epochs=1,
              seed=0, after_step=poison)


def test_user_features_change_the_user_vector():
    from fedrec.data.dataset import RawData, build_dataset

    frame = pd.DataFrame({"user": ["a", "a", "b", "b"], "item": ["x", "y", "x", "y"],
                          "order": [1, 2, 1, 2]})
    ds = build_dataset("feat", RawData(frame, user_features={"a": ["gender=F", "age=20s"],
                                                             "b": ["gender=M", "age=20s"]}),
                       min_rating=None, kcore=0, source="feat")
    cfg = typed_config("model.use_user_features=true", "model.embedding_dim=8",
                       "model.hidden_dim=8")
    torch.manual_seed(0)
    model = TwoTower.for_dataset(cfg.model, ds)
    history = torch.tensor([[0, 1], [0, 1]])  # the same history for both users
    vectors = model.user_vectors(history, torch.tensor([0, 1]))
    assert not torch.allclose(vectors[0], vectors[1])
    with pytest.raises(ValueError, match="use_user_features"):
        TwoTower.for_dataset(cfg.model, build_dataset("plain", RawData(frame), min_rating=None,
                                                      kcore=0, source="plain"))


def test_a_null_weight_decay_is_chosen_from_the_shoppers_histories():
    cfg = typed_config("train.auto_decay.short_history_below=5",
                       "train.auto_decay.short_histories.centralized=0.1",
                       "train.auto_decay.short_histories.federated=0.2",
                       "train.auto_decay.long_histories.centralized=0.3",
                       "train.auto_decay.long_histories.federated=0.4").train
    short = torch.tensor([7, 7, 3, 3, 3, 9, 9, 9, 9, 9, 9])  # 2, 3 and 6 examples: median 3
    long = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 6, 9]))  # median 6
    chosen = {(kind, federated): choose_weight_decay(cfg, shoppers, federated=federated)
              for kind, shoppers in (("short", short), ("long", long))
              for federated in (False, True)}
    assert {key: choice.weight_decay for key, choice in chosen.items()} == {
        ("short", False): 0.1, ("short", True): 0.2, ("long", False): 0.3, ("long", True): 0.4}
    assert "median shopper has 3 training examples" in chosen["short", True].why
    assert "median shopper has 6 training examples" in chosen["long", False].why
    fixed = typed_config("train.weight_decay=0.25").train
    assert choose_weight_decay(fixed, short, federated=True).weight_decay == 0.25


def test_a_client_trains_with_the_decay_chosen_from_its_own_shoppers():
    """A shop's round under train.weight_decay=null equals the round with its chosen decay set
    by hand, and differs from one without decay."""
    def round_with(overrides: str) -> torch.Tensor:
        node = load_node(f"{TINY} train.optimizer=adamw train.lr=0.05 {overrides}", 0, 3)
        torch.manual_seed(0)
        model = node_model(node)
        train_round(node, model, lr=0.05, local_epochs=1, batch_size=16, proximal_mu=0.0,
                    seed=1)
        return torch.cat([p.flatten() for p in model.shared_state().values()])

    node = load_node(TINY, 0, 3)
    decay = choose_weight_decay(node.cfg.train, node.examples.user, federated=True).weight_decay
    assert decay > 0
    auto = round_with("train.weight_decay=null")
    assert torch.equal(auto, round_with(f"train.weight_decay={decay}"))
    assert not torch.allclose(auto, round_with("train.weight_decay=0"))


@pytest.mark.parametrize("keep", [True, False])
def test_a_client_that_keeps_its_optimizer_state_resumes_adam(keep):
    """Two rounds of a client that keeps its optimizer's state (the second from the first's
    model, as with one client) take the same steps as one Adam trained over both rounds'
    batches, each round at its own lr; with a fresh optimizer each round they do not, and the
    result carries no state."""
    node = load_node(f"{TINY} train.optimizer=adam train.weight_decay=0 "
                     f"train.keep_optimizer_state={str(keep).lower()}", 0, 3)
    torch.manual_seed(0)
    start = node_model(node)
    rounds = copy.deepcopy(start)
    first = train_round(node, rounds, lr=0.05, local_epochs=1, batch_size=16, proximal_mu=0.0,
                        seed=1)
    assert (first.optimizer_state is not None) == keep
    train_round(node, rounds, lr=0.02, local_epochs=1, batch_size=16, proximal_mu=0.0, seed=2,
                optimizer_state=first.optimizer_state)

    one = copy.deepcopy(start)
    optimizer = make_optimizer(one.parameters(), "adam", lr=0.05, weight_decay=0.0)
    train(one, optimizer, make_loader(node.examples, 16, 1), node.objective, epochs=1, seed=1)
    optimizer.param_groups[0]["lr"] = 0.02
    train(one, optimizer, make_loader(node.examples, 16, 2), node.objective, epochs=1, seed=2)
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in
               zip(rounds.shared_state().values(), one.shared_state().values(), strict=True))
    assert same == keep


def test_a_kept_optimizer_state_that_does_not_fit_the_model_is_refused():
    """State kept by a client whose model had other shapes (a config changed between runs that
    share a Context) is refused by name, not loaded into the wrong moments."""
    node = load_node(f"{TINY} train.optimizer=adam train.weight_decay=0 "
                     "train.keep_optimizer_state=true", 0, 3)
    torch.manual_seed(0)
    kept = train_round(node, node_model(node), lr=0.05, local_epochs=1, batch_size=16,
                       proximal_mu=0.0, seed=1).optimizer_state
    wider = load_node(f"{TINY} train.optimizer=adam train.weight_decay=0 "
                      "train.keep_optimizer_state=true model.embedding_dim=12", 0, 3)
    with pytest.raises(ValueError, match="does not fit this model's parameter 0"):
        train_round(wider, node_model(wider), lr=0.05, local_epochs=1, batch_size=16,
                    proximal_mu=0.0, seed=2, optimizer_state=kept)
