"""
desperados.testing: Conns built in memory, plugs run on them, responses recorded.
"""

from __future__ import annotations

import gzip
import zlib

import pytest
import pytest_twisted
from support import upgrade_request
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from desperados import Builder, testing
from desperados.endpoints import HTTP, Echo
from desperados.plugs import Websocket


def _hello(conn, opts):
    return conn.send_resp(200, f"hello {opts}").halt()


def test_conn_splits_path_and_query():
    conn = testing.conn("get", "/users/a%20b/7?tab=posts&x=1")

    assert conn.method == "GET"
    assert conn.request_path == "/users/a%20b/7"
    assert conn.path_info == ["users", "a b", "7"]
    assert conn.query_string == "tab=posts&x=1"
    assert conn.get_req_header("host") == ["www.example.com"]
    assert conn.port == 80


def test_conn_takes_headers_as_mapping_or_pairs():
    from_mapping = testing.conn(headers={"Accept": "text/html"})
    from_pairs = testing.conn(headers=[("X-A", "1"), ("x-a", "2"), ("Host", "h")])

    assert from_mapping.get_req_header("accept") == ["text/html"]
    assert from_pairs.get_req_header("x-a") == ["1", "2"]
    assert from_pairs.get_req_header("host") == ["h"]


def test_conn_https_port_and_body():
    conn = testing.conn("POST", "/", "héllo", scheme="https")

    assert conn.port == 443
    assert conn.adapter.request_body == "héllo".encode()


def test_call_sync_runs_plug_with_opts():
    conn = testing.call_sync(_hello, testing.conn(), "world")
    response = testing.sent(conn)

    assert conn.state == "sent"
    assert conn.halted
    assert response.status == 200
    assert response.body == b"hello world"
    assert response.header("content-length") == "11"


def test_call_sync_sends_stored_response():
    def stores(conn, opts):
        return conn.resp(201, "stored")

    conn = testing.call_sync(stores, testing.conn())

    assert conn.state == "sent"
    assert testing.sent(conn).status == 201
    assert testing.sent(conn).body == b"stored"


def test_call_sync_keeps_assigns_of_pipeline():
    def first(conn, opts):
        return conn.assign("user", "ada")

    conn = testing.call_sync(Builder([first, HTTP]), testing.conn("GET", "/x"))

    assert conn.assigns == {"user": "ada"}
    assert testing.sent(conn).status == 404


def test_call_sync_raises_plug_error():
    def raising(conn, opts):
        raise RuntimeError("plug failed on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        testing.call_sync(raising, testing.conn())


def test_call_sync_rejects_waiting_plug():
    def waiting(conn, opts):
        return Deferred()

    with pytest.raises(RuntimeError, match="still waiting"):
        testing.call_sync(waiting, testing.conn())


def test_call_sync_rejects_non_conn_result():
    with pytest.raises(TypeError, match="expected a Conn"):
        testing.call_sync(lambda conn, opts: None, testing.conn())


@pytest_twisted.ensureDeferred
async def test_call_waits_for_deferred_and_coroutine():
    def deferred_plug(conn, opts):
        return deferLater(reactor, 0, lambda: conn.assign("deferred", True))

    async def coroutine_plug(conn, opts):
        await deferLater(reactor, 0, lambda: None)
        return conn.send_resp(200, "late")

    conn = await testing.call(Builder([deferred_plug, coroutine_plug]), testing.conn())

    assert conn.assigns["deferred"] is True
    assert testing.sent(conn).body == b"late"


def test_sent_without_response_says_so():
    conn = testing.call_sync(lambda conn, opts: conn, testing.conn())

    with pytest.raises(ValueError, match="no response was sent; the Conn is 'unset'"):
        testing.sent(conn)


def test_upgraded_after_websocket_route():
    head = upgrade_request("/chat").decode("latin-1").split("\r\n")[1:]
    headers = [tuple(line.split(": ", 1)) for line in head if line]
    pipeline = Builder(
        [Websocket, ("desperados.endpoints.Websocket", {"handler": Echo()})]
    )

    upgraded = testing.call_sync(
        pipeline, testing.conn("GET", "/chat", headers=headers)
    )
    plain = testing.call_sync(pipeline, testing.conn("GET", "/chat"))

    assert testing.upgraded(upgraded)
    assert upgraded.halted
    assert not testing.upgraded(plain)


def test_head_is_sent_without_body():
    conn = testing.call_sync(HTTP, testing.conn("HEAD", "/"))
    response = testing.sent(conn)

    assert response.status == 404
    assert response.header("content-length") == "9"
    assert response.body == b""


# Streaming helpers in memory.


async def _echo_body(conn, opts):
    parts = []
    more = True
    while more:
        data, more = await conn.read_body(length=4)
        parts.append(data)
    return conn.send_resp(200, b"|".join(parts))


def test_read_body_returns_parts():
    conn = testing.call_sync(_echo_body, testing.conn("POST", "/", b"0123456789"))

    assert testing.sent(conn).body == b"0123|4567|89"


def test_read_body_empty():
    conn = testing.call_sync(_echo_body, testing.conn("POST", "/"))

    assert testing.sent(conn).body == b""


def test_read_body_rejects_bad_length():
    conn = testing.conn("POST", "/", b"data")

    with pytest.raises(ValueError, match="length of 1 or more"):
        conn.read_body(length=0)


async def _stream(conn, opts):
    conn.put_resp_content_type("text/plain")
    conn.send_chunked(200)
    for part in opts:
        await conn.chunk(part)
    return conn


def test_chunked_response_recorded():
    conn = testing.call_sync(_stream, testing.conn(), [b"one ", b"", "two"])
    response = testing.sent(conn)

    assert response.status == 200
    assert response.chunks == [b"one ", b"two"]
    assert response.body == b"one two"
    assert response.finished
    assert response.header("content-length") is None


def test_chunked_response_compressed():
    request = testing.conn(headers={"accept-encoding": "gzip"})
    parts = [b"first part\n" * 20, b"second part\n" * 20]

    conn = testing.call_sync(_stream, request, parts)
    response = testing.sent(conn)
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    first = reader.decompress(response.chunks[0])

    assert response.header("content-encoding") == "gzip"
    assert response.header("vary") == "accept-encoding"
    assert first == parts[0]
    assert gzip.decompress(response.body) == b"".join(parts)


def test_chunked_head_has_no_body():
    conn = testing.call_sync(_stream, testing.conn("HEAD", "/"), [b"hidden"])

    assert testing.sent(conn).body == b""
    assert testing.sent(conn).chunks == []


def test_send_file_range(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(100)))

    def plug(conn, opts):
        return conn.send_file(206, path, offset=10, length=5)

    conn = testing.call_sync(plug, testing.conn(headers={"accept-encoding": "gzip"}))
    response = testing.sent(conn)

    assert response.status == 206
    assert response.body == bytes(range(10, 15))
    assert response.header("content-length") == "5"
    assert response.header("content-encoding") is None


def test_inform_recorded():
    def plug(conn, opts):
        conn.inform(103, [("Link", "</style.css>; rel=preload")])
        return conn.send_resp(200, "page")

    conn = testing.call_sync(plug, testing.conn())

    assert conn.adapter.informational == [
        (103, [("link", "</style.css>; rel=preload")])
    ]
    assert testing.sent(conn).status == 200
