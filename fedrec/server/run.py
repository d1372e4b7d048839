"""The run builder: everything the server plans before the first message goes out (the data it
may hold, a resumed run's state, the round's sample, privacy, SecAgg+, the strategy), then the
rounds themselves and the run's summary. ``fedrec.server.app`` only reads the config and
starts what ``plan_run`` returns.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from omegaconf import DictConfig

from fedrec.accounting import DpSgdPlan, check_delta, default_delta, plan_dp_sgd
from fedrec.config import CentralDpConfig, Config, ConfigError, DpSgdConfig, federated_config
from fedrec.data.dataset import Dataset
from fedrec.data.federation import Federation, build_federation
from fedrec.data.loaders import load_catalogue
from fedrec.data.sequences import heldout_cases
from fedrec.metrics import RankingSums, evaluate_case_sets
from fedrec.model import TwoTower
from fedrec.outputs import RunOutputs
from fedrec.pretrain import PretrainResult, pretrain_on_catalogue
from fedrec.recommend import Recommender, RecommendError, format_recommendations
from fedrec.server.cohort import Cohorts, cohort_size
from fedrec.server.privacy import CentralDp, PrivacyReport, plan_central_dp, wrap_strategy
from fedrec.server.rounds import MeteredGrid, RoundLog, RunStopped
from fedrec.server.secagg import SecAggPlan, plan_secagg, run_secure_rounds
from fedrec.server.strategy import RunStrategy, build_strategy

log = logging.getLogger("fedrec.server")


@dataclass
class FederatedRun:
    """A planned run: what ``start`` needs to train, evaluate and report it."""

    cfg: Config
    composed: DictConfig  # the config as composed, saved with the model
    fed: Federation | None  # a simulation's data; a deployed server holds none
    dataset: Dataset  # the federation's, or the catalogue the nodes share
    model: TwoTower
    outputs: RunOutputs
    resumed: dict[str, Any] | None
    grid: MeteredGrid
    train_config: ConfigRecord
    population: int
    num_rounds: int
    central: CentralDp | None
    secagg: SecAggPlan | None
    privacy: PrivacyReport
    rounds: RoundLog
    strategy: Strategy
    weighted_by_key: str
    started: float
    cohorts: Cohorts | None  # a pool of virtual shoppers' sampler
    pretrained: PretrainResult | None  # the initial model's catalogue pretraining

    @property
    def done(self) -> int:
        return 0 if self.resumed is None else int(self.resumed["round"])


def plan_run(composed: DictConfig, grid: Grid) -> FederatedRun:
    """Check the config against the federation and plan the run; nothing is sent yet, so a
    config, data or partition error ends the run here with one line."""
    started = time.perf_counter()
    cfg = federated_config(composed)
    if not Path(cfg.output_dir).expanduser().is_absolute():
        raise ConfigError(f"output_dir={cfg.output_dir!r} must be absolute in a federated run: "
                          f"the ServerApp runs in {Path.cwd()}, not in your project")
    if cfg.mode != "federated":
        raise ConfigError(f"mode={cfg.mode!r} is a sweep job's choice; flwr run trains federated"
                          ": run the centralized reference with python -m fedrec.centralized")
    torch.manual_seed(cfg.seed)
    # A deployed server holds no shopper data: only the catalogue the nodes share.
    fed = None if cfg.federation == "deployment" else build_federation(cfg)
    dataset = load_catalogue(cfg.dataset) if fed is None else fed.dataset
    # The server holds the shared model only: personal vectors never leave their client.
    model = TwoTower.for_dataset(dataclasses.replace(cfg.model, personal_embedding=False),
                                 dataset)
    resumed = None
    if cfg.resume is None:
        outputs = RunOutputs(cfg.output_dir, composed)
    else:
        outputs, resumed = RunOutputs.resume(cfg.resume, composed)
        model.load_shared_state(resumed["arrays"])
    done = 0 if resumed is None else int(resumed["round"])

    metered = MeteredGrid(grid, cfg.wire_log)
    train_config = train_request(cfg, done)
    population, sample_size = _round_sample(
        cfg, metered, cfg.strategy.min_available_nodes if fed is None else
        min(cfg.strategy.min_available_nodes, fed.num_nodes))
    if fed is not None:
        fed.check_nodes(population)
    cohorts = strategy_cfg = None
    if fed is not None and cfg.pooled:
        # Virtual shoppers: the cohort is sampled over every shopper, and each round reaches
        # only the nodes that own one (SecAgg+'s legacy workflow samples its own nodes).
        population = fed.num_clients
        sample_size = cohort_size(population, cfg.strategy.fraction_train,
                                  cfg.strategy.min_train_nodes)
        if not cfg.secagg.enabled:
            cohorts = Cohorts(population, sample_size, fed.num_nodes, cfg.seed)
            nodes = fed.num_nodes
            strategy_cfg = dataclasses.replace(
                cfg.strategy, fraction_train=1.0, min_train_nodes=1,
                min_evaluate_nodes=min(cfg.strategy.min_evaluate_nodes, nodes),
                min_available_nodes=min(cfg.strategy.min_available_nodes, nodes))
    central, dp_sgd = plan_privacy(cfg, fed, population, sample_size, train_config)
    # Per-client evaluation figures are covered by no mechanism: a private or SecAgg+ run
    # asks for none, and a simulation evaluates on the server instead (labelled so).
    federated_evaluation = cfg.stops_on_validation
    num_rounds = cfg.num_rounds if central is None else central.rounds
    if cfg.stops_on_validation:
        log.info("at most %d rounds (num_rounds); eval.patience=%s ends the run once that many "
                 "evaluations in a row have not beaten the best validation %s", cfg.num_rounds,
                 cfg.eval.patience, cfg.eval.select_by)
    else:
        log.info("%d rounds (num_rounds), all of them: with privacy=%s secagg=%s no validation "
                 "figure reaches the server, so eval.patience does not apply", cfg.num_rounds,
                 cfg.privacy.mechanism, "on" if cfg.secagg.enabled else "off")
    if cfg.train.weight_decay is None and cfg.privacy.mechanism != "dp_sgd":
        log.info("train.weight_decay=null: each client picks its own from its shoppers' median "
                 "training history (train.auto_decay) and logs it")
    if num_rounds < cfg.num_rounds:
        log.info("privacy.max_epsilon=%s allows %d of the %d rounds asked for: the run stops "
                 "after round %d", cfg.privacy.max_epsilon, num_rounds, cfg.num_rounds,
                 num_rounds)
    # A private run averages the clients uniformly: DP-FedAvg's noise is calibrated to a
    # uniform mean of clipped updates, and a client's count is data no guarantee covers.
    weighted_by_key = "num-examples" if cfg.privacy.mechanism == "none" else "unit-weight"
    secagg = None
    if cfg.secagg.enabled:
        largest = None if fed is None else float(fed.client_examples().max())
        secagg = plan_secagg(cfg.secagg, sample_size=sample_size,
                             largest_weight=1.0 if cfg.privacy.mechanism != "none" else largest)
    # DESIGN.md's report names the unit shopper or client: a client is a shop under
    # partition=silo, and whatever its operator runs (a device or a shop) in a deployment.
    client_unit = "shopper" if cfg.pooled else "client"
    privacy = PrivacyReport(cfg.privacy, central=central, dp_sgd=dp_sgd,
                            secagg=None if secagg is None else dataclasses.asdict(secagg),
                            client_unit=client_unit)
    if resumed is not None:
        privacy.resume(resumed.get("privacy_accountant"))
    server_side = fed is not None and (cfg.eval.server or not federated_evaluation)
    if fed is None and not federated_evaluation:
        log.warning("privacy=%s secagg=%s: the clients send no evaluation figures and a "
                    "deployed server holds no test data, so this run reports no metrics",
                    cfg.privacy.mechanism, "on" if cfg.secagg.enabled else "off")
    rounds = RoundLog(outputs, metered, num_rounds,
                      _server_evaluation(fed, model) if server_side else None,
                      privacy, cfg.eval.select_by, resumed,
                      federated_evaluation=federated_evaluation, patience=cfg.eval.patience,
                      eval_every=cfg.eval.every)
    strategy = build_strategy(strategy_cfg or cfg.strategy, train_metrics=rounds.aggregate_train,
                              evaluate_metrics=rounds.aggregate_evaluate,
                              weighted_by_key=weighted_by_key)
    if central is not None and secagg is None:
        strategy = privacy.strategy = wrap_strategy(strategy, central, pooled=cohorts is not None)
    strategy = RunStrategy(strategy, eval_every=cfg.eval.every if federated_evaluation else None,
                           num_rounds=num_rounds, round_offset=done,
                           # with SecAgg+, the legacy strategy steps the item table
                           item_server_lr=1.0 if secagg else cfg.strategy.item_server_lr,
                           item_decay=0.0 if secagg else cfg.strategy.item_decay,
                           item_optimizer=cfg.strategy.item_optimizer,
                           weighted_by_key=weighted_by_key,
                           cohorts=cohorts)
    # Last, so that every check above speaks before the seconds it takes. A resumed run's
    # checkpoint already holds what it trained from.
    pretrained = None if resumed is not None else pretrain_on_catalogue(
        model, cfg.train.catalogue_pretraining, num_negatives=cfg.train.num_negatives,
        seed=cfg.seed)
    return FederatedRun(cfg, composed, fed, dataset, model, outputs, resumed, metered,
                        train_config, population, num_rounds, central, secagg, privacy, rounds,
                        strategy, weighted_by_key, started, cohorts, pretrained)


def train_request(cfg: Config, done: int) -> ConfigRecord:
    """What every train message asks of a client, before privacy adds its plan's keys, in a run
    that resumes after round ``done``. No seed goes down: each client samples from its own
    secret (``fedrec.client.app.round_seed``)."""
    return ConfigRecord({"lr": cfg.train.lr, "lr-decay": cfg.train.round_lr_decay,
                         "local-epochs": cfg.train.local_epochs,
                         "batch-size": cfg.train.batch_size, "round-offset": done})


def start(run: FederatedRun, context: Context) -> dict[str, Any]:
    """Train the planned rounds, then write the summary and the model; the summary."""
    cfg, rounds, strategy, metered = run.cfg, run.rounds, run.strategy, run.grid
    initial = ArrayRecord(torch_state_dict=run.model.shared_state())
    if run.cohorts is not None:
        run.cohorts.map_nodes(metered, cfg.round_timeout)
    if run.resumed is None and rounds.federated_evaluation:
        # Round 0: the initial model (pretrained on the catalogue only, if asked), evaluated
        # federated, so every run shows where it started.
        replies = list(metered.send_and_receive(
            strategy.configure_evaluate(0, initial, ConfigRecord(), metered),
            timeout=cfg.round_timeout))
        answered = [r.content for r in replies if not r.has_error()]
        if replies and not answered:  # a config or data error every node meets: say it once
            raise RuntimeError(f"every client failed to evaluate the initial model, so no "
                               f"round can run; the first said: {replies[0].error.reason}")
        rounds.aggregate_evaluate(answered, "num-examples")
    remaining = max(run.num_rounds - run.done, 0)
    num_rounds = run.num_rounds
    try:
        if run.secagg is None:
            final_arrays = strategy.start(grid=metered, initial_arrays=initial,
                                          num_rounds=remaining, timeout=cfg.round_timeout,
                                          train_config=run.train_config,
                                          evaluate_fn=rounds.end_of_round).arrays
        else:
            rounds.end_of_round(0, initial)
            final_arrays = run_secure_rounds(
                metered, context, secagg=run.secagg, strategy_cfg=cfg.strategy,
                strategy=strategy, rounds=rounds, initial=initial,
                train_config=run.train_config, num_rounds=remaining,
                weighted_by_key=run.weighted_by_key, central=run.central,
                round_timeout=cfg.round_timeout)
        # central_dp plans fewer rounds than num_rounds when privacy.max_epsilon allows no more.
        stopped_by = "num_rounds" if run.num_rounds == cfg.num_rounds else "privacy.max_epsilon"
    except RunStopped as stopped:
        final_arrays, num_rounds, stopped_by = stopped.arrays, stopped.server_round, stopped.reason
    return _report(run, num_rounds, final_arrays, stopped_by)


def _report(run: FederatedRun, num_rounds: int, final_arrays: ArrayRecord,
            stopped_by: str) -> dict[str, Any]:
    cfg, fed, dataset, outputs = run.cfg, run.fed, run.dataset, run.outputs
    final = _reported_round(run.rounds, cfg, num_rounds, final_arrays)
    run.model.load_shared_state(final["arrays"])
    record = final["record"]
    source = "clients" if "test" in record else "server" if "server" in record else None
    reported = record["test"] if source == "clients" else record.get("server", {}).get("test", {})
    summary = {
        "mode": "federated",
        "model": cfg.model.kind,
        "dataset": cfg.dataset.name,
        "num_users": None if fed is None else dataset.num_users,  # the nodes' to know
        "num_items": dataset.num_items,
        "num_clients": run.population if fed is None else fed.num_clients,
        "rounds": num_rounds,
        "rounds_requested": cfg.num_rounds,
        # What ended the run: num_rounds, eval.patience or privacy.max_epsilon.
        "stopped_by": stopped_by,
        "resumed_after_round": None if run.resumed is None else run.done,
        "selected_round": final["round"],
        "select_by": cfg.eval.select_by,
        "strategy": cfg.strategy.name,
        "metrics": {"sampled": reported.get("sampled", {}), "full": reported.get("full", {})},
        # clients: federated evaluation; server: the server's own evaluation of the global
        # model on every shopper's test item (simulation only), in a private or SecAgg+ run.
        "metrics_source": source,
        "valid_metrics": record.get("valid"),
        "privacy": run.privacy.as_dict(),
        # Public data only, so no budget above pays for it; null: none, or a resumed run.
        "catalogue_pretraining": (None if run.pretrained is None
                                  else dataclasses.asdict(run.pretrained)),
        "communication": {"bytes_up": run.grid.bytes_up, "bytes_down": run.grid.bytes_down},
        "wall_seconds": time.perf_counter() - run.started,
    }
    if "server" in record:
        summary["server_metrics"] = record["server"]["test"]
    outputs.write_summary(summary)
    outputs.save_model(run.model, dataset, run.composed)
    sampled = summary["metrics"]["sampled"]
    log.info("federated HR@10 %.4f NDCG@10 %.4f at round %s", sampled.get("hr@10", math.nan),
             sampled.get("ndcg@10", math.nan), final["round"])
    log.info("results: %s", outputs.path)
    spent = summary["privacy"]["epsilon"]
    private = "" if spent is None else f" at epsilon {spent:.3f} ({cfg.privacy.mechanism})"
    print(f"fedrec: HR@10 {sampled.get('hr@10', math.nan):.4f} "
          f"NDCG@10 {sampled.get('ndcg@10', math.nan):.4f} at round "
          f"{final['round']} of {num_rounds}{private}; results in {outputs.path}", flush=True)
    if cfg.guide_example and fed is not None:
        _print_guide_example(outputs.path / "model.pt", fed.dataset, cfg)
    return summary


def _reported_round(rounds: RoundLog, cfg: Config, num_rounds: int,
                    final_arrays: ArrayRecord) -> dict[str, Any]:
    """The evaluated round the run reports, and its model: the best by the clients' validation
    ``eval.select_by``, as the centralized run picks its epoch."""
    selected = rounds.selected
    if selected is None:
        log.warning("no round was evaluated (every evaluation failed; see the Flower log): the "
                    "summary has no metrics and model.pt holds the last round's model")
        return {"round": None, "record": {}, "arrays": final_arrays.to_torch_state_dict()}
    score = rounds.validation_score(selected["record"])
    if not rounds.federated_evaluation:
        log.info("privacy=%s secagg=%s: the run reports its last round, %s, chosen by nothing "
                 "private (its metrics: the server's own evaluation, in a simulation)",
                 cfg.privacy.mechanism, "on" if cfg.secagg.enabled else "off", selected["round"])
    elif score is None:
        log.warning("the clients hold no validation interactions: reporting the last evaluated "
                    "round, not the best by eval.select_by=%s", cfg.eval.select_by)
    else:
        log.info("best validation %s %.4f at round %d of %d", cfg.eval.select_by, score,
                 selected["round"], num_rounds)
    return selected


def _print_guide_example(model_path: Path, dataset: Dataset, cfg: Config) -> None:
    """The trained guide at work for one shopper: by default a made-up one, whose history is
    a few catalogue items (public) drawn with the run seed, so no real shopper's history reaches
    the log; ``guide_shopper`` names a real one. In a deployment the guide runs where the history
    lives (python -m fedrec.recommend)."""
    if cfg.guide_shopper is None:
        who = "a made-up shopper (guide_shopper=<user id> shows a real one)"
        generator = np.random.default_rng(cfg.seed)
        history = generator.choice(dataset.num_items, size=min(5, dataset.num_items - 1),
                                   replace=False).tolist()
    else:
        ids = list(dataset.user_ids)
        if cfg.guide_shopper not in ids:
            log.warning("no guide example: guide_shopper=%r is not a user id of %s",
                        cfg.guide_shopper, dataset.name)
            return
        who = f"shopper {cfg.guide_shopper} of {dataset.name}"
        history = dataset.history(ids.index(cfg.guide_shopper))
    try:
        guide = Recommender.load(model_path)
        top = guide.recommend(history, min(10, dataset.num_items - len(set(history))))
    except RecommendError as err:  # the run is done and saved: the example is only a show
        log.warning("no guide example: %s", err)
        return
    print(f"fedrec: the shopping guide for {who} (python -m fedrec.recommend {model_path} "
          "--user <id>):\n" + format_recommendations(guide, history, top), flush=True)


def _round_sample(cfg: Config, grid: Grid, wait_for: int) -> tuple[int, int]:
    """The federation's size (once ``wait_for`` nodes are up) and a training round's sample,
    as Flower's strategies size it."""
    _, nodes = sample_nodes(grid, wait_for, 0)
    return len(nodes), cohort_size(len(nodes), cfg.strategy.fraction_train,
                                   cfg.strategy.min_train_nodes)


def plan_privacy(cfg: Config, fed: Federation | None, population: int, sample_size: int,
                 train_config: ConfigRecord) -> tuple[CentralDp | None, DpSgdPlan | None]:
    """Plan what privacy needs to know about the federation before the first round: DP-SGD
    clients get the public inputs of their plan (the server holds the same plan, to state their
    epsilon); DP-FedAvg gets its noise and the rounds that fit in its budget."""
    privacy = cfg.privacy
    if privacy.mechanism == "none":
        return None, None
    if cfg.client_seed is not None:
        log.warning("client_seed=%s: every client's randomness, DP-SGD's sampling and noise "
                    "included, follows a seed the config names, so whoever knows the config "
                    "can replay it: the privacy guarantee does not hold against them (a "
                    "reproducible simulation, for tests)", cfg.client_seed)
    if isinstance(privacy, DpSgdConfig):
        planned = privacy.planned_rounds or math.ceil(cfg.num_rounds * sample_size / population)
        delta = privacy.delta
        if fed is not None:  # a simulation counts the federation's protected units
            # As clients count them (node.protected_units): shoppers with a training example.
            units = (int(fed.client_examples().sum()) if privacy.unit == "example"
                     else int((fed.split.train.groupby("user").size() >= 2).sum()))
            if delta is None:
                delta = default_delta(units)
            check_delta(delta, units, f"{privacy.unit}s in the federation")
        elif delta is None:
            raise ConfigError("privacy.delta=null with privacy=dp_sgd and federation=deployment:"
                              " the server cannot count the shoppers; set privacy.delta below "
                              "1 / n^1.1 for the n shoppers of the largest node")
        step = cfg.train.dp_sgd
        plan = plan_dp_sgd(privacy, step, delta=delta, planned_rounds=planned)
        train_config.update({"lr": step.lr, "local-epochs": step.local_epochs,
                             "lr-decay": step.round_lr_decay, "dp-planned-rounds": planned,
                             "dp-delta": delta, "dp-steps-per-epoch": step.steps_per_epoch})
        del train_config["batch-size"]
        log.info("DP-SGD (unit %s): each client plans noise multiplier %.4f for %d rounds of %d "
                 "steps at sampling rate %.3g, delta %.3g (target epsilon %s); train.dp_sgd: "
                 "lr=%s round_lr_decay=%s", privacy.unit, plan.noise_multiplier, planned,
                 plan.steps_per_round, plan.sample_rate, delta, privacy.target_epsilon, step.lr,
                 step.round_lr_decay)
        return None, plan
    assert isinstance(privacy, CentralDpConfig)
    central = plan_central_dp(privacy, population=population, sample_size=sample_size,
                              num_rounds=cfg.num_rounds)
    log.info("DP-FedAvg: %d of %d clients a round, noise multiplier %.4f, clipping norm %s, "
             "delta %.3g: epsilon reaches at most %s", sample_size, population,
             central.noise_multiplier, privacy.clipping_norm, central.delta,
             privacy.max_epsilon)
    return central, None


def _server_evaluation(fed: Federation, model: TwoTower):
    """Server-side evaluation of the global model on every user's validation and test items
    (simulation only: a real server does not hold the shoppers' data). The validation figures
    are for choosing hyper-parameters between runs; a run never picks its round by them."""
    cfg = fed.cfg
    valid, test = (heldout_cases(fed.split, part, num_items=fed.dataset.num_items,
                                 max_history=cfg.model.max_history,
                                 num_negatives=cfg.eval.num_negatives, seed=cfg.eval.seed)
                   for part in ("valid", "test"))

    def evaluate(arrays: ArrayRecord) -> tuple[RankingSums, RankingSums]:
        model.load_shared_state(arrays.to_torch_state_dict())
        sums = evaluate_case_sets(model, [valid, test], list(cfg.eval.ks), cfg.eval.batch_size)
        return sums[0], sums[1]

    return evaluate


