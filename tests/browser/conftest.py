"""Fixtures of the browser tier: the ComfyUI web app in headless Chromium (Playwright, the system's Chromium)."""

from __future__ import annotations

import pytest

from support import browser_harness


@pytest.fixture(scope="module")
def app_page(workflow_server):
    browser_harness.skip_without_browser()
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = browser_harness.launch(playwright)
    try:
        yield browser_harness.open_app(browser, workflow_server)
    finally:
        browser.close()
        playwright.stop()
