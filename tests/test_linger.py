"""
Closing a connection after its last response without a TCP reset.

A client that sends more bytes before it has read a closing response must
still get the whole response: the server half-closes, reads and discards
what arrives, and aborts only a client that neither reads nor closes.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from http2_support import connect_raw_tls
from support import RawClient, connect
from twisted.internet import reactor
from twisted.internet.task import deferLater

from desperados import HTTPOptions

pytestmark = pytest.mark.usefixtures("both_http1_paths")

BIG = b"x" * 4_000_000

CLOSING_REQUESTS = [
    b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"GET /big HTTP/1.0\r\n\r\n",
]


def _big(conn, opts):
    conn.put_resp_header("content-type", "application/octet-stream")
    return conn.send_resp(200, BIG)


def _small(conn, opts):
    return conn.send_resp(200, b"small")


async def _pause() -> None:
    await deferLater(reactor, 0.3, lambda: None)


async def _send_more_before_reading(client: RawClient, request: bytes) -> None:
    """
    Send C{request}, then a second request before reading the response.
    """
    client.transport.pauseProducing()
    client.send(request)
    await _pause()
    client.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    await _pause()
    client.transport.resumeProducing()


@pytest.mark.parametrize("request_bytes", CLOSING_REQUESTS)
@pytest_twisted.ensureDeferred
async def test_closing_response_arrives_whole(serve, request_bytes):
    # The client reads nothing for longer than the linger timeout.
    port = await serve(_big, http_options=HTTPOptions(linger_timeout=0.2))
    client = await connect(port)

    await _send_more_before_reading(client, request_bytes)
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 200
    assert len(response.body) == len(BIG)
    assert client.buffer == b""


@pytest_twisted.ensureDeferred
async def test_closing_response_arrives_whole_over_tls(serve, tls_files):
    port = await serve(
        _big,
        scheme="https",
        certfile=tls_files.certfile,
        keyfile=tls_files.keyfile,
        http_options=HTTPOptions(linger_timeout=0.2),
    )
    client = await connect_raw_tls(port, tls_files, [b"http/1.1"])

    await _send_more_before_reading(client, CLOSING_REQUESTS[0])
    response = await client.read_response()
    client.transport.loseConnection()
    await client.wait_closed()

    assert response.status == 200
    assert len(response.body) == len(BIG)


@pytest_twisted.ensureDeferred
async def test_client_that_never_closes_is_aborted(serve):
    port = await serve(_small, http_options=HTTPOptions(linger_timeout=0.2))
    client = await connect(port)

    client.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    response = await client.read_response()
    # The server has sent FIN, but this client keeps its side open.
    await client.wait_closed()

    assert response.status == 200
    assert response.body == b"small"


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_is_aborted(serve, logs):
    options = HTTPOptions(linger_timeout=0.2, keepalive_timeout=0.5)
    port = await serve(_big, http_options=options)
    client = await connect(port)

    client.transport.pauseProducing()
    client.send(CLOSING_REQUESTS[0])
    # Longer than the keep-alive timeout plus two linger timeouts.
    await deferLater(reactor, 1.5, lambda: None)
    client.transport.resumeProducing()
    await client.wait_closed()

    assert client.buffer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(client.buffer) < len(BIG)
    assert logs.with_format("aborting the closing connection")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 20_000 + b"\r\n\r\n", 431),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_response_arrives_whole(serve, request_bytes, status):
    port = await serve(_small)
    client = await connect(port)

    client.transport.pauseProducing()
    client.send(request_bytes)
    await _pause()
    client.send(b"more bytes that nobody reads\r\n" * 1000)
    await _pause()
    client.transport.resumeProducing()
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == status
    assert response.header("connection") == "close"
    assert len(response.body) == int(response.header("content-length"))
