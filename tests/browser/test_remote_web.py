"""The web view of a step whose children run on runners: each child's row names the runner of
its current attempt, live, in Debian's Chromium."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stepflow_proto.v1 import job_pb2
from tests.jobs import final, submit
from tests.process_helpers import free_port
from tests.remote_helpers import cluster

WAIT_S = 60.0


async def test_the_children_table_names_each_childs_runner(browser: Any, tmp_path: Path) -> None:
    web_port = free_port()
    async with cluster(tmp_path, http_port=web_port) as c:
        job = {
            "name": "remote",
            "steps": [
                {
                    "name": "work",
                    "type": "simulate",
                    "executor": "celery",
                    "config": {"children": 8, "duration_ms": 300},
                }
            ],
        }
        manager_id = await submit(c.ostub(), job)
        manager = await final(c.stub, manager_id)
        assert manager.status == job_pb2.JOB_STATUS_COMPLETED
        step_id = await c.step_id(manager_id)
        recorded = {k.id: k.runner for k in await c.children(step_id)}
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{web_port}/jobs/{manager_id}")
        step = page.locator(f'[data-step-id="{step_id}"]')
        await step.locator("[data-children] summary").click()
        rows = step.locator("[data-children-rows] tr")
        deadline = time.monotonic() + WAIT_S
        while await rows.count() < len(recorded):
            assert time.monotonic() < deadline, "the children table never filled"
            await page.wait_for_timeout(100)
        shown = {
            await row.get_attribute("data-child-id"): await row.get_attribute("data-runner")
            for row in await rows.all()
        }
        assert shown == recorded
        assert set(shown.values()) <= {"A", "B"} and all(shown.values())
        cells = await rows.first.locator("td").all_text_contents()
        assert cells[3] in ("A", "B"), cells
