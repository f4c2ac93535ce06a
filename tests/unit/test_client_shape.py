"""The client's two faces agree, and what it builds matches what the orchestrator reads: the
blocking and asyncio classes have the same methods (the asyncio ones awaitable or async
iterators), and a job file's structure becomes the JobDefinition the orchestrator's own
loader makes of it."""

from __future__ import annotations

import inspect
import json
import tomllib
from pathlib import Path

import pytest

import stepflow_client
from orchestrator_svc import definitions
from stepflow_client import aio
from stepflow_client._requests import job_definition, metadata_patch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.[tj][os][mo]*"))


def _public(cls: type) -> dict[str, object]:
    return {name: f for name, f in vars(cls).items() if not name.startswith("_")}


# Methods that return an emitter (its own methods are awaited, or block, by flavour).
EMITTER_FACTORIES = {"events"}


@pytest.mark.parametrize("name", ["MonitorClient", "OrchestratorClient"])
def test_sync_and_asyncio_clients_have_the_same_methods(name: str) -> None:
    sync_cls, aio_cls = getattr(stepflow_client, name), getattr(aio, name)
    assert _public(sync_cls).keys() == _public(aio_cls).keys()
    for method, fn in _public(aio_cls).items():
        sync_fn = _public(sync_cls)[method]
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
        assert params == inspect.signature(sync_fn).parameters, method  # type: ignore[arg-type]
        if method in EMITTER_FACTORIES:  # returns the emitter of its flavour, called plainly
            assert not inspect.iscoroutinefunction(fn), method
            continue
        assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn), method
        assert not inspect.iscoroutinefunction(sync_fn), method


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_a_job_files_structure_becomes_the_definition_the_orchestrator_reads(path: Path) -> None:
    raw = (
        tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    )
    spec = definitions.load_file(str(path))
    assert definitions.from_proto(job_definition(raw)) == spec


def test_a_definition_with_every_field() -> None:
    raw = {
        "name": "all",
        "timeout": "2h",
        "error_tolerance": {"max_child_failures": 3, "action": "continue"},
        "config": {"k": "v"},
        "steps": [
            {"name": "a", "type": "command", "config": {"command": "true"}, "on_error": "fatal",
             "timeout": 90, "retries": 2, "retry_backoff": "500ms", "on_interrupt": "fail"},
            {"name": "b", "type": "command", "depends_on": ["a"], "wait": False,
             "config": {"command": "true"}},
        ],
    }  # fmt: skip
    assert definitions.from_proto(job_definition(raw)) == definitions.from_mapping(raw)
    with pytest.raises(ValueError, match="on_error: 'sometimes' is not one of"):
        job_definition({"name": "x", "steps": [{"name": "a", "on_error": "sometimes"}]})


def test_metadata_patch_sends_changed_keys_and_deletes_dropped_ones() -> None:
    before = {"a": 1, "b": {"x": 1}, "c": "same"}
    after = {"a": 2, "b": {"x": 1}, "c": "same", "d": None, "e": [1]}
    assert metadata_patch(before, after) == {"a": 2, "d": None, "e": [1]}
    assert metadata_patch(before, {"c": "same"}) == {"a": None, "b": None}
    assert metadata_patch(before, dict(before)) == {}
