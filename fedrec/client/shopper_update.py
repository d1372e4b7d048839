"""A pool shopper's update as the item-table rows it moved and the rest of the model.

Plain SGD without weight decay moves an item's id row only when the shopper's round reads it (as
a history item, a target or a sampled negative): every other row's gradient is zero. So a pool
node that trains its shoppers one at a time need not copy, clip and add the whole item table per
shopper, which on Beauty (12,101 items, 90% of the shared parameters) cost several times the
shopper's own training. It trains with a sparse item-table gradient, keeps the change of the
rows the shopper read and of the small dense parameters, and puts exactly those back to the
global model for the next shopper. The update is the same as the whole model's difference: the
rows it leaves out did not move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedrec.client.task import TrainingData
from fedrec.config import DpSgdConfig
from fedrec.model import ITEM_TABLE, PERSONAL_PREFIX, TwoTower
from fedrec.train import TrainResult


def moves_only_rows_read(data: TrainingData) -> bool:
    """Whether a shopper's round leaves every item row it does not read unchanged: SGD (fedrec's
    has no momentum) without decay, and no noise on every parameter (DP-SGD). A personal vector
    is the shopper's own state, kept apart, so it takes the whole-model path."""
    cfg = data.cfg
    return (cfg.train.optimizer == "sgd" and data.weight_decay == 0
            and not isinstance(cfg.privacy, DpSgdConfig) and not cfg.model.personal_embedding)


@dataclass
class ShopperUpdate:
    """A shopper's trained model minus the global model."""

    rows: torch.Tensor  # the item-table rows the round read, sorted and distinct
    table: torch.Tensor  # their change, one row each
    dense: dict[str, torch.Tensor]  # every other shared parameter's change

    def clipped(self, clipping_norm: float) -> ShopperUpdate:
        """Clipped as ``fedrec.client.app.clipped_update`` clips the whole model's difference:
        the rows left out did not move, so they add nothing to the norm."""
        scale = clip_scale([self.table, *self.dense.values()], clipping_norm)
        return ShopperUpdate(self.rows, self.table * scale,
                             {name: d * scale for name, d in self.dense.items()})


def clip_scale(update: list[torch.Tensor], clipping_norm: float) -> float:
    """min(1, clipping_norm / the L2 norm over every array of ``update``): the factor Flower's
    fixedclipping_mod scales a device's update by (``compute_clip_model_update``)."""
    norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(u, dtype=torch.float64) for u in update])))
    return min(1.0, clipping_norm / norm) if norm > 0 else 1.0


def train_for_update(model: TwoTower, global_state: dict[str, torch.Tensor],
                     train: Callable[[], TrainResult]) -> tuple[ShopperUpdate, TrainResult]:
    """Run ``train`` on ``model``, which holds ``global_state``, and return the shopper's update;
    ``model`` holds ``global_state`` again afterwards, also when ``train`` fails."""
    table = model.item_embedding
    read: list[torch.Tensor] = []
    hook = table.register_forward_pre_hook(lambda _, inputs: read.append(inputs[0].reshape(-1)))
    table.sparse = True  # SGD then steps the rows read, not a dense table of zeros
    try:
        result = train()
    except BaseException:
        model.load_shared_state(global_state)
        raise
    finally:
        hook.remove()
        table.sparse = False
    rows = torch.unique(torch.cat(read)) if read else torch.zeros(0, dtype=torch.long)
    dense = [(name, p) for name, p in model.named_parameters()
             if name != ITEM_TABLE and not name.startswith(PERSONAL_PREFIX)]
    with torch.no_grad():
        # The global model can come in float64 (FedAdam's numpy step): the change is taken
        # from it, and the model holds it as load_shared_state puts it, in float32.
        start = global_state[ITEM_TABLE][rows]
        update = ShopperUpdate(rows, table.weight[rows] - start,
                               {name: p - global_state[name] for name, p in dense})
        table.weight[rows] = start.to(table.weight.dtype)
        for name, p in dense:
            p.copy_(global_state[name])
    return update, result
