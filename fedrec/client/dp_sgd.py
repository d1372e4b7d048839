"""DP-SGD on a client (``privacy=dp_sgd``), with Opacus: one round of noisy, clipped steps on
the node's examples, shopper- or example-level, and the ledger that composes the rounds.

Flower's Opacus example builds a new PrivacyEngine every round, so the epsilon it reports
covers one round. Here the client plans its noise once for the whole run
(``fedrec.accounting``) and keeps the accountant's history in its Context.state
(``DpSgdLedger``), so a client whose next round would pass its budget refuses to train.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import register_norm_sampler
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fedrec.accounting import DpSgdPlan, Step, epsilon_of
from fedrec.client.shopper_objective import (
    ShopperGradients,
    ShopperObjective,
    per_shopper_gradients,
)
from fedrec.config import ConfigError, DpSgdConfig, DpSgdStepConfig
from fedrec.data.sequences import TrainExamples
from fedrec.model import ATTRIBUTE_TABLE, ITEM_TABLE
from fedrec.train import (
    Objective,
    TrainResult,
    batch_collate,
    examples_dataset,
    row_chunks,
    train,
)


@dataclass
class DpSgdLedger:
    """A client's DP-SGD budget: its plan and the accountant history of the rounds it trained."""

    accountant: str
    target_epsilon: float
    plan: DpSgdPlan
    history: list[Step]

    def epsilon(self, *, with_next_round: bool = False) -> float:
        history = list(self.history)
        if with_next_round:
            plan = self.plan
            history = _merge([*history, (plan.noise_multiplier, plan.sample_rate,
                                         plan.steps_per_round)])
        return epsilon_of(self.accountant, history, self.plan.delta) if history else 0.0

    def can_train(self) -> bool:
        # The plan spends the budget exactly; allow the accountant's rounding, not a round more.
        return self.epsilon(with_next_round=True) <= self.target_epsilon * (1 + 1e-6)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "accountant": self.accountant, "target-epsilon": self.target_epsilon,
            **{f"plan.{k}": v for k, v in dataclasses.asdict(self.plan).items()},
            "history.noise": [float(s[0]) for s in self.history],
            "history.rate": [float(s[1]) for s in self.history],
            "history.steps": [int(s[2]) for s in self.history],
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> DpSgdLedger:
        plan = DpSgdPlan(**{f.name: record[f"plan.{f.name}"]
                            for f in dataclasses.fields(DpSgdPlan)})  # type: ignore[arg-type]
        history = list(zip(record["history.noise"], record["history.rate"],  # type: ignore[arg-type]
                           record["history.steps"], strict=True))
        return cls(str(record["accountant"]), float(record["target-epsilon"]),  # type: ignore[arg-type]
                   plan, history)


def _draw_seed(noise_seed: int | None, stream: int) -> int:
    """A seed of the round's Poisson sampling or noise: fresh OS randomness, which the guarantee
    assumes nobody can predict; or, in a simulation that fixed ``client_seed`` to be
    reproducible, one derived from it, which whoever knows ``client_seed`` can replay (the
    guarantee does not hold against them: docs/privacy.md)."""
    if noise_seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1  # torch seeds are signed 64-bit
    return (noise_seed * 1_000_033 + stream) % 2**62


def _merge(history: list[Step]) -> list[Step]:
    """Join consecutive entries with the same noise and rate, as Opacus' step hook does."""
    merged: list[Step] = []
    for noise, rate, steps in history:
        if merged and merged[-1][:2] == (noise, rate):
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((noise, rate, steps))
    return merged


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of an embedding table for ghost clipping: Opacus' algorithm
    (sum each example's gradient rows per id, then take norms), with the (example, id) pairs
    made unique as one integer key instead of by ``torch.unique(dim=0)``, which took half of a
    DP-SGD step on this model."""
    ids = activations[0].reshape(activations[0].shape[0], -1)
    grads = backprops.reshape(-1, backprops.shape[-1])
    rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    keys, position = torch.unique(rows * layer.num_embeddings + ids.reshape(-1),
                                  return_inverse=True)
    summed = torch.zeros(len(keys), grads.shape[-1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, position, grads)
    norms = torch.zeros(ids.shape[0], dtype=grads.dtype, device=grads.device)
    norms.scatter_add_(0, keys // layer.num_embeddings, (summed ** 2).sum(1))
    return {layer.weight: norms.sqrt()}


def train_dp_sgd(model: nn.Module, shared_optimizer: torch.optim.Optimizer,
                 examples: TrainExamples, objective: Objective, ledger: DpSgdLedger,
                 cfg: DpSgdConfig, step: DpSgdStepConfig, *, seed: int,
                 noise_seed: int | None = None,
                 after_step: Callable[[], None] | None = None) -> TrainResult:
    """One round of DP-SGD (``ledger.plan.steps_per_round`` steps) on the parameters
    ``shared_optimizer`` holds; every other parameter must be frozen. Appends the round's steps
    to ``ledger.history``.

    ``seed`` (the client's own secret) drives the negatives and the examples a shopper's step
    reads. The Poisson sampling of units and the noise draw from fresh OS randomness, which
    the guarantee (amplification by sampling included) assumes nobody can predict, unless a
    reproducible simulation passes ``noise_seed`` (``_draw_seed``)."""
    if cfg.unit == "shopper":
        if objective.per_example or objective.item_log_share is not None:
            raise ValueError("DP-SGD by shopper needs one shopper's batch objective: negatives "
                             "that shopper draws, no logQ from other shoppers' targets")
        result = _train_by_shopper(model, shared_optimizer, examples, objective, ledger.plan,
                                   clip_groups(model, cfg), step.examples_per_shopper, seed=seed,
                                   noise_seed=noise_seed, after_step=after_step)
    else:
        if not objective.per_example:
            raise ValueError("DP-SGD by example needs a per-example objective (no in-batch "
                             "negatives)")
        result = _train_by_example(model, shared_optimizer, examples, objective, ledger.plan,
                                   cfg, seed=seed, noise_seed=noise_seed,
                                   after_step=after_step)
    plan = ledger.plan
    ledger.history = _merge([*ledger.history,
                             (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)])
    return result


def clip_groups(model: nn.Module, cfg: DpSgdConfig) -> list[tuple[list[str], float]]:
    """``privacy.clip_groups`` on ``model``: each group's trainable parameters, by name, and the
    norm its part of a shopper's gradient is clipped to; groups of weight 0 left out (they do
    not train). Empty: one group of every trainable parameter, at ``max_grad_norm``."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not cfg.clip_groups:
        return [(trainable, cfg.max_grad_norm)]
    members = {prefix: [name for name in trainable if name == prefix
                        or name.startswith(f"{prefix}.")] for prefix in cfg.clip_groups}
    claimed = [name for names in members.values() for name in names]
    empty = [prefix for prefix, names in members.items() if not names]
    unclaimed = [name for name in trainable if name not in claimed]
    if empty or unclaimed or len(set(claimed)) != len(claimed):
        raise ConfigError(
            f"privacy.clip_groups={dict(cfg.clip_groups)} must put each trainable parameter in "
            f"exactly one group (a module name such as item_mlp); no parameter in: {empty}; "
            f"in no group: {unclaimed}; the model's: {trainable}")
    total = math.sqrt(sum(weight ** 2 for weight in cfg.clip_groups.values()))
    return [(members[prefix], cfg.max_grad_norm * weight / total)
            for prefix, weight in cfg.clip_groups.items() if weight > 0]


def _train_by_shopper(model: nn.Module, shared_optimizer: torch.optim.Optimizer,
                      examples: TrainExamples, objective: Objective, plan: DpSgdPlan,
                      groups: list[tuple[list[str], float]], examples_per_shopper: int, *,
                      seed: int,
                      noise_seed: int | None,
                      after_step: Callable[[], None] | None) -> TrainResult:
    """User-level DP-SGD: each step Poisson-samples shoppers at the plan's rate, computes each
    sampled shopper's gradient (mean loss over up to ``examples_per_shopper`` of their
    examples), clips each to ``max_grad_norm`` as Opacus' DPOptimizer clips a per-sample
    gradient (with ``groups``, each group to its own part of that norm first: ``clipped_sum``),
    and hands their sum to the DPOptimizer, which adds the noise once and steps. Adding or
    removing a shopper changes one clipped term: that is the unit the accountant's add/remove
    bound protects.
    The step follows the noisy sum, not the sum over the client's own count of shoppers: a
    divisor that depends on the data is a release the accountant does not cover (Adam, the
    default optimizer, is blind to the scale)."""
    order = torch.argsort(examples.user, stable=True)
    shoppers, counts = torch.unique_consecutive(examples.user[order], return_counts=True)
    rows_of = torch.split(order, counts.tolist())
    trainable = {id(p) for group in shared_optimizer.param_groups for p in group["params"]
                 if p.requires_grad}  # as DPOptimizer reads its groups
    params = {name: p for name, p in model.named_parameters() if id(p) in trainable}
    if len(params) != len(trainable):
        raise ValueError("the optimizer holds parameters that are not the model's")
    if sorted(params) != sorted(name for names, _ in groups for name in names):
        raise ValueError(f"the optimizer trains {sorted(params)}, not the clipping groups' "
                         f"{groups}: build it over their parameters alone")
    max_grad_norm = math.sqrt(sum(norm ** 2 for _, norm in groups))
    optimizer = DPOptimizer(
        shared_optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=1, generator=torch.Generator().manual_seed(_draw_seed(noise_seed, 1)))
    sampler = torch.Generator().manual_seed(_draw_seed(noise_seed, 2))
    model.train()
    shopper_loss = ShopperObjective(model, examples, logq=False)
    losses, seen = [], 0
    for step in range(plan.steps_per_round):
        draw = torch.rand(len(shoppers), generator=sampler)
        terms = []
        for index in (draw < plan.sample_rate).nonzero().flatten().tolist():
            # Each shopper's own stream (examples read, negatives): one shopper's data never
            # changes what another shopper's term draws.
            generator = torch.Generator().manual_seed(
                (seed * 1_000_003 + step * 7_919 + int(shoppers[index])) % 2**62)
            terms.append(shopper_term(rows_of[index], objective, examples_per_shopper,
                                      generator))
        # Each chunk's shoppers clipped and added up into Opacus' sum of clipped gradients
        # (``summed_grad``, where its own clip_and_accumulate puts it); Opacus' step adds the
        # noise once to that sum and steps.
        for grads in shopper_gradients(shopper_loss, params, terms):
            for name, summed in clipped_sum(grads, params, groups).items():
                p = params[name]
                p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed
            losses.extend(grads.losses.tolist())
        for p in params.values():
            p.grad_sample = p.new_zeros((0, *p.shape))  # no shopper left: adds nothing
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += sum(len(term.rows) for term in terms)
        if after_step is not None:
            after_step()
    loss = sum(losses) / len(losses) if losses else math.nan
    if losses and not math.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss}: lower train.dp_sgd.lr")
    return TrainResult(loss=loss, num_examples=seen)


@dataclass(frozen=True)
class ShopperTerm:
    """What one sampled shopper's term in a DP-SGD step reads: the examples it draws, and its
    own negatives, which all of those examples share (one shopper's batch, as ``Objective``
    scores it)."""

    rows: torch.Tensor
    negatives: torch.Tensor


def shopper_term(rows: torch.Tensor, objective: Objective, examples_per_shopper: int,
                 generator: torch.Generator) -> ShopperTerm:
    """Up to ``examples_per_shopper`` of a shopper's ``rows``, and its negatives, drawn from the
    shopper's own ``generator`` in the order ``Objective`` draws a batch's."""
    if len(rows) > examples_per_shopper:
        rows = rows[torch.randperm(len(rows), generator=generator)[:examples_per_shopper]]
    negatives = torch.randint(0, objective.num_items, (objective.num_negatives,),
                              generator=generator)
    return ShopperTerm(rows, negatives)


# Rows of one vmap pass over shoppers (each padded to the pass's longest). A DP-SGD round of
# one Beauty shop (about 1,100 shoppers a step) took 1.8 s at 128 rows, 2.1 s at 64; one pass
# of 500 shoppers took 0.76 s at 128, 0.87 s at 256 and 1.5 s at 512 (2 threads; measured
# with each example's own negatives, before a shopper's examples shared theirs).
SHOPPER_CHUNK_ROWS = 128
# Per-shopper gradient floats of the dense parameters one vmap call may hold (256 MiB).
GRADIENT_FLOATS = 2**26


def shopper_gradients(objective: ShopperObjective, params: dict[str, nn.Parameter],
                      terms: list[ShopperTerm]) -> Iterator[ShopperGradients]:
    """Each term's gradient (of its mean loss over its examples) with respect to ``params``,
    the model's trainable parameters, and its loss, in chunks.

    ``torch.func.vmap`` takes the chunk's gradients apart in one pass (shoppers sorted by size,
    so a chunk pads little). A shopper's gradient on the id table is taken on the rows it read,
    and on the attribute table from its items' mean attribute rows (``clipped_sum`` reads
    them so)."""
    dense = {name: p.detach() for name, p in params.items()
             if name not in (ITEM_TABLE, ATTRIBUTE_TABLE)}
    floats = sum(p.numel() for p in dense.values())
    per_chunk = max(1, min(512, GRADIENT_FLOATS // max(floats, 1)))
    gradients = per_shopper_gradients(  # dropout: each shopper its own mask
        objective, dense, id_table=ITEM_TABLE in params, attributes=ATTRIBUTE_TABLE in params,
        randomness="different")
    by_size = sorted(terms, key=lambda term: len(term.rows))
    sizes = torch.tensor([len(term.rows) for term in by_size], dtype=torch.long)
    for rows in row_chunks(sizes, SHOPPER_CHUNK_ROWS):
        for first in range(rows.start, rows.stop, per_chunk):
            last = min(first + per_chunk, rows.stop)
            chunk = by_size[first:last]
            batch = objective.batch(torch.cat([term.rows for term in chunk]), sizes[first:last],
                                    torch.stack([term.negatives for term in chunk]))
            yield gradients(batch)


def clipped_sum(grads: ShopperGradients, params: dict[str, nn.Parameter],
                groups: list[tuple[list[str], float]]) -> dict[str, torch.Tensor]:
    """The sum over a chunk's shoppers of each one's gradient, clipped as Opacus' DPOptimizer
    clips a per-sample gradient (to the root-sum-square of the groups' norms, with a 1e-6 in
    the divisor), each clipping group first scaled to at most its own norm.

    It reads each shopper's gradient on the tables as the rows it reached: Opacus' per-sample
    gradients are a dense copy of every parameter per shopper, and on Beauty's default model
    (12,102 id rows) laying out, clipping and adding those copies took about three quarters
    of a DP-SGD round."""
    squares = grads.squares()
    shoppers = len(grads.losses)
    scales: dict[str, torch.Tensor] = {}
    clipped_squares = torch.zeros(shoppers)
    for names, norm in groups:
        group_squares = sum(squares[name] for name in names)
        scale = ((norm / (group_squares.sqrt() + 1e-6)).clamp(max=1.0) if len(groups) > 1
                 else torch.ones(shoppers))
        scales.update(dict.fromkeys(names, scale))
        clipped_squares += scale ** 2 * group_squares
    max_grad_norm = math.sqrt(sum(norm ** 2 for _, norm in groups))
    factor = (max_grad_norm / (clipped_squares.sqrt() + 1e-6)).clamp(max=1.0)
    return grads.weighted_sum({name: scale * factor for name, scale in scales.items()}, params)


def _noise_only_step(optimizer: DPOptimizer) -> None:
    """The step of an empty Poisson draw: no gradient, the noise alone. Skipping it would make
    "nothing moved" an outcome whose probability depends on how many units the client holds."""
    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_by_example(model: nn.Module, shared_optimizer: torch.optim.Optimizer,
                      examples: TrainExamples, objective: Objective, plan: DpSgdPlan,
                      cfg: DpSgdConfig, *, seed: int, noise_seed: int | None,
                      after_step: Callable[[], None] | None) -> TrainResult:
    """Example-level DP-SGD through Opacus' PrivacyEngine, on a Poisson loader at the plan's
    public rate (Opacus takes the rate from the loader's length: 1 / steps_per_epoch)."""
    with warnings.catch_warnings():
        # Opacus warns on every engine that secure_mode is off; docs/privacy.md says so once.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    loader = DPDataLoader(examples_dataset(examples), sample_rate=plan.sample_rate,
                          collate_fn=batch_collate,
                          generator=torch.Generator().manual_seed(_draw_seed(noise_seed, 2)))
    private = engine.make_private(
        module=model, optimizer=shared_optimizer, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False, grad_sample_mode=cfg.grad_sample_mode,
        criterion=nn.CrossEntropyLoss(),
        noise_generator=torch.Generator().manual_seed(_draw_seed(noise_seed, 1)))
    if cfg.grad_sample_mode == "ghost":
        module, optimizer, criterion, private_loader = private
        objective = dataclasses.replace(objective, criterion=criterion)
    else:
        module, optimizer, private_loader = private
    # Step along the noisy sum: Opacus would divide it by the client's own expected batch
    # (its count of examples x the rate), a data-dependent scale the accountant does not cover.
    optimizer.expected_batch_size = 1
    if abs(1.0 / len(private_loader) - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus would account sampling rate {1.0 / len(private_loader)}, "
                           f"not the planned {plan.sample_rate}")
    epochs = plan.steps_per_round // len(private_loader)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer fire although item ids need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = train(module, optimizer, private_loader, objective, epochs=epochs,
                           seed=seed, after_step=after_step,
                           empty_step=lambda: _noise_only_step(optimizer))
    finally:
        module.remove_hooks()
    return result

