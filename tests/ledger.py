"""A ledger the children's own processes write: each run appends ``start``/``end`` lines
(item, attempt, pid), and at its start records ``overlap`` if an earlier run of the same item
is still alive. So "run once" and "at most once at a time" are read off what the processes
themselves did, not off the record."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

LEDGER_SCRIPT = """\
import os, sys, time
ledger, item, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
attempt = os.environ.get("STEPFLOW_ATTEMPT", "?")

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False

with open(ledger) as f:
    earlier = [l.split() for l in f if l.startswith(f"start {item} ")]
with open(ledger, "a") as f:
    for words in earlier:
        if alive(int(words[3])):
            f.write(f"overlap {item} {words[2]} {attempt}\\n")
    f.write(f"start {item} {attempt} {os.getpid()}\\n")
time.sleep(seconds)
with open(ledger, "a") as f:
    f.write(f"end {item} {attempt} {os.getpid()}\\n")
"""


class Ledger:
    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "ledger.py"
        self.script.write_text(LEDGER_SCRIPT)
        self.path = tmp_path / "ledger.txt"
        self.path.write_text("")

    def command(self, seconds: float) -> str:
        return f"{sys.executable} {self.script} {self.path} {{item}} {seconds}"

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.path.read_text().splitlines()]

    def starts(self) -> Counter[str]:
        return Counter(w[1] for w in self.lines() if w[0] == "start")

    def ends(self) -> Counter[str]:
        return Counter(w[1] for w in self.lines() if w[0] == "end")

    def overlaps(self) -> list[list[str]]:
        return [w for w in self.lines() if w[0] == "overlap"]

    def pids(self, item: str) -> list[int]:
        return [int(w[3]) for w in self.lines() if w[0] == "start" and w[1] == item]
