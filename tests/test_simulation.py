"""How fedrec drives Flower's command-line tools: output copied as it comes, and a deadline
that holds even when a hung command prints nothing."""

from __future__ import annotations

import io
import os
import sys
import time

import pytest

from fedrec.simulation import stream_command


def test_output_is_copied_and_the_exit_code_returned():
    log = io.StringIO()
    code = stream_command([sys.executable, "-c", "print('one'); print('two'); raise SystemExit(3)"],
                          log, timeout=60, env=dict(os.environ))
    assert code == 3 and log.getvalue().split() == ["one", "two"]


def test_a_silent_hung_command_is_stopped_at_its_deadline():
    log = io.StringIO()
    seen = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="past 1 s"):
        stream_command([sys.executable, "-c", "print('started', flush=True); "
                        "import time; time.sleep(60)"], log, timeout=1, env=dict(os.environ),
                       started=seen.append)
    assert time.monotonic() - started < 30
    assert log.getvalue().strip() == "started"
    assert seen[0].poll() is not None  # killed, not left behind
