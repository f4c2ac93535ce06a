"""Regenerate the Python stubs in ``stepflow_proto/`` from ``protos/``.

``--check`` regenerates into a temporary directory and fails when the committed stubs differ,
so stale generated code cannot land. protoc writes bare ``stepflow.v1`` imports; they are
rewritten to the fenced-off ``stepflow_proto.v1`` package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "stepflow_proto"
BARE_IMPORT = re.compile(r"^from stepflow\.v1 import ", re.MULTILINE)
MYPY_GRPC_PLUGIN = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
INIT_TEXT = '"""Generated protobuf and gRPC stubs. Never edit: run ``make gen``."""\n'


def generate(dest: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                f"--plugin=protoc-gen-mypy_grpc={MYPY_GRPC_PLUGIN}",
                f"--mypy_grpc_out={raw}",
                *protos,
            ],
            capture_output=True,  # the mypy plugin narrates every file it writes
            text=True,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"protoc failed with exit status {done.returncode}")
        generated = Path(raw) / "stepflow" / "v1"
        (dest / "v1").mkdir(parents=True, exist_ok=True)
        (dest / "__init__.py").write_text(INIT_TEXT)
        (dest / "v1" / "__init__.py").write_text(INIT_TEXT)
        (dest / "py.typed").write_text("")
        for path in sorted(generated.iterdir()):
            text = BARE_IMPORT.sub("from stepflow_proto.v1 import ", path.read_text())
            (dest / "v1" / path.name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(OUT_PACKAGE, ignore_errors=True)
        generate(OUT_PACKAGE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "stepflow_proto"
        generate(fresh)
        diff = filecmp.dircmp(fresh, OUT_PACKAGE, ignore=["__pycache__"])
        stale = _differences(diff)
        if stale:
            print("generated stubs are stale; run `make gen`:", *stale, sep="\n  ")
            return 1
    print("generated stubs are up to date")
    return 0


def _differences(diff: filecmp.dircmp[str]) -> list[str]:
    found = [*diff.left_only, *diff.right_only, *diff.diff_files]
    # dircmp compares shallowly by stat; compare contents to be sure.
    for name in diff.common_files:
        left, right = Path(diff.left) / name, Path(diff.right) / name
        if left.read_bytes() != right.read_bytes() and name not in found:
            found.append(name)
    for sub in diff.subdirs.values():
        found.extend(_differences(sub))
    return found


if __name__ == "__main__":
    sys.exit(main())
