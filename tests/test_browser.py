"""
The browser example in headless Chromium: a page and its WebSocket echo.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread
from webdriver import Browser, find_chromium

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from browser_echo import App  # noqa: E402


def _results_in_chromium(url: str, profile: Path, chromium: str, driver: str) -> dict:
    browser = Browser(chromium, driver, profile)
    try:
        browser.open(url)
        for _ in range(600):
            results = browser.run("return window.results;")
            if results and results["done"]:
                return results
            time.sleep(0.05)
        raise RuntimeError(f"the page did not finish: {results!r}")
    finally:
        browser.close()


@pytest_twisted.ensureDeferred
async def test_chromium_echoes_through_page(serve, tmp_path):
    chromium, driver = find_chromium()
    port = await serve(App)

    # WebDriver calls block, so they run in a thread while the reactor serves.
    results = await deferToThread(
        _results_in_chromium,
        f"http://127.0.0.1:{port}/",
        tmp_path / "profile",
        chromium,
        driver,
    )

    assert "permessage-deflate" in results["extensions"]
    messages = results["messages"]
    assert messages[0] == {"type": "text", "data": "hello"}
    assert messages[1] == {"type": "binary", "data": [0, 1, 2, 255]}
    assert messages[2] == {"type": "text", "data": "pong\n"}
    assert messages[3] == {"type": "text", "data": "\u00e9cho " * 4000}
    assert len(messages) == 4
    assert results["closeCode"] == 1000
