"""Generate the blocking client (``stepflow_client/_sync*.py``) from the
asyncio one (``_aio.py`` and its ``_aio_*.py`` parts, each into its ``_sync*`` twin).

The two have the same classes and methods; the blocking one is the asyncio one without
``async``/``await``, on ``grpc`` instead of ``grpc.aio``, plus the few lines listed in
``FLAVOUR`` below (its channel, and the event emitter that runs on its own thread). Writing it
by hand let the two drift; generating it makes a change to one a change to both. ``--check``
fails when the committed file differs from what this script makes (``make test`` runs it).
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "stepflow_client"
# Each asyncio module and its blocking twin.
PAIRS = tuple(
    (CLIENT / f"_aio{part}.py", CLIENT / f"_sync{part}.py")
    for part in ("", "_log", "_lease", "_orchestrator")
)
RUFF = Path(sys.executable).parent / "ruff"

HEADER = '''"""The blocking clients (``stepflow_client``): ``{source}``'s, method for method.

Generated from ``{source}.py`` by ``scripts/gen_sync_client.py``: never edit; change
``{source}.py`` and run ``make gen``."""
'''

# Exact blocks of _aio.py and what the blocking client has in their place; each must occur once.
FLAVOUR: tuple[tuple[str, str], ...] = (
    ("    aio_channel,\n)", "    aio_channel,\n    sync_channel,\n)"),
    ("self.channel = aio_channel(self._settings)", "self.channel = sync_channel(self._settings)"),
    (
        "from stepflow_client._events import ChildEventEmitter\n",
        "from stepflow_client._events_sync import SyncChildEventEmitter\n",
    ),
    (
        '''    def events(self, **options: Any) -> ChildEventEmitter:
        """A batched, acknowledged, resending child-event stream (StreamChildEvents) on this
        client's channel; ``options`` are :class:`ChildEventEmitter`'s."""
        return ChildEventEmitter(self.channel, **options)
''',
        '''    def events(self, **options: Any) -> SyncChildEventEmitter:
        """A batched, acknowledged, resending child-event stream (StreamChildEvents) running on
        its own thread; ``options`` are :class:`SyncChildEventEmitter`'s. Needs a client made
        from a target, so the stream's own asyncio channel gets the same settings."""
        settings = self._settings
        if settings is None:
            raise ValueError("events() needs a MonitorClient made from a target, not a channel")
        return SyncChildEventEmitter(lambda: aio_channel(settings), **options)
''',
    ),
)

# Then, everywhere: the asyncio words and their blocking twins.
WORDS: tuple[tuple[str, str], ...] = (
    (r"^from stepflow_client\._aio(\w*) import", r"from stepflow_client._sync\1 import"),
    (r"^import asyncio\n", ""),
    (r"^from grpc import aio$", "import grpc"),
    (r"\baio\.AioRpcError\b", "grpc.RpcError"),
    (r"\baio\.Channel\b", "grpc.Channel"),
    (r"\basyncio\.sleep\(", "time.sleep("),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAwaitable, ", ""),
    (r"\bAwaitable\[([^\]]+)\]", r"\1"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\basync (def|for|with) ", r"\1 "),
    (r"\bawait ", ""),
    # An async generator cannot ``yield from``; a blocking one should.
    (r"^( *)for (\w+) in (.+):\n\1    yield \2\n", r"\1yield from \3\n"),
)


def generate(source: Path, target: Path) -> str:
    text = source.read_text()
    body = text[text.index('"""', 3) + 3 :].lstrip("\n")
    for old, new in FLAVOUR if source.name == "_aio.py" else ():
        count = body.count(old)
        if count != 1:
            raise SystemExit(
                f"gen_sync_client: expected one {old!r} in {source.name}, found {count}"
            )
        body = body.replace(old, new)
    for pattern, replacement in WORDS:
        body = re.sub(pattern, replacement, body, flags=re.MULTILINE)
    if "time.sleep(" in body and not re.search(r"^import time$", body, flags=re.MULTILINE):
        body = body.replace(
            "from __future__ import annotations\n",
            "from __future__ import annotations\nimport time\n",
            1,
        )
    left = re.findall(r"\basync (?:def|for|with)\b.*|\bawait \w.*|\basyncio\.\w.*", body)
    if left:
        raise SystemExit(f"gen_sync_client: asyncio left in the blocking client: {left[:3]}")
    made = HEADER.format(source=source.stem) + "\n" + body
    sorted_imports = _ruff(["check", "--fix", "--select", "I", "--quiet"], made, target)
    return _ruff(["format"], sorted_imports, target)


def _ruff(command: list[str], source: str, target: Path) -> str:
    """``source`` through ruff, as the project's settings have it (the output is checked by
    ``make lint`` like any file)."""
    done = subprocess.run(
        [str(RUFF), *command, "--stdin-filename", str(target), "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"gen_sync_client: ruff {command[0]} failed:\n{done.stderr}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a blocking twin is stale")
    args = parser.parse_args()
    stale = 0
    for source, target in PAIRS:
        made = generate(source, target)
        if not args.check:
            target.write_text(made)
            continue
        committed = target.read_text() if target.exists() else ""
        if committed == made:
            continue
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True),
            made.splitlines(keepends=True),
            f"stepflow_client/{target.name} (committed)",
            f"stepflow_client/{target.name} (generated from {source.name})",
        )
        sys.stderr.writelines(diff)
        print(
            f"stepflow_client/{target.name} is stale: run `make gen` (it is generated from "
            f"{source.name})",
            file=sys.stderr,
        )
        stale = 1
    return stale


if __name__ == "__main__":
    sys.exit(main())
