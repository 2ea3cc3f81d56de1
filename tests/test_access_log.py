"""
The access log over real loopback sockets: one combined log format line per
request, HTTP/2 included, and client disconnects that are not errors.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from http2_support import connect_h2
from support import connect
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from desperados import HTTPOptions

pytestmark = pytest.mark.usefixtures("both_http1_paths")

COMBINED = re.compile(
    r'(?P<host>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000)\] '
    r'"(?P<request>[^"\\]*(?:\\.[^"\\]*)*)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<agent>[^"\\]*(?:\\.[^"\\]*)*)"$'
)


def _lines(path) -> list[re.Match]:
    text = path.read_text() if path.exists() else ""
    matches = [COMBINED.match(line) for line in text.splitlines()]
    assert all(matches), text
    return matches


async def _until_lines(path, count: int) -> list[re.Match]:
    # The line is written when the response finishes, which the client can
    # see a moment before the server has run its last callback.
    for _ in range(500):
        lines = _lines(path)
        if len(lines) >= count:
            return lines
        await deferLater(reactor, 0.01)
    return _lines(path)


def _ok(conn, opts):
    return conn.send_resp(200, b"hello").halt()


@pytest_twisted.ensureDeferred
async def test_requests_get_combined_lines(serve, tmp_path):
    path = tmp_path / "access.log"
    port = await serve(_ok, access_log=str(path))
    client = await connect(port)

    client.send(
        b"GET /page?q=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Referer: http://example.com/"quoted"\r\nUser-Agent: test-agent/1.0\r\n\r\n'
    )
    await client.read_response()
    client.send(b"HEAD /head HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await client.read_response(head_only=True)
    lines = await _until_lines(path, 2)
    client.transport.loseConnection()

    get, head = lines
    assert get["host"] == "127.0.0.1"
    assert get["request"] == "GET /page?q=1 HTTP/1.1"
    assert get["status"] == "200"
    assert get["size"] == "5"
    assert get["referer"] == 'http://example.com/\\"quoted\\"'
    assert get["agent"] == "test-agent/1.0"
    assert head["request"] == "HEAD /head HTTP/1.1"
    assert head["size"] == "-"
    assert head["referer"] == "-"
    assert head["agent"] == "-"


@pytest_twisted.ensureDeferred
async def test_no_access_log_by_default(serve, tmp_path, capsys):
    port = await serve(_ok)
    client = await connect(port)

    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await client.read_response()
    client.transport.loseConnection()

    assert capsys.readouterr().out == ""


@pytest_twisted.ensureDeferred
async def test_dash_writes_to_stdout(serve, capsys):
    port = await serve(_ok, access_log="-")
    client = await connect(port)

    client.send(b"GET /out HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await client.read_response()
    client.transport.loseConnection()
    await deferLater(reactor, 0.05)

    [line] = capsys.readouterr().out.splitlines()
    assert COMBINED.match(line)["request"] == "GET /out HTTP/1.1"


@pytest_twisted.ensureDeferred
async def test_http2_request_is_logged(serve, tmp_path):
    path = tmp_path / "access.log"
    port = await serve(_ok, access_log=str(path))
    client = await connect_h2(port)

    stream_id = client.request("/over-h2")
    response = await client.response(stream_id)
    [line] = await _until_lines(path, 1)
    client.transport.loseConnection()

    assert response.status == 200
    assert line["request"] == "GET /over-h2 HTTP/2.0"
    assert line["status"] == "200"
    assert line["size"] == "5"


@pytest_twisted.ensureDeferred
async def test_client_leaving_is_logged_not_an_error(serve, tmp_path, logs):
    arrived: Deferred = Deferred()

    def never_answers(conn, opts):
        arrived.callback(None)
        return Deferred()

    path = tmp_path / "access.log"
    port = await serve(never_answers, access_log=str(path))
    client = await connect(port)

    client.send(b"GET /gone HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await arrived
    client.transport.loseConnection()
    [line] = await _until_lines(path, 1)

    assert line["request"] == "GET /gone HTTP/1.1"
    assert line["status"] == "499"
    assert line["size"] == "-"
    assert not [event for event in logs.events if event.get("log_failure")]
    assert not [
        event
        for event in logs.events
        if event.get("log_level") is not None
        and event["log_level"].name in ("error", "critical")
    ]


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_is_logged(serve, tmp_path):
    from support import open_websocket

    path = tmp_path / "access.log"
    port = await serve(access_log=str(path))

    client, response = await open_websocket(port, "/socket")
    [line] = await _until_lines(path, 1)
    client.transport.loseConnection()

    assert response.status == 101
    assert line["request"] == "GET /socket HTTP/1.1"
    assert line["status"] == "101"


def test_twistd_access_log_option():
    from twisted.plugins.desperados_plugin import Options

    options = Options()
    options.parseOptions(["--access-log", "-"])

    assert options["access-log"] == "-"
    assert Options()["access-log"] is None


@pytest_twisted.ensureDeferred
async def test_proxied_client_address_is_logged(serve, tmp_path):
    from desperados import Builder
    from desperados.plugs import ProxyHeaders

    path = tmp_path / "access.log"
    pipeline = Builder([(ProxyHeaders, {"trusted": ["127.0.0.1"]}), _ok])
    port = await serve(pipeline, access_log=str(path))
    client = await connect(port)

    client.send(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    )
    await client.read_response()
    [line] = await _until_lines(path, 1)
    client.transport.loseConnection()

    assert line["host"] == "203.0.113.7"


def test_twistd_unwritable_access_log_is_usage_error(tmp_path):
    from twisted.plugins.desperados_plugin import Options
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="--access-log"):
        Options().parseOptions(["--access-log", str(tmp_path / "missing" / "access.log")])


def test_failed_write_is_logged_not_raised(tmp_path, logs):
    from desperados.access_log import AccessLog

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

    access_log = AccessLog(str(tmp_path / "access.log"), reactor)
    access_log._file = FullDisk()

    class Request:
        method, uri, clientproto = b"GET", b"/", b"HTTP/1.1"
        code, sentLength, startedWriting, finished = 200, 5, True, True

        def getClientAddress(self):
            return None

        def getHeader(self, name):
            return None

    access_log.write(Request())

    [error] = logs.with_format("cannot write to the access log")
    assert "No space left" in error["error"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "request_line"),
    [
        (b"\x01\x02 garbage\r\n\r\n", 400, "-"),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 414, "-"),
        (
            b"GET /big HTTP/1.1\r\nHost: h\r\nUser-Agent: agent/2\r\n"
            b"X: " + b"y" * 20_000 + b"\r\n\r\n",
            431,
            "GET /big HTTP/1.1",
        ),
        (
            b"GET /e HTTP/1.1\r\nHost: h\r\nExpect: tea\r\n\r\n",
            417,
            "GET /e HTTP/1.1",
        ),
        (
            b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n\r\n",
            413,
            "POST /up HTTP/1.1",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_rejected_request_gets_line(
    serve, tmp_path, request_bytes, status, request_line
):
    path = tmp_path / "access.log"
    port = await serve(_ok, access_log=str(path))
    client = await connect(port)

    client.send(request_bytes)
    response = await client.read_response()
    await client.wait_closed()
    lines = await _until_lines(path, 1)

    assert response.status == status
    assert len(lines) == 1
    assert lines[0]["host"] == "127.0.0.1"
    assert lines[0]["request"] == request_line
    assert lines[0]["status"] == str(status)
    assert lines[0]["size"] == str(len(response.body))


@pytest_twisted.ensureDeferred
async def test_head_timeout_gets_line(serve, tmp_path):
    path = tmp_path / "access.log"
    port = await serve(
        _ok, access_log=str(path), http_options=HTTPOptions(header_timeout=0.2)
    )
    client = await connect(port)

    client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n")
    response = await client.read_response()
    await client.wait_closed()
    lines = await _until_lines(path, 1)

    assert response.status == 408
    assert len(lines) == 1
    assert lines[0]["request"] == "GET /slow HTTP/1.1"
    assert lines[0]["status"] == "408"


async def _read_whole_body(conn, opts):
    more = True
    while more:
        _, more = await conn.read_body()
    return conn.send_resp(200, b"read").halt()


@pytest_twisted.ensureDeferred
async def test_body_timeout_in_pipeline_gets_one_line(serve, tmp_path):
    # The pipeline is reading the body, so the request writes its own line.
    path = tmp_path / "access.log"
    port = await serve(
        _read_whole_body,
        access_log=str(path),
        http_options=HTTPOptions(body_timeout=0.2),
    )
    client = await connect(port)

    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    response = await client.read_response()
    await client.wait_closed()
    lines = await _until_lines(path, 1)
    # Give a second line the time to appear.
    await deferLater(reactor, 0.2)

    assert response.status == 408
    assert len(_lines(path)) == 1
    assert lines[0]["request"] == "POST /up HTTP/1.1"
