"""The proto contract is guarded: ``buf breaking`` (run by ``make lint``) compares ``protos/``
with the image recorded at the last release, so a change that would break a deployed client
fails the build while additive changes pass.

Each case edits a copy of ``protos/`` and runs the same command ``make lint`` runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"  # PyPI buf-bin, installed by the [dev] extras
RELEASED = ROOT / "protos" / "released" / "stepflow-v1.json"
JOB_PROTO = Path("stepflow/v1/job.proto")
MONITOR_PROTO = Path("stepflow/v1/monitor_service.proto")


def _copy_protos(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy, ignore=shutil.ignore_patterns("released"))
    return copy


def _edit(root: Path, rel: Path, old: str, new: str) -> None:
    path = root / rel
    text = path.read_text()
    assert old in text, f"{old!r} not in {rel}: the case no longer edits anything"
    path.write_text(text.replace(old, new, 1))


def _breaking(protos: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", str(protos), "--against", str(RELEASED)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_current_protos_are_compatible_with_the_release() -> None:
    result = _breaking(ROOT / "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_added_field_is_not_breaking(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    _edit(protos, JOB_PROTO, "string owner = 18;", "string owner = 18;\n  string added_later = 99;")
    result = _breaking(protos)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("rel", "old", "new", "expected"),
    [
        pytest.param(
            JOB_PROTO, "string owner = 18;", "string owner_name = 18;", "changed name", id="rename"
        ),
        pytest.param(JOB_PROTO, "string owner = 18;", "int64 owner = 18;", "type", id="retype"),
        pytest.param(
            JOB_PROTO, "string owner = 18;", "string owner = 99;", "deleted", id="renumber"
        ),
        pytest.param(
            MONITOR_PROTO,
            "  rpc GetJob(GetJobRequest) returns (GetJobResponse);\n",
            "",
            "GetJob",
            id="remove-rpc",
        ),
    ],
)
def test_a_breaking_change_fails(
    tmp_path: Path, rel: Path, old: str, new: str, expected: str
) -> None:
    protos = _copy_protos(tmp_path)
    _edit(protos, rel, old, new)
    result = _breaking(protos)
    assert result.returncode != 0, "buf breaking accepted a breaking change"
    assert expected in result.stdout + result.stderr
