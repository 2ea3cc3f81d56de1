"""
One misbehaving request affects only its own connection: timeouts, disconnects.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from support import connect, upgrade_request
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import LogLevel

from desperados import PlugResource, start_link

GET_HANG = b"GET /hang HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
GET_FINE = b"GET /fine HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Hanging:
    """
    A plug whose C{/hang} requests wait on a Deferred that never fires.

    :ivar outcomes: what happened to each hanging Deferred: C{"cancelled"}.
    """

    def __init__(self) -> None:
        self.conns: list = []
        self.outcomes: list[str] = []
        self.arrived: Deferred[None] = Deferred()

    def __call__(self, conn, opts):
        if conn.request_path != "/hang":
            return conn.send_resp(200, b"fine").halt()
        self.conns.append(conn)

        def cancelled(pending: Deferred) -> None:
            self.outcomes.append("cancelled")

        arrived, self.arrived = self.arrived, Deferred()
        arrived.callback(None)
        return Deferred(cancelled)


class HangingCoroutine(Hanging):
    """
    The same plug written as a coroutine, which sees the cancellation.
    """

    def __call__(self, conn, opts):
        if conn.request_path != "/hang":
            return conn.send_resp(200, b"fine").halt()
        return self._hang(conn)

    async def _hang(self, conn):
        self.conns.append(conn)
        arrived, self.arrived = self.arrived, Deferred()
        arrived.callback(None)
        try:
            await Deferred()
        except CancelledError:
            self.outcomes.append("cancelled")
            raise
        return conn


async def _start(plug, **options):
    return await start_link(
        plug, port=0, ip="127.0.0.1", reactor=reactor, startup_log=None, **options
    )


def _errors(logs) -> list[dict]:
    return [
        event
        for event in logs.events
        if event.get("log_level", LogLevel.info) >= LogLevel.error
    ]


@pytest.mark.parametrize("plug_class", [Hanging, HangingCoroutine])
@pytest_twisted.ensureDeferred
async def test_response_timeout_answers_503(plug_class, logs):
    plug = plug_class()
    server = await _start(plug, response_timeout=0.2)
    port = server.getHost().port
    hanging = await connect(port)
    hanging.send(GET_HANG)
    await plug.arrived
    other = await connect(port)
    other.send(GET_FINE)
    fine = await other.read_response()

    response = await hanging.read_response()
    await hanging.wait_closed()
    # A plug that writes after the timeout is ignored.
    plug.conns[0].send_resp(200, b"too late")
    await server.stop()

    assert fine.status == 200
    assert response.status == 503
    assert response.header("connection") == "close"
    assert response.body == b"service unavailable"
    assert plug.outcomes == ["cancelled"]
    [timed_out] = logs.with_format("did not finish")
    assert timed_out["method"] == "GET"
    assert timed_out["path"] == "/hang"
    assert timed_out["timeout"] == 0.2
    assert _errors(logs) == [timed_out]


@pytest.mark.parametrize("plug_class", [Hanging, HangingCoroutine])
@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_plug_quietly(plug_class, logs):
    plug = plug_class()
    server = await _start(plug)
    port = server.getHost().port
    client = await connect(port)
    client.send(GET_HANG)
    await plug.arrived

    client.transport.loseConnection()
    await client.wait_closed()
    while not plug.outcomes:
        await deferLater(reactor, 0.01)
    plug.conns[0].send_resp(200, b"nobody reads this")
    other = await connect(port)
    other.send(GET_FINE)
    fine = await other.read_response()
    await server.stop()

    assert plug.outcomes == ["cancelled"]
    assert fine.status == 200
    assert _errors(logs) == []


@pytest_twisted.ensureDeferred
async def test_no_response_timeout_waits(logs):
    plug = Hanging()
    server = await _start(plug, response_timeout=None)
    client = await connect(server.getHost().port)
    client.send(GET_HANG)
    await plug.arrived

    await deferLater(reactor, 0.3)

    assert client.buffer == b""
    assert plug.outcomes == []
    await server.stop(drain_timeout=0)
    assert plug.outcomes == ["cancelled"]


def test_response_timeout_must_be_positive():
    with pytest.raises(ValueError, match="positive response_timeout"):
        PlugResource(Hanging(), response_timeout=0)


@pytest_twisted.ensureDeferred
async def test_upgrade_with_hanging_pipeline_gets_503(logs):
    plug = Hanging()
    server = await _start(plug, response_timeout=0.2)
    client = await connect(server.getHost().port)

    client.send(upgrade_request("/hang"))
    response = await client.read_response()
    await client.wait_closed()
    await server.stop()

    assert response.status == 503
    assert response.header("connection") == "close"
    assert plug.outcomes == ["cancelled"]


class Streaming:
    """
    A plug that streams 64 KiB chunks until its client stops reading.

    :ivar written: the number of bytes handed to C{conn.chunk()} so far.
    :ivar blocked: fires when a chunk did not fit and the plug has to wait.
    :ivar outcome: the name of the exception that ended the stream.
    """

    part = b"x" * 65536

    def __init__(self) -> None:
        self.written = 0
        self.blocked: Deferred[None] = Deferred()
        self.outcome: str | None = None

    async def __call__(self, conn, opts):
        if conn.request_path != "/stream":
            return conn.send_resp(200, b"fine").halt()
        conn.send_chunked(200)
        try:
            while True:
                waiting = conn.chunk(self.part)
                self.written += len(self.part)
                if not waiting.called and not self.blocked.called:
                    self.blocked.callback(None)
                await waiting
        except Exception as error:
            self.outcome = type(error).__name__
            raise


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_pauses_stream(logs):
    plug = Streaming()
    server = await _start(plug, response_timeout=0.5)
    port = server.getHost().port
    client = await connect(port)
    client.transport.pauseProducing()
    client.send(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    await plug.blocked
    other = await connect(port)
    other.send(GET_FINE)
    fine = await other.read_response()
    # The kernel's socket buffers take some more; then the stream stalls
    # and the response timeout cancels the plug.
    while plug.outcome is None:
        await deferLater(reactor, 0.05)
    written = plug.written
    client.transport.resumeProducing()
    await client.wait_closed()
    await server.stop()

    assert fine.status == 200
    # Twisted's 64 KiB write buffer plus the loopback socket buffers, far
    # from the unbounded growth of a server that ignores backpressure.
    assert written < 32 * 1024 * 1024
    assert plug.outcome == "CancelledError"
    [timed_out] = logs.with_format("did not finish")
    assert timed_out["started"] is True
    # The response was cut: no last chunk, so the body never ends.
    assert not client.buffer.endswith(b"0\r\n\r\n")
