"""The package is cut along the wire: a device runs the client side and the core, nothing of the
server's (DESIGN.md). Checked in a fresh interpreter, as a ClientApp process starts."""

from __future__ import annotations

import json
import subprocess
import sys

# What a node must not load: the server side, and the server's and the user's tools.
NOT_ON_A_NODE = ("fedrec.server", "fedrec.outputs", "fedrec.recommend", "fedrec.simulation",
                 "fedrec.deployment", "fedrec.sweep", "fedrec.report", "fedrec.centralized")


def _fedrec_modules_after_import(module: str) -> list[str]:
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fedrec'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_client_app_imports_nothing_of_the_server():
    loaded = _fedrec_modules_after_import("fedrec.client.app")
    assert "fedrec.client.task" in loaded and "fedrec.model" in loaded  # the import ran
    server_side = [m for m in loaded if m.startswith(NOT_ON_A_NODE)]
    assert server_side == []


def test_the_server_app_imports_nothing_of_the_client():
    loaded = _fedrec_modules_after_import("fedrec.server.app")
    assert "fedrec.server.run" in loaded
    assert [m for m in loaded if m.startswith("fedrec.client")] == []
