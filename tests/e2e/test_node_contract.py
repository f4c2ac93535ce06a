"""A client in another language: ``tests/node/contract.js`` loads ``protos/`` with Node's
``@grpc/proto-loader`` and drives both services through ``@grpc/grpc-js`` — the unary RPCs,
the bidirectional child-event stream and WatchJob — against real servers on both databases.

The Node packages are pinned in ``tests/node/package-lock.json``; this test installs them with
``npm ci`` when they are missing (``make test`` runs it with the network the registry needs).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from monitor_svc.server import RunningMonitor
from orchestrator_svc.server import RunningOrchestrator

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
REQUIRE_NODE_ENV = "STEPFLOW_TEST_REQUIRE_NODE"
RUN_TIMEOUT_S = 90.0


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The contract script, with its pinned packages installed."""
    if NODE is None or NPM is None:
        if os.environ.get(REQUIRE_NODE_ENV):
            raise RuntimeError("node and npm are required for the contract test but not found")
        pytest.skip("node/npm not installed: the Node contract test needs them")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR / "contract.js"


async def test_a_node_client_drives_both_services(
    node_client: Path, monitor: RunningMonitor, orchestrator: RunningOrchestrator
) -> None:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(node_client),
        str(ROOT / "protos"),
        monitor.address,
        orchestrator.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    assert proc.returncode == 0, err.decode(errors="replace")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["monitor"]["children"] == 3
    assert summary["monitor"]["watch_messages"] >= 2
    assert summary["orchestrator"]["sim_children"] == 12
