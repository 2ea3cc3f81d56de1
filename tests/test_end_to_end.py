"""
The default pipeline over real loopback sockets: 404, WebSocket echo, errors.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from support import (
    close_payload,
    connect,
    expected_accept,
    open_websocket,
    upgrade_request,
    websocket_key,
)

from desperados import Builder
from desperados.plugs import Inspect

pytestmark = pytest.mark.usefixtures("both_http1_paths")

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


@pytest_twisted.ensureDeferred
async def test_get_answers_404_and_keeps_alive(serve):
    port = await serve()
    client = await connect(port)

    client.send(b"GET /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await client.read_response()
    client.send(b"GET /other/path?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    second = await client.read_response()

    assert first.status == 404
    assert first.body == b"not found"
    assert first.header("content-length") == "9"
    assert first.header("date") is not None
    assert first.header("cache-control") == "max-age=0, private, must-revalidate"
    assert first.header("server") is None
    assert second.status == 404
    assert second.body == b"not found"
    assert not client.closed
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_head_has_headers_without_body(serve):
    port = await serve()
    client = await connect(port)

    client.send(b"HEAD /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await client.read_response(head_only=True)
    client.send(b"GET /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    after = await client.read_response()

    assert response.status == 404
    assert response.header("content-length") == "9"
    assert after.body == b"not found"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_websocket_echoes_text_and_binary(serve):
    port = await serve()
    key = websocket_key()
    client = await connect(port)

    client.send(upgrade_request("/test", key=key))
    response = await client.read_response()
    client.send_frame(TEXT, b"test")
    text = await client.read_frame()
    client.send_frame(BINARY, b"\x00\xff\x10")
    binary = await client.read_frame()
    client.send_frame(TEXT, b"ping\n")
    pong = await client.read_frame()
    client.send_frame(CLOSE, close_payload(1000))
    closing = await client.read_frame()
    await client.wait_closed()

    assert response.status == 101
    assert response.header("sec-websocket-accept") == expected_accept(key)
    assert text == (TEXT, b"test")
    assert binary == (BINARY, b"\x00\xff\x10")
    assert pong == (TEXT, b"pong\n")
    assert closing == (CLOSE, close_payload(1000))


@pytest_twisted.ensureDeferred
async def test_upgrade_token_is_case_insensitive(serve):
    port = await serve()
    client = await connect(port)

    client.send(upgrade_request("/any/path", upgrade="WebSocket"))
    response = await client.read_response()
    client.send_frame(TEXT, b"hello")
    frame = await client.read_frame()

    assert response.status == 101
    assert frame == (TEXT, b"hello")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_partial_upgrade_headers_get_404(serve):
    port = await serve()
    key = websocket_key()
    partial_heads = [
        "Upgrade: websocket\r\n",
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        f"Upgrade: websocket\r\nSec-WebSocket-Key: {key}\r\n",
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n",
    ]

    for headers in partial_heads:
        client = await connect(port)
        client.send(
            f"GET /test HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
            f"{headers}\r\n".encode()
        )
        response = await client.read_response()
        client.transport.loseConnection()

        assert response.status == 404, headers
        assert response.body == b"not found", headers


@pytest_twisted.ensureDeferred
async def test_pipeline_without_response_gives_500(serve, logs):
    port = await serve(Builder([Inspect]))
    client = await connect(port)

    client.send(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 500
    assert response.header("connection") == "close"
    assert response.body == b"internal server error"
    errors = logs.with_format("no response was set or sent")
    assert len(errors) == 1
    assert errors[0]["method"] == "GET"
    assert errors[0]["path"] == "/nothing"
    assert logs.with_format("{conn!r}")


def _raising_plug(conn, opts):
    if conn.request_path == "/boom":
        raise RuntimeError("plug failed on purpose")
    return conn.send_resp(200, b"fine").halt()


@pytest_twisted.ensureDeferred
async def test_raising_plug_gives_500_then_serves(serve, logs):
    port = await serve(_raising_plug)

    failing = await connect(port)
    failing.send(b"GET /boom HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    failed = await failing.read_response()
    await failing.wait_closed()
    working = await connect(port)
    working.send(b"GET /fine HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    fine = await working.read_response()
    working.transport.loseConnection()

    assert failed.status == 500
    assert failed.header("connection") == "close"
    assert b"plug failed" not in failed.body
    assert fine.status == 200
    assert fine.body == b"fine"
    failures = [event for event in logs.events if event.get("log_failure")]
    assert len(failures) == 1
    assert isinstance(failures[0]["log_failure"].value, RuntimeError)
    failures[0]["log_failure"].cleanFailure()
    # The failure was logged, not left unhandled.
    for event in failures:
        event["log_failure"].trap(RuntimeError)


@pytest_twisted.ensureDeferred
async def test_websocket_on_any_path(serve):
    port = await serve()

    client, response = await open_websocket(port, "/deeply/nested/path?query=1")
    client.send_frame(TEXT, "héllo".encode())
    frame = await client.read_frame()
    client.transport.loseConnection()

    assert response.status == 101
    assert frame == (TEXT, "héllo".encode())


def _status_from_path(conn, opts):
    return conn.send_resp(int(conn.path_info[0]), "").halt()


@pytest_twisted.ensureDeferred
async def test_status_codes_get_their_reason_phrase(serve):
    port = await serve(_status_from_path)
    client = await connect(port)
    reasons = {}
    for status in (421, 422, 425, 426, 428, 429, 431, 451, 511):
        client.send(b"GET /%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % status)
        response = await client.read_response()
        reasons[response.status] = response.reason
    client.transport.loseConnection()

    assert reasons == {
        421: "Misdirected Request",
        422: "Unprocessable Content",
        425: "Too Early",
        426: "Upgrade Required",
        428: "Precondition Required",
        429: "Too Many Requests",
        431: "Request Header Fields Too Large",
        451: "Unavailable For Legal Reasons",
        511: "Network Authentication Required",
    }
