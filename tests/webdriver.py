"""
A small W3C WebDriver client for chromedriver, enough to open a page and run a script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from subprocesses import free_port

# The flags a headless browser needs in a container, without network
# traffic of its own (updates, sync, metrics).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
]


def find_chromium() -> tuple[str, str]:
    """
    Return the paths of chromium and chromedriver, or skip (fail in CI).
    """
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        reason = (
            "chromium and chromium-driver are not installed (scripts/install-test-deps)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver


class Browser:
    """
    One chromedriver process with one headless Chromium session.
    """

    def __init__(self, chromium: str, driver: str, profile: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [driver, f"--port={self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"],
            },
        }
        session = self._call(
            "POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}
        )
        self.session = session["sessionId"]

    def _wait_ready(self) -> None:
        for _ in range(200):
            try:
                if self._call("GET", "/status")["ready"]:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError("chromedriver did not start")

    def _call(self, method: str, path: str, body: object = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)["value"]
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:500]
            raise RuntimeError(f"WebDriver {method} {path} failed: {detail}") from None

    def open(self, url: str) -> None:
        """
        Load C{url} and wait for the page's load event.
        """
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str) -> object:
        """
        Run C{script} (a function body) in the page and return its value.
        """
        return self._call(
            "POST",
            f"/session/{self.session}/execute/sync",
            {"script": script, "args": []},
        )

    def close(self) -> None:
        """
        End the session and stop chromedriver.
        """
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.process.terminate()
            self.process.wait(timeout=30)
