"""Run a federated simulation through the real Flower runtime (`flwr run`) from Python.

Benchmarks, tests and sweeps use this instead of Flower's deprecated in-process shortcut, so
they exercise exactly what a user's `flwr run .` does. `flwr run --stream` exits 0 even when the
run fails, so success is judged by the run's summary.json, and a failure raises with the log.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from fedrec.config import parse_overrides

# The Flower app `flwr run` is handed: a folder inside the package, so that a plain install runs
# the same app as the checkout's `flwr run .`.
APP_DIR = Path(__file__).resolve().parent / "flwrapp"
# Flower's managed local SuperLink: one per machine, started by the first `flwr run` (or by
# fedrec, the same way). Its ports are Flower 1.42's, which `flwr run` looks for: one for HTTP
# (health) and the runtime API, which the simulations it starts connect to (and which outlive
# it if it is killed), one for the Control API.
SUPERLINK_MARKER = "local-superlink"
MANAGED_PORT = os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
MANAGED_CONTROL_PORT = os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093")


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
    project_dir: Path = APP_DIR,
) -> dict[str, Any]:
    """Run `flwr run` on ``project_dir`` (default: fedrec's app) and return its summary.json."""
    started = time.time()
    output_dir = Path(output_dir).resolve()
    args = [*parse_overrides(overrides), f"output_dir={output_dir}"]
    env = flower_env()
    log_path = log_path or output_dir.with_name(output_dir.name + ".flwr.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ensure_superlink()
    run_config = write_run_config(args)
    command = [
        _flwr(), "run", str(project_dir), "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
        "--run-config", str(run_config),
    ]
    try:
        with open(log_path, "w") as log:
            stream_command(command, log, timeout=timeout, env=env, cwd=project_dir, echo=echo)
    except TimeoutError as err:
        stopped = stop_started_run(log_path, env)
        raise SimulationError(f"flwr run exceeded {timeout:.0f} s; {stopped}; log: "
                              f"{log_path}") from err
    finally:
        run_config.unlink()
    summary_path = output_dir / "summary.json"
    # A summary older than this command is an earlier run's, left in the folder this run
    # refused to write into.
    if not summary_path.exists() or summary_path.stat().st_mtime < started:
        raise SimulationError(f"flwr run wrote no {summary_path}; {failure_lines(log_path)}")
    return json.loads(summary_path.read_text())


def flower_env() -> dict[str, str]:
    """The environment for Flower's commands. flwr starts flower-superlink, and the SuperLink
    starts flower-superexec, by name: this interpreter's scripts go first on PATH, so a venv that
    is used but not activated still runs its own."""
    return {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                     os.environ.get("PATH", "")])}


# The last line of a Python traceback: "KeyError: 'full'", "fedrec.config.ConfigError: ...".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)"
                             r"\b.*$")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def failure_lines(log_path: Path, limit: int = 12) -> str:
    """What a failed run's log says went wrong, for an error message: its ERROR lines and the
    exception line ending each traceback, once each, in order (a ClientApp failure repeats per
    message). A full log can run to hundreds of lines."""
    text = _COLOUR.sub("", log_path.read_text(errors="replace")) if log_path.exists() else ""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        line = re.sub(r"^\d\d/\d\d/\d{4} [\d:]+:", "", line).strip()
        if line.startswith("ERROR") or _EXCEPTION_LINE.match(line):
            seen.setdefault(re.sub(r"^ERROR\s*:?\s*", "", line), None)
    found = list(seen)[-limit:]
    if not found:
        tail = "\n".join(text.splitlines()[-15:])
        return f"{log_path} names no error; its end:\n{tail}"
    return f"the errors in {log_path}:\n" + "\n".join(f"  {line}" for line in found)


def stop_started_run(log_path: Path, env: dict[str, str], *connection: str) -> str:
    """Ask the SuperLink to stop the run that `flwr run` logged as started: stopping the `flwr
    run` client alone leaves the run itself going. Says what it did."""
    started = re.findall(r"Successfully started run (\d+)", log_path.read_text())
    if not started:
        return "no run had started"
    try:
        done = subprocess.run([_flwr(), "stop", started[-1], *connection], env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"`flwr stop {started[-1]}` did not answer within 60 s"
    if done.returncode != 0:
        return f"`flwr stop {started[-1]}` failed: {(done.stdout + done.stderr).strip()[-300:]}"
    return f"run {started[-1]} stopped"


def stream_command(
    command: list[str],
    log: IO[str],
    *,
    timeout: float,
    env: dict[str, str],
    cwd: Path | None = None,
    echo: bool = False,
    started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> int:
    """Run ``command``, copying its output to ``log`` (and to stdout with ``echo``) as it
    comes, and return its exit code. The deadline holds while the command prints nothing, as
    a hung run does: it is then killed and TimeoutError raised. ``started`` receives the
    process, for an owner that may have to stop it from elsewhere."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, cwd=cwd)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span reads
    deadline = time.monotonic() + timeout

    def copy(chunk: bytes, final: bool = False) -> None:
        text = decoder.decode(chunk, final)
        log.write(text)
        log.flush()
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        if started is not None:
            started(process)
        assert process.stdout is not None
        stream = process.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{command[0]} ran past {timeout:.0f} s")
            ready, _, _ = select.select([stream], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(stream, 1 << 16)
            if not chunk:  # the command closed its output; it is ending
                copy(b"", final=True)
                try:
                    return process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired as err:
                    raise TimeoutError(f"{command[0]} ran past {timeout:.0f} s") from err
            copy(chunk)
    finally:
        if process.poll() is None:
            stop_processes([process.pid], sig=signal.SIGKILL, timeout=5)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def write_run_config(overrides: list[str]) -> Path:
    """A temporary run-config TOML holding the overrides: a file sidesteps shell and TOML
    quoting of the override string. The caller deletes it."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as run_config:
        run_config.write(f"overrides = {json.dumps(' '.join(map(_quote, overrides)))}\n")
    return Path(run_config.name)


def superlink_pids() -> list[int]:
    """Flower's managed local SuperLinks on this machine, whoever started them, with their
    SuperExecs and the simulations they started (which outlive a stopped SuperLink)."""
    processes = _processes()
    superlinks = {pid: args for pid, args in processes.items()
                  if args and args[0].endswith("flower-superlink")
                  and SUPERLINK_MARKER in " ".join(args)}
    ports = {MANAGED_PORT} | {args[args.index("--port") + 1] for args in superlinks.values()
                              if "--port" in args[:-1]}
    started = [pid for pid, args in processes.items()
               if "--runtime-api-address" in args[:-1] and args[0].endswith(
                   ("flower-superexec", "flwr-simulation"))
               and args[args.index("--runtime-api-address") + 1].rsplit(":", 1)[-1] in ports]
    return [*superlinks, *started]


def _processes() -> dict[int, list[str]]:
    """Each process's arguments, the interpreter dropped (Flower's tools are Python scripts)."""
    commands = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if args and "python" in Path(args[0]).name:
                args = args[1:]
            commands[int(proc.name)] = args
    return commands


def descendants(roots: list[int]) -> list[int]:
    """Every process started, directly or not, by one of ``roots``."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                # The parent pid is the 4th field after the parenthesised command name.
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _superlink_files() -> tuple[Path, Path]:
    """Where Flower keeps its managed SuperLink (its log and database), and fedrec's record of
    the one it started there."""
    folder = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "local-superlink"
    folder.mkdir(parents=True, exist_ok=True)
    return folder, folder / "started-by-fedrec.json"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process
    (a pid alone may be reused by another)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _superlink_healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{MANAGED_PORT}/health",
                                    timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def ensure_superlink(timeout: float = 60) -> bool:
    """Flower's managed local SuperLink, which `flwr run` uses when it answers: the running one,
    or one fedrec starts (as `flwr run` would, plus no runtime dependency installation) and
    records by pid and start time, so that only it is ever stopped. True when it started one."""
    if _superlink_healthy():
        return False
    folder, record = _superlink_files()
    command = [str(Path(sys.executable).with_name("flower-superlink")), "--insecure",
               "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{MANAGED_CONTROL_PORT}",
               "--host", "127.0.0.1", "--port", MANAGED_PORT,
               "--log-file", str(folder / "superlink.log"),
               "--database", str(folder / "state.db"),
               "--disable-runtime-dependency-installation"]
    # Its console goes to a file: a failure before its logging starts is only printed there.
    console = folder / "superlink.console.log"
    with open(console, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=flower_env())
    record.write_text(json.dumps({"pid": process.pid, "start_time": _start_time(process.pid)}))
    deadline = time.monotonic() + timeout
    while not _superlink_healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_processes([process.pid], timeout=5)
            raise SimulationError(f"the local SuperLink did not start within {timeout:.0f} s "
                                  f"(exit code {process.poll()}); {failure_lines(console)}")
        time.sleep(0.2)
    return True


def stop_local_superlink(timeout: float = 10) -> str:
    """Stop the managed SuperLink that fedrec started (and everything it started), if it still
    runs; any other SuperLink is left alone. Says what it did."""
    _, record = _superlink_files()
    ours = json.loads(record.read_text()) if record.exists() else None
    record.unlink(missing_ok=True)
    alive = ours is not None and _start_time(ours["pid"]) == ours["start_time"]
    started = descendants([ours["pid"]]) if alive else []
    others = [pid for pid in superlink_pids()
              if pid not in started and not (alive and pid == ours["pid"])]
    left = (f"; left running: {len(others)} Flower process(es) fedrec did not start "
            f"(pids {', '.join(map(str, others[:5]))})" if others else "")
    if not alive:
        return "no SuperLink started by fedrec is running" + left
    stop_processes([ours["pid"]], timeout=timeout)
    return (f"stopped the SuperLink fedrec started (pid {ours['pid']}) and the "
            f"{len(started)} process(es) it started" + left)


@contextlib.contextmanager
def local_superlink() -> Iterator[None]:
    """The managed SuperLink for the `flwr run`s inside: the running one, or one started here
    and stopped on the way out."""
    started = ensure_superlink()
    try:
        yield
    finally:
        if started:
            print(f"fedrec: {stop_local_superlink()}", flush=True)


def stop_processes(roots: list[int], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Send ``sig`` to ``roots`` and every process they started; SIGKILL what still runs after
    ``timeout`` seconds."""
    pids = list(dict.fromkeys(roots + descendants(roots)))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(_running, pids)):
        time.sleep(0.1)
    for pid in filter(_running, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _flwr() -> str:
    candidate = Path(sys.executable).with_name("flwr")
    return str(candidate) if candidate.exists() else "flwr"


def _quote(override: str) -> str:
    return f"'{override}'" if " " in override else override


USAGE = """usage:
  python -m fedrec.simulation run [--supernodes N] [--timeout SECONDS] [OVERRIDE ...]
  python -m fedrec.simulation stop

run: a federated simulation of the overrides through `flwr run`, on the local SuperLink
  (started and stopped here when none is running), with as many SuperNodes as the partition
  makes clients unless --supernodes says otherwise. Exits 0 when the run wrote its
  summary.json, 1 when it failed (naming the errors), 2 on a bad config.
stop: stop the local SuperLink fedrec started, and say what it stopped."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["stop"]:
        print(f"fedrec: {stop_local_superlink()}")
        return 0
    if argv[:1] == ["run"]:
        return _run_command(argv[1:])
    print(USAGE, file=sys.stderr)
    return 0 if argv in (["-h"], ["--help"]) else 2


def _run_command(argv: list[str]) -> int:
    from fedrec.config import ConfigError, compose_config, federated_config
    from fedrec.data.federation import build_federation
    from fedrec.outputs import resumable

    options: dict[str, float] = {}
    overrides = []
    args = iter(argv)
    for arg in args:
        if arg in ("--supernodes", "--timeout"):
            value = next(args, None)
            try:
                options[arg] = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                print(f"error: {arg} takes a number, got {value!r} (usage: python -m "
                      "fedrec.simulation --help)", file=sys.stderr)
                return 2
        else:
            overrides.append(arg)
    try:
        # Composed here first: a bad override or dataset stops before Flower starts, and
        # output_dir's ${now:...} resolves once, to the folder this command reports.
        cfg = federated_config(compose_config(overrides))
        if cfg.federation != "simulation":
            raise ConfigError(f"federation={cfg.federation}: this command simulates on one "
                              "machine; a deployment runs `flwr run` against its own SuperLink"
                              " (docs/deployment.md)")
        supernodes = int(options.get("--supernodes") or build_federation(cfg).num_nodes)
        # A resumed run writes into the folder it continues.
        output_dir = (Path(cfg.output_dir).expanduser().resolve() if cfg.resume is None
                      else resumable(cfg.resume))
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"fedrec: {supernodes} SuperNodes; results in {output_dir}", flush=True)
    with local_superlink():
        try:
            run_federated([*overrides, f"output_dir={output_dir}"], num_supernodes=supernodes,
                          output_dir=output_dir, timeout=options.get("--timeout", 86400),
                          echo=True)
        except SimulationError as err:
            print(f"error: the run failed: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
