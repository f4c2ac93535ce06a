"""The layers hold: only ``monitor_svc/store`` (and its migrations) import SQLAlchemy, and the
lifecycle rules import neither SQL nor gRPC."""

from __future__ import annotations

import ast
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
