"""What a job's page shows, read through the hooks SPEC §7 pins (``[data-job-status]``,
``[data-step-index]`` with ``data-status`` and ``[data-count]``, ``[data-log-seq]``,
``[data-live]`` with ``data-change-seq``), and the rules every sample of it must keep."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from stepflow_proto.v1 import job_pb2

COUNTS = ("pending", "running", "completed", "failed", "cancelled")
RANK = {
    "pending": 0,
    "running": 1,
    "spawned": 2,
    "completed": 3,
    "failed": 3,
    "cancelled": 3,
    "skipped": 3,
}

READ_PAGE = """() => {
  const live = document.querySelector('[data-live]');
  return {
    status: document.querySelector('[data-job-status]').textContent.trim(),
    change: Number(live.dataset.changeSeq || 0),
    fresh: live.textContent.trim(),
    steps: [...document.querySelectorAll('[data-step-index]')].map((el) => ({
      index: Number(el.dataset.stepIndex), id: el.dataset.stepId, status: el.dataset.status,
      counts: Object.fromEntries([...el.querySelectorAll('[data-count]')].map(
        (c) => [c.dataset.count, Number(c.textContent)])),
    })),
    log: [...document.querySelectorAll('[data-log-seq]')].map((el) => Number(el.dataset.logSeq)),
  };
}"""


@dataclass(frozen=True, slots=True)
class Shown:
    status: str
    change: int
    fresh: str
    steps: list[dict[str, Any]]
    log: list[int]

    def step(self, step_id: str) -> dict[str, Any]:
        return next(s for s in self.steps if s["id"] == step_id)


async def shown(page: Any) -> Shown:
    return Shown(**await page.evaluate(READ_PAGE))


def status_word(status: int) -> str:
    return job_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def counts_of(stat: job_pb2.StepStat) -> dict[str, int]:
    return {name: getattr(stat.children, name) for name in COUNTS}


def assert_equals_job(page: Shown, job: job_pb2.Job) -> None:
    """The page shows exactly this state of the job."""
    assert page.status == status_word(job.status), (page.status, job.status)
    assert page.change == job.change_seq
    assert [s["id"] for s in page.steps] == [s.step_id for s in job.step_stats]
    for stat in job.step_stats:
        on_page = page.step(stat.step_id)
        assert on_page["index"] == stat.step_index
        assert on_page["status"] == status_word(stat.status), (stat.step_name, on_page)
        assert on_page["counts"] == counts_of(stat), (stat.step_name, on_page)


def assert_moves_forward(samples: list[Shown], totals: dict[str, int]) -> None:
    """Across samples: the state shown never gets older, no step's status goes back (a
    finished step never shows another status), no finished count falls, none passes the
    step's total. A page still loading (no state yet: a reload's first moments) is skipped."""
    samples = [s for s in samples if s.change > 0]
    for before, after in itertools.pairwise(samples):
        assert after.change >= before.change, (before.change, after.change)
        for step in after.steps:
            earlier = next((s for s in before.steps if s["id"] == step["id"]), None)
            if earlier is None:
                continue
            assert RANK[step["status"]] >= RANK[earlier["status"]], (earlier, step)
            if RANK[earlier["status"]] == 3:
                assert step["status"] == earlier["status"], (earlier, step)
            for name in ("completed", "failed", "cancelled"):
                assert step["counts"].get(name, 0) >= earlier["counts"].get(name, 0)
    for sample in samples:
        for step in sample.steps:
            total = totals.get(step["id"])
            if total is not None and step["counts"]:
                assert sum(step["counts"].values()) <= total, step


def assert_log_is(page: Shown, seqs: list[int]) -> None:
    """The page holds the whole log, each line once, in order."""
    assert len(page.log) == len(set(page.log)), "a line is shown twice"
    assert page.log == seqs
