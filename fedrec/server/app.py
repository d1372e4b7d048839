"""Flower ServerApp: reads the run's config, hands it to the run builder
(``fedrec.server.run``) and starts the run. The federation logic is Flower's; the model and data
logic is fedrec's core.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import compose_config
from fedrec.server.run import plan_run, start

app = ServerApp()


def _log_through_flower() -> None:
    """Send fedrec's progress lines to the handlers Flower streams to `flwr run --stream`."""
    ours = logging.getLogger("fedrec")
    ours.setLevel(logging.INFO)
    ours.handlers = list(logging.getLogger("flwr").handlers)
    ours.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_through_flower()
    # Composed once: ${now:...} in output_dir resolves to one time for the whole run.
    composed = compose_config(str(context.run_config["overrides"]))
    start(plan_run(composed, grid), context)
