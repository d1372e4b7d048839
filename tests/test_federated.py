"""Federated training through the real Flower runtime: `flwr run` on this project, on a tiny shop.

The managed local SuperLink these runs start is stopped at the end, unless it was already
running before the tests.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import (
    TINY,
    assert_wire_contract,
    last_round_model,
    load_node,
    train_message,
    typed_config,
    wait_for_round,
)
from flwr.app import ArrayRecord

from fedrec.client.app import PERSONAL_STATE
from fedrec.client.app import app as client_app
from fedrec.client.task import NodeHolder, node_model, train_round
from fedrec.config import ConfigError, compose_config
from fedrec.data.formats import DataFormatError
from fedrec.model import TwoTower
from fedrec.server.strategy import ITEM_TABLE, STRATEGY_CLASSES, build_strategy
from fedrec.simulation import SimulationError


@pytest.mark.slow  # starts the Flower runtime
def test_federated_run_follows_the_output_contract_and_learns(flower, tmp_path):
    out, wire = tmp_path / "run", tmp_path / "wire.jsonl"
    summary = flower(f"{TINY} num_rounds=3 eval.server=true wire_log={wire} "
                     "train.catalogue_pretraining.steps=20", num_supernodes=3, output_dir=out)
    layouts = assert_wire_contract(wire, f"{TINY} num_rounds=3")
    assert {(x["direction"], x["type"]) for x in layouts} == {
        ("down", "train"), ("up", "train"), ("down", "evaluate"), ("up", "evaluate")}

    assert summary["mode"] == "federated" and summary["num_clients"] == 3
    assert summary["num_users"] == 60 and summary["num_items"] == 40 and summary["rounds"] == 3
    assert summary["stopped_by"] == "num_rounds"
    assert set(summary["metrics"]) == {"sampled", "full"}
    assert set(summary["metrics"]["sampled"]) == {"hr@10", "ndcg@10", "hr@20", "ndcg@20"}
    assert set(summary["metrics"]["full"]) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
    assert summary["privacy"] == {"mechanism": "none", "unit": None, "neighbouring": None,
                                  "sampling": None, "epsilon": None, "delta": None,
                                  "noise_multiplier": None, "secagg": False}
    assert summary["metrics_source"] == "clients"
    assert summary["communication"]["bytes_up"] > 0 and summary["communication"]["bytes_down"] > 0
    assert summary["wall_seconds"] > 0
    assert summary["catalogue_pretraining"]["steps"] == 20
    assert 0 < summary["catalogue_pretraining"]["loss"] < math.inf  # a finite cross-entropy
    assert "server_metrics" in summary  # labelled apart from the federated metrics

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    for line in lines[1:]:
        assert {"test", "valid", "server", "train_loss", "bytes_up", "bytes_down",
                "seconds"} <= set(line)
        assert set(line["test"]) == {"sampled", "full"} and set(line["server"]) == {"valid", "test"}
        assert line["bytes_up"] > 0 and line["bytes_down"] > 0 and line["seconds"] > 0
        assert line["train_loss"] > 0 and line["train_clients"] == 3
    assert lines[-1]["test"]["sampled"]["hr@10"] > lines[0]["test"]["sampled"]["hr@10"]
    assert sum(line["bytes_up"] for line in lines) == summary["communication"]["bytes_up"]
    # Per-round seconds: they add up to less than the whole run.
    assert sum(line["seconds"] for line in lines) < summary["wall_seconds"]
    assert summary["fedrec_version"] and summary["started_at"].endswith("+00:00")

    # The run reports the round with the best validation HR@10 (the earliest of equals), as the
    # centralized run picks its epoch, and model.pt holds that round's model.
    scores = [line["valid"]["sampled"]["hr@10"] for line in lines]
    best = scores.index(max(scores))
    assert summary["select_by"] == "sampled.hr@10" and summary["selected_round"] == best
    assert summary["metrics"] == lines[best]["test"]
    assert summary["valid_metrics"] == lines[best]["valid"]
    assert summary["server_metrics"] == lines[best]["server"]["test"]
    saved = torch.load(out / "model.pt", weights_only=True)
    selected = torch.load(out / "checkpoint.pt", weights_only=True)["selected"]
    assert selected["round"] == best
    for name, tensor in selected["arrays"].items():
        assert torch.equal(saved["shared_state"][name], tensor), name
    cfg = typed_config(*TINY.split())
    assert set(saved["shared_state"]) == set(
        TwoTower.for_dataset(cfg.model, load_node(TINY, 0, 3).dataset).shared_state())
    assert saved["item_vectors"].shape == (40, 16)
    assert "dataset" in (out / "config.yaml").read_text()
    # The run ends by showing the trained guide for one shopper (guide_example).
    log = out.with_name("run.flwr.log").read_text()
    assert "the shopping guide for a made-up shopper" in log and "top 10:" in log


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedavgm", "fedtrimmedavg",
                                      "fedmedian", "multikrum"])
@pytest.mark.slow  # starts the Flower runtime
def test_each_strategy_family_runs(flower, tmp_path, strategy):
    summary = flower(f"{TINY} num_rounds=1 strategy={strategy}", num_supernodes=3,
                     output_dir=tmp_path / strategy)
    assert summary["strategy"] == strategy
    lines = [json.loads(line) for line in
             (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    # Robust rules (Krum, trimmed mean) may keep fewer than the 3 updates they received.
    assert [line["round"] for line in lines] == [0, 1] and lines[1]["train_clients"] >= 2
    assert lines[1]["test"] != lines[0]["test"]  # the aggregate moved the global model
    assert summary["metrics"] == lines[summary["selected_round"]]["test"]


@pytest.mark.slow  # starts the Flower runtime
def test_bad_override_fails_before_training(flower, tmp_path):
    with pytest.raises(SimulationError, match=r"train\.lr=-1"):
        flower(f"{TINY} train.lr=-1", num_supernodes=3, output_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", sorted(STRATEGY_CLASSES))
def test_every_strategy_builds_from_its_config(name):
    cfg = typed_config(f"strategy={name}")
    strategy = build_strategy(cfg.strategy,
                              train_metrics=lambda r, k: None, evaluate_metrics=lambda r, k: None)
    assert isinstance(strategy, STRATEGY_CLASSES[name])


def test_unknown_strategy_param_is_refused():
    cfg = typed_config("strategy=fedadam", "+strategy.params.momentum=0.5")
    with pytest.raises(ConfigError, match=r"strategy\.params\.momentum.*eta"):
        build_strategy(cfg.strategy,
                       train_metrics=lambda r, k: None, evaluate_metrics=lambda r, k: None)


def test_proximal_term_changes_the_update():
    node = load_node(TINY, 0, 3)
    torch.manual_seed(0)
    start = node_model(node)

    def trained(mu: float) -> torch.Tensor:
        model = copy.deepcopy(start)
        train_round(node, model, lr=0.05, local_epochs=2, batch_size=16, proximal_mu=mu, seed=0)
        return torch.cat([p.flatten() for p in model.shared_state().values()])

    origin = torch.cat([p.flatten() for p in start.shared_state().values()])
    plain, proximal = trained(0.0), trained(5.0)
    assert not torch.allclose(plain, proximal)
    assert (proximal - origin).norm() < (plain - origin).norm()


def test_node_data_is_held_per_run_and_partitions_must_match():
    holder = NodeHolder()
    first = holder.node(1, TINY, 1, 3, None)
    assert holder.node(1, TINY, 1, 3, None) is first  # read once for the run
    assert holder.config(1, TINY) is first.cfg
    # Another run in the same process reads its data and config afresh.
    other = holder.node(2, TINY, 1, 3, None)
    assert other is not first and other.cfg is not first.cfg
    assert torch.equal(other.examples.user, first.examples.user)
    with pytest.raises(ConfigError, match="num-supernodes=3"):
        load_node(TINY, 0, 5)


def test_client_reply_holds_only_shared_parameters_and_counts():
    overrides = f"{TINY} model.personal_embedding=true"
    message, context = train_message(overrides)
    reply = client_app(message, context)
    node = load_node(overrides, 0, 3)

    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == set(node_model(node).shared_state())
    assert not any("personal" in key for key in arrays)
    assert set(reply.content["metrics"].keys()) == {"num-examples", "train_loss", "unit-weight"}
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    # The personal vectors stayed on the node, one per user it holds.
    personal = context.state[PERSONAL_STATE].to_torch_state_dict()
    assert personal["personal.weight"].shape[0] == len(node.users)
    assert personal["personal.weight"].abs().sum() > 0  # it trained
    # Nothing rides along: every array is a shared parameter of exactly its shape, so no user
    # id, interaction or personal vector is in what is sent back.
    shared = node_model(node).shared_state()
    assert {k: tuple(a.shape) for k, a in arrays.items()} == {
        k: tuple(v.shape) for k, v in shared.items()}


def test_client_lr_decays_with_the_run_round():
    initial = node_model(load_node(TINY, 0, 3)).shared_state()

    def trained(**config):
        # client_seed: the same sampling in every call, so only the lr differs.
        message, context = train_message(f"{TINY} client_seed=2", **config)
        message.content["arrays"] = ArrayRecord(torch_state_dict=initial)
        return client_app(message, context).content["arrays"].to_torch_state_dict()

    # Round 3 of a run with decay 0.5 trains at lr x 0.25; a resumed run counts its offset.
    decayed = trained(**{"lr": 0.4, "lr-decay": 0.5, "server-round": 3})
    assert all(torch.allclose(decayed[k], v) for k, v in trained(**{
        "lr": 0.1, "lr-decay": 1.0, "server-round": 3}).items())
    resumed = trained(**{"lr": 0.4, "lr-decay": 0.5, "server-round": 1, "round-offset": 2})
    assert all(torch.equal(decayed[k], v) for k, v in resumed.items())
    undecayed = trained(**{"lr": 0.4, "lr-decay": 1.0, "server-round": 3})
    assert not torch.allclose(decayed["item_mlp.0.weight"], undecayed["item_mlp.0.weight"])


def fedadam_first_step(start: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Adam's first step from ``start`` towards the replies' ``mean``, at fedadam.yaml's
    hyper-parameters; Flower counts its bias correction from round + 1."""
    eta, beta_1, beta_2, tau, t = 0.01, 0.9, 0.99, 0.001, 2
    delta = mean - start
    eta_t = eta * (1 - beta_2 ** t) ** 0.5 / (1 - beta_1 ** t)
    return eta_t * (1 - beta_1) * delta / ((1 - beta_2) ** 0.5 * delta.abs() + tau)


@pytest.mark.slow  # starts the Flower runtime
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_item_server_lr_and_item_decay_act_on_the_item_table_alone(flower, tmp_path, strategy):
    """One real round with item_server_lr=3 and item_decay=0.25 against FedAvg of the same three
    replies computed here: the item table moves three times as far and loses a quarter of its
    start. Every other parameter moves as FedAvg moves it, or under FedAdam with
    item_optimizer=sgd by Adam's first step, while the item table still takes SGD's."""
    # client_seed: the clients' own sampling reproducible, so this test can replay it.
    overrides = (f"{TINY} strategy={strategy} strategy.item_server_lr=3.0 "
                 "strategy.item_decay=0.25 client_seed=3")
    if strategy == "fedadam":
        overrides += " strategy.item_optimizer=sgd"
    out = tmp_path / "item_step"
    flower(f"{overrides} num_rounds=1", num_supernodes=3, output_dir=out)
    cfg = typed_config(*overrides.split())
    torch.manual_seed(cfg.seed)  # as the ServerApp builds its initial model
    initial = TwoTower.for_dataset(cfg.model, load_node(overrides, 0, 3).dataset).shared_state()
    replies = []
    for partition in range(3):
        message, context = train_message(overrides, **{
            "lr": cfg.train.lr, "local-epochs": cfg.train.local_epochs,
            "batch-size": cfg.train.batch_size, "round-offset": 0})
        message.content["arrays"] = ArrayRecord(torch_state_dict=initial)
        context.node_config["partition-id"] = partition
        replies.append(client_app(message, context).content)
    weights = [float(r["metrics"]["num-examples"]) for r in replies]
    states = [r["arrays"].to_torch_state_dict() for r in replies]
    fedavg = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / sum(weights)
              for k in initial}

    trained = last_round_model(out, 1)
    # FedAdam computes in float64; the next round's model and its traffic stay float32.
    assert {value.dtype for value in trained.values()} == {torch.float32}
    for key, start in initial.items():
        if key == ITEM_TABLE:
            expected = 3.0 * (fedavg[key] - start) - 0.25 * start
        elif strategy == "fedadam":
            expected = fedadam_first_step(start, fedavg[key])
        else:
            expected = fedavg[key] - start
        assert torch.allclose(trained[key] - start, expected, atol=1e-5), key
    assert (fedavg[ITEM_TABLE] - initial[ITEM_TABLE]).abs().max() > 1e-3  # it did move


@pytest.mark.slow  # starts the Flower runtime
def test_federated_evaluation_runs_every_n_rounds(flower, tmp_path):
    out = tmp_path / "every"
    flower(f"{TINY} num_rounds=3 eval.every=2", num_supernodes=3, output_dir=out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line["round"] for line in lines if "test" in line]
    assert evaluated == [0, 2, 3]  # round 0, every 2nd round, and always the last


def test_deployed_node_reads_its_own_data_path(tmp_path):
    node_file = tmp_path / "shop_a.csv"
    rows = [f"u{u},i{(u * 3 + k) % 12},{k}" for u in range(4) for k in range(5)]
    node_file.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    catalogue = tmp_path / "catalogue.csv"
    # The catalogue holds items this node never saw: ids follow the catalogue, not the data.
    catalogue.write_text("item,attributes\n" + "\n".join(
        f"i{i},colour={'red' if i % 2 else 'blue'}" for i in range(15)) + "\n")
    overrides = (f"federation=deployment dataset=csv dataset.path={tmp_path}/unused.csv "
                 f"dataset.catalogue={catalogue} eval.num_negatives=3 model.embedding_dim=8 "
                 "model.hidden_dim=8")
    node = load_node(overrides, None, None, str(node_file))
    assert len(node.users) == 4 and node.dataset.num_items == 15
    assert list(node.dataset.item_ids[:3]) == ["i0", "i1", "i10"]
    assert len(node.split.test) == 4
    with pytest.raises(ConfigError, match="federation=simulation"):
        load_node(TINY, None, None, str(node_file))
    with pytest.raises(ConfigError, match="no data-path"):
        load_node(overrides, 0, 3)
    with pytest.raises(ConfigError, match=r"^dataset\.catalogue=None"):
        compose_config(["federation=deployment", "dataset=csv", "dataset.path=x.csv"])
    stray = tmp_path / "stray.csv"
    stray.write_text("user,item,timestamp\nu1,i99,1\nu1,i1,2\n")
    with pytest.raises(DataFormatError, match=r"1 item ids are not in dataset\.catalogue"):
        load_node(overrides, None, None, str(stray))


@pytest.mark.slow  # starts the Flower runtime
def test_stopped_run_resumes_from_its_last_round(flower, tmp_path):
    """Stop a 4-round run (SuperLink and simulation killed) once round 2 is logged; resume it:
    it reaches round 4 and metrics.jsonl holds every round exactly once."""
    import threading

    from fedrec.simulation import stop_local_superlink

    run = tmp_path / "run"
    overrides = f"{TINY} num_rounds=4 train.local_epochs=5"
    failure: list[Exception] = []

    def first_attempt() -> None:
        try:
            flower(overrides, num_supernodes=3, output_dir=run)
        except SimulationError as err:
            failure.append(err)

    attempt = threading.Thread(target=first_attempt)
    attempt.start()
    wait_for_round(run, 2, attempt, timeout=300)
    stop_local_superlink()
    attempt.join(timeout=120)
    assert failure, "the first attempt was meant to be stopped before round 4"
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["round"]
    assert 2 <= stopped_at < 4

    summary = flower(f"{overrides} resume={run}", num_supernodes=3, output_dir=run)
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").open()]
    assert rounds == [0, 1, 2, 3, 4]
    assert summary["rounds"] == 4 and summary["resumed_after_round"] == stopped_at
    assert summary["catalogue_pretraining"] is None  # the checkpoint is the starting point
    assert summary["metrics"]["sampled"]["hr@10"] > 0
    # The choice among rounds spans both attempts: the checkpoint carried the best so far.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    scores = [line["valid"]["sampled"]["hr@10"] for line in lines]
    assert summary["selected_round"] == scores.index(max(scores))
    with pytest.raises(ConfigError, match=r"^resume="):
        compose_config(["privacy=dp_sgd", f"resume={run}"])
