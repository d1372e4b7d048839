"""A real Flower deployment on this machine: a SuperLink with TLS and SuperNode authentication,
one SuperNode per data folder, each on its own port, and `flwr run` against them.

It is what a multi-machine deployment does (docs/deployment.md), on loopback: the certificates,
the node keys and their registration, the processes and their logs. ``scripts/deploy_local.py``
is its command line; the tests use it directly.

Flower 1.42 serves the SuperLink's Control, Fleet and runtime APIs on one HTTPS port. SuperNode
keys are EC P-384 in OpenSSH format; a node's public key must be registered (``flwr supernode
register``) before the node can connect.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrec.config import parse_overrides
from fedrec.simulation import (
    APP_DIR,
    SimulationError,
    failure_lines,
    stop_processes,
    stop_started_run,
    stream_command,
    write_run_config,
)

log = logging.getLogger(__name__)

CONNECTION = "fedrec-local"  # the SuperLink's name in the CLI's config.toml
BIN = Path(sys.executable).parent


class DeploymentError(RuntimeError):
    """A process of the deployment failed; the message names its log."""


class LocalDeployment:
    """Start with ``with LocalDeployment(out, data_paths) as d:``; everything stops on exit,
    on error and on Ctrl-C. Every process logs to ``out/logs/<name>.log``."""

    def __init__(self, out: Path, data_paths: list[Path], *, startup_timeout: float = 120):
        self.out = Path(out).resolve()
        self.data_paths = [Path(p).resolve() for p in data_paths]
        self.startup_timeout = startup_timeout
        self.logs = self.out / "logs"
        self.secrets = self.out / "deployment"  # CA, server certificate, node keys
        self.home = self.secrets / "flwr-home"  # the CLI's config.toml, installed apps
        self.port = 0
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_files: list[IO[bytes]] = []
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}

    # ---------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for folder in (self.logs, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        ca = self._certificates()
        self.port = _free_port()
        self._spawn("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(self.secrets / "server.pem"),
            "--ssl-keyfile", str(self.secrets / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.secrets / "state.db")], cwd=self.secrets)
        self._wait_healthy(ca)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{ca}"\ninsecure = false\n')
        for index, data in enumerate(self.data_paths):
            key = self.node_key(f"node-{index}")
            self.flwr("supernode", "register", f"{key}.pub", CONNECTION)
            self.start_node(index, data)
        self.wait_online(len(self.data_paths))

    def stop(self) -> None:
        """SuperNodes first (a SIGTERM lets them sign off), the SuperLink last; every process
        each of them started goes too (the SuperLink starts its SuperExec in a new session)."""
        for name in reversed(list(self.processes)):
            self._terminate(self.processes.pop(name))
        for handle in self._log_files:
            handle.close()
        self._log_files = []

    # ---------------------------------------------------------------------------- nodes
    def node_key(self, name: str) -> Path:
        """A SuperNode's key pair, P-384 in OpenSSH format (``<name>`` and ``<name>.pub``)."""
        path = self.secrets / name
        key = ec.generate_private_key(ec.SECP384R1())
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        return path

    def start_node(self, index: int, data: Path, key: Path | None = None,
                   name: str | None = None) -> subprocess.Popen:
        key = key or self.secrets / f"node-{index}"
        return self._spawn(name or f"supernode-{index}", [
            "flower-supernode", "--root-certificates", str(self.secrets / "ca.crt"),
            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(key),
            "--host", "127.0.0.1", "--port", str(_free_port()),
            "--node-config", f'data-path="{data}"'], cwd=self.secrets)

    def kill_node(self, index: int) -> None:
        """SIGKILL a SuperNode and its ClientApps: a machine that dies, without signing off."""
        self._terminate(self.processes.pop(f"supernode-{index}"), signal.SIGKILL)

    def stop_node(self, index: int) -> None:
        """SIGTERM a SuperNode: it signs off, and the SuperLink marks it offline at once."""
        self._terminate(self.processes.pop(f"supernode-{index}"))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr_json("supernode", "ls", CONNECTION).get("nodes", []))

    def wait_online(self, count: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while sum(str(n.get("status")) == "online" for n in self.nodes()) < count:
            self._check_alive()
            if time.monotonic() > deadline:
                raise DeploymentError(f"fewer than {count} SuperNodes came online in "
                                      f"{self.startup_timeout:.0f} s; logs: {self.logs}")
            time.sleep(1)

    # ---------------------------------------------------------------------------- runs
    def run(self, overrides: str | list[str], output_dir: Path, *, timeout: float = 3600,
            echo: bool = False) -> dict[str, Any]:
        """`flwr run` fedrec's app with the overrides; its summary.json."""
        output_dir = Path(output_dir).resolve()
        args = [*parse_overrides(overrides), "federation=deployment", f"output_dir={output_dir}"]
        run_config = write_run_config(args)
        command = [str(BIN / "flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
                   "--run-config", str(run_config)]
        try:
            with open(self.logs / "flwr-run.log", "a") as out:
                stream_command(command, out, timeout=timeout, env=self.env, echo=echo,
                               started=lambda process: self.processes.update(
                                   {"flwr-run": process}))
        except TimeoutError as err:
            stopped = stop_started_run(self.logs / "flwr-run.log", self.env, CONNECTION)
            raise DeploymentError(f"flwr run exceeded {timeout:.0f} s; {stopped}; logs: "
                                  f"{self.logs}") from err
        finally:
            run_config.unlink()
            self.processes.pop("flwr-run", None)
        runs = re.findall(r"Successfully started run (\d+)",
                          (self.logs / "flwr-run.log").read_text())
        run = self.flwr_json("ls", CONNECTION, "--run-id", runs[-1])["runs"][0] if runs else {}
        status = run.get("status", "not started")
        summary = output_dir / "summary.json"
        if status != "finished:completed" or not summary.exists():
            details = run.get("status-details") or "no details"
            nodes = "\n".join(failure_lines(path, limit=4)
                              for path in sorted(self.logs.glob("supernode-*.log")))
            raise SimulationError(
                f"the run ended {status!r} ({details}) without {summary}; "
                f"{failure_lines(self.logs / 'flwr-run.log')}\nthe SuperNodes': {nodes}")
        return json.loads(summary.read_text())

    # ---------------------------------------------------------------------------- helpers
    def flwr(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def flwr_json(self, *args: str) -> dict[str, Any]:
        out = self.flwr(*args, "--format", "json")
        return json.loads(out[out.index("{"):])

    def _spawn(self, name: str, command: list[str], cwd: Path) -> subprocess.Popen:
        handle = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log_files.append(handle)
        log.info("starting %s: %s", name, " ".join(command))
        process = subprocess.Popen([str(BIN / command[0]), *command[1:]], stdout=handle,
                                   stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def _terminate(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        stop_processes([process.pid], sig)
        process.wait()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DeploymentError(f"{name} exited with code {process.returncode}; see "
                                      f"{self.logs / name}.log")

    def _wait_healthy(self, ca: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health",
                                            context=context, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise DeploymentError(f"the SuperLink did not answer on port {self.port}; see "
                              f"{self.logs / 'superlink.log'}")

    def _certificates(self) -> Path:
        """A CA and a SuperLink certificate for localhost/127.0.0.1 it signs."""
        self.secrets.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec local CA")])
        ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, now, [
            (x509.BasicConstraints(ca=True, path_length=None), True)])
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_cert = _certificate(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name,
            server_key.public_key(), ca_key, now, [
                (x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                 False),
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
        for name, cert in (("ca.crt", ca_cert), ("server.pem", server_cert)):
            (self.secrets / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        for name, key in (("ca.key", ca_key), ("server.key", server_key)):
            path = self.secrets / name
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
            path.chmod(0o600)
        return self.secrets / "ca.crt"


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: Any, signer: Any,
                 now: dt.datetime, extensions: list[tuple[Any, bool]]) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=30)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
