"""
Streamed responses over real loopback sockets: chunked bodies, file ranges,
informational (1xx) responses.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from http2_support import connect_h2
from support import connect
from twisted.internet.defer import Deferred

from desperados import Conn
from desperados.errors import AlreadySentError, ClientDisconnectedError

pytestmark = pytest.mark.usefixtures("both_http1_paths")


async def _stream_parts(conn, opts):
    conn.put_resp_header("content-type", "text/plain")
    conn.send_chunked(200)
    for part in (b"one,", b"two,", b"", "three"):
        await conn.chunk(part)
    return conn.halt()


def _get(path: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    return f"{method} {path} {version}\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_chunked_response_streams_parts(serve):
    port = await serve(_stream_parts)
    client = await connect(port)

    client.send(_get("/"))
    response = await client.read_response()
    client.send(_get("/again"))
    again = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("content-length") is None
    assert response.header("content-type") == "text/plain"
    assert response.body == b"one,two,three"
    assert again.body == b"one,two,three"


@pytest_twisted.ensureDeferred
async def test_large_chunked_response_arrives_whole(serve):
    part = bytes(range(256)) * 1024

    async def stream(conn, opts):
        conn.send_chunked(200)
        for _ in range(16):
            await conn.chunk(part)
        return conn

    port = await serve(stream)
    client = await connect(port)

    client.send(_get("/"))
    response = await client.read_response()
    client.transport.loseConnection()

    assert response.body == part * 16


@pytest_twisted.ensureDeferred
async def test_head_with_chunked_response_has_no_body(serve):
    port = await serve(_stream_parts)
    client = await connect(port)

    client.send(_get("/", method="HEAD"))
    response = await client.read_response(head_only=True)
    client.send(_get("/after"))
    after = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.header("content-type") == "text/plain"
    assert after.status == 200
    assert after.body == b"one,two,three"


@pytest_twisted.ensureDeferred
async def test_http10_chunked_response_ends_with_close(serve):
    port = await serve(_stream_parts)
    client = await connect(port)

    client.send(_get("/", version="HTTP/1.0"))
    response = await client.read_response()

    assert response.header("transfer-encoding") is None
    assert response.body == b"one,two,three"
    assert client.closed


@pytest_twisted.ensureDeferred
async def test_chunk_after_client_left_raises(serve, logs):
    outcome: Deferred = Deferred()
    sent_head: Deferred = Deferred()

    async def stream(conn, opts):
        conn.send_chunked(200)
        await conn.chunk(b"first")
        sent_head.callback(None)
        closed: Deferred = Deferred()
        conn.adapter.request.notifyFinish().addBoth(lambda _: closed.callback(None))
        await closed
        try:
            await conn.chunk(b"late")
        except ClientDisconnectedError as error:
            outcome.callback(error)
            raise
        outcome.callback(None)
        return conn

    port = await serve(stream)
    client = await connect(port)

    client.send(_get("/"))
    await sent_head
    client.transport.loseConnection()
    error = await outcome

    assert isinstance(error, ClientDisconnectedError)
    assert "closed the connection" in str(error)
    assert not [event for event in logs.events if event.get("log_failure")]


def test_chunk_without_send_chunked_raises():
    conn = Conn()

    with pytest.raises(ValueError, match="expected a chunked response"):
        conn.chunk(b"data")


def test_chunk_after_send_resp_raises():
    conn = Conn().send_resp(200, b"done")

    with pytest.raises(AlreadySentError, match="expected a chunked response"):
        conn.chunk(b"data")


def test_send_resp_after_send_chunked_raises():
    conn = Conn().send_chunked(200)

    with pytest.raises(AlreadySentError):
        conn.send_resp(200, b"again")


# send_file


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    return path


def _file_plug(conn, opts):
    """
    Send the file C{opts}, or the range given as C{?offset=N&length=M}.
    """
    fields = dict(pair.split("=") for pair in conn.query_string.split("&") if pair)
    offset = int(fields.get("offset", 0))
    length = int(fields["length"]) if "length" in fields else None
    return conn.send_file(200, opts, offset, length).halt()


@pytest_twisted.ensureDeferred
async def test_send_file_sends_whole_file(serve, data_file):
    port = await serve(_file_plug, data_file)
    client = await connect(port)

    client.send(_get("/"))
    response = await client.read_response()
    client.send(_get("/again"))
    again = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.header("content-length") == str(data_file.stat().st_size)
    assert response.body == data_file.read_bytes()
    assert again.body == data_file.read_bytes()


@pytest_twisted.ensureDeferred
async def test_send_file_sends_range(serve, data_file):
    port = await serve(_file_plug, data_file)
    client = await connect(port)
    content = data_file.read_bytes()

    client.send(_get("/?offset=1000&length=70000"))
    middle = await client.read_response()
    client.send(_get("/?offset=255000"))
    tail = await client.read_response()
    client.send(_get("/?offset=10&length=0"))
    empty = await client.read_response()
    client.transport.loseConnection()

    assert middle.header("content-length") == "70000"
    assert middle.body == content[1000:71000]
    assert tail.body == content[255000:]
    assert empty.header("content-length") == "0"
    assert empty.body == b""


@pytest_twisted.ensureDeferred
async def test_send_file_head_has_length_only(serve, data_file):
    port = await serve(_file_plug, data_file)
    client = await connect(port)

    client.send(_get("/", method="HEAD"))
    response = await client.read_response(head_only=True)
    client.send(_get("/?offset=0&length=3"))
    after = await client.read_response()
    client.transport.loseConnection()

    assert response.header("content-length") == str(data_file.stat().st_size)
    assert after.body == b"\x00\x01\x02"


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, None), (256_001, None), (0, 256_001), (255_000, 1001), (0, -1)],
)
def test_send_file_rejects_range_outside_file(data_file, offset, length):
    conn = Conn()

    with pytest.raises(ValueError, match="expected a"):
        conn.send_file(200, data_file, offset, length)

    assert conn.state == "unset"


def test_send_file_missing_file_raises(tmp_path):
    conn = Conn()

    with pytest.raises(FileNotFoundError):
        conn.send_file(200, tmp_path / "missing")

    assert conn.state == "unset"


# inform


def _early_hints(conn, opts):
    conn.inform(103, [("Link", "</style.css>; rel=preload; as=style")])
    return conn.send_resp(200, b"page").halt()


@pytest_twisted.ensureDeferred
async def test_inform_sends_early_hints_before_response(serve):
    port = await serve(_early_hints)
    client = await connect(port)

    client.send(_get("/"))
    hints = await client.read_response()
    response = await client.read_response()
    client.transport.loseConnection()

    assert hints.status == 103
    assert hints.reason == "Early Hints"
    assert hints.header("link") == "</style.css>; rel=preload; as=style"
    assert response.status == 200
    assert response.body == b"page"


@pytest_twisted.ensureDeferred
async def test_inform_skipped_for_http10(serve):
    port = await serve(_early_hints)
    client = await connect(port)

    client.send(_get("/", version="HTTP/1.0"))
    response = await client.read_response()

    assert response.status == 200
    assert response.body == b"page"


@pytest.mark.parametrize("status", [99, 101, 200, "103"])
def test_inform_rejects_non_informational_status(status):
    with pytest.raises(ValueError, match="informational status"):
        Conn().inform(status)


def test_inform_after_send_raises():
    conn = Conn().send_resp(200, b"done")

    with pytest.raises(AlreadySentError):
        conn.inform(103)


# The same helpers over HTTP/2 (cleartext, prior knowledge)


@pytest_twisted.ensureDeferred
async def test_http2_early_hints_then_response(serve):
    port = await serve(_early_hints)
    client = await connect_h2(port)

    stream_id = client.request("/")
    response = await client.response(stream_id)
    client.transport.loseConnection()

    [hints] = response.informational
    assert (b":status", b"103") in hints
    assert (b"link", b"</style.css>; rel=preload; as=style") in hints
    assert response.status == 200
    assert response.body == b"page"


@pytest_twisted.ensureDeferred
async def test_http2_chunked_response_is_data_frames(serve):
    port = await serve(_stream_parts)
    client = await connect_h2(port)

    stream_id = client.request("/")
    response = await client.response(stream_id)
    client.transport.loseConnection()

    assert response.status == 200
    assert response.header(b"transfer-encoding") is None
    assert response.header(b"content-length") is None
    assert response.body == b"one,two,three"


@pytest_twisted.ensureDeferred
async def test_http2_send_file_range(serve, data_file):
    port = await serve(_file_plug, data_file)
    client = await connect_h2(port)

    stream_id = client.request("/?offset=1000&length=70000")
    response = await client.response(stream_id)
    client.transport.loseConnection()

    assert response.header(b"content-length") == b"70000"
    assert response.body == data_file.read_bytes()[1000:71000]


@pytest_twisted.ensureDeferred
async def test_http2_failing_chunked_response_resets_stream(serve, logs):
    async def fail_midway(conn, opts):
        conn.send_chunked(200)
        await conn.chunk(b"partial")
        raise RuntimeError("plug failed on purpose")

    port = await serve(fail_midway)
    client = await connect_h2(port)

    stream_id = client.request("/")
    response = await client.response(stream_id)
    client.transport.loseConnection()

    # The DATA frame may still be queued when the stream is reset.
    assert response.body in (b"", b"partial")
    assert not response.ended
    assert response.reset_code is not None
    [failure] = [event for event in logs.events if event.get("log_failure")]
    failure["log_failure"].trap(RuntimeError)
