"""The layers hold: only ``monitor_svc/store`` (and its migrations) import SQLAlchemy, the
lifecycle rules import neither SQL nor gRPC, the web view reaches the monitor only through
its public RPCs, and the Python client needs nothing of the services' dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITOR = ROOT / "monitor_svc"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _modules(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in _modules(MONITOR)
        if not p.is_relative_to(MONITOR / "store") and not p.is_relative_to(MONITOR / "migrations")
    ],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_the_store_imports_sqlalchemy(path: Path) -> None:
    assert not {m for m in _imports(path) if m.split(".")[0] == "sqlalchemy"}


@pytest.mark.parametrize(
    "path", _modules(MONITOR / "lifecycle"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_lifecycle_imports_no_sql_and_no_grpc(path: Path) -> None:
    banned = {"sqlalchemy", "grpc", "stepflow_proto", "google"}
    assert not {m for m in _imports(path) if m.split(".")[0] in banned}
    assert not {m for m in _imports(path) if m.startswith("monitor_svc.store")}


@pytest.mark.parametrize("path", _modules(MONITOR / "web"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_web_view_uses_the_public_rpcs_only(path: Path) -> None:
    """It could run as a process of its own: nothing of the monitor but the web package."""
    own = {m for m in _imports(path) if m.split(".")[0] == "monitor_svc"}
    assert all(m.startswith("monitor_svc.web") for m in own), own


CLIENT = ROOT / "stepflow_client"
SERVER_ONLY = ("sqlalchemy", "structlog", "monitor_svc", "orchestrator_svc", "rich", "alembic")


def test_the_client_library_loads_no_server_dependency() -> None:
    """``stepflow_client`` (and ``.aio``) need grpcio and protobuf only: imported in a fresh
    interpreter, none of the services' own dependencies is loaded."""
    code = (
        "import sys, stepflow_client, stepflow_client.aio\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("path", _modules(CLIENT), ids=lambda p: str(p.relative_to(ROOT)))
def test_client_modules_import_only_grpc_protobuf_and_pure_common_modules(path: Path) -> None:
    allowed_common = {
        "stepflow_common",
        "stepflow_common.errors",
        "stepflow_common.rpc_errors",
        "stepflow_common.status",
        "stepflow_common.proto_status",
        "stepflow_common.limits",
        "stepflow_common.durations",
        "stepflow_common.job_keys",  # the job definition's keys (errors only)
        "stepflow_common.subprocesses",  # the standard library only (the test kit uses it)
        "stepflow_common.channels",  # grpcio only: the channels the client and services dial
    }
    for module in _imports(path):
        top = module.split(".")[0]
        if top == "stepflow_common":
            assert module in allowed_common, f"{path.name} imports {module}"
        assert top not in SERVER_ONLY, f"{path.name} imports {module}"


PROJECT = ("monitor_svc", "orchestrator_svc", "stepflow_common", "stepflow_client")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports when it is loaded (not those imported inside a
    function, nor under ``TYPE_CHECKING``); ``from package import module`` names the module."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(subs or ({node.module} & known))
    return found


def _graph() -> dict[str, set[str]]:
    paths = {
        _module_name(p): p
        for package in PROJECT
        for p in _modules(ROOT / package)
        if "migrations" not in p.parts
    }
    known = set(paths)
    return {name: _module_level_imports(path, known) - {name} for name, path in paths.items()}


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (module -> modules it imports), or [] if none."""
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def walk(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := walk(target)):
                return found
        path.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (found := walk(module)):
            return found
    return []


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles() -> None:
    circle = _circle(_graph())
    assert not circle, "import circle: " + " -> ".join(circle)


def test_the_shared_code_imports_neither_service_nor_the_client() -> None:
    """stepflow_common is the lowest layer: the client and both services stand on it."""
    for module, targets in _graph().items():
        if module.split(".")[0] == "stepflow_common":
            above = {t for t in targets if t.split(".")[0] != "stepflow_common"}
            assert not above, f"{module} imports {sorted(above)}"


@pytest.mark.parametrize(
    "module", sorted(m for m in _graph() if not m.endswith("__main__")), ids=str
)
def test_every_name_a_module_exports_is_there(module: str) -> None:
    """``__all__`` is a promise to importers (``from pkg import *`` and readers alike)."""
    import importlib

    loaded = importlib.import_module(module)
    missing = [n for n in getattr(loaded, "__all__", ()) if not hasattr(loaded, n)]
    assert not missing, f"{module}.__all__ names what it does not have: {missing}"
