"""
HTTP/2 over real loopback sockets, with the h2 package as the client.

Each behaviour runs over cleartext with prior knowledge and over TLS with
ALPN, because the two paths reach HTTP/2 through different code.
"""

from __future__ import annotations

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
from twisted.internet.task import deferLater

from desperados.http2 import H2Connection

BIG_BODY = bytes(range(256)) * 800  # 204,800 bytes: several windows' worth


def _describe(conn, opts):
    """
    Answer with the request fields that depend on the protocol.
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
