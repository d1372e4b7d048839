"""How fedrec drives Flower's command-line tools: output copied as it comes, and a deadline
that holds even when a hung command prints nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.simulation import _running, stop_local_superlink, stream_command
from fedrec.simulation import main as simulation_main


def test_output_is_copied_and_the_exit_code_returned():
    log = io.StringIO()
    code = stream_command([sys.executable, "-c", "print('one'); print('two'); raise SystemExit(3)"],
                          log, timeout=60, env=dict(os.environ))
    assert code == 3 and log.getvalue().split() == ["one", "two"]


def test_a_silent_hung_command_is_stopped_at_its_deadline():
    """The command and what it started (as `flwr run` starts a SuperLink) are killed."""
    log = io.StringIO()
    started = time.monotonic()
    hang = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('child', child.pid, flush=True); time.sleep(60)")
    with pytest.raises(TimeoutError, match="past 2 s"):
        stream_command([sys.executable, "-c", hang], log, timeout=2, env=dict(os.environ))
    assert time.monotonic() - started < 30
    word, pid = log.getvalue().split()
    assert word == "child"
    deadline = time.monotonic() + 10
    while _running(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(int(pid))


def test_a_character_split_across_reads_is_kept():
    log = io.StringIO()
    # 65535 ASCII bytes, then a two-byte character straddling the 64 KiB read boundary.
    code = stream_command([sys.executable, "-c", "import sys; sys.stdout.buffer.write("
                           "b'a' * 65535 + 'é'.encode()); sys.stdout.flush()"],
                          log, timeout=60, env=dict(os.environ))
    assert code == 0 and log.getvalue() == "a" * 65535 + "é"


def _fake_superlink(folder: Path) -> subprocess.Popen:
    """A process that looks like a managed SuperLink somebody else started."""
    script = folder / "flower-superlink"
    script.write_text("import time\ntime.sleep(120)\n")
    return subprocess.Popen([sys.executable, str(script), "--log-file",
                             str(folder / "local-superlink" / "superlink.log")])


def test_stop_leaves_a_superlink_fedrec_did_not_start(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    other = _fake_superlink(tmp_path)
    try:
        time.sleep(0.5)
        said = stop_local_superlink()
        assert said.startswith("no SuperLink started by fedrec is running")
        assert f"fedrec did not start (pids {other.pid}" in said or str(other.pid) in said
        assert _running(other.pid)
        # A record whose pid now names another process (pid reuse) stops nothing either.
        record = tmp_path / "home" / "local-superlink" / "started-by-fedrec.json"
        record.write_text(json.dumps({"pid": other.pid, "start_time": 1}))
        assert stop_local_superlink().startswith("no SuperLink started by fedrec")
        assert _running(other.pid) and not record.exists()
    finally:
        other.kill()
        other.wait()


def test_run_command_refuses_a_bad_override_before_flower_starts(tmp_path, capsys):
    assert simulation_main(["run", "train.lr=-1", f"output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "train.lr" in error[0]
    assert not (tmp_path / "run").exists()
    assert simulation_main(["run", "--supernodes", "many"]) == 2
    assert "--supernodes takes a number, got 'many'" in capsys.readouterr().err
    assert simulation_main(["run", "federation=deployment"]) == 2
    assert "federation=deployment" in capsys.readouterr().err


def test_centralized_refuses_resume_with_one_line(tmp_path, capsys):
    from fedrec.centralized import main as centralized_main

    assert centralized_main([f"resume={tmp_path}", f"output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: resume={tmp_path}")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # starts the Flower runtime
def test_run_command_fails_with_the_servers_reason_and_stops_its_superlink(tmp_path, capsys):
    from conftest import TINY

    code = simulation_main(["run", "--supernodes", "2", *TINY.split(), "num_rounds=1",
                            f"output_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    assert code == 1
    error = captured.err.strip()
    assert error.startswith("error: the run failed:") and "num-supernodes=3" in error
    assert len(error.splitlines()) < 10  # the errors, not the log
