"""The package is cut along the wire: a device runs the client side and the core, nothing of the
server's (DESIGN.md). Checked in a fresh interpreter, as a ClientApp process starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# What a node must not load: the server side, and the server's and the user's tools.
NOT_ON_A_NODE = ("fedrec.server", "fedrec.outputs", "fedrec.recommend", "fedrec.simulation",
                 "fedrec.deployment", "fedrec.sweep", "fedrec.report", "fedrec.centralized")


@pytest.fixture(scope="module")
def fresh_import() -> dict[str, tuple[list[str], list[str]]]:
    """Per app, in a fresh interpreter as a ClientApp or ServerApp process starts: the fedrec
    modules its import loads, and what one of Flower's log lines prints after it."""
    code = ("import json, logging, sys, {module}; from flwr.common.logger import log; "
            "log(logging.INFO, 'round 7 of 9'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fedrec'))))")
    seen = {}
    for module in ("fedrec.client.app", "fedrec.server.app"):
        done = subprocess.run([sys.executable, "-c", code.format(module=module)],
                              capture_output=True, text=True, check=True)
        printed = (done.stdout + done.stderr).splitlines()
        seen[module] = (json.loads(done.stdout.strip().splitlines()[-1]),
                        [line for line in printed if "round 7 of 9" in line])
    return seen


@pytest.mark.slow  # two fresh interpreters load torch, Opacus and Flower
def test_the_client_app_imports_nothing_of_the_server(fresh_import):
    loaded = fresh_import["fedrec.client.app"][0]
    assert "fedrec.client.task" in loaded and "fedrec.model" in loaded  # the import ran
    server_side = [m for m in loaded if m.startswith(NOT_ON_A_NODE)]
    assert server_side == []


@pytest.mark.slow  # two fresh interpreters load torch, Opacus and Flower
def test_the_server_app_imports_nothing_of_the_client(fresh_import):
    loaded = fresh_import["fedrec.server.app"][0]
    assert "fedrec.server.run" in loaded
    assert [m for m in loaded if m.startswith("fedrec.client")] == []


@pytest.mark.slow  # the same two fresh interpreters
@pytest.mark.parametrize("module", ["fedrec.client.app", "fedrec.server.app"])
def test_a_flower_log_line_prints_once_in_each_app(module, fresh_import):
    """Opacus gives the root logger a handler on import, and Flower's logger propagates to it:
    without care, each of Flower's lines shows twice in `flwr run --stream`."""
    shown = fresh_import[module][1]
    assert len(shown) == 1, shown


def test_the_packaged_flower_app_is_the_checkouts_app():
    """`flwr run .` in a checkout and `python -m fedrec.simulation run` (which runs the app
    folder inside the package) must start the same components with the same run config."""
    import tomli  # Flower depends on it; tomllib is Python 3.11+

    from fedrec.simulation import APP_DIR

    project = Path(__file__).resolve().parents[1]
    checkout = tomli.loads((project / "pyproject.toml").read_text())
    packaged = tomli.loads((APP_DIR / "pyproject.toml").read_text())
    assert packaged["tool"]["flwr"] == checkout["tool"]["flwr"]
    assert packaged["project"]["version"] == checkout["project"]["version"]


@pytest.mark.slow  # builds the package, and starts the Flower runtime
def test_a_built_wheel_carries_its_config_and_runs_outside_the_checkout(tmp_path):
    """A plain (non-editable) install: the wheel alone, imported from outside the checkout,
    composes its config, trains the centralized reference, runs a sweep and a federated
    simulation through `flwr run`."""
    from conftest import TINY

    from fedrec.simulation import superlink_pids

    project = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(project)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("fedrec-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    # The venv used, not activated: Flower's commands must still be its own.
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}

    def fedrec(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=600)

    where = fedrec("-c", "import fedrec.config as c; print(c.CONF_DIR)").stdout.strip()
    assert where.startswith(str(site)) and (Path(where) / "config.yaml").is_file()
    tiny = ["dataset.num_users=40", "dataset.num_items=60", "dataset.num_categories=3",
            "eval.num_negatives=10",
            "train.epochs=1", "model.embedding_dim=8", "model.hidden_dim=16"]
    run = fedrec("-m", "fedrec.centralized", *tiny, f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["mode"] == "centralized"
    sweep = fedrec("-m", "fedrec.sweep", "-m", "mode=centralized", "seed=0,1", *tiny,
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2
    # The SuperLink the launcher starts, and the ServerApp it runs, must see the wheel: a
    # SuperLink already up would run the checkout's code instead.
    assert superlink_pids() == [], "a SuperLink is already running; stop it first"
    federated = fedrec("-m", "fedrec.simulation", "run", *TINY.split(), "num_rounds=1",
                       f"output_dir={tmp_path / 'federated'}")
    assert federated.returncode == 0, federated.stderr[-3000:]
    summary = json.loads((tmp_path / "federated" / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["rounds"] == 1
    # Run from the wheel, not from a checkout: no git commit to name.
    assert summary["git_commit"] is None and summary["fedrec_version"] == "0.1.0"
    assert superlink_pids() == []
