"""
Graceful stop over real loopback sockets: requests finish, WebSockets get 1001.
"""

from __future__ import annotations

import signal

import pytest
import pytest_twisted
from http2_support import H2Client, connect_protocol
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame
from support import close_payload, connect, open_websocket, upgrade_request
from twistd_process import TwistdProcess
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater

from desperados import Builder, start_link
from desperados.endpoints import Websocket
from desperados.endpoints.websocket import Echo
from desperados.plugs import Websocket as DetectWebsocket
from desperados.server import DesperadosService, make_site

pytestmark = pytest.mark.usefixtures("both_http1_paths")

TEXT, CLOSE = 0x1, 0x8
GET_SLOW = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
GET_FAST = b"GET /fast HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Waiting:
    """
    A plug that holds C{/slow} requests until the test releases them.
    """

    def __init__(self, path: str = "/slow", respond: bool = True) -> None:
        self.path = path
        self.respond = respond
        self.pending: list[Deferred[None]] = []
        self.arrived: Deferred[None] = Deferred()

    def __call__(self, conn, opts):
        if conn.request_path != self.path:
            return conn.send_resp(200, b"fast").halt() if self.respond else conn
        release: Deferred[None] = Deferred()
        self.pending.append(release)
        arrived, self.arrived = self.arrived, Deferred()
        arrived.callback(None)
        if not self.respond:
            return release.addCallback(lambda _: conn)
        return release.addCallback(lambda _: conn.send_resp(200, b"done").halt())

    def release_all(self) -> None:
        for release in self.pending:
            if not release.called:
                release.callback(None)


async def _requests_in_flight(server, count: int) -> None:
    # Wait until the server has parsed C{count} request heads, on the
    # channel or waiting on the fast path.
    while True:
        channels = [protocol._channel for protocol in server.site.connections.values()]
        parsed = sum(len(channel.requests) for channel in channels)
        parsed += sum(channel.waiting_request is not None for channel in channels)
        if parsed >= count:
            return
        await deferLater(reactor, 0.01)


async def _start(plug, *, before=(), **options):
    pipeline = Builder([*before, DetectWebsocket, Websocket, plug])
    return await start_link(
        pipeline, port=0, ip="127.0.0.1", reactor=reactor, startup_log=None, **options
    )


@pytest_twisted.ensureDeferred
async def test_stop_finishes_request_and_closes_websocket(logs):
    waiting = Waiting()
    server = await _start(waiting)
    port = server.getHost().port
    idle = await connect(port)
    idle.send(GET_FAST)
    await idle.read_response()
    busy = await connect(port)
    busy.send(GET_SLOW)
    await waiting.arrived
    websocket, upgraded = await open_websocket(port)

    stopped = server.stop(drain_timeout=30)
    await idle.wait_closed()
    close_frame = await websocket.read_frame()
    websocket.send_frame(CLOSE, close_payload(1001))
    await websocket.wait_closed()
    assert not stopped.called
    waiting.release_all()
    response = await busy.read_response()
    await busy.wait_closed()
    await stopped

    assert upgraded.status == 101
    assert idle.buffer == b""
    assert close_frame == (CLOSE, close_payload(1001, b"server shutdown"))
    assert response.status == 200
    assert response.body == b"done"
    assert response.header("connection") == "close"
    [draining] = logs.with_format("draining {http} HTTP")
    assert draining["http"] == 2
    assert draining["websockets"] == 1
    assert len(logs.with_format("drained all connections")) == 1
    assert logs.with_format("drain timed out") == []


@pytest_twisted.ensureDeferred
async def test_drain_timeout_sends_503_to_waiting_request(logs):
    waiting = Waiting()
    server = await _start(waiting)
    port = server.getHost().port
    busy = await connect(port)
    busy.send(GET_SLOW)
    await waiting.arrived
    websocket, _ = await open_websocket(port)

    await server.stop(drain_timeout=0.1)
    response = await busy.read_response()
    await busy.wait_closed()
    await websocket.wait_closed()

    assert response.status == 503
    assert response.header("connection") == "close"
    assert response.body == b"server is shutting down"
    [timed_out] = logs.with_format("drain timed out")
    assert timed_out["requests"] == 1
    assert timed_out["http"] == 0
    assert timed_out["websockets"] == 1
    [gave_up] = logs.with_format("gave up on {method} {path}")
    assert gave_up["path"] == "/slow"
    assert gave_up["outcome"] == "sent 503"
    # The pipeline was cancelled.
    assert waiting.pending[0].called
    assert logs.with_format("did not finish") == []


async def _stream_then_wait(conn, opts):
    """
    Send the head and one chunk of C{/stream}, then wait for ever.
    """
    if conn.request_path != "/stream":
        return conn
    conn.send_chunked(200)
    await conn.chunk(b"first part")
    await Deferred()
    return conn


@pytest_twisted.ensureDeferred
async def test_drain_timeout_closes_response_in_progress(logs):
    server = await _start(_stream_then_wait)
    busy = await connect(server.getHost().port)
    busy.send(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await busy.read_response(head_only=True)
    first = await busy.read_chunk()

    await server.stop(drain_timeout=0.1)
    await busy.wait_closed()

    assert head.status == 200
    assert first == b"first part"
    # No last chunk: the client can tell that the response is cut.
    assert b"0\r\n\r\n" not in busy.buffer
    [timed_out] = logs.with_format("drain timed out")
    assert timed_out["requests"] == 1
    [gave_up] = logs.with_format("gave up on {method} {path}")
    assert gave_up["outcome"] == "closed the connection mid-response"


@pytest_twisted.ensureDeferred
async def test_requests_during_drain_close_and_upgrades_get_503(logs):
    waiting = Waiting()
    # Holds the WebSocket upgrade before the plugs that perform it.
    holding = Waiting("/chat", respond=False)
    server = await _start(waiting, before=[holding])
    port = server.getHost().port
    first = await connect(port)
    first.send(GET_SLOW)
    await waiting.arrived
    second = await connect(port)
    # The pipeline runs at the end of the head; the body is still incomplete.
    second.send(b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nx")
    await waiting.arrived
    upgrading = await connect(port)
    upgrading.send(upgrade_request("/chat"))
    await holding.arrived
    await _requests_in_flight(server, 3)

    stopped = server.stop(drain_timeout=30)
    while not logs.with_format("draining {http} HTTP"):
        await deferLater(reactor, 0.01)
    second.send(b"y")
    waiting.release_all()
    answered = await second.read_response()
    await second.wait_closed()
    holding.release_all()
    refused = await upgrading.read_response()
    await upgrading.wait_closed()
    await first.read_response()
    await stopped

    assert answered.status == 200
    assert answered.header("connection") == "close"
    assert refused.status == 503
    assert refused.header("connection") == "close"
    assert refused.body == b"server is shutting down"


@pytest_twisted.ensureDeferred
async def test_stop_without_connections_fires(logs):
    server = await _start(Waiting())

    await server.stop()

    [draining] = logs.with_format("draining {http} HTTP")
    assert draining["http"] == 0
    assert draining["websockets"] == 0
    assert server.ports == []


@pytest.mark.parametrize("signal_name", ["TERM", "INT"])
@pytest_twisted.ensureDeferred
async def test_twistd_drains_on_signal(signal_name):
    drain_timeout = 10
    process = await TwistdProcess.start(
        "--listen=tcp:0:interface=127.0.0.1",
        "--plug=apps.SlowApp",
        f"--drain-timeout={drain_timeout}",
        env={"SLOW_SECONDS": "1"},
    )
    try:
        port = process.port()
        websocket, upgraded = await open_websocket(port)
        busy = await connect(port)
        busy.send(GET_SLOW)
        await process.wait_for("slow request started")

        process.signal(signal_name)
        close_frame = await websocket.read_frame()
        websocket.send_frame(CLOSE, close_payload(1001))
        response = await busy.read_response()
        await busy.wait_closed()
        await _with_timeout(process.ended, drain_timeout + 5)
    finally:
        process.kill()

    assert upgraded.status == 101
    assert close_frame == (CLOSE, close_payload(1001, b"server shutdown"))
    assert response.status == 200
    assert response.body == b"done"
    assert response.header("connection") == "close"
    # twistd re-raises the signal that stopped it once the reactor is done.
    assert process.exit_signal == getattr(signal, f"SIG{signal_name}")
    assert process.stderr == b""
    [draining] = process.with_format("draining {http} HTTP")
    assert draining["http"] == 1
    assert draining["websockets"] == 1
    assert process.with_format("drained all connections")
    assert process.with_format("drain timed out") == []


@pytest_twisted.ensureDeferred
async def test_twistd_drain_timeout_gives_up_requests():
    """
    At the end of --drain-timeout, a request without a response gets 503
    and a response in progress is cut; then twistd exits.
    """
    process = await TwistdProcess.start(
        "--listen=tcp:0:interface=127.0.0.1",
        "--plug=apps.SlowApp",
        "--drain-timeout=0.5",
        env={"SLOW_SECONDS": "60"},
    )
    try:
        port = process.port()
        waiting = await connect(port)
        waiting.send(GET_SLOW)
        await process.wait_for("slow request started")
        streaming = await connect(port)
        streaming.send(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await streaming.read_response(head_only=True)
        first = await streaming.read_chunk()

        process.signal("TERM")
        response = await waiting.read_response()
        await waiting.wait_closed()
        await streaming.wait_closed()
        await _with_timeout(process.ended, 30)
    finally:
        process.kill()

    assert response.status == 503
    assert response.header("connection") == "close"
    assert response.body == b"server is shutting down"
    assert head.status == 200
    assert first == b"first part"
    assert b"last part" not in streaming.buffer
    assert process.exit_signal == signal.SIGTERM
    [timed_out] = process.with_format("drain timed out")
    assert timed_out["requests"] == 2
    assert timed_out["http"] == 0
    outcomes = sorted(
        (event["path"], event["outcome"])
        for event in process.with_format("gave up on {method} {path}")
    )
    assert outcomes == [
        ("/slow", "sent 503"),
        ("/stream", "closed the connection mid-response"),
    ]


async def _with_timeout(deferred: Deferred, seconds: float):
    return await deferred.addTimeout(seconds, reactor)


class _GoAwayTolerantClient(H2Client):
    """
    An HTTP/2 client that reads responses after a graceful GOAWAY.

    hyper-h2 4.x closes its connection state machine on GOAWAY and then
    rejects the frames of streams that the server still answers, which
    RFC 9113 section 6.8 allows; GOAWAY frames are recorded but kept from it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._unparsed = b""

    def dataReceived(self, data: bytes) -> None:
        self._record_frames(data)
        self._unparsed += data
        forwarded = b""
        while len(self._unparsed) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._unparsed[:9]))
            if len(self._unparsed) < 9 + length:
                break
            raw, self._unparsed = (
                self._unparsed[: 9 + length],
                self._unparsed[9 + length :],
            )
            if not isinstance(frame, GoAwayFrame):
                forwarded += raw
        for event in self.conn.receive_data(forwarded):
            self._handle(event)
        self.flush()
        self._wake()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_stop_sends_goaway_and_finishes_http2_streams(scheme, tls_files, logs):
    waiting = Waiting()
    if scheme == "https":
        tls = tls_files
        server = await _start(
            waiting, scheme="https", certfile=tls.certfile, keyfile=tls.keyfile
        )
    else:
        tls = None
        server = await _start(waiting)
    client = _GoAwayTolerantClient()
    client.scheme = scheme
    # Sending no frame after the response leaves the close to the server.
    client.auto_window_update = False
    await connect_protocol(server.getHost().port, client, tls, [b"h2"])
    slow = client.request("/slow")
    await waiting.arrived

    stopped = server.stop(drain_timeout=30)
    await client.wait_for(lambda: client.frames_of(GoAwayFrame))
    [goaway] = client.frames_of(GoAwayFrame)
    waiting.release_all()
    response = await client.response(slow)
    await client.wait_closed()
    await stopped

    assert goaway.last_stream_id == slow
    assert goaway.error_code == 0
    assert response.status == 200
    assert response.body == b"done"
    final = client.frames_of(GoAwayFrame)[-1]
    assert final.last_stream_id == slow
    assert final.error_code == 0
    assert logs.with_format("HTTP/2 connection error") == []


@pytest_twisted.ensureDeferred
async def test_drain_timeout_cancels_pipeline_after_response(logs):
    """
    A pipeline that goes on after its response is complete is cancelled
    too, when the drain is still waiting for another request at its end.
    """
    cancelled = []

    async def plug(conn, opts):
        if conn.request_path == "/sent":
            conn.send_resp(200, b"sent")
        try:
            await Deferred()
        except CancelledError:
            cancelled.append(conn.request_path)
            raise
        return conn

    server = await _start(plug)
    port = server.getHost().port
    sent = await connect(port)
    sent.send(b"GET /sent HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await sent.read_response()
    holding = await connect(port)
    holding.send(GET_SLOW)
    await _requests_in_flight(server, 1)

    await server.stop(drain_timeout=0.1)
    refused = await holding.read_response()

    assert response.status == 200
    assert response.body == b"sent"
    assert refused.status == 503
    assert sorted(cancelled) == ["/sent", "/slow"]
    outcomes = {
        event["path"]: event["outcome"]
        for event in logs.with_format("gave up on {method} {path}")
    }
    assert outcomes == {
        "/sent": "cancelled the pipeline, the response was complete",
        "/slow": "sent 503",
    }
    assert [event for event in logs.events if event.get("log_failure")] == []


@pytest_twisted.ensureDeferred
async def test_drain_timeout_sends_503_on_http2_stream(logs):
    waiting = Waiting()
    server = await _start(waiting)
    client = _GoAwayTolerantClient()
    client.scheme = "http"
    await connect_protocol(server.getHost().port, client, None, [b"h2"])
    slow = client.request("/slow")
    await waiting.arrived

    await server.stop(drain_timeout=0.1)
    response = await client.response(slow)
    await client.wait_closed()

    assert response.status == 503
    assert response.body == b"server is shutting down"
    [timed_out] = logs.with_format("drain timed out")
    assert timed_out["requests"] == 1
    assert timed_out["http"] == 0


@pytest_twisted.ensureDeferred
async def test_streams_after_goaway_are_refused(logs):
    """
    RFC 9113 section 6.8: a stream with an ID above the GOAWAY's last
    stream ID is refused with REFUSED_STREAM, and the earlier one finishes.
    """
    waiting = Waiting()
    server = await _start(waiting)
    client = _GoAwayTolerantClient()
    client.auto_window_update = False
    await connect_protocol(server.getHost().port, client, None, [b"h2"])
    slow = client.request("/slow")
    await waiting.arrived

    stopped = server.stop(drain_timeout=30)
    await client.wait_for(lambda: client.frames_of(GoAwayFrame))
    # The second one's HEADERS and DATA arrive together, before the reset.
    late = [
        client.request("/fast"),
        client.request("/fast", method="POST", body=b"late body"),
    ]
    await client.wait_for(
        lambda: all(client.responses[stream].reset_code is not None for stream in late)
    )
    waiting.release_all()
    response = await client.response(slow)
    await client.wait_closed()
    await stopped

    [goaway] = client.frames_of(GoAwayFrame)[:1]
    assert goaway.last_stream_id == slow
    assert all(stream > slow for stream in late)
    for stream in late:
        assert client.responses[stream].reset_code == ErrorCodes.REFUSED_STREAM
        assert client.responses[stream].headers == []
    assert response.status == 200
    assert response.body == b"done"
    assert logs.with_format("HTTP/2 connection error") == []
    [refused] = logs.with_format("refused HTTP/2 stream")
    assert refused["stream_id"] == late[0]
    assert refused["last_stream_id"] == slow


@pytest_twisted.ensureDeferred
async def test_second_signal_aborts_twistd_drain():
    process = await TwistdProcess.start(
        "--listen=tcp:0:interface=127.0.0.1",
        "--plug=apps.SlowApp",
        "--drain-timeout=60",
        env={"SLOW_SECONDS": "60"},
    )
    try:
        busy = await connect(process.port())
        busy.send(GET_SLOW)
        await process.wait_for("slow request started")

        process.signal("TERM")
        await process.wait_for("draining {http} HTTP")
        process.signal("INT")
        await busy.wait_closed()
        await _with_timeout(process.ended, 30)
    finally:
        process.kill()

    assert busy.buffer == b""
    [aborted] = process.with_format("drain stopped early")
    assert aborted["http"] == 1
    assert aborted["websockets"] == 0
    [received] = process.with_format("received {signal} while draining")
    assert received["signal"] == "SIGINT"
    levels = {event["log_level"]["name"] for event in process.events}
    assert "critical" not in levels
    assert process.exit_signal == signal.SIGTERM


@pytest_twisted.ensureDeferred
async def test_abort_drain_cuts_connections_now(logs):
    waiting = Waiting()
    server = await _start(waiting)
    busy = await connect(server.getHost().port)
    busy.send(GET_SLOW)
    await waiting.arrived

    stopped = server.stop(drain_timeout=60)
    # The ports are still closing, so the drain has not started yet.
    server.site.abort_drain()
    await stopped
    await busy.wait_closed()

    assert busy.buffer == b""
    [aborted] = logs.with_format("drain stopped early")
    assert aborted["http"] == 1
    assert logs.with_format("drain timed out") == []


@pytest_twisted.ensureDeferred
async def test_restarted_service_serves_normally():
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    pipeline = Builder([DetectWebsocket, Websocket])
    service = DesperadosService(
        make_site(pipeline, reactor=reactor),
        [endpoint],
        plug_name="test",
        startup_log=None,
    )
    service.startService()
    await service._listening
    await service.stopService()

    service.startService()
    await service._listening
    websocket, upgraded = await open_websocket(service.ports[0].getHost().port)
    websocket.transport.loseConnection()
    await service.stopService()

    assert upgraded.status == 101


class RecordingEcho(Echo):
    """
    The echo handler, recording the reason of every C{terminate}.
    """

    def __init__(self) -> None:
        self.reasons: list = []

    def terminate(self, reason, state):
        self.reasons.append(reason)


async def _start_recording(waiting: Waiting):
    handler = RecordingEcho()
    pipeline = Builder([DetectWebsocket, (Websocket, {"handler": handler}), waiting])
    server = await start_link(
        pipeline, port=0, ip="127.0.0.1", reactor=reactor, startup_log=None
    )
    return server, handler


async def _reply_to_close(websocket) -> tuple[int, bytes]:
    # Read the server's Close frame, reply to it, and wait for the TCP close.
    close_frame = await websocket.read_frame()
    websocket.send_frame(CLOSE, close_payload(1001))
    await websocket.wait_closed()
    return close_frame


@pytest_twisted.ensureDeferred
async def test_drain_lets_websocket_finish(logs):
    waiting = Waiting()
    server, handler = await _start_recording(waiting)
    port = server.getHost().port
    busy = await connect(port)
    busy.send(GET_SLOW)
    await waiting.arrived
    websocket, upgraded = await open_websocket(port)

    await server.stopListening()
    drained = server.site.drain(60, wait_for_websockets=True)
    waiting.release_all()
    response = await busy.read_response()
    await busy.wait_closed()
    websocket.send_frame(TEXT, b"still open")
    echo = await websocket.read_frame()
    assert not drained.called
    websocket.send_frame(CLOSE, close_payload(1000))
    close_reply = await websocket.read_frame()
    await websocket.wait_closed()
    await drained

    assert upgraded.status == 101
    assert response.status == 200
    assert response.header("connection") == "close"
    assert echo == (TEXT, b"still open")
    assert close_reply == (CLOSE, close_payload(1000))
    [reason] = handler.reasons
    assert reason.kind == "remote"
    assert reason.code == 1000
    [draining] = logs.with_format("letting {websockets} WebSocket connections finish")
    assert draining["http"] == 1
    assert draining["websockets"] == 1
    assert logs.with_format("drain timed out") == []


@pytest_twisted.ensureDeferred
async def test_drain_closes_websocket_with_1001_at_timeout(logs):
    server, handler = await _start_recording(Waiting())
    websocket, _ = await open_websocket(server.getHost().port)

    await server.stopListening()
    drained = server.site.drain(0.1, wait_for_websockets=True)
    close_frame = await _reply_to_close(websocket)
    await drained

    assert close_frame == (CLOSE, close_payload(1001, b"server shutdown"))
    [reason] = handler.reasons
    assert reason.kind == "shutdown"
    assert reason.code == 1001
    [timed_out] = logs.with_format("drain timed out")
    assert "closing {websockets} WebSocket" in timed_out["log_format"]
    assert timed_out["websockets"] == 1
    assert timed_out["http"] == 0


@pytest_twisted.ensureDeferred
async def test_close_websockets_ends_waiting_drain(logs):
    server, handler = await _start_recording(Waiting())
    websocket, _ = await open_websocket(server.getHost().port)

    await server.stopListening()
    drained = server.site.drain(600, wait_for_websockets=True)
    server.site.close_websockets()
    close_frame = await _reply_to_close(websocket)
    await drained

    assert close_frame == (CLOSE, close_payload(1001, b"server shutdown"))
    [reason] = handler.reasons
    assert reason.kind == "shutdown"
    [closing] = logs.with_format("closing {websockets} WebSocket connections")
    assert closing["websockets"] == 1
    assert logs.with_format("drain timed out") == []
