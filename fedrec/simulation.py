"""Run a federated simulation through the real Flower runtime (`flwr run`) from Python.

Benchmarks, tests and sweeps use this instead of Flower's deprecated in-process shortcut, so
they exercise exactly what a user's `flwr run .` does. `flwr run --stream` exits 0 even when the
run fails, so success is judged by the run's summary.json, and a failure raises with the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedrec.config import parse_overrides

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Flower's managed local SuperLink: one per machine, started by the first `flwr run`.
SUPERLINK_MARKER = "local-superlink"


class SimulationError(RuntimeError):
    """The federated run ended without writing its summary."""


def run_federated(
    overrides: str | list[str],
    *,
    num_supernodes: int,
    output_dir: Path,
    log_path: Path | None = None,
    timeout: float = 3600,
    cpus_per_client: float = 1,
    echo: bool = False,
    project_dir: Path = PROJECT_DIR,
) -> dict[str, Any]:
    """Run `flwr run` on ``project_dir`` (default: this project) and return its summary.json."""
    output_dir = Path(output_dir).resolve()
    args = [*parse_overrides(overrides), f"output_dir={output_dir}"]
    # flwr starts flower-superlink by name: put this interpreter's scripts first on PATH, so a
    # venv that is used but not activated still finds its own.
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                    os.environ.get("PATH", "")])}
    log_path = log_path or output_dir.with_name(output_dir.name + ".flwr.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as run_config:
        # A TOML file sidesteps shell and TOML quoting of the override string.
        run_config.write(f"overrides = {json.dumps(' '.join(map(_quote, args)))}\n")
    command = [
        _flwr(), "run", str(project_dir), "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
        "--run-config", run_config.name,
    ]
    try:
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env=env, cwd=project_dir)
            deadline = time.monotonic() + timeout
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                if time.monotonic() > deadline:
                    process.kill()
                    raise SimulationError(f"flwr run exceeded {timeout:.0f} s; log: {log_path}")
            process.wait()
    finally:
        os.unlink(run_config.name)
    summary_path = output_dir / "summary.json"
    if not summary_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise SimulationError(f"flwr run wrote no {summary_path}; end of {log_path}:\n{tail}")
    return json.loads(summary_path.read_text())


def superlink_pids() -> list[int]:
    """PIDs of Flower's managed local SuperLink and its SuperExec, if running."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        superlink = "flower-superlink" in cmdline and SUPERLINK_MARKER in cmdline
        superexec = "flower-superexec" in cmdline and "--parent-pid" in cmdline
        if superlink or superexec:
            pids.append(int(proc.name))
    return pids


def stop_local_superlink(timeout: float = 10) -> None:
    """Stop the managed SuperLink that `flwr run` leaves running."""
    pids = superlink_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def _flwr() -> str:
    candidate = Path(sys.executable).with_name("flwr")
    return str(candidate) if candidate.exists() else "flwr"


def _quote(override: str) -> str:
    return f"'{override}'" if " " in override else override


def main(argv: list[str] | None = None) -> int:
    """`python -m fedrec.simulation stop` stops the managed SuperLink."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["stop"]:
        pids = superlink_pids()
        stop_local_superlink()
        print(f"stopped {len(pids)} Flower process(es)" if pids else "no local SuperLink running")
        return 0
    print("usage: python -m fedrec.simulation stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
