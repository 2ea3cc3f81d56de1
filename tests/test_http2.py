"""
HTTP/2 over real loopback sockets, with the h2 package as the client.

Each behaviour runs over cleartext with prior knowledge and over TLS with
ALPN, because the two paths reach HTTP/2 through different code.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from http2_support import PREFACE, connect_h2
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from support import connect
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from desperados.http1_options import HTTPOptions
from desperados.http2 import H2Connection

BIG_BODY = bytes(range(256)) * 800  # 204,800 bytes: several windows' worth


def _describe(conn, opts):
    """
    Respond with the request fields that depend on the protocol.
    """
    body = f"{conn.scheme} {conn.http_version} {conn.method} {conn.request_path}"
    return conn.put_resp_header("x-host", conn.host).send_resp(200, body).halt()


def _big(conn, opts):
    return conn.send_resp(200, BIG_BODY).halt()


@pytest.fixture(params=["cleartext", "tls"])
def transport(request, tls_files):
    """
    Run the test over cleartext prior knowledge, then over TLS with ALPN.
    """
    if request.param == "tls":
        return tls_files
    return None


def _server_options(tls):
    if tls is None:
        return {}
    return {"scheme": "https", "certfile": tls.certfile, "keyfile": tls.keyfile}


async def _reactor_turns(count: int) -> None:
    for _ in range(count):
        await deferLater(reactor, 0, lambda: None)


# Requests


@pytest_twisted.ensureDeferred
async def test_request_runs_pipeline_with_http2_conn(serve, transport):
    port = await serve(_describe, **_server_options(transport))
    client = await connect_h2(port, transport)

    first = client.request("/first?x=1")
    second = client.request("/second", method="HEAD")
    third = client.request("/third", method="POST", body=b"posted")
    responses = [await client.response(stream) for stream in (first, second, third)]
    client.transport.loseConnection()

    scheme = "https" if transport else "http"
    assert [response.status for response in responses] == [200, 200, 200]
    assert responses[0].body == f"{scheme} HTTP/2 GET /first".encode()
    assert responses[0].header(b"x-host") == b"localhost"
    assert responses[0].header(b"content-length") == b"%d" % len(responses[0].body)
    assert responses[1].body == b""
    assert responses[2].body == f"{scheme} HTTP/2 POST /third".encode()


@pytest_twisted.ensureDeferred
async def test_default_pipeline_answers_404(serve, transport):
    port = await serve(**_server_options(transport))
    client = await connect_h2(port, transport)

    response = await client.response(client.request("/test"))
    client.transport.loseConnection()

    assert response.status == 404
    assert response.body == b"not found"
    assert response.header(b"cache-control") == b"max-age=0, private, must-revalidate"


@pytest_twisted.ensureDeferred
async def test_large_response_follows_flow_control(serve, transport):
    port = await serve(_big, **_server_options(transport))
    client = await connect_h2(port, transport)

    response = await client.response(client.request("/big"))
    client.transport.loseConnection()

    assert response.status == 200
    assert response.body == BIG_BODY


@pytest_twisted.ensureDeferred
async def test_preface_in_pieces_is_detected(serve):
    port = await serve(_describe)
    client = await connect(port)

    for piece in (PREFACE[:3], PREFACE[3:10], PREFACE[10:]):
        client.send(piece)
        await _reactor_turns(2)
    client.send(SettingsFrame(0).serialize())
    while b"\x00\x00\x04\x01" not in client.buffer and not client.closed:
        await client.wait_for_data()
    client.transport.loseConnection()

    # The server's preface is a SETTINGS frame (type 4) on stream 0.
    assert client.buffer[3:4] == b"\x04"
    assert not client.buffer.startswith(b"HTTP/1.1")


@pytest_twisted.ensureDeferred
async def test_http11_starting_like_preface_stays_http11(serve):
    port = await serve(_describe)
    client = await connect(port)

    client.send(b"PRIVATE /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await client.read_response()
    client.transport.loseConnection()

    assert response.version == "HTTP/1.1"
    assert response.body == b"http HTTP/1.1 PRIVATE /x"


# Connection errors: GOAWAY with the RFC 9113 error code, then close.

class _HeaderOnly:
    """
    The 9-byte header of a frame, sent without the payload it announces.
    """

    def __init__(self, frame: object) -> None:
        self.frame = frame

    def serialize(self) -> bytes:
        return self.frame.serialize()[:9]


CONNECTION_ERRORS = {
    # A client opens odd-numbered streams only (RFC 9113 section 5.1.1).
    "even stream id": (
        HeadersFrame(2, data=b"\x82\x86\x84\x41\x09localhost", flags=["END_HEADERS"]),
        ErrorCodes.PROTOCOL_ERROR,
    ),
    # Section 6.5.2: an initial window above 2**31 - 1.
    "window setting too large": (
        SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 2**31}),
        ErrorCodes.FLOW_CONTROL_ERROR,
    ),
    # Section 4.3: an index past the end of the HPACK dynamic table.
    "invalid field block": (
        HeadersFrame(1, data=b"\xff\xff\xff\x0f", flags=["END_HEADERS", "END_STREAM"]),
        ErrorCodes.COMPRESSION_ERROR,
    ),
    # Section 4.2: a frame larger than SETTINGS_MAX_FRAME_SIZE (16,384).
    "frame too large": (
        DataFrame(1, data=b"x" * 20000),
        ErrorCodes.FRAME_SIZE_ERROR,
    ),
    # The length in the frame header is enough to tell, before the payload.
    "frame header too large": (
        _HeaderOnly(DataFrame(1, data=b"x" * 20000)),
        ErrorCodes.FRAME_SIZE_ERROR,
    ),
}


@pytest.mark.parametrize("case", sorted(CONNECTION_ERRORS))
@pytest_twisted.ensureDeferred
async def test_connection_error_sends_goaway_then_closes(serve, transport, logs, case):
    frame, error_code = CONNECTION_ERRORS[case]
    port = await serve(_describe, **_server_options(transport))
    client = await connect_h2(port, transport)
    await client.wait_for(lambda: client.frames_of(SettingsFrame))

    client.send_raw(frame.serialize())
    await client.wait_closed()

    goaways = client.frames_of(GoAwayFrame)
    assert len(goaways) == 1
    assert goaways[0].error_code == error_code
    assert client.frames[-1] is goaways[0]
    assert client.closed
    (event,) = logs.with_format("HTTP/2 connection error")
    assert event["error_code"] == error_code.name
    failures = [event for event in logs.events if event.get("log_failure")]
    assert failures == []


# Flow control (RFC 9113 sections 5.2 and 6.9)


@pytest.fixture
def send_loop_calls(monkeypatch):
    """
    Count the runs of the server's data-sending loop.
    """
    calls = []
    original = H2Connection._sendPrioritisedData

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(H2Connection, "_sendPrioritisedData", counting)
    return calls


def _failures(logs):
    return [event for event in logs.events if event.get("log_failure")]


@pytest_twisted.ensureDeferred
async def test_zero_window_waits_without_spinning(serve, transport, logs, send_loop_calls):
    port = await serve(_big, **_server_options(transport))
    client = await connect_h2(port, transport, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    await client.wait_for(lambda: client.frames_of(SettingsFrame))

    stream_id = client.request("/big")
    response = client.responses[stream_id]
    await client.wait_for(lambda: response.headers)
    del send_loop_calls[:]
    await _reactor_turns(50)
    calls_while_blocked = len(send_loop_calls)
    client.conn.increment_flow_control_window(len(BIG_BODY), stream_id)
    client.flush()
    await client.response(stream_id)
    client.transport.loseConnection()

    # A loop that polls the window runs once per reactor turn.
    assert calls_while_blocked <= 2
    assert response.body == BIG_BODY
    assert _failures(logs) == []


@pytest_twisted.ensureDeferred
async def test_settings_drive_window_negative(serve, transport, logs):
    port = await serve(_big, **_server_options(transport))
    client = await connect_h2(port, transport)
    client.auto_window_update = False

    stream_id = client.request("/big")
    response = client.responses[stream_id]
    await client.wait_for(lambda: len(response.body) == 65535)
    # The stream's send window is 0; lowering the initial window by 49,151
    # makes it -49,151 (RFC 9113 section 6.9.2).
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 16384})
    client.conn.increment_flow_control_window(len(BIG_BODY))
    client.flush()
    await _reactor_turns(20)
    received_while_negative = len(response.body)
    client.conn.increment_flow_control_window(49151 + 16384, stream_id)
    client.flush()
    await client.wait_for(lambda: len(response.body) == 65535 + 16384)
    client.auto_window_update = True
    client.conn.increment_flow_control_window(len(BIG_BODY), stream_id)
    client.flush()
    await client.response(stream_id)
    client.transport.loseConnection()

    assert received_while_negative == 65535
    assert response.body == BIG_BODY
    assert _failures(logs) == []


@pytest_twisted.ensureDeferred
async def test_settings_opening_window_resume_stream(serve, transport, logs):
    port = await serve(_big, **_server_options(transport))
    client = await connect_h2(port, transport, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    await client.wait_for(lambda: client.frames_of(SettingsFrame))

    stream_id = client.request("/big")
    response = client.responses[stream_id]
    await client.wait_for(lambda: response.headers)
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    client.flush()
    await client.response(stream_id)
    client.transport.loseConnection()

    assert response.body == BIG_BODY
    assert _failures(logs) == []


# Closing


@pytest_twisted.ensureDeferred
async def test_peer_goaway_closes_connection(serve, transport, logs):
    port = await serve(_describe, **_server_options(transport))
    client = await connect_h2(port, transport)
    await client.response(client.request("/before"))

    client.conn.close_connection()
    client.flush()
    await client.wait_closed()

    assert client.closed
    assert not client.gave_up
    assert logs.with_format("HTTP/2 connection error") == []


@pytest_twisted.ensureDeferred
async def test_idle_timeout_sends_goaway_then_closes(serve, transport):
    options = _server_options(transport)
    port = await serve(_describe, http_options=HTTPOptions(keepalive_timeout=0.2), **options)
    client = await connect_h2(port, transport)
    await client.response(client.request("/once"))

    await client.wait_closed()

    goaways = client.frames_of(GoAwayFrame)
    assert not client.gave_up
    assert len(goaways) == 1
    assert goaways[0].error_code == ErrorCodes.NO_ERROR
    assert client.frames[-1] is goaways[0]


def _raise_on_boom(conn, opts):
    if conn.request_path == "/boom":
        raise RuntimeError("plug failed on purpose")
    return conn.send_resp(200, b"fine").halt()


@pytest_twisted.ensureDeferred
async def test_raising_plug_fails_only_its_stream(serve, transport, logs):
    port = await serve(_raise_on_boom, **_server_options(transport))
    client = await connect_h2(port, transport)

    boom = client.request("/boom")
    fine = client.request("/fine")
    failed = await client.response(boom)
    served = await client.response(fine)
    after = await client.response(client.request("/after"))
    client.transport.loseConnection()

    assert failed.status == 500
    assert failed.body == b"internal server error"
    assert failed.header(b"connection") is None
    assert served.body == b"fine"
    assert after.body == b"fine"
    failures = [event for event in logs.events if event.get("log_failure")]
    assert len(failures) == 1
    failures[0]["log_failure"].trap(RuntimeError)


# Request bodies, read as they arrive


async def _digest_body(conn, opts):
    """
    Read the body through read_body; respond with its size, reads and SHA-256.
    """
    opts = opts or {}
    started = opts.get("started")
    if started is not None and not started.called:
        started.callback(conn)
    digest = hashlib.sha256()
    size = reads = 0
    more = True
    while more:
        data, more = await conn.read_body(length=opts.get("length", 8_000_000))
        digest.update(data)
        size += len(data)
        reads += 1
    return conn.send_resp(200, f"{size} {reads} {digest.hexdigest()}").halt()


def _ignore_body(conn, opts):
    return conn.send_resp(200, f"ignored {conn.request_path}").halt()


@pytest_twisted.ensureDeferred
async def test_pipeline_runs_before_body_arrives(serve, transport):
    started = Deferred()
    opts = {"started": started, "length": 16384}
    port = await serve(_digest_body, opts, **_server_options(transport))
    client = await connect_h2(port, transport)
    body = bytes(range(256)) * 4096  # 1 MiB: many stream windows' worth

    stream_id = client.start_request("/upload")
    await client.wait_for(lambda: started.called)
    conn = await started
    await client.send_body(stream_id, body)
    response = await client.response(stream_id)
    client.transport.loseConnection()

    assert conn.http_version == "HTTP/2"
    assert response.status == 200
    size, reads, digest = response.body.decode().split()
    assert int(size) == len(body)
    assert int(reads) >= len(body) // 16384
    assert digest == hashlib.sha256(body).hexdigest()


@pytest_twisted.ensureDeferred
async def test_continue_sent_only_when_plug_reads(serve, transport):
    port = await serve(_digest_body, **_server_options(transport))
    client = await connect_h2(port, transport)
    expect = [("expect", "100-continue")]

    reading = client.start_request("/read", headers=expect)
    await client.wait_for(lambda: client.responses[reading].informational)
    await client.send_body(reading, b"after continue")
    read = await client.response(reading)
    ignoring_port = await serve(_ignore_body, **_server_options(transport))
    other = await connect_h2(ignoring_port, transport)
    ignoring = other.start_request("/ignore", headers=expect)
    ignored = await other.response(ignoring)
    client.transport.loseConnection()
    other.transport.loseConnection()

    assert read.informational == [[(b":status", b"100")]]
    assert read.body.startswith(b"14 ")
    assert ignored.informational == []
    assert ignored.status == 200


@pytest_twisted.ensureDeferred
async def test_response_before_body_resets_stream(serve, transport, logs):
    port = await serve(_ignore_body, **_server_options(transport))
    client = await connect_h2(port, transport)

    stream_id = client.start_request("/early")
    client.conn.send_data(stream_id, b"x" * 1000)
    client.flush()
    response = client.responses[stream_id]
    await client.wait_for(lambda: response.ended or response.reset_code is not None)
    await client.wait_for(lambda: response.reset_code is not None)
    # DATA already in flight when the reset went out reaches a closed stream.
    client.transport.write(DataFrame(stream_id, data=b"late" * 250).serialize())
    after = await client.response(client.request("/after"))
    client.transport.loseConnection()

    assert response.status == 200
    assert response.body == b"ignored /early"
    assert response.ended
    assert response.reset_code == ErrorCodes.NO_ERROR
    assert after.body == b"ignored /after"
    assert _failures(logs) == []


@pytest_twisted.ensureDeferred
async def test_declared_body_over_limit_gets_413(serve, transport):
    port = await serve(_digest_body, max_body_size=1000, **_server_options(transport))
    client = await connect_h2(port, transport)

    stream_id = client.start_request("/big", headers=[("content-length", "5000")])
    client.conn.send_data(stream_id, b"x" * 1000)
    client.flush()
    response = client.responses[stream_id]
    await client.wait_for(lambda: response.reset_code is not None)
    after = await client.response(client.request("/after", method="POST", body=b"small"))
    client.transport.loseConnection()

    assert response.status == 413
    assert response.body == b"request body larger than the maximum of 1000 bytes"
    assert response.reset_code == ErrorCodes.NO_ERROR
    assert after.status == 200
    assert after.body.startswith(b"5 ")


@pytest_twisted.ensureDeferred
async def test_unknown_expectation_gets_417(serve, transport, logs):
    """
    RFC 9110 section 10.1.1 applies to HTTP/2 too: only 100-continue.
    """
    port = await serve(_digest_body, **_server_options(transport))
    client = await connect_h2(port, transport)

    expect = client.request(
        "/expect", method="POST", headers=[("expect", "bogus")], body=b"x"
    )
    rejected = await client.response(expect)
    after = await client.response(
        client.request("/after", method="POST", body=b"small")
    )
    client.transport.loseConnection()

    assert rejected.status == 417
    assert rejected.body == b"unsupported Expect header, expected '100-continue'"
    assert after.status == 200
    [event] = logs.with_format("rejected {method} {path}")
    assert event["status"] == 417


# Streamed responses


async def _stream_chunks(conn, opts):
    conn.send_chunked(200)
    for index in range(10):
        await conn.chunk(bytes([index]) * 16384)
        opts["sent"].append(index)
    return conn.halt()


@pytest_twisted.ensureDeferred
async def test_chunks_wait_for_stream_window(serve, transport, logs):
    opts = {"sent": []}
    port = await serve(_stream_chunks, opts, **_server_options(transport))
    client = await connect_h2(port, transport, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    await client.wait_for(lambda: client.frames_of(SettingsFrame))

    stream_id = client.request("/stream")
    response = client.responses[stream_id]
    await client.wait_for(lambda: response.headers)
    await _reactor_turns(20)
    sent_while_blocked = len(opts["sent"])
    client.conn.increment_flow_control_window(10 * 16384, stream_id)
    client.flush()
    await client.response(stream_id)
    client.transport.loseConnection()

    assert sent_while_blocked <= 1
    assert response.status == 200
    assert response.body == b"".join(bytes([index]) * 16384 for index in range(10))
    assert opts["sent"] == list(range(10))
    assert _failures(logs) == []
