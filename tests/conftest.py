"""
Fixtures shared by the tests: a server on loopback and log capture.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from desperados import start_link
from support import LogCapture


@pytest.fixture
def logs() -> LogCapture:
    """
    Collect every log event published during the test.
    """
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


@pytest_twisted.async_yield_fixture
async def serve() -> Callable:
    """
    Start servers on 127.0.0.1 with a free port; stop them after the test.

    Call it as C{port = await serve(plug, opts)}; it returns the port number.
    """
    ports = []

    async def start(plug: object = "desperados.plugs.Default", opts: object = None) -> int:
        listening = await start_link(
            plug, opts, port=0, ip="127.0.0.1", reactor=reactor, startup_log=None
        )
        ports.append(listening)
        return listening.getHost().port

    yield start
    for listening in ports:
        await listening.stopListening()
