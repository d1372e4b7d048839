"""Secure aggregation (secagg=on), the client's side: a mod that runs Flower's
``secaggplus_mod`` and, for the one stage that trains, translates SecAgg+'s legacy request into
fedrec's train message and the reply back, so the ClientApp's ``train`` is the plain path's.
The server's side is ``fedrec.server.secagg``.

What each party learns: the server sees only the weighted sum of the updates and of the weights;
a client's masks fall away only in that sum, unless ``reconstruction_threshold`` of its
neighbours collude with the server. A client's loss and count do not leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedrec.config import Config
from fedrec.wire import ARRAY_NAMES, LEGACY_CONFIG_KEYS, MAX_WEIGHT, NOT_COVERED, WEIGHT_KEY


def secure_aggregation_mod(run_config: Callable[[Context], Config]) -> Mod:
    """The mod, reading the run's config through ``run_config`` (the ClientApp's holder):
    SecAgg+ train messages go through Flower's secaggplus_mod; plain ones pass untouched."""

    def secure_aggregation(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            if run_config(context).secagg.enabled:
                # A run with SecAgg+ never trains in the clear, whatever the server asks.
                return Message(Error(NOT_COVERED, "this run has secagg=on: this client trains "
                                     "only inside SecAgg+'s stages, never for a plain train "
                                     "request"), reply_to=msg)
            return call_next(msg, context)
        reply = secaggplus_mod(msg, context, _translated(call_next))
        if not reply.has_error() and "fitres.num_examples" in reply.content:
            # secaggplus_mod masks the weight into the vector but leaves the legacy records in
            # the clear: the count and metrics go, and the server's legacy strategy gets a
            # constant weight (every reply carries the same revealed sum, so the weights
            # cancel).
            reply.content["fitres.num_examples"] = MetricRecord({"num_examples": 1})
            reply.content["fitres.metrics"] = ConfigRecord()
        return reply

    return secure_aggregation


def _translated(call_next: ClientAppCallable) -> Callable[[Message, Context], Message]:
    def train(msg: Message, context: Context) -> Message:
        legacy_config = msg.content.config_records["fitins.config"]
        config = ConfigRecord({LEGACY_CONFIG_KEYS.get(k, k): v for k, v in legacy_config.items()
                               if k not in (ARRAY_NAMES, WEIGHT_KEY, MAX_WEIGHT)})
        names = cast(list[str], legacy_config[ARRAY_NAMES])
        arrays = msg.content.array_records["fitins.parameters"].to_numpy_ndarrays()
        msg.content = RecordDict({
            "arrays": ArrayRecord(torch_state_dict={
                n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays, strict=True)}),
            "config": config,
        })
        reply = call_next(msg, context)
        if reply.has_error():
            # secaggplus_mod then raises: the client drops out of the round after sharing its
            # keys, which SecAgg+ survives while enough neighbours remain.
            raise RuntimeError(f"training failed: {reply.error.reason}")
        metrics = reply.content["metrics"]
        weight = float(metrics[legacy_config[WEIGHT_KEY]])
        if weight > float(legacy_config[MAX_WEIGHT]):
            raise ValueError(f"this client's weight {weight:g} ({legacy_config[WEIGHT_KEY]}) "
                             f"exceeds secagg.max_weight={legacy_config[MAX_WEIGHT]:g}: its "
                             "masked update would overflow; raise secagg.max_weight")
        state = reply.content["arrays"].to_torch_state_dict()
        reply.content = RecordDict({
            "fitres.parameters": ArrayRecord([state[n].numpy() for n in names]),
            "fitres.num_examples": MetricRecord({"num_examples": int(weight)}),
            "fitres.metrics": ConfigRecord(dict(cast(MetricRecord, metrics))),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        })
        return reply

    return train
