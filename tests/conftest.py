"""
Fixtures shared by the tests: a server on loopback and log capture.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted
from http2_support import TLSFiles, make_tls_files
from support import LogCapture
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from desperados import start_link
from desperados.server import DesperadosSite


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """
    A self-signed certificate for localhost and its key, as PEM files.
    """
    return make_tls_files(tmp_path_factory.mktemp("tls"))


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
    Keyword arguments go to C{start_link}, such as C{scheme="https"}.
    """
    ports = []

    async def start(
        plug: object = "desperados.plugs.Default", opts: object = None, **options: object
    ) -> int:
        options.setdefault("startup_log", None)
        listening = await start_link(
            plug, opts, port=0, ip="127.0.0.1", reactor=reactor, **options
        )
        ports.append(listening)
        return listening.getHost().port

    yield start
    for listening in ports:
        await listening.stopListening()


@pytest.fixture(params=["fast path", "channel"])
def both_http1_paths(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> str:
    """
    Run a test with desperados.http1_fast on, then with twisted.web's
    Request carrying every HTTP/1.1 request.

    Servers in other processes (twistd) always use the fast path.
    """
    monkeypatch.setattr(DesperadosSite, "http1_fast_path", request.param == "fast path")
    return request.param
