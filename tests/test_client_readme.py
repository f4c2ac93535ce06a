"""README's "Python client" examples run as written, against live services: the ``python``
blocks of that section, in order, as one script (``localhost:50051``/``:50052`` swapped for
the test servers' ports). A block after ``<!-- client-example: not run … -->`` is shown only
(it needs certificates); the client's TLS is tested in test_client*.py."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.process_helpers import clean_env, monitor_process, orchestrator_process, running

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[1] / "README.md"
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
    assert len(BLOCK.findall(section())) > len(blocks)  # the TLS one is shown, not run


async def test_the_python_client_examples_run(database_url: str, tmp_path: Path) -> None:
    monitor = monitor_process(database_url, tmp_path)
    orchestrator = orchestrator_process(monitor.address, tmp_path)
    async with running(monitor, orchestrator):
        script = "\n\n".join(runnable_blocks())
        script = script.replace("localhost:50051", monitor.address)
        script = script.replace("localhost:50052", orchestrator.address)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
            cwd=tmp_path,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "completed 2/2 steps ended" in lines
    assert "500.0" in lines
    assert lines[-1].endswith(" completed")
