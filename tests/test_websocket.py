"""
The WebSocket bridge over real loopback sockets: handler callbacks, results,
limits, compression and every way a connection ends.
"""

from __future__ import annotations

import gc
import struct
import zlib
from collections.abc import Callable

import pytest
import pytest_twisted
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from support import (
    RawClient,
    close_payload,
    connect,
    encode_frame,
    read_frame_with_rsv,
    upgrade_request,
)
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.task import deferLater
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from desperados import (
    Binary,
    Builder,
    IWebSock,
    Ok,
    Ping,
    Pong,
    Push,
    Stop,
    Text,
    current_handle,
    endpoints,
    start_link,
)
from desperados.plugs import Websocket
from desperados.server import DesperadosService, make_site
from desperados.websock import WebSocketOptions

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
CONTINUATION = 0x0
RSV1 = 0b100


@implementer(IWebSock)
class Scripted:
    """
    A handler whose callbacks return what the test gives, recording every call.

    Each keyword names a callback (C{init}, C{handle_in}, C{handle_info},
    C{handle_control}) and gives a function with the same arguments that
    returns the result; a callback without one returns C{Ok(state)}.
    """

    def __init__(self, **callbacks: Callable[..., object]) -> None:
        self.callbacks = callbacks
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.handles: list[object] = []
        self.terminations: list[tuple[object, object]] = []
        self.terminate_handles: list[object] = []
        self.terminated: Deferred[object] = Deferred()
        if "handle_control" in callbacks:
            self.handle_control = self._handle_control

    def _run(self, name: str, *args: object) -> object:
        self.calls.append((name, args))
        function = self.callbacks.get(name)
        if function is None:
            return Ok(args[-1])
        return function(*args)

    def init(self, state: object) -> object:
        self.handles.append(current_handle())
        return self._run("init", state)

    def handle_in(self, frame: tuple[bytes, str], state: object) -> object:
        return self._run("handle_in", frame, state)

    def handle_info(self, message: object, state: object) -> object:
        return self._run("handle_info", message, state)

    def _handle_control(self, frame: tuple[bytes, str], state: object) -> object:
        return self._run("handle_control", frame, state)

    def terminate(self, reason: object, state: object) -> None:
        self.terminate_handles.append(current_handle())
        self.terminations.append((reason, state))
        if not self.terminated.called:
            self.terminated.callback(reason)

    def called(self, name: str) -> list[tuple[object, ...]]:
        return [args for callback, args in self.calls if callback == name]


class Server:
    """
    A running server for one test, with the handler it upgrades to.
    """

    def __init__(self, listening: object, handler: Scripted) -> None:
        self.listening = listening
        self.handler = handler
        self.port = listening.getHost().port
        self.bridge = listening.factory.plug_resource.websockets

    async def open(self, extra: str = "") -> RawClient:
        client = await connect(self.port)
        client.send(upgrade_request("/socket", extra=extra))
        response = await client.read_response()
        assert response.status == 101, response
        return client


@pytest_twisted.async_yield_fixture
async def websocket_server():
    """
    Start a server upgrading every request to a handler: C{await start(h, **opts)}.
    """
    started = []

    async def start(handler: Scripted, state: object = 0, **options: object) -> Server:
        pipeline = Builder(
            [
                Websocket,
                (endpoints.Websocket, {"handler": handler, "state": state, **options}),
            ]
        )
        listening = await start_link(
            pipeline, port=0, ip="127.0.0.1", reactor=reactor, startup_log=None
        )
        server = Server(listening, handler)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.bridge.shutdown()
        await server.listening.stopListening()


async def close_cleanly(client: RawClient) -> None:
    """
    Run the closing handshake from the client side and wait for TCP to close.
    """
    client.send_frame(CLOSE, close_payload(1000))
    while True:
        opcode, payload = await client.read_frame()
        if opcode == CLOSE:
            break
    await client.wait_closed()


async def ended(server: Server) -> object:
    """
    Wait for the handler's terminate and for the connection to be gone.
    """
    reason = await server.handler.terminated
    # Let the reactor finish the ending, so a second terminate would show.
    await deferLater(reactor, 0, lambda: None)
    return reason


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0]


def deflate(data: bytes) -> bytes:
    """
    Compress one message as permessage-deflate does (RFC 7692 section 7.2.1).
    """
    compressor = zlib.compressobj(wbits=-15)
    compressed = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert compressed.endswith(b"\x00\x00\xff\xff")
    return compressed[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")


# Callbacks and results


@pytest_twisted.ensureDeferred
async def test_init_push_sends_frames_before_messages(websocket_server):
    handler = Scripted(init=lambda state: Push(Text("hello"), state + 1))
    server = await websocket_server(handler, state=41)

    client = await server.open()
    greeting = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert greeting == (TEXT, b"hello")
    assert handler.called("init") == [(41,)]
    assert handler.terminations[0][1] == 42


@pytest_twisted.ensureDeferred
async def test_handle_in_gets_text_and_binary_with_state(websocket_server):
    handler = Scripted(handle_in=lambda frame, state: Ok(state + [frame]))
    server = await websocket_server(handler, state=[])

    client = await server.open()
    client.send_frame(TEXT, "héllo".encode())
    client.send_frame(BINARY, b"\x00\xff")
    await close_cleanly(client)
    await ended(server)

    assert handler.called("handle_in") == [
        ((b"h\xc3\xa9llo", "text"), []),
        ((b"\x00\xff", "binary"), [(b"h\xc3\xa9llo", "text")]),
    ]
    assert handler.terminations[0][1] == [
        (b"h\xc3\xa9llo", "text"),
        (b"\x00\xff", "binary"),
    ]


@pytest_twisted.ensureDeferred
async def test_push_with_several_frames_sends_them_in_order(websocket_server):
    def reply(frame: tuple[bytes, str], state: int) -> Push:
        frames = [Text("one"), Binary(b"two"), Ping(b"three"), Pong(b"four")]
        return Push(frames, state + 1)

    server = await websocket_server(Scripted(handle_in=reply))

    client = await server.open()
    client.send_frame(TEXT, b"go")
    received = [await client.read_frame() for _ in range(4)]
    await close_cleanly(client)
    await ended(server)

    assert received == [
        (TEXT, b"one"),
        (BINARY, b"two"),
        (PING, b"three"),
        (PONG, b"four"),
    ]
    assert server.handler.terminations[0][1] == 1


@pytest_twisted.ensureDeferred
async def test_stop_closes_with_code_and_reason(websocket_server):
    handler = Scripted(handle_in=lambda frame, state: Stop("done", 4000, "bye"))
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"stop")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, payload) == (CLOSE, close_payload(4000, b"bye"))
    assert (reason.kind, reason.code, reason.reason) == ("local", 4000, "bye")
    assert handler.terminations[0][1] == "done"


@pytest_twisted.ensureDeferred
async def test_stop_from_init_closes_before_any_message(websocket_server):
    handler = Scripted(init=lambda state: Stop(state, 1008, "not allowed"))
    server = await websocket_server(handler)

    client = await server.open()
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, close_code(payload)) == (CLOSE, 1008)
    assert (reason.kind, reason.code) == ("local", 1008)
    assert handler.called("handle_in") == []


@pytest_twisted.ensureDeferred
async def test_coroutine_callback_may_await(websocket_server):
    async def reply(frame: tuple[bytes, str], state: int) -> Push:
        await deferLater(reactor, 0, lambda: None)
        handle = current_handle()
        return Push(Text(frame[0] + b" later"), state + 1), handle

    results = []

    async def recording_reply(frame: tuple[bytes, str], state: int) -> Push:
        result, handle = await reply(frame, state)
        results.append(handle)
        return result

    handler = Scripted(handle_in=recording_reply)
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"first")
    client.send_frame(TEXT, b"second")
    first = await client.read_frame()
    second = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert first == (TEXT, b"first later")
    assert second == (TEXT, b"second later")
    assert results == [handler.handles[0], handler.handles[0]]
    assert handler.terminations[0][1] == 2


@pytest_twisted.ensureDeferred
async def test_deferred_result_delays_next_callback(websocket_server):
    pending: list[Deferred[object]] = []

    def reply(frame: tuple[bytes, str], state: int) -> Deferred[object]:
        waiting: Deferred[object] = Deferred()
        pending.append(waiting)
        return waiting

    handler = Scripted(handle_in=reply)
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"first")
    client.send_frame(TEXT, b"second")
    while not pending:
        await deferLater(reactor, 0.01, lambda: None)
    calls_while_pending = len(handler.called("handle_in"))
    pending[0].callback(Push(Text(b"one"), 1))
    first = await client.read_frame()
    pending[1].callback(Push(Text(b"two"), 2))
    second = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert calls_while_pending == 1
    assert first == (TEXT, b"one")
    assert second == (TEXT, b"two")
    assert handler.called("handle_in")[1] == ((b"second", "text"), 1)


@pytest_twisted.ensureDeferred
async def test_handle_control_sees_ping_and_pong(websocket_server):
    handler = Scripted(
        handle_control=lambda frame, state: Push(
            Text(b"saw " + frame[1].encode()), state
        )
    )
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(PING, b"p1")
    pong = await client.read_frame()
    saw_ping = await client.read_frame()
    client.send_frame(PONG, b"p2")
    saw_pong = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert pong == (PONG, b"p1")
    assert saw_ping == (TEXT, b"saw ping")
    assert saw_pong == (TEXT, b"saw pong")
    assert handler.called("handle_control") == [
        ((b"p1", "ping"), 0),
        ((b"p2", "pong"), 0),
    ]


@pytest_twisted.ensureDeferred
async def test_ping_is_answered_without_handle_control(websocket_server):
    server = await websocket_server(Scripted())

    client = await server.open()
    client.send_frame(PING, b"hi")
    pong = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert pong == (PONG, b"hi")
    assert not hasattr(server.handler, "handle_control")


# handle_info and handles


def _register_or_broadcast(
    registry: list[object],
) -> Callable[[tuple[bytes, str], object], object]:
    def handle_in(frame: tuple[bytes, str], state: object) -> object:
        if frame[0] == b"register":
            registry.append(current_handle())
            return Push(Text(b"registered"), state)
        for handle in registry:
            handle.send(("broadcast", frame[0]))
        return Ok(state)

    return handle_in


@pytest_twisted.ensureDeferred
async def test_handle_info_from_another_connection(websocket_server):
    registry: list[object] = []
    threads_seen: list[bool] = []

    def handle_info(message: tuple[str, bytes], state: int) -> Push:
        threads_seen.append(isInIOThread())
        return Push(Text(message[1]), state + 1)

    handler = Scripted(
        handle_in=_register_or_broadcast(registry), handle_info=handle_info
    )
    server = await websocket_server(handler)

    listener = await server.open()
    listener.send_frame(TEXT, b"register")
    registered = await listener.read_frame()
    sender = await server.open()
    sender.send_frame(TEXT, b"news")
    news = await listener.read_frame()
    await close_cleanly(listener)
    await close_cleanly(sender)

    assert registered == (TEXT, b"registered")
    assert news == (TEXT, b"news")
    assert handler.called("handle_info") == [(("broadcast", b"news"), 0)]
    assert threads_seen == [True]


@pytest_twisted.ensureDeferred
async def test_handle_info_from_a_thread(websocket_server):
    registry: list[object] = []
    threads_seen: list[bool] = []

    def handle_info(message: int, state: int) -> Push:
        threads_seen.append(isInIOThread())
        return Push(Text(str(message)), state)

    handler = Scripted(
        handle_in=_register_or_broadcast(registry), handle_info=handle_info
    )
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"register")
    await client.read_frame()

    def send_from_thread() -> tuple[bool, list[bool]]:
        in_io_thread = isInIOThread()
        return in_io_thread, [registry[0].send(number) for number in range(3)]

    sender_in_io_thread, sent = await threads.deferToThread(send_from_thread)
    received = [await client.read_frame() for _ in range(3)]
    await close_cleanly(client)
    await ended(server)

    assert sender_in_io_thread is False
    assert sent == [True, True, True]
    assert received == [(TEXT, b"0"), (TEXT, b"1"), (TEXT, b"2")]
    assert threads_seen == [True, True, True]


@pytest_twisted.ensureDeferred
async def test_handle_send_after_close_is_dropped(websocket_server):
    handler = Scripted()
    server = await websocket_server(handler)

    client = await server.open()
    await close_cleanly(client)
    await ended(server)
    handle = handler.handles[0]

    assert handle.open is False
    assert handle.send("too late") is False
    assert handler.called("handle_info") == []


def test_current_handle_outside_callback_raises():
    with pytest.raises(RuntimeError, match="outside a WebSocket handler callback"):
        current_handle()


# Limits and invalid input from the peer


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_with_1001(websocket_server):
    handler = Scripted()
    server = await websocket_server(handler, timeout=0.2)

    client = await server.open()
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert opcode == CLOSE
    assert payload == close_payload(1001, b"idle timeout")
    assert (reason.kind, reason.code) == ("timeout", 1001)


@pytest_twisted.ensureDeferred
async def test_frame_over_max_frame_size_closes_with_1009(websocket_server):
    handler = Scripted()
    server = await websocket_server(handler, max_frame_size=100)

    client = await server.open()
    client.send_frame(BINARY, b"x" * 100)
    client.send_frame(BINARY, b"x" * 101)
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, close_code(payload)) == (CLOSE, 1009)
    assert (reason.kind, reason.code) == ("protocol", 1009)
    assert len(handler.called("handle_in")) == 1


@pytest_twisted.ensureDeferred
async def test_message_over_max_message_size_closes_with_1009(websocket_server):
    handler = Scripted()
    server = await websocket_server(handler, max_message_size=100)

    client = await server.open()
    client.send_frame(BINARY, b"x" * 60, fin=False)
    client.send_frame(CONTINUATION, b"x" * 60)
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, close_code(payload)) == (CLOSE, 1009)
    assert (reason.kind, reason.code) == ("protocol", 1009)
    assert handler.called("handle_in") == []


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_closes_with_1007(websocket_server, logs):
    handler = Scripted(handle_in=lambda frame, state: Push(Text(frame[0]), state))
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"fine")
    echo = await client.read_frame()
    client.send_frame(TEXT, b"bad \xff here")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert echo == (TEXT, b"fine")
    assert (opcode, close_code(payload)) == (CLOSE, 1007)
    assert (reason.kind, reason.code) == ("protocol", 1007)
    # One failure: the server waited for the client's Close frame.
    assert len(logs.with_format("failing WebSocket connection")) == 1
    assert logs.with_format("dropping connection to peer") == []


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_passes_without_validation(websocket_server):
    handler = Scripted(handle_in=lambda frame, state: Push(Binary(frame[0]), state))
    server = await websocket_server(handler, validate_utf8=False)

    client = await server.open()
    client.send_frame(TEXT, b"bad \xff here")
    echo = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert echo == (BINARY, b"bad \xff here")


@pytest_twisted.ensureDeferred
async def test_server_pings_at_interval(websocket_server):
    handler = Scripted()
    server = await websocket_server(handler, ping_interval=0.1, ping_timeout=10)

    client = await server.open()
    first_opcode, first_payload = await client.read_frame()
    client.send_frame(PONG, first_payload)
    second_opcode, _ = await client.read_frame()
    await close_cleanly(client)
    reason = await ended(server)

    assert first_opcode == PING
    assert second_opcode == PING
    assert reason.kind == "remote"


@pytest_twisted.ensureDeferred
async def test_unanswered_ping_ends_with_timeout(websocket_server):
    handler = Scripted()
    server = await websocket_server(handler, ping_interval=0.1, ping_timeout=0.1)

    client = await server.open()
    opcode, _ = await client.read_frame()
    await client.wait_closed()
    reason = await ended(server)

    assert opcode == PING
    assert (reason.kind, reason.code) == ("timeout", None)


# Callbacks that fail


@pytest_twisted.ensureDeferred
async def test_raising_callback_closes_with_1011(websocket_server, logs):
    def handle_in(frame: tuple[bytes, str], state: int) -> object:
        if frame[0] == b"boom":
            raise RuntimeError("handler failed on purpose")
        return Push(Text(frame[0]), state)

    handler = Scripted(handle_in=handle_in)
    server = await websocket_server(handler)

    bystander = await server.open()
    failing = await server.open()
    failing.send_frame(TEXT, b"boom")
    opcode, payload = await failing.read_frame()
    failing.send_frame(CLOSE, payload)
    await failing.wait_closed()
    reason = await ended(server)
    bystander.send_frame(TEXT, b"still here")
    echo = await bystander.read_frame()
    await close_cleanly(bystander)

    assert (opcode, payload) == (CLOSE, close_payload(1011, b"internal error"))
    assert (reason.kind, reason.code) == ("error", 1011)
    assert echo == (TEXT, b"still here")
    failures = [event for event in logs.events if event.get("log_failure")]
    assert len(failures) == 1
    assert failures[0]["callback"] == "handle_in"
    assert isinstance(failures[0]["log_failure"].value, RuntimeError)


@pytest_twisted.ensureDeferred
async def test_failing_deferred_closes_with_1011(websocket_server, logs):
    async def handle_in(frame: tuple[bytes, str], state: int) -> object:
        await deferLater(reactor, 0, lambda: None)
        raise ValueError("coroutine failed on purpose")

    server = await websocket_server(Scripted(handle_in=handle_in))

    client = await server.open()
    client.send_frame(TEXT, b"go")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, close_code(payload)) == (CLOSE, 1011)
    assert reason.kind == "error"
    failures = [event for event in logs.events if event.get("log_failure")]
    assert len(failures) == 1
    assert isinstance(failures[0]["log_failure"].value, ValueError)


@pytest.mark.parametrize(
    "result",
    [
        pytest.param("not a result", id="wrong-type"),
        pytest.param(Push([Text(b"ok"), "not a frame"], 0), id="bad-frame"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_result_closes_with_1011(websocket_server, logs, result):
    handler = Scripted(handle_in=lambda frame, state: result)
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"go")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    await ended(server)

    # A bad frame anywhere in a Push sends none of its frames.
    assert (opcode, close_code(payload)) == (CLOSE, 1011)
    failures = [event for event in logs.events if event.get("log_failure")]
    assert len(failures) == 1
    assert isinstance(failures[0]["log_failure"].value, TypeError)


# Compression


@pytest_twisted.ensureDeferred
async def test_compressed_exchange_with_raw_frames(websocket_server):
    handler = Scripted(handle_in=lambda frame, state: Push(Text(frame[0]), state))
    server = await websocket_server(handler)
    message = b"compress me " * 100

    client = await connect(server.port)
    client.send(
        upgrade_request(
            "/socket", extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )
    )
    response = await client.read_response()
    client.send_frame(TEXT, deflate(message), rsv=RSV1)
    rsv, opcode, payload = await read_frame_with_rsv(client)
    await close_cleanly(client)
    await ended(server)

    assert response.status == 101
    assert response.header("sec-websocket-extensions") == "permessage-deflate"
    assert (rsv, opcode) == (RSV1, TEXT)
    assert len(payload) < len(message)
    assert inflate(payload) == message
    assert handler.called("handle_in")[0][0] == (message, "text")


@pytest_twisted.ensureDeferred
async def test_compressed_message_inflating_past_limit_closes_with_1009(
    websocket_server, logs
):
    handler = Scripted()
    server = await websocket_server(handler, max_message_size=1000)
    compressed = deflate(b"\x00" * 100_000)

    client = await connect(server.port)
    client.send(
        upgrade_request(
            "/socket", extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )
    )
    response = await client.read_response()
    client.send_frame(BINARY, compressed, rsv=RSV1)
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert response.status == 101
    assert len(compressed) < 1000
    assert (opcode, close_code(payload)) == (CLOSE, 1009)
    assert (reason.kind, reason.code) == ("protocol", 1009)
    assert handler.called("handle_in") == []
    # The server read the client's Close frame instead of timing out.
    assert logs.with_format("dropping connection to peer") == []


async def open_compressed(server: Server) -> RawClient:
    client = await connect(server.port)
    client.send(
        upgrade_request(
            "/socket", extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )
    )
    response = await client.read_response()
    assert response.header("sec-websocket-extensions") == "permessage-deflate"
    return client


@pytest_twisted.ensureDeferred
async def test_compression_bomb_closes_with_1009(websocket_server, logs):
    """
    With the default options, about 8 KiB that inflate to 8 MiB (below
    max_message_size) close the connection, and the server keeps serving.
    """
    echo = Scripted(handle_in=lambda frame, state: Push(Binary(frame[0]), state))
    server = await websocket_server(echo)
    bomb = deflate(b"\x00" * 8 * 1024 * 1024)

    client = await open_compressed(server)
    local = client.transport.getHost()
    client.send_frame(BINARY, bomb, rsv=RSV1)
    opcode, payload = await ensureDeferred(client.read_frame()).addTimeout(10, reactor)
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)
    second = await open_compressed(server)
    second.send_frame(BINARY, deflate(b"after the bomb"), rsv=RSV1)
    rsv, echo_opcode, echoed = await read_frame_with_rsv(second)
    await close_cleanly(second)

    assert len(bomb) < 10_000
    assert (opcode, close_code(payload)) == (CLOSE, 1009)
    assert payload[2:] == b"compressed message inflated past 100 times its %d bytes" % (
        len(bomb)
    )
    assert (reason.kind, reason.code) == ("protocol", 1009)
    assert echo.called("handle_in")[0][0] == (b"after the bomb", "binary")
    assert len(echo.called("handle_in")) == 1
    assert (echo_opcode, inflate(echoed)) == (BINARY, b"after the bomb")
    (failed,) = logs.with_format("failing WebSocket connection from {peer}")
    assert failed["peer"] == f"127.0.0.1:{local.port}"
    assert failed["code"] == 1009


@pytest_twisted.ensureDeferred
async def test_small_message_past_ratio_is_read(websocket_server):
    """
    Below inflate_ratio_min_size the ratio is not checked: 100 kB of zeros
    compress about 1000 times.
    """
    handler = Scripted(handle_in=lambda frame, state: Push(Binary(frame[0]), state))
    server = await websocket_server(handler)
    message = b"\x00" * 100_000
    compressed = deflate(message)

    client = await open_compressed(server)
    client.send_frame(BINARY, compressed, rsv=RSV1)
    rsv, opcode, payload = await read_frame_with_rsv(client)
    await close_cleanly(client)

    assert len(message) / len(compressed) > 100
    assert (opcode, inflate(payload)) == (BINARY, message)


@pytest_twisted.ensureDeferred
async def test_inflate_ratio_applies_across_frames(websocket_server):
    """
    The ratio counts the compressed bytes of every frame of the message.
    """
    handler = Scripted()
    server = await websocket_server(
        handler, max_inflate_ratio=10, inflate_ratio_min_size=1000
    )
    compressed = deflate(b"\x00" * 50_000)

    client = await open_compressed(server)
    client.send_frame(BINARY, compressed[:10], rsv=RSV1, fin=False)
    client.send_frame(CONTINUATION, compressed[10:])
    opcode, payload = await ensureDeferred(client.read_frame()).addTimeout(10, reactor)
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, close_code(payload)) == (CLOSE, 1009)
    assert (reason.kind, reason.code) == ("protocol", 1009)
    assert handler.called("handle_in") == []


@pytest_twisted.ensureDeferred
async def test_inflate_ratio_none_reads_bomb(websocket_server):
    handler = Scripted(
        handle_in=lambda frame, state: Push(Text(b"%d" % len(frame[0])), state)
    )
    server = await websocket_server(handler, max_inflate_ratio=None)
    bomb = deflate(b"\x00" * 2 * 1024 * 1024)

    client = await open_compressed(server)
    client.send_frame(BINARY, bomb, rsv=RSV1)
    rsv, opcode, payload = await read_frame_with_rsv(client)
    await close_cleanly(client)

    assert (opcode, inflate(payload)) == (TEXT, b"%d" % (2 * 1024 * 1024))


@pytest.mark.parametrize(
    "options",
    [
        {"max_inflate_ratio": 0.5},
        {"max_inflate_ratio": True},
        {"max_inflate_ratio": "100"},
        {"inflate_ratio_min_size": 0},
    ],
)
def test_invalid_inflate_options_raise(options):
    with pytest.raises(ValueError, match="expected"):
        WebSocketOptions(**options)


@pytest_twisted.ensureDeferred
async def test_compression_off_declines_the_offer(websocket_server):
    server = await websocket_server(Scripted(), compress=False)

    client = await connect(server.port)
    client.send(
        upgrade_request(
            "/socket", extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )
    )
    response = await client.read_response()
    await close_cleanly(client)
    await ended(server)

    assert response.status == 101
    assert response.header("sec-websocket-extensions") is None


class _CompressingClient(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))
        if len(self.factory.messages) == 2:
            self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        self.factory.closed.callback((wasClean, code))


@pytest_twisted.ensureDeferred
async def test_compressed_exchange_with_autobahn_client(websocket_server):
    handler = Scripted(
        handle_in=lambda frame, state: Push(
            Binary(frame[0]) if frame[1] == "binary" else Text(frame[0]), state
        )
    )
    server = await websocket_server(handler)
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{server.port}/socket")
    factory.protocol = _CompressingClient
    factory.opened, factory.closed, factory.messages = Deferred(), Deferred(), []

    def accept(response: object) -> PerMessageDeflateResponseAccept | None:
        if isinstance(response, PerMessageDeflateResponse):
            return PerMessageDeflateResponseAccept(response)
        return None

    factory.setProtocolOptions(
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=accept,
    )
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    await endpoint.connect(factory)
    protocol = await factory.opened
    protocol.sendMessage("héllo ".encode() * 50)
    protocol.sendMessage(b"\x00\x01" * 300, isBinary=True)
    was_clean, code = await factory.closed
    await ended(server)

    assert protocol._perMessageCompress is not None
    assert factory.messages == [
        ("héllo ".encode() * 50, False),
        (b"\x00\x01" * 300, True),
    ]
    assert (was_clean, code) == (True, 1000)


# Subprotocols


@pytest_twisted.ensureDeferred
async def test_subprotocol_selection_sends_header(websocket_server):
    server = await websocket_server(Scripted(), subprotocols=["v2.chat", "v1.chat"])

    client = await connect(server.port)
    client.send(
        upgrade_request("/socket", extra="Sec-WebSocket-Protocol: v1.chat, v2.chat\r\n")
    )
    response = await client.read_response()
    await close_cleanly(client)

    assert response.status == 101
    assert response.header("sec-websocket-protocol") == "v2.chat"


@pytest_twisted.ensureDeferred
async def test_no_common_subprotocol_sends_no_header(websocket_server):
    server = await websocket_server(Scripted(), subprotocols=["v2.chat"])

    client = await connect(server.port)
    client.send(upgrade_request("/socket", extra="Sec-WebSocket-Protocol: mqtt\r\n"))
    response = await client.read_response()
    await close_cleanly(client)

    assert response.status == 101
    assert response.header("sec-websocket-protocol") is None


# terminate, exactly once in every ending


async def _client_closes(server: Server, client: RawClient) -> None:
    await close_cleanly(client)


async def _client_closes_without_code(server: Server, client: RawClient) -> None:
    client.send_frame(CLOSE, b"")
    await client.read_frame()
    await client.wait_closed()


async def _handler_stops(server: Server, client: RawClient) -> None:
    client.send_frame(TEXT, b"stop")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()


async def _transport_lost(server: Server, client: RawClient) -> None:
    client.transport.abortConnection()
    await client.wait_closed()


async def _idle_timeout(server: Server, client: RawClient) -> None:
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()


async def _server_shutdown(server: Server, client: RawClient) -> None:
    shutting_down = server.bridge.shutdown()
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    await shutting_down


async def _callback_raises(server: Server, client: RawClient) -> None:
    client.send_frame(TEXT, b"raise")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()


async def _protocol_error(server: Server, client: RawClient) -> None:
    client.send_frame(0x3, b"reserved opcode")
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_protocol_error_log_names_peer(websocket_server, logs):
    server = await websocket_server(Scripted())

    client = await server.open()
    local = client.transport.getHost()
    await _protocol_error(server, client)
    await ended(server)

    (failed,) = logs.with_format("failing WebSocket connection")
    assert failed["log_format"].startswith("failing WebSocket connection from {peer}")
    assert failed["peer"] == f"127.0.0.1:{local.port}"
    assert failed["code"] == 1002
    assert failed["log_level"].name == "info"


def _stop_or_raise(frame: tuple[bytes, str], state: object) -> object:
    if frame[0] == b"raise":
        raise RuntimeError("terminate test raises on purpose")
    return Stop(state, 4001, "stopped")


@pytest.mark.parametrize(
    ("ending", "kind", "code"),
    [
        (_client_closes, "remote", 1000),
        (_client_closes_without_code, "remote", None),
        (_handler_stops, "local", 4001),
        (_transport_lost, "lost", None),
        (_idle_timeout, "timeout", 1001),
        (_server_shutdown, "shutdown", 1001),
        (_callback_raises, "error", 1011),
        (_protocol_error, "protocol", 1002),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
@pytest_twisted.ensureDeferred
async def test_terminate_called_once(websocket_server, logs, ending, kind, code):
    handler = Scripted(handle_in=_stop_or_raise)
    timeout = 0.2 if kind == "timeout" else 60
    server = await websocket_server(handler, state="last state", timeout=timeout)

    client = await server.open()
    await ending(server, client)
    reason = await ended(server)

    assert len(handler.terminations) == 1
    assert (reason.kind, reason.code) == (kind, code)
    assert handler.terminations[0][1] == "last state"
    assert handler.terminate_handles == handler.handles
    assert server.bridge.connections == set()


@pytest_twisted.ensureDeferred
async def test_terminate_waits_for_no_pending_callback(websocket_server):
    """
    A connection lost while a callback's Deferred is pending still terminates
    once, and the late result is ignored.
    """
    pending: Deferred[object] = Deferred()
    handler = Scripted(handle_in=lambda frame, state: pending)
    server = await websocket_server(handler)

    client = await server.open()
    client.send_frame(TEXT, b"slow")
    while not handler.called("handle_in"):
        await deferLater(reactor, 0.01, lambda: None)
    client.transport.abortConnection()
    reason = await ended(server)
    pending.callback(Push(Text(b"too late"), "new state"))
    await deferLater(reactor, 0, lambda: None)

    assert reason.kind == "lost"
    assert len(handler.terminations) == 1


@pytest_twisted.ensureDeferred
async def test_service_stop_closes_websockets_with_1001():
    handler = Scripted()
    pipeline = Builder([Websocket, (endpoints.Websocket, {"handler": handler})])
    service = DesperadosService(
        make_site(pipeline, reactor=reactor),
        [TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")],
        plug_name="test",
        startup_log=None,
    )
    service.startService()
    await service._listening
    port = service.ports[0].getHost().port

    client = await connect(port)
    client.send(upgrade_request("/socket"))
    await client.read_response()
    await deferLater(reactor, 0, lambda: None)
    stopping = service.stopService()
    opcode, payload = await client.read_frame()
    client.send_frame(CLOSE, payload)
    await client.wait_closed()
    await stopping

    assert (opcode, payload) == (CLOSE, close_payload(1001, b"server shutdown"))
    assert len(handler.terminations) == 1
    assert handler.terminations[0][0].kind == "shutdown"


# The hand-off from twisted.web


@pytest_twisted.ensureDeferred
async def test_frames_right_behind_handshake_are_read(websocket_server):
    handler = Scripted(handle_in=lambda frame, state: Push(Text(frame[0]), state))
    server = await websocket_server(handler)

    client = await connect(server.port)
    client.send(upgrade_request("/socket") + encode_frame(TEXT, b"early"))
    response = await client.read_response()
    echo = await client.read_frame()
    await close_cleanly(client)
    await ended(server)

    assert response.status == 101
    assert echo == (TEXT, b"early")


@pytest_twisted.ensureDeferred
async def test_client_gone_before_slow_upgrade(serve, logs):
    """
    A plug that upgrades after the client left does nothing and logs no error.
    """
    handler = Scripted()
    entered: Deferred[Deferred[None]] = Deferred()
    waiting: Deferred[None] = Deferred()

    async def slow_upgrade(conn, opts):
        entered.callback(conn.adapter.request.notifyFinish())
        await waiting
        return conn.upgrade(handler, 0).halt()

    port = await serve(Builder([slow_upgrade]))
    client = await connect(port)
    client.send(upgrade_request("/socket"))
    request_finished = await entered
    client.transport.abortConnection()
    with pytest.raises(ConnectionLost):
        await request_finished
    waiting.callback(None)
    await deferLater(reactor, 0, lambda: None)
    # An exception in the hand-off would be logged when its Deferred is
    # collected.
    gc.collect()

    assert handler.calls == []
    assert handler.terminations == []
    assert [event for event in logs.events if event.get("log_failure")] == []


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 1005), 1002),
        (struct.pack("!H", 5000), 1002),
        (struct.pack("!H", 1000) + b"\xff", 1007),
    ],
    ids=["one_byte", "code_999", "code_1005", "code_5000", "reason_not_utf8"],
)
@pytest_twisted.ensureDeferred
async def test_invalid_close_frame_gets_close_code(websocket_server, payload, code):
    server = await websocket_server(Scripted())

    client = await server.open()
    client.send_frame(CLOSE, payload)
    opcode, reply = await client.read_frame()
    await client.wait_closed()
    reason = await ended(server)

    assert (opcode, close_code(reply)) == (CLOSE, code)
    assert (reason.kind, reason.code) == ("protocol", code)


@pytest.mark.parametrize(
    ("offers", "accepted"),
    [
        ("permessage-deflate; server_max_window_bits=7", None),
        ("permessage-deflate; x-unknown=1", None),
        (
            "permessage-deflate; client_max_window_bits=99, permessage-deflate",
            "permessage-deflate",
        ),
    ],
    ids=["invalid_value", "unknown_parameter", "invalid_then_valid"],
)
@pytest_twisted.ensureDeferred
async def test_invalid_deflate_offer_is_declined(websocket_server, offers, accepted):
    """
    RFC 7692 section 5: the server declines an offer it cannot accept.
    """
    server = await websocket_server(Scripted())

    client = await connect(server.port)
    client.send(
        upgrade_request("/socket", extra=f"Sec-WebSocket-Extensions: {offers}\r\n")
    )
    response = await client.read_response()
    await close_cleanly(client)
    await ended(server)

    assert response.status == 101
    assert response.header("sec-websocket-extensions") == accepted
