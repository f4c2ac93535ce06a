"""README's "Python client" examples run as written, against live services: each ``python``
block of that section on its own, in a fresh interpreter (``localhost:50051``/``:50052``
swapped for the test servers' ports), so a reader can paste any one of them. A block after
``<!-- client-example: not run … -->`` is only compiled (it needs certificates); the client's
TLS is tested in test_client*.py."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.process_helpers import clean_env, monitor_process, orchestrator_process, running

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"(<!-- client-example: not run[^>]*-->\n)?```python\n(.*?)^```", re.M | re.S)


def section() -> str:
    text = README.read_text()
    start = text.index("\n## Python client\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def runnable_blocks() -> list[str]:
    return [code for skip, code in BLOCK.findall(section()) if not skip]


def test_the_section_has_examples_to_run() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 3
    every = BLOCK.findall(section())
    assert len(every) > len(blocks)  # the TLS one is shown, not run
    for _, code in every:
        compile(code, "README.md", "exec")


async def run_block(code: str, monitor: str, orchestrator: str, cwd: Path) -> list[str]:
    """One block on its own, in a fresh interpreter: it must import and connect what it uses."""
    script = code.replace("localhost:50051", monitor).replace("localhost:50052", orchestrator)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, f"{code}\n{err.decode()}"
    return out.decode().splitlines()


async def test_the_python_client_examples_run_each_on_its_own(
    database_url: str, tmp_path: Path
) -> None:
    monitor = monitor_process(database_url, tmp_path)
    orchestrator = orchestrator_process(monitor.address, tmp_path)
    async with running(monitor, orchestrator):
        outputs = [
            await run_block(code, monitor.address, orchestrator.address, tmp_path)
            for code in runnable_blocks()
        ]
    follow, metadata, asyncio_watch = outputs[:3]
    assert "completed 2/2 steps ended" in follow
    assert "500.0" in metadata
    assert asyncio_watch[-1].endswith(" completed")
