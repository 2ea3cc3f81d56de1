"""
Request bodies over real loopback sockets: read_body, 413, 100-continue,
unread bodies on keep-alive connections.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
from support import connect, upgrade_request
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred

from desperados.errors import ClientDisconnectedError
from desperados.request import DISCARD_LIMIT

pytestmark = pytest.mark.usefixtures("both_http1_paths")


async def _digest_body(conn, opts):
    """
    Read the whole body through read_body; answer with its size, the number
    of reads and its SHA-256.
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


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


def _chunked(parts: list[bytes]) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return encoded + b"0\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_pipeline_runs_before_body_arrives(serve):
    started: Deferred = Deferred()
    port = await serve(_digest_body, {"started": started})
    client = await connect(port)
    body = b"x" * 100_000

    client.send(
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    conn = await started
    client.send(body)
    response = await client.read_response()
    client.transport.loseConnection()

    assert conn.request_path == "/upload"
    assert response.status == 200
    size, _, digest = response.body.decode().split()
    assert int(size) == len(body)
    assert digest == hashlib.sha256(body).hexdigest()


@pytest_twisted.ensureDeferred
async def test_read_body_length_caps_each_read(serve):
    port = await serve(_digest_body, {"length": 1000})
    client = await connect(port)
    body = bytes(range(256)) * 20

    client.send(_post("/", body))
    response = await client.read_response()
    client.transport.loseConnection()

    size, reads, digest = response.body.decode().split()
    assert int(size) == len(body)
    assert int(reads) >= len(body) // 1000
    assert digest == hashlib.sha256(body).hexdigest()


@pytest_twisted.ensureDeferred
async def test_chunked_body_is_streamed(serve):
    port = await serve(_digest_body)
    client = await connect(port)
    parts = [b"first", b"-second-", b"x" * 70_000]

    client.send(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked(parts)
    )
    response = await client.read_response()
    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    after = await client.read_response()
    client.transport.loseConnection()

    size, _, digest = response.body.decode().split()
    assert int(size) == sum(map(len, parts))
    assert digest == hashlib.sha256(b"".join(parts)).hexdigest()
    assert after.status == 200
    assert after.body.startswith(b"0 1 ")


@pytest_twisted.ensureDeferred
async def test_get_without_body_reads_empty(serve):
    port = await serve(_digest_body)
    client = await connect(port)

    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await client.read_response()
    client.transport.loseConnection()

    assert response.body == f"0 1 {hashlib.sha256(b'').hexdigest()}".encode()


@pytest_twisted.ensureDeferred
async def test_content_length_over_limit_gets_413(serve, logs):
    called = []

    def plug(conn, opts):
        called.append(conn)
        return conn.send_resp(200, b"should not run")

    port = await serve(plug, max_body_size=1000)
    client = await connect(port)

    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1001\r\n\r\n")
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 413
    assert response.header("connection") == "close"
    assert response.body == b"request body larger than the maximum of 1000 bytes"
    assert called == []
    rejected = logs.with_format("rejected {method} {path}")
    assert len(rejected) == 1
    assert rejected[0]["status"] == 413


@pytest_twisted.ensureDeferred
async def test_content_length_at_limit_is_read(serve):
    port = await serve(_digest_body, max_body_size=1000)
    client = await connect(port)

    client.send(_post("/", b"y" * 1000))
    response = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.body.startswith(b"1000 ")


@pytest_twisted.ensureDeferred
async def test_chunked_body_past_limit_gets_413(serve, logs):
    port = await serve(_digest_body, max_body_size=1000)
    client = await connect(port)

    client.send(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked([b"a" * 600, b"b" * 600])
    )
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 413
    assert response.header("connection") == "close"
    rejected = logs.with_format("rejected {method} {path}")
    assert [event["status"] for event in rejected] == [413]


@pytest_twisted.ensureDeferred
async def test_continue_sent_when_plug_reads(serve):
    port = await serve(_digest_body)
    client = await connect(port)

    client.send(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    interim = await client.read_response()
    client.send(b"hello")
    response = await client.read_response()
    client.transport.loseConnection()

    assert interim.status == 100
    assert interim.version == "HTTP/1.1"
    assert response.status == 200
    assert response.body.startswith(b"5 ")


@pytest_twisted.ensureDeferred
async def test_no_continue_when_plug_ignores_body(serve):
    port = await serve(_ignore_body)
    client = await connect(port)

    client.send(
        b"POST /skip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    response = await client.read_response()
    await client.wait_closed()

    # The client may never send a body it was not asked for, so the
    # connection closes instead of waiting for it.
    assert response.status == 200
    assert response.body == b"ignored /skip"
    assert response.header("connection") == "close"
    assert client.buffer == b""


@pytest_twisted.ensureDeferred
async def test_unread_body_is_skipped_on_keep_alive(serve):
    port = await serve(_ignore_body)
    client = await connect(port)
    body = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 10

    client.send(_post("/first", body) + b"GET /second HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await client.read_response()
    second = await client.read_response()
    client.transport.loseConnection()

    assert first.body == b"ignored /first"
    assert first.header("connection") is None
    assert second.body == b"ignored /second"


@pytest_twisted.ensureDeferred
async def test_unread_body_arriving_late_is_skipped(serve):
    port = await serve(_ignore_body)
    client = await connect(port)
    body = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 100

    client.send(
        b"POST /first HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    first = await client.read_response()
    client.send(body + b"GET /second HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    second = await client.read_response()
    client.transport.loseConnection()

    assert first.body == b"ignored /first"
    assert second.body == b"ignored /second"


@pytest_twisted.ensureDeferred
async def test_large_unread_body_closes_connection(serve):
    port = await serve(_ignore_body, max_body_size=None)
    client = await connect(port)
    length = DISCARD_LIMIT + 1

    client.send(
        b"POST /big HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % length
    )
    response = await client.read_response()
    await client.wait_closed()

    assert response.body == b"ignored /big"
    assert response.header("connection") == "close"


@pytest_twisted.ensureDeferred
async def test_unread_chunked_body_past_discard_limit_closes(serve):
    port = await serve(_ignore_body, max_body_size=None)
    client = await connect(port)

    client.send(b"POST /big HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    response = await client.read_response()
    chunks = [b"z" * 65536] * (DISCARD_LIMIT // 65536 + 2)
    client.send(_chunked(chunks)[: -len(b"0\r\n\r\n")])
    await client.wait_closed()

    assert response.body == b"ignored /big"
    assert client.closed


@pytest_twisted.ensureDeferred
async def test_read_timeout_gets_408(serve, logs):
    async def slow_reader(conn, opts):
        while (await conn.read_body(timeout=0.05)).more:
            pass
        return conn.send_resp(200, b"unexpected")

    port = await serve(slow_reader)
    client = await connect(port)

    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n12345")
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 408
    assert response.header("connection") == "close"
    rejected = logs.with_format("rejected {method} {path}")
    assert [event["status"] for event in rejected] == [408]


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_body_is_not_an_error(serve, logs):
    failed: Deferred = Deferred()

    async def reader(conn, opts):
        try:
            while (await conn.read_body())[1]:
                pass
        except ClientDisconnectedError as error:
            failed.callback(error)
            raise
        return conn.send_resp(200, b"unexpected")

    port = await serve(reader)
    client = await connect(port)

    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nabc")
    client.transport.loseConnection()
    error = await failed

    assert isinstance(error, ClientDisconnectedError)
    assert not [event for event in logs.events if event.get("log_failure")]
    assert not [
        event
        for event in logs.events
        if event.get("log_level") is not None and event["log_level"].name in ("error", "critical")
    ]


@pytest_twisted.ensureDeferred
async def test_upgrade_with_body_gets_400(serve):
    port = await serve()
    client = await connect(port)

    client.send(upgrade_request("/chat")[:-2] + b"Content-Length: 3\r\n\r\nab")
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 400
    assert response.body == b"a WebSocket upgrade request must not have a body"
    assert response.header("connection") == "close"


@pytest_twisted.ensureDeferred
async def test_chunk_size_past_limit_gets_413_at_once(serve, logs):
    """
    A chunk-size line that alone would exceed the limit gets 413 before any
    of the chunk's bytes arrive.
    """
    port = await serve(_digest_body, max_body_size=1000)
    client = await connect(port)

    client.send(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"258\r\n"
        + b"a" * 600
        + b"\r\n191\r\n"
    )
    response = await ensureDeferred(client.read_response()).addTimeout(10, reactor)
    await client.wait_closed()

    assert response.status == 413
    assert response.header("connection") == "close"
    assert response.body == (
        b"a chunk of 401 bytes would make the request body larger than the "
        b"maximum of 1000 bytes"
    )
    rejected = logs.with_format("rejected {method} {path}")
    assert [event["status"] for event in rejected] == [413]


@pytest_twisted.ensureDeferred
async def test_chunks_up_to_limit_are_read(serve):
    port = await serve(_digest_body, max_body_size=1000)
    client = await connect(port)

    client.send(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked([b"a" * 600, b"b" * 400])
    )
    response = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.body.startswith(b"1000 ")
