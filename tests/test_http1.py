"""
HTTP/1.1 limits, deadlines and malformed requests over real loopback sockets.

Each malformed kind has a test even where twisted.web already rejects it, so
that a change upstream is caught.  Deadlines are set short by options, and
the tests wait for the server's response, never for a measured time.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable
from typing import TypeVar

import pytest
import pytest_twisted
from http2_support import connect_raw_tls
from support import RawClient, Response, close_payload, connect, upgrade_request
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.usage import UsageError

from desperados import Builder, HTTPOptions
from desperados.server import make_site

pytestmark = pytest.mark.usefixtures("both_http1_paths")

T = TypeVar("T")

GET = b"GET /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
REJECTED = "rejected a request from {peer} with {status}: {reason}"


def bounded(awaitable: Awaitable[T], seconds: float = 10.0) -> Deferred[T]:
    """
    Wait for C{awaitable}, failing the test if it takes more than C{seconds}.

    A safety net so that a server that never responds fails the test instead
    of hanging it.  No test depends on how long anything takes.
    """
    return ensureDeferred(awaitable).addTimeout(seconds, reactor)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _read_body(conn, opts):
    while (await conn.read_body()).more:
        pass
    return conn


# The default pipeline, after reading the whole body.
_READ_BODY_THEN_DEFAULT = Builder([_read_body, "desperados.plugs.Default"])


async def request_once(
    serve, data: bytes, **options: object
) -> tuple[Response, RawClient]:
    """
    Send C{data} on a new connection and read one response.

    The pipeline reads the whole body before the default plugs run, so that
    an error in the body's framing is found before any response goes out.
    """
    port = await serve(_READ_BODY_THEN_DEFAULT, http_options=HTTPOptions(**options))
    client = await connect(port)
    client.send(data)
    response = await bounded(client.read_response())
    return response, client


async def assert_rejected(
    serve, logs, data: bytes, status: int, **options: object
) -> Response:
    """
    Check that C{data} gets C{status} with connection: close, then a close.
    """
    response, client = await request_once(serve, data, **options)
    await bounded(client.wait_closed())

    assert response.status == status
    assert response.header("connection") == "close"
    assert response.header("content-type") == "text/plain; charset=utf-8"
    assert response.header("date") is not None
    assert client.buffer == b"", "nothing may follow the error response"
    events = logs.with_format(REJECTED)
    assert [event["status"] for event in events] == [status]
    return response


def rejection_reason(logs) -> str:
    (event,) = logs.with_format(REJECTED)
    return event["reason"]


# Limits


@pytest_twisted.ensureDeferred
async def test_request_line_too_long_gets_414(serve, logs):
    data = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    await assert_rejected(serve, logs, data, 414, max_request_line_length=100)


@pytest_twisted.ensureDeferred
async def test_rejection_log_names_peer_address(serve, logs):
    port = await serve(_READ_BODY_THEN_DEFAULT)
    client = await connect(port)
    local = client.transport.getHost()
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    await bounded(client.wait_closed())

    (event,) = logs.with_format(REJECTED)
    assert event["peer"] == f"127.0.0.1:{local.port}"


@pytest_twisted.ensureDeferred
async def test_request_line_without_end_gets_414(serve, logs):
    """
    A request line longer than every limit and still unfinished gets 414.
    """
    data = b"GET /" + b"a" * 300
    await assert_rejected(
        serve, logs, data, 414, max_request_line_length=100, max_header_length=100
    )


@pytest_twisted.ensureDeferred
async def test_request_line_at_limit_is_served(serve):
    line = b"GET /" + b"a" * 86 + b" HTTP/1.1"
    assert len(line) == 100
    response, client = await request_once(
        serve, line + b"\r\nHost: 127.0.0.1\r\n\r\n", max_request_line_length=100
    )
    assert response.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_header_line_too_long_gets_431(serve, logs):
    data = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 200 + b"\r\n\r\n"
    await assert_rejected(serve, logs, data, 431, max_header_length=100)


@pytest_twisted.ensureDeferred
async def test_header_line_without_end_gets_431(serve, logs):
    """
    twisted.web closes a connection whose header line passes its maximum
    without a response, and the channel sends 431.
    """
    data = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 300
    await assert_rejected(
        serve, logs, data, 431, max_request_line_length=100, max_header_length=100
    )


@pytest_twisted.ensureDeferred
async def test_header_line_over_twisted_maximum_gets_431(serve, logs):
    """
    With the default options, a header line longer than LineReceiver's own
    16 KiB maximum gets 431 as well.
    """
    data = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n"
    )
    await assert_rejected(serve, logs, data, 431)


@pytest_twisted.ensureDeferred
async def test_too_many_headers_get_431(serve, logs):
    fields = b"".join(b"X-%d: 1\r\n" % index for index in range(5))
    data = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n"
    await assert_rejected(serve, logs, data, 431, max_header_count=5)


@pytest_twisted.ensureDeferred
async def test_head_too_large_gets_431(serve, logs):
    fields = b"".join(b"X-%d: %s\r\n" % (index, b"a" * 90) for index in range(20))
    data = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n"
    await assert_rejected(serve, logs, data, 431, max_head_size=1000)

    assert rejection_reason(logs) == "request head too large"


@pytest_twisted.ensureDeferred
async def test_head_at_size_limit_is_served(serve):
    line = b"GET /test HTTP/1.1"
    field = b"X-A: " + b"a" * (100 - len(line) - len(HOST) - 5)
    assert len(line) + len(HOST) + len(field) == 100
    response, client = await request_once(
        serve, _request(HOST, field, line=line), max_head_size=100
    )

    assert response.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_header_count_at_limit_is_served(serve):
    fields = b"".join(b"X-%d: 1\r\n" % index for index in range(4))
    data = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n"
    response, client = await request_once(serve, data, max_header_count=5)
    assert response.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_max_requests_closes_after_last(serve):
    port = await serve(http_options=HTTPOptions(max_requests=3))
    client = await connect(port)

    responses = []
    for _ in range(3):
        client.send(GET)
        responses.append(await bounded(client.read_response()))
    await bounded(client.wait_closed())

    assert [response.status for response in responses] == [404, 404, 404]
    assert [response.header("connection") for response in responses] == [
        None,
        None,
        "close",
    ]


@pytest_twisted.ensureDeferred
async def test_pipelined_request_after_max_requests_is_dropped(serve):
    port = await serve(http_options=HTTPOptions(max_requests=1))
    client = await connect(port)

    client.send(GET + GET)
    response = await bounded(client.read_response())
    await bounded(client.wait_closed())

    assert response.header("connection") == "close"
    assert client.buffer == b""


@pytest_twisted.ensureDeferred
async def test_connection_over_limit_gets_503(serve, logs):
    port = await serve(http_options=HTTPOptions(max_connections=2))
    first = await connect(port)
    second = await connect(port)
    # A response on each proves that both connections were accepted.
    for client in (first, second):
        client.send(GET)
        await bounded(client.read_response())

    third = await connect(port)
    rejected = await bounded(third.read_response())
    await bounded(third.wait_closed())
    first.send(GET)
    still_served = await bounded(first.read_response())

    assert rejected.status == 503
    assert rejected.header("connection") == "close"
    assert still_served.status == 404
    (warning,) = logs.with_format("reached the limit of {max_connections}")
    assert warning["max_connections"] == 2

    first.transport.loseConnection()
    await bounded(first.wait_closed())
    fourth = await connect(port)
    fourth.send(GET)
    after_close = await bounded(fourth.read_response())
    assert after_close.status == 404
    (recovered,) = logs.with_format("below the limit of {max_connections}")
    assert recovered["rejected"] == 1
    second.transport.loseConnection()
    fourth.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_websocket_counts_against_connection_limit(serve):
    """
    A connection handed to the WebSocket bridge stays counted until it closes.
    """
    port = await serve(http_options=HTTPOptions(max_connections=1))
    websocket = await connect(port)
    websocket.send(upgrade_request())
    upgraded = await bounded(websocket.read_response())

    other = await connect(port)
    rejected = await bounded(other.read_response())

    assert upgraded.status == 101
    assert rejected.status == 503
    websocket.transport.loseConnection()
    await bounded(websocket.wait_closed())


@pytest_twisted.ensureDeferred
async def test_closed_websocket_frees_connection_slot(serve):
    """
    The count of a WebSocket connection ends when the server closes it.
    """
    port = await serve(http_options=HTTPOptions(max_connections=1))
    websocket = await connect(port)
    websocket.send(upgrade_request())
    upgraded = await bounded(websocket.read_response())
    websocket.send_frame(0x8, close_payload(1000))
    close_reply = await bounded(websocket.read_frame())
    # The server closes TCP after the closing handshake.
    await bounded(websocket.wait_closed())

    other = await connect(port)
    other.send(_request(HOST))
    served = await bounded(other.read_response())

    assert upgraded.status == 101
    assert close_reply == (0x8, close_payload(1000))
    assert served.status == 404
    other.transport.loseConnection()


@pytest.mark.parametrize(
    "options",
    [
        {"max_header_count": 0},
        {"max_requests": 0},
        {"max_connections": -1},
        {"header_timeout": 0},
        {"keepalive_timeout": "60"},
        {"max_header_length": True},
    ],
)
def test_invalid_options_raise(options):
    with pytest.raises(ValueError, match="expected a positive"):
        HTTPOptions(**options)


# Deadlines


@pytest_twisted.ensureDeferred
async def test_trickled_head_gets_408(serve, logs):
    """
    Bytes that keep coming do not extend the deadline for the request head.

    twisted.web's idle timer restarts on every byte, so there this client
    finishes its request and gets 404.
    """
    port = await serve(http_options=HTTPOptions(header_timeout=0.3))
    client = await connect(port)
    head = (
        b"GET /test HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n"
    )

    for byte in head:
        if client.closed:
            break
        client.send(bytes([byte]))
        await sleep(0.02)
    response = await bounded(client.read_response())
    await bounded(client.wait_closed())

    assert response.status == 408
    assert response.header("connection") == "close"
    assert rejection_reason(logs) == "timed out reading the request head"


@pytest_twisted.ensureDeferred
async def test_idle_keepalive_connection_is_closed(serve, logs):
    port = await serve(http_options=HTTPOptions(keepalive_timeout=0.2))
    client = await connect(port)

    client.send(GET)
    response = await bounded(client.read_response())
    await bounded(client.wait_closed())

    assert response.status == 404
    assert client.buffer == b"", "an idle connection is closed without an answer"
    assert logs.with_format(REJECTED) == []


@pytest_twisted.ensureDeferred
async def test_connection_without_request_is_closed(serve):
    port = await serve(http_options=HTTPOptions(keepalive_timeout=0.2))
    client = await connect(port)

    await bounded(client.wait_closed())

    assert client.buffer == b""


@pytest_twisted.ensureDeferred
async def test_stalled_body_gets_408(serve, logs):
    head = b"POST /test HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n"
    response, client = await request_once(serve, head + b"abc", body_timeout=0.2)
    await bounded(client.wait_closed())

    assert response.status == 408
    assert response.header("connection") == "close"
    assert rejection_reason(logs) == "timed out reading the request body"


@pytest_twisted.ensureDeferred
async def test_stalled_body_after_response_closes(serve, logs):
    """
    The pipeline answered before reading the body: no second response.
    """
    head = b"POST /test HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n"
    port = await serve(http_options=HTTPOptions(body_timeout=0.2))
    client = await connect(port)
    client.send(head + b"abc")
    response = await bounded(client.read_response())
    await bounded(client.wait_closed())

    assert response.status == 404
    assert client.buffer == b""
    assert rejection_reason(logs) == "timed out reading the request body"


@pytest_twisted.ensureDeferred
async def test_slow_body_bytes_extend_body_timeout(serve):
    """
    Unlike the head deadline, each body byte restarts the body timeout.
    """
    port = await serve(http_options=HTTPOptions(body_timeout=1.0))
    client = await connect(port)
    client.send(b"POST /test HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 15\r\n\r\n")

    for _ in range(15):
        await sleep(0.1)
        client.send(b"x")
    response = await bounded(client.read_response())

    assert response.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_keepalive_requests_are_not_timed_out(serve):
    """
    The head deadline starts with each request, not with the connection.
    """
    port = await serve(http_options=HTTPOptions(header_timeout=0.3))
    client = await connect(port)

    statuses = []
    for _ in range(4):
        client.send(GET)
        statuses.append((await bounded(client.read_response())).status)
        await sleep(0.15)

    assert statuses == [404, 404, 404, 404]
    assert not client.closed
    client.transport.loseConnection()


# Over TLS


@pytest_twisted.ensureDeferred
async def test_stalled_tls_handshake_is_closed(serve, tls_files):
    """
    The keep-alive timeout starts when TCP connects, so it bounds the handshake.
    """
    port = await serve(
        scheme="https",
        certfile=tls_files.certfile,
        keyfile=tls_files.keyfile,
        http_options=HTTPOptions(keepalive_timeout=0.2),
    )
    client = await connect(port)

    await bounded(client.wait_closed())

    assert client.closed


HANDSHAKE_TIMED_OUT = "the TLS handshake timed out"


async def serve_tls(serve, tls_files, **options: object) -> int:
    return await serve(
        scheme="https",
        certfile=tls_files.certfile,
        keyfile=tls_files.keyfile,
        http_options=HTTPOptions(**options),
    )


@pytest_twisted.ensureDeferred
async def test_silent_tls_client_is_aborted(serve, tls_files, logs):
    """
    A client that connects to the TLS port and sends nothing is aborted
    after tls_handshake_timeout, well before the keep-alive timeout of 60 s.
    """
    port = await serve_tls(serve, tls_files, tls_handshake_timeout=0.2)
    client = await connect(port)
    local = client.transport.getHost()

    await bounded(client.wait_closed())

    assert client.buffer == b""
    (event,) = logs.with_format(HANDSHAKE_TIMED_OUT)
    assert event["peer"] == f"127.0.0.1:{local.port}"
    assert event["timeout"] == 0.2


# Twisted 26.10's ssl: parser hands pyOpenSSL X509 and PKey objects to
# OpenSSL, which pyOpenSSL 26 deprecates.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL .* objects:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_silent_client_on_ssl_description_is_aborted(serve, tls_files, logs):
    description = (
        f"ssl:0:interface=127.0.0.1:privateKey={tls_files.keyfile}"
        f":certKey={tls_files.certfile}"
    )
    port = await serve(
        listen=description, http_options=HTTPOptions(tls_handshake_timeout=0.2)
    )
    client = await connect(port)

    await bounded(client.wait_closed())

    assert client.buffer == b""
    assert len(logs.with_format(HANDSHAKE_TIMED_OUT)) == 1


@pytest_twisted.ensureDeferred
async def test_half_client_hello_is_aborted(serve, tls_files, logs):
    port = await serve_tls(serve, tls_files, tls_handshake_timeout=0.2)
    hello = _tls_client_hello()
    client = await connect(port)

    client.send(hello[: len(hello) // 2])
    await bounded(client.wait_closed())

    assert client.buffer == b""
    assert len(logs.with_format(HANDSHAKE_TIMED_OUT)) == 1


@pytest_twisted.ensureDeferred
async def test_completed_handshake_outlives_its_timeout(serve, tls_files, logs):
    """
    The handshake timeout ends with the handshake: a client that sends its
    request later than that is served.
    """
    port = await serve_tls(serve, tls_files, tls_handshake_timeout=0.2)
    client = await connect_raw_tls(port, tls_files, [b"http/1.1"])
    client.send(GET)
    first = await bounded(client.read_response())

    await sleep(0.4)
    client.send(GET)
    second = await bounded(client.read_response())
    client.transport.loseConnection()

    assert first.status == 404
    assert second.status == 404
    assert logs.with_format(HANDSHAKE_TIMED_OUT) == []


@pytest_twisted.ensureDeferred
async def test_trickled_head_over_tls_gets_408(serve, tls_files):
    port = await serve(
        scheme="https",
        certfile=tls_files.certfile,
        keyfile=tls_files.keyfile,
        http_options=HTTPOptions(header_timeout=0.3),
    )
    client = await connect_raw_tls(port, tls_files, [b"http/1.1"])

    for byte in GET:
        if client.closed or client.buffer:
            break
        client.send(bytes([byte]))
        await sleep(0.03)
    response = await bounded(client.read_response())

    assert response.status == 408
    assert response.header("connection") == "close"


@pytest_twisted.ensureDeferred
async def test_wss_counts_against_connection_limit(serve, tls_files):
    port = await serve(
        scheme="https",
        certfile=tls_files.certfile,
        keyfile=tls_files.keyfile,
        http_options=HTTPOptions(max_connections=1),
    )
    websocket = await connect_raw_tls(port, tls_files, [b"http/1.1"])
    websocket.send(upgrade_request())
    upgraded = await bounded(websocket.read_response())
    websocket.send_frame(0x1, b"still counted")
    echoed = await bounded(websocket.read_frame())

    other = await connect_raw_tls(port, tls_files, [b"http/1.1"])
    rejected = await bounded(other.read_response())

    assert upgraded.status == 101
    assert echoed == (0x1, b"still counted")
    assert rejected.status == 503
    websocket.transport.loseConnection()


# Malformed requests: RFC 9112 and RFC 9110


def _request(
    *fields: bytes, line: bytes = b"GET /test HTTP/1.1", body: bytes = b""
) -> bytes:
    return (
        line + b"\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body
    )


HOST = b"Host: 127.0.0.1"

MALFORMED = [
    # RFC 9112 section 3.2: Host is required in HTTP/1.1, and only once.
    ("missing_host", _request(), "missing Host header"),
    ("two_hosts", _request(HOST, b"Host: example.com"), "more than one Host header"),
    ("invalid_host", _request(b"Host: a b"), "invalid Host header"),
    ("host_with_slash", _request(b"Host: a/b"), "invalid Host header"),
    # RFC 9112 section 6.3: framing headers that disagree.
    (
        "conflicting_content_length",
        _request(HOST, b"Content-Length: 3", b"Content-Length: 4", body=b"abcd"),
        None,
    ),
    (
        "repeated_content_length",
        _request(HOST, b"Content-Length: 3", b"Content-Length: 3", body=b"abc"),
        None,
    ),
    ("content_length_list", _request(HOST, b"Content-Length: 3, 3", body=b"abc"), None),
    ("content_length_sign", _request(HOST, b"Content-Length: +3", body=b"abc"), None),
    ("content_length_hex", _request(HOST, b"Content-Length: 0x3", body=b"abc"), None),
    (
        "content_length_and_transfer_encoding",
        _request(
            HOST, b"Content-Length: 3", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"
        ),
        None,
    ),
    (
        "transfer_encoding_and_content_length",
        _request(
            HOST, b"Transfer-Encoding: chunked", b"Content-Length: 3", body=b"0\r\n\r\n"
        ),
        None,
    ),
    (
        "repeated_transfer_encoding",
        _request(
            HOST,
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
        ),
        None,
    ),
    (
        "transfer_encoding_identity",
        _request(
            HOST, b"Transfer-Encoding: identity", b"Content-Length: 3", body=b"abc"
        ),
        None,
    ),
    (
        "transfer_encoding_gzip_chunked",
        _request(HOST, b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        None,
    ),
    (
        "transfer_encoding_in_http_1_0",
        _request(
            HOST,
            b"Transfer-Encoding: chunked",
            line=b"POST /test HTTP/1.0",
            body=b"0\r\n\r\n",
        ),
        "Transfer-Encoding in an HTTP/1.0 request",
    ),
    # RFC 9112 section 7.1: chunk-size is 1*HEXDIG, each chunk ends with CRLF.
    *[
        (
            f"chunk_size_{name}",
            _request(
                HOST, b"Transfer-Encoding: chunked", body=size + b"\r\nabc\r\n0\r\n\r\n"
            ),
            "malformed chunked body",
        )
        for name, size in [
            ("not_hex", b"zz"),
            ("prefixed", b"0x3"),
            ("negative", b"-3"),
            ("leading_space", b" 3"),
            ("trailing_space", b"3 "),
            ("empty", b""),
        ]
    ],
    (
        "chunk_without_crlf",
        _request(HOST, b"Transfer-Encoding: chunked", body=b"3\r\nabcX0\r\n\r\n"),
        "malformed chunked body",
    ),
    (
        "chunk_longer_than_size",
        _request(HOST, b"Transfer-Encoding: chunked", body=b"3\r\nabcdef\r\n0\r\n\r\n"),
        "malformed chunked body",
    ),
    # RFC 9112 section 7.1: chunk-size and trailer lines end with CRLF too.
    *[
        (
            f"bare_lf_{name}",
            _request(HOST, b"Transfer-Encoding: chunked", body=body),
            "bare LF in a chunked body",
        )
        for name, body in [
            ("after_chunk_size", b"3\nabc\n0\n\n"),
            ("after_last_chunk", b"3\r\nabc\r\n0\n\n"),
            ("in_trailer", b"3\r\nabc\r\n0\r\nX-A: 1\n\n"),
        ]
    ],
    # RFC 9112 section 7.1.2: trailer fields have the syntax of header fields.
    (
        "trailer_without_colon",
        _request(HOST, b"Transfer-Encoding: chunked", body=b"0\r\nX-A 1\r\n\r\n"),
        "trailer field without a colon",
    ),
    (
        "trailer_name_not_token",
        _request(HOST, b"Transfer-Encoding: chunked", body=b"0\r\nX A: 1\r\n\r\n"),
        "invalid trailer field name",
    ),
    (
        "trailer_value_with_control",
        _request(
            HOST, b"Transfer-Encoding: chunked", body=b"0\r\nX-A: a\x01b\r\n\r\n"
        ),
        "invalid character in a trailer field",
    ),
    # RFC 9112 section 3: a request line starts with a method, a token.
    (
        "nul_before_method",
        b"\x00" + GET,
        "invalid first byte of the request line",
    ),
    (
        "space_before_method",
        b" " + GET,
        "invalid first byte of the request line",
    ),
    # RFC 9112 section 2.2: lines end with CRLF.
    (
        "bare_lf_in_field",
        _request(HOST, b"X-A: 1\nX-B: 2"),
        "bare LF in the request head",
    ),
    (
        "bare_lf_in_request_line",
        b"GET /test HTTP/1.1\nHost: 127.0.0.1\r\n\r\n",
        "bare LF in the request head",
    ),
    (
        "bare_lf_everywhere",
        b"GET /test HTTP/1.1\nHost: 127.0.0.1\n\n",
        "bare LF in the request head",
    ),
    (
        "bare_cr_in_field",
        _request(HOST, b"X-A: 1\rX-B: 2"),
        "invalid character in a header field",
    ),
    # RFC 9112 section 5.1: no whitespace between the field name and colon.
    (
        "space_before_colon",
        _request(HOST, b"X-A : 1"),
        "whitespace before the colon in a header field",
    ),
    (
        "tab_before_colon",
        _request(HOST, b"X-A\t: 1"),
        "whitespace before the colon in a header field",
    ),
    (
        "space_before_colon_host",
        _request(b"Host : 127.0.0.1"),
        "whitespace before the colon in a header field",
    ),
    # RFC 9112 section 5.2: obs-fold, and whitespace before the first field.
    (
        "obs_fold",
        _request(HOST, b"X-A: 1", b" continued"),
        "obsolete line folding in a header field",
    ),
    (
        "obs_fold_tab",
        _request(HOST, b"X-A: 1", b"\tcontinued"),
        "obsolete line folding in a header field",
    ),
    (
        "space_before_first_field",
        _request(b" X-A: 1", HOST),
        "obsolete line folding in a header field",
    ),
    # RFC 9110 section 5.1 and 5.5: field names are tokens, values hold no CTL.
    ("field_without_colon", _request(HOST, b"X-A 1"), "header field without a colon"),
    ("empty_field_name", _request(HOST, b": 1"), "invalid header field name"),
    ("brace_in_name", _request(HOST, b"X{A}: 1"), "invalid header field name"),
    ("space_in_name", _request(HOST, b"X A: 1"), "invalid header field name"),
    ("non_ascii_in_name", _request(HOST, b"X-\xe9: 1"), "invalid header field name"),
    (
        "nul_in_value",
        _request(HOST, b"X-A: a\x00b"),
        "invalid character in a header field",
    ),
    (
        "control_in_value",
        _request(HOST, b"X-A: a\x01b"),
        "invalid character in a header field",
    ),
    (
        "del_in_value",
        _request(HOST, b"X-A: a\x7fb"),
        "invalid character in a header field",
    ),
    # Characters that str.splitlines() reads as line breaks (Autobahn does).
    *[
        (
            f"line_break_{byte:02x}_in_value",
            _request(HOST, b"X-A: a" + bytes([byte]) + b"X-B: b"),
            "invalid character in a header field",
        )
        for byte in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E)
    ],
    # RFC 9112 section 3: method SP request-target SP HTTP-version.
    (
        "two_spaces",
        b"GET  /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid request target",
    ),
    ("no_version", b"GET /test\r\nHost: 127.0.0.1\r\n\r\n", "malformed request line"),
    (
        "lowercase_version",
        b"GET /test http/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "malformed request line",
    ),
    (
        "version_1_2",
        b"GET /test HTTP/1.2\r\nHost: 127.0.0.1\r\n\r\n",
        "malformed request line",
    ),
    (
        "method_not_token",
        b"G(T /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "malformed request line",
    ),
    (
        "tab_in_request_line",
        b"GET\t/test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid character in the request line",
    ),
    (
        "non_ascii_target",
        b"GET /t\xe9st HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid character in the request line",
    ),
    (
        "del_in_target",
        b"GET /t\x7fst HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid character in the request line",
    ),
    ("two_empty_lines_first", b"\r\n\r\n" + GET, "malformed request line"),
    # RFC 9112 section 3.2: the four forms of request-target.
    (
        "relative_target",
        _request(HOST, line=b"GET test HTTP/1.1"),
        "invalid request target",
    ),
    (
        "asterisk_with_get",
        _request(HOST, line=b"GET * HTTP/1.1"),
        "invalid request target",
    ),
    (
        "absolute_ftp_target",
        _request(HOST, line=b"GET ftp://127.0.0.1/ HTTP/1.1"),
        "invalid request target",
    ),
    (
        "absolute_target_with_userinfo",
        _request(HOST, line=b"GET http://user@127.0.0.1/ HTTP/1.1"),
        "invalid authority in the request target",
    ),
    (
        "absolute_target_without_host",
        _request(HOST, line=b"GET http:///test HTTP/1.1"),
        "invalid authority in the request target",
    ),
    (
        "absolute_target_without_host_header",
        _request(line=b"GET http://127.0.0.1/test HTTP/1.1"),
        "missing Host header",
    ),
]


@pytest.mark.parametrize(
    ("data", "reason"),
    [pytest.param(data, reason, id=name) for name, data, reason in MALFORMED],
)
@pytest_twisted.ensureDeferred
async def test_malformed_request_gets_400(serve, logs, data, reason):
    response = await assert_rejected(serve, logs, data, 400)

    if reason is not None:
        assert rejection_reason(logs) == reason
        assert response.body == reason.encode("ascii") + b"\n"


def _echo_target(conn, opts):
    return conn.send_resp(200, f"{conn.host} {conn.port} {conn.request_path}").halt()


@pytest_twisted.ensureDeferred
async def test_absolute_target_replaces_host(serve):
    """
    RFC 9112 section 3.2.2: the target's authority wins over Host.
    """
    port = await serve(_echo_target)
    client = await connect(port)

    client.send(
        _request(b"Host: other.example", line=b"GET HTTP://example.com:81?x=1 HTTP/1.1")
    )
    response = await bounded(client.read_response())

    assert response.status == 200
    assert response.body == b"example.com 81 /"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_options_asterisk_is_served(serve):
    """
    twisted.web's Site answers OPTIONS * itself, before the pipeline, and
    without the Server header that PlugResource leaves out.
    """
    response, client = await request_once(
        serve, _request(HOST, line=b"OPTIONS * HTTP/1.1")
    )

    assert response.status == 200
    assert response.header("server") is None
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_http_2_request_line_gets_505(serve, logs):
    data = b"GET /test HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n"
    await assert_rejected(serve, logs, data, 505)


@pytest_twisted.ensureDeferred
async def test_nothing_after_framing_error_is_parsed(serve, logs):
    """
    A request smuggled behind a framing error never reaches the pipeline.
    """
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    data = _request(
        HOST,
        b"Content-Length: 3",
        b"Transfer-Encoding: chunked",
        body=b"0\r\n\r\n" + smuggled,
    )
    await assert_rejected(serve, logs, data, 400)

    assert logs.with_format("{method} {path}") == []


@pytest_twisted.ensureDeferred
async def test_nothing_after_error_sent_later_is_parsed(serve, logs):
    response, client = await request_once(serve, _request(HOST, b"X-A : 1"))
    client.send(GET)
    await bounded(client.wait_closed())

    assert response.status == 400
    assert client.buffer == b""


@pytest_twisted.ensureDeferred
async def test_http_1_0_without_host_is_served(serve):
    response, client = await request_once(serve, b"GET /test HTTP/1.0\r\n\r\n")
    await bounded(client.wait_closed())

    assert response.status == 404


@pytest_twisted.ensureDeferred
async def test_one_empty_line_before_request_is_ignored(serve):
    """
    RFC 9112 section 2.2: a server should ignore at least one empty line
    received before the request line.
    """
    response, client = await request_once(serve, b"\r\n" + GET)

    assert response.status == 404
    client.transport.loseConnection()


def _tls_client_hello() -> bytes:
    """
    Return the first bytes a TLS client sends: a record with its ClientHello.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


TLS_ON_CLEARTEXT = (
    "the request looks like a TLS handshake, but this port serves cleartext HTTP"
)


@pytest_twisted.ensureDeferred
async def test_tls_client_hello_gets_400_at_once(serve, logs):
    """
    A TLS client on the cleartext port gets 400 before the head timeout.

    The default header timeout of 60 s is longer than bounded() waits.
    """
    hello = _tls_client_hello()
    assert hello[0] == 0x16

    response = await assert_rejected(serve, logs, hello, 400)

    assert rejection_reason(logs) == TLS_ON_CLEARTEXT
    assert response.body == TLS_ON_CLEARTEXT.encode("ascii") + b"\n"


@pytest_twisted.ensureDeferred
async def test_invalid_first_byte_gets_400_at_once(serve, logs):
    await assert_rejected(serve, logs, b"\x80\x01\x02", 400)

    assert rejection_reason(logs) == "invalid first byte of the request line"


@pytest_twisted.ensureDeferred
async def test_tls_client_hello_after_request_gets_400(serve, logs):
    """
    The check also applies to the bytes pipelined after a request.
    """
    response, client = await request_once(serve, GET + _tls_client_hello())
    second = await bounded(client.read_response())
    await bounded(client.wait_closed())

    assert response.status == 404
    assert second.status == 400
    assert second.header("connection") == "close"
    assert rejection_reason(logs) == TLS_ON_CLEARTEXT


@pytest.mark.parametrize(
    "expect",
    [b"Expect: bogus", b"Expect: 100-continue, bogus", b"Expect: 100-continue=1"],
)
@pytest_twisted.ensureDeferred
async def test_unknown_expectation_gets_417(serve, logs, expect):
    """
    RFC 9110 section 10.1.1: 100-continue is the only expectation.
    """
    data = _request(HOST, b"Content-Length: 3", expect, body=b"abc")
    response = await assert_rejected(serve, logs, data, 417)

    assert response.body == b"unsupported Expect header, expected '100-continue'\n"


@pytest.mark.parametrize(
    ("expect", "version"),
    [
        (b"Expect: 100-Continue", b"HTTP/1.1"),
        (b"Expect: 100-continue", b"HTTP/1.0"),
        (b"Expect:", b"HTTP/1.1"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_continue_expectation_is_served(serve, expect, version):
    data = _request(
        HOST,
        b"Content-Length: 3",
        expect,
        line=b"POST /test " + version,
        body=b"abc",
    )
    response, client = await request_once(serve, data)
    if response.status == 100:
        response = await bounded(client.read_response())

    assert response.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_chunked_body_with_trailer_is_served(serve):
    data = _request(
        HOST,
        b"Transfer-Encoding: chunked",
        body=b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-Empty:\r\n\r\n",
    )
    response, client = await request_once(serve, data + GET)
    second = await bounded(client.read_response())

    assert response.status == 404
    assert second.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_valid_chunked_body_is_served(serve):
    data = _request(
        HOST, b"Transfer-Encoding: chunked", body=b"3;ext=1\r\nabc\r\n0\r\n\r\n"
    )
    response, client = await request_once(serve, data + GET)
    second = await bounded(client.read_response())

    assert response.status == 404
    assert second.status == 404
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_obs_text_in_value_is_served(serve):
    """
    Bytes 0x80-0xFF are obs-text, which RFC 9110 section 5.5 allows in values.
    """
    response, client = await request_once(serve, _request(HOST, b"X-A: caf\xe9 \x85"))

    assert response.status == 404
    client.transport.loseConnection()


@pytest.mark.parametrize("byte", [0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85])
@pytest_twisted.ensureDeferred
async def test_line_break_in_upgrade_header_gets_400(serve, logs, byte):
    """
    A header value that Autobahn would split in two never reaches the hand-off.

    The channel rejects the control characters; 0x85 is valid obs-text for
    HTTP, and the WebSocket bridge rejects it before replaying the request.
    """
    extra = "X-Split: a" + chr(byte) + "Sec-WebSocket-Protocol: evil\r\n"
    response, client = await request_once(serve, upgrade_request(extra=extra))
    await bounded(client.wait_closed())

    assert response.status == 400
    assert response.header("connection") == "close"
    assert response.header("upgrade") is None
    assert client.buffer == b""


@pytest_twisted.ensureDeferred
async def test_connection_close_among_tokens_closes(serve):
    """
    twisted.web splits Connection on spaces, which misses "keep-alive,close".
    """
    response, client = await request_once(
        serve, _request(HOST, b"Connection: keep-alive,close")
    )
    await bounded(client.wait_closed())

    assert response.header("connection") == "close"


@pytest_twisted.ensureDeferred
async def test_connection_close_in_second_header_closes(serve):
    response, client = await request_once(
        serve, _request(HOST, b"Connection: keep-alive", b"Connection: close")
    )
    await bounded(client.wait_closed())

    assert response.header("connection") == "close"


# Options from the command line


def test_twistd_options_set_http_options():
    from twisted.plugins.desperados_plugin import Options, service_maker

    options = Options()
    options.parseOptions(
        [
            "--max-header-count=7",
            "--max-head-size=4096",
            "--max-requests=3",
            "--max-connections=none",
            "--header-timeout=none",
            "--body-timeout=2.5",
            "--tls-handshake-timeout=3",
        ]
    )
    service = service_maker.makeService(options, reactor=MemoryReactor())

    assert service.site.http_options == HTTPOptions(
        max_header_count=7,
        max_head_size=4096,
        max_requests=3,
        max_connections=None,
        header_timeout=None,
        body_timeout=2.5,
        tls_handshake_timeout=3.0,
    )
    assert service.site.timeOut == 60.0
    assert service.site.connection_limit.tls_handshake_timeout == 3.0


def test_twistd_defaults_are_http_options_defaults():
    from twisted.plugins.desperados_plugin import Options

    options = Options()
    options.parseOptions([])

    assert options["http-options"] == HTTPOptions()


@pytest.mark.parametrize(
    "argument",
    [
        "--max-header-count=0",
        "--max-header-length=none",
        "--max-requests=-1",
        "--max-connections=many",
        "--keepalive-timeout=0",
        "--linger-timeout=none",
        "--tls-handshake-timeout=0",
    ],
)
def test_twistd_invalid_limit_is_usage_error(argument):
    from twisted.plugins.desperados_plugin import Options

    with pytest.raises(UsageError, match=argument.split("=")[0]):
        Options().parseOptions([argument])


# In memory, with a Clock


def _never_answer(conn, opts):
    return Deferred()


def _connect_in_memory(
    plug: object = "desperados.plugs.Default", **options: object
) -> tuple[object, StringTransport, Clock]:
    clock = Clock()
    site = make_site(plug, reactor=clock, http_options=HTTPOptions(**options))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8082),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
    )
    protocol = site.buildProtocol(transport.getPeer())
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol._channel, transport, clock


def test_paused_body_timeout_does_not_fire():
    channel, transport, clock = _connect_in_memory(_never_answer, body_timeout=1.0)
    channel.dataReceived(_request(HOST, b"Content-Length: 10", body=b"abc"))

    channel.pause_body_timeout()
    clock.advance(5.0)
    paused_output = transport.value()
    channel.resume_body_timeout()
    clock.advance(0.5)
    resumed_output = transport.value()
    clock.advance(0.6)

    assert paused_output == b""
    assert resumed_output == b""
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_deadline_after_response_started_only_closes():
    """
    A 408 cannot follow a response that has started: the channel only closes.
    """
    channel, transport, clock = _connect_in_memory(_never_answer, body_timeout=1.0)
    channel.dataReceived(_request(HOST, b"Content-Length: 10", body=b"abc"))
    channel.requests[-1].startedWriting = True

    clock.advance(1.5)

    assert transport.value() == b""
    assert transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_pipelined_error_after_valid_request(serve, logs):
    """
    A valid request keeps its response when the next one in the same
    packet is malformed; the connection closes after the 400.
    """
    response, client = await request_once(serve, GET + _request(HOST, b"X-A : 1"))
    rejected = await bounded(client.read_response())
    await bounded(client.wait_closed())

    assert response.status == 404
    assert rejected.status == 400
    assert rejected.header("connection") == "close"
    assert client.buffer == b""
    assert rejection_reason(logs) == "whitespace before the colon in a header field"
