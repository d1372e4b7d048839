import pytest

from fedrec.config import ConfigError, compose_config, to_typed


def test_defaults_compose_to_typed_groups():
    cfg = to_typed(compose_config([]))
    assert cfg.dataset.format == "synthetic"
    assert cfg.model.kind == "two_tower"
    assert cfg.train.lr > 0
    assert list(cfg.eval.ks) == [10, 20]


def test_override_string_is_split_like_a_shell():
    cfg = to_typed(compose_config("train.lr=0.01 'name=my run'"))
    assert cfg.train.lr == 0.01
    assert cfg.name == "my run"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.foo=1", "train.foo"),
        ("dataset=nope", "dataset/nope"),
        ("train.lr=-0.1", "train.lr"),
        ("train.lr=abc", "train.lr"),
        ("train.loss=hinge", "train.loss"),
        ("eval.ks=[]", "eval.ks"),
        ("partition=silo partition.alpha=0", "partition.alpha"),
        ("dataset=movielens_100k", "dataset.path"),
        ("model.temperature=0", "model.temperature"),
        ("eval.select_by=full.recall@50", "eval.select_by"),
        ("mode=both", "mode"),
        ("train.round_lr_decay=1.5", "train.round_lr_decay"),
        ("strategy.item_server_lr=0", "strategy.item_server_lr"),
        ("strategy=fedavgm strategy.item_server_lr=2", "strategy.item_server_lr"),
        ("strategy.item_decay=1", "strategy.item_decay"),
        ("model.item_vectors=id", "model.item_vectors"),
        ("strategy.item_decay=-0.1", "strategy.item_decay"),
        ("strategy=fedavgm strategy.item_decay=0.1", "strategy.item_decay"),
        ("strategy=fedadam strategy.item_optimizer=adam", "strategy.item_optimizer"),
        ("strategy.item_optimizer=sgd", "strategy.item_optimizer"),
        ("strategy=fedavgm strategy.item_optimizer=sgd", "strategy.item_optimizer"),
        ("train.dp_sgd.steps_per_epoch=0", "train.dp_sgd.steps_per_epoch"),
        ("train.dp_sgd.examples_per_shopper=0", "train.dp_sgd.examples_per_shopper"),
        ("client_seed=-1", "client_seed"),
        ("train.dp_sgd.round_lr_decay=0", "train.dp_sgd.round_lr_decay"),
    ],
)
def test_bad_override_fails_naming_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        compose_config(override)
    assert named in str(err.value)


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError, match="sampled_softmax, bpr"):
        compose_config("train.loss=hinge")


def test_experiment_preset_sets_keys_across_groups_and_yields_to_overrides():
    cfg = to_typed(compose_config("experiment=cross_device train.lr=0.5"))
    assert cfg.partition.kind == "user"
    assert cfg.train.optimizer == "sgd"
    assert cfg.train.lr == 0.5  # the command line wins over the preset
    # Under DP-SGD the cross-device clients take the recipe's own step, overrides included.
    assert (cfg.train.dp_sgd.lr, cfg.train.dp_sgd.local_epochs) == (0.5, cfg.train.local_epochs)
    assert cfg.strategy.fraction_train < 1


def test_no_dataset_is_named_in_the_training_defaults():
    """The decay comes from the data (train.auto_decay), not from a preset named for a
    dataset; a recipe named for a kind of data (an experiment) sets its own."""
    beauty = to_typed(compose_config("dataset=sequence dataset.path=/data/Beauty.txt"))
    synthetic = to_typed(compose_config(""))
    assert beauty.train == synthetic.train and beauty.train.weight_decay is None
    with pytest.raises(ConfigError, match="preset"):
        compose_config("preset=beauty")
    sparse = to_typed(compose_config("dataset=sequence dataset.path=/data/Beauty.txt "
                                     "experiment=cross_device_sparse train.epochs=3"))
    assert (sparse.train.optimizer, sparse.train.weight_decay) == ("sgd", 0.0)
    assert sparse.train.epochs == 3


def test_clip_groups_are_set_with_plus_plus_and_checked():
    """Hydra refuses new keys in the empty default mapping: the error says to write ++; with
    ++ the groups compose, and a weight below 0 or all weights 0 are refused by key."""
    with pytest.raises(ConfigError, match=r"privacy.clip_groups.item_mlp: .*with \+\+"):
        compose_config("privacy=dp_sgd privacy.clip_groups={item_mlp:1}")
    groups = to_typed(compose_config(
        "privacy=dp_sgd ++privacy.clip_groups={item_mlp:1,user_mlp:0}"))
    assert dict(groups.privacy.clip_groups) == {"item_mlp": 1.0, "user_mlp": 0.0}
    for bad in ("{item_mlp:0}", "{item_mlp:-1,user_mlp:1}"):
        with pytest.raises(ConfigError, match=r"privacy\.clip_groups="):
            to_typed(compose_config(f"privacy=dp_sgd ++privacy.clip_groups={bad}"))
    with pytest.raises(ConfigError, match=r"privacy\.unit=example"):
        to_typed(compose_config("privacy=dp_sgd privacy.unit=example "
                                "++privacy.clip_groups={item_mlp:1}"))
