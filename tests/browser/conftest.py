"""A real browser for the web view's tests: Debian's Chromium, driven by Playwright (its own
browser download is never used). Without a Chromium these tests are skipped, unless
``STEPFLOW_TEST_REQUIRE_BROWSER`` is set (CI), where that is an error."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest

CHROMIUM_ENV = "STEPFLOW_TEST_CHROMIUM"
REQUIRE_ENV = "STEPFLOW_TEST_REQUIRE_BROWSER"


def chromium() -> str | None:
    return (
        os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    )


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    path = chromium()
    if path is None:
        if os.environ.get(REQUIRE_ENV):
            raise RuntimeError(f"a browser is required: install chromium or set {CHROMIUM_ENV}")
        pytest.skip(f"no chromium on this machine (apt-get install chromium, or {CHROMIUM_ENV})")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        launched = await playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()
