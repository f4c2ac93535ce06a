"""The blocking client is generated from the asyncio one (``scripts/gen_sync_client.py``), so
the two cannot drift: the committed ``_sync.py`` and ``_sync_log.py`` are exactly what the
script makes now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "gen_sync_client", ROOT / "scripts/gen_sync_client.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_blocking_client_is_the_generated_one() -> None:
    gen = _generator()
    assert len(gen.PAIRS) == 4
    for source, target in gen.PAIRS:
        assert gen.generate(source, target) == target.read_text(), f"{target.name}: make gen"


def test_the_blocking_client_has_no_asyncio_left() -> None:
    for name in ("_sync.py", "_sync_log.py", "_sync_lease.py", "_sync_orchestrator.py"):
        text = (ROOT / "stepflow_client" / name).read_text()
        for word in ("async def", "await ", "asyncio.", "AsyncIterator", "aio.AioRpcError"):
            assert word not in text, (name, word)


def test_the_check_fails_on_a_hand_edit(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    gen = _generator()
    (source, target), rest = gen.PAIRS[0], gen.PAIRS[1:]
    edited = tmp_path / "_sync.py"
    edited.write_text(target.read_text().replace("def get_job(", "def get_job_renamed(", 1))
    monkeypatch.setattr(gen, "PAIRS", ((source, edited), *rest))
    monkeypatch.setattr(sys, "argv", ["gen_sync_client.py", "--check"])
    assert gen.main() == 1
    assert "is stale: run `make gen`" in capsys.readouterr().err
