"""How fedrec drives Flower's command-line tools: output copied as it comes, and a deadline
that holds even when a hung command prints nothing."""

from __future__ import annotations

import io
import os
import sys
import time

import pytest

from fedrec.simulation import _running, stream_command


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
