"""README.md cannot drift: its grpcurl walkthrough runs against live servers, as written.

Every fenced ``sh`` block whose first line starts with ``grpcurl`` (or ``curl``, for the web
view's JSON API) is run with bash, in README order, against real ``monitor-svc serve`` and
``orchestrator-svc serve`` processes (``localhost:50051``/``localhost:50052``/``localhost:8080``
are swapped for their ports). Shell variables the
README has the reader set from an earlier answer come from HTML comments just before a block:

    <!-- readme-test: set MANAGER_ID=job.id -->    after the block, MANAGER_ID = its job.id
    <!-- readme-test: expect ABORTED -->            the block must fail with this status code

Every other block must exit 0. Beside the walkthrough: every RPC of both services has an
example, every flag and environment variable of every command is documented, the job-file
examples are the files in examples/, and the worker-plugin example loads and runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from monitor_svc import cli as monitor_cli
from orchestrator_svc import cli as orchestrator_cli
from orchestrator_svc import definitions
from orchestrator_svc.demo_services import (
    ServiceProcess,
    free_port,
    start_service,
    wait_serving,
)
from orchestrator_svc.workers.base import StepContext
from orchestrator_svc.workers.registry import as_worker
from stepflow_common.errors import InvalidArgument
from stepflow_proto.v1 import monitor_service_pb2, orchestrator_service_pb2

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
README_MONITOR = "localhost:50051"
README_ORCHESTRATOR = "localhost:50052"
README_WEB = "localhost:8080"
COMMAND_TIMEOUT_S = 60.0
GRPCURL_ERROR_BASE = 64  # grpcurl exits with 64 + the status code's number
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(set|expect)\s+(.*?)\s*-->", re.S)
RPC = re.compile(r"\bstepflow\.v1\.(\w+Service)/(\w+)")


@dataclass(frozen=True, slots=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence, for failure messages
    directives: tuple[tuple[str, str], ...] = field(default=())


def blocks() -> list[Block]:
    """Every fenced block, with the readme-test directives between it and the block before."""
    readme = README.read_text()
    found: list[Block] = []
    previous_end = 0
    for match in FENCE.finditer(readme):
        between = readme[previous_end : match.start()]
        found.append(
            Block(
                language=match.group(1),
                text=match.group(2),
                line=readme.count("\n", 0, match.start()) + 1,
                directives=tuple(DIRECTIVE.findall(between)),
            )
        )
        previous_end = match.end()
    return found


def grpcurl_examples() -> list[Block]:
    return [b for b in blocks() if b.language == "sh" and b.text.lstrip().startswith("grpcurl")]


def walkthrough() -> list[Block]:
    """The grpcurl examples and the web view's curl examples, in README order."""
    return [
        b
        for b in blocks()
        if b.language == "sh" and b.text.lstrip().startswith(("grpcurl", "curl "))
    ]


# -- the walkthrough, live ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    tmp = tmp_path_factory.mktemp("readme")
    common = ["--shutdown-grace", "2s", "--log-format", "json"]
    web = f"127.0.0.1:{free_port()}"
    monitor = [str(BIN / "monitor-svc"), "serve", "--database-url", f"sqlite:///{tmp / 'r.db'}",
               "--grace-period", "5s", "--http-port", web.rsplit(":", 1)[1], *common]  # fmt: skip
    started: list[ServiceProcess] = []
    try:
        started.append(start_service("monitor", "stepflow.v1.MonitorService", monitor, tmp))
        wait_serving(started[0])
        orchestrator = [str(BIN / "orchestrator-svc"), "serve", "--monitor", started[0].address]
        started.append(
            start_service(
                "orchestrator", "stepflow.v1.OrchestratorService", [*orchestrator, *common], tmp
            )
        )
        wait_serving(started[1])
        yield started[0].address, started[1].address, web
    finally:
        codes = {service.name: service.stop() for service in reversed(started)}
    assert codes == {"orchestrator": 0, "monitor": 0}, f"unclean shutdown: {codes}"


def _first_json(text: str) -> Any:
    value, _ = json.JSONDecoder().raw_decode(text.lstrip())
    return value


def _field(document: Any, path: str) -> str:
    value = document
    for key in path.split("."):
        value = value[key]
    return str(value)


def _expected_exit(code_name: str) -> tuple[int, str]:
    code = grpc.StatusCode[code_name]
    camel = "".join(part.capitalize() for part in code_name.split("_"))
    return GRPCURL_ERROR_BASE + code.value[0], f"Code: {camel}"


def test_readme_grpcurl_walkthrough(servers: tuple[str, str, str]) -> None:
    monitor, orchestrator, web = servers
    examples = walkthrough()
    assert len(examples) >= 20, "the grpcurl examples were not found in README.md"
    assert any(b.text.lstrip().startswith("curl ") for b in examples), "no web API example"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # grpcurl from the venv
    for example in examples:
        script = example.text.replace(README_MONITOR, monitor)
        script = script.replace(README_ORCHESTRATOR, orchestrator)
        script = script.replace(README_WEB, web)
        done = _run(script, env)
        where = (
            f"README.md line {example.line}:\n{example.text}\n"
            f"stdout:\n{done[1]}\nstderr:\n{done[2]}"
        )
        expect = [arg for verb, arg in example.directives if verb == "expect"]
        if expect:
            status, marker = _expected_exit(expect[0])
            assert done[0] == status, (
                f"expected {expect[0]} (exit {status}), got {done[0]}: {where}"
            )
            assert marker in done[2], where
        else:
            assert done[0] == 0, f"exit {done[0]}: {where}"
        for verb, arg in example.directives:
            if verb == "set":
                name, _, path = arg.partition("=")
                env[name.strip()] = _field(_first_json(done[1]), path.strip())


def _run(script: str, env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
        cwd=ROOT,
    )
    return done.returncode, done.stdout, done.stderr


# -- coverage and drift -----------------------------------------------------------------------
def test_every_rpc_has_an_example() -> None:
    shown = {m.groups() for b in grpcurl_examples() for m in RPC.finditer(b.text)}
    missing = []
    for module, service in (
        (monitor_service_pb2, "MonitorService"),
        (orchestrator_service_pb2, "OrchestratorService"),
    ):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            if (service, method.name) not in shown:
                missing.append(f"{service}/{method.name}")
    assert not missing, f"README.md has no grpcurl example for {missing}"


def _commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for prog, parser in (
        ("monitor-svc", monitor_cli.build_parser()),
        ("orchestrator-svc", orchestrator_cli.build_parser()),
    ):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prog} {name}", sub


def test_every_flag_and_variable_is_documented() -> None:
    readme = README.read_text()
    undocumented = []
    for command, parser in _commands():
        assert parser.description, f"`{command} --help` does not say what it does"
        assert f"### `{command}" in readme, f"README.md has no section for {command}"
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and f"`{flag}`" not in readme:
                    undocumented.append(f"{command} {flag}")
            env = re.search(r"\[env: ([^;\]]+)", action.help or "")
            for name in env.group(1).split(",") if env else ():
                if f"`{name.strip()}`" not in readme:
                    undocumented.append(f"{command}: {name.strip()}")
    assert not undocumented, f"not in README.md: {undocumented}"


def _block_starting(language: str, start: str) -> str:
    for block in blocks():
        if block.language == language and block.text.lstrip().startswith(start):
            return block.text
    raise AssertionError(f"README.md has no {language} block starting {start!r}")


def test_job_file_examples_match_the_files() -> None:
    toml_text = _block_starting("toml", 'name = "nightly-crawl"')
    from_readme = definitions.from_mapping(tomllib.loads(toml_text))
    assert from_readme == definitions.load_file(ROOT / "examples" / "nightly-crawl.toml")
    json_text = _block_starting("json", '{\n  "name": "nightly-crawl"')
    assert definitions.from_mapping(json.loads(json_text)) == from_readme
    assert definitions.load_file(ROOT / "examples" / "nightly-crawl.json") == from_readme


def test_worker_plugin_example_runs(tmp_path: Path) -> None:
    source = _block_starting("python", "# acme_workers/checksum.py")
    module = types.ModuleType("acme_workers_checksum")
    exec(compile(source, "README.md:acme_workers/checksum.py", "exec"), module.__dict__)
    worker = as_worker(module.ChecksumWorker, "README example")
    assert worker.type == "checksum" and worker.spawns_children
    with pytest.raises(InvalidArgument, match=r"^files:"):
        worker.validate_config({"files": "not a list"})
    present = tmp_path / "present.txt"
    present.write_text("data")
    config = {"files": [str(present), str(tmp_path / "missing.txt")]}
    worker.validate_config(config)

    events: list[tuple[str, ...]] = []

    async def created(child_id: str, name: str) -> None:
        events.append(("created", child_id))

    async def running(child_id: str, attempt: int = 1) -> None:
        events.append(("running", child_id))

    async def finished(child_id: str, status: str, error: str) -> None:
        events.append((status, child_id, error))

    ctx = StepContext(
        step_id="s1",
        step_name="checksum",
        config=config,
        child_created=created,
        child_running=running,
        child_finished=finished,
        cancelled=asyncio.Event(),
    )
    result = asyncio.run(worker.run(ctx))
    assert result.ok and result.child_count == 2
    ends = sorted(e[0] for e in events if e[0] not in ("created", "running"))
    assert ends == ["completed", "failed"], events
