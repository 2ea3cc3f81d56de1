"""
The HTTP/1.1 fast path against twisted.web's Request, over real loopback.

Most tests serve the same requests with the fast path on and off, check
that the client gets the same bytes, and check which path served them.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from support import RawClient, upgrade_request
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater

from desperados import Builder, telemetry
from desperados.server import DesperadosSite, make_site

GET = b"GET /a/b?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n"
_DATE = re.compile(rb"\r\ndate: [^\r]*\r\n", re.IGNORECASE)


class RecordingClient(RawClient):
    """
    A RawClient that also keeps every byte it received.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        super().dataReceived(data)


@pytest_twisted.async_yield_fixture
async def listen():
    """
    Listen with a Site on 127.0.0.1; stop listening after the test.

    Call it as C{port = listen(site)}.
    """
    ports = []

    def start(site: DesperadosSite) -> int:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        await port.stopListening()


def make_test_site(
    plug: object = "desperados.plugs.Default", *, fast: bool = True, **options: object
) -> DesperadosSite:
    site = make_site(plug, reactor=reactor, **options)
    site.http1_fast_path = fast
    site.test_protocols = []
    build = site._build_http_protocol
    # The number of twisted.web requests that the channel parsed.
    site.channel_requests = 0
    request_factory = site.requestFactory

    def build_request(*args):
        site.channel_requests += 1
        return request_factory(*args)

    site.requestFactory = build_request

    def build_and_keep(addr):
        protocol = build(addr)
        site.test_protocols.append(protocol)
        return protocol

    site._build_http_protocol = build_and_keep
    return site


async def exchange(
    listen, site: DesperadosSite, data: bytes, *, heads: tuple[bool, ...] = (False,)
) -> tuple[bytes, RecordingClient]:
    """
    Send C{data} on a new connection and read one response per entry of
    C{heads} (True for a response to HEAD).

    :returns: the bytes received, with Date values blanked, and the client.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listen(site))
    client = await connectProtocol(endpoint, RecordingClient())
    client.send(data)
    for head_only in heads:
        await client.read_response(head_only=head_only)
    return _DATE.sub(b"\r\ndate: -\r\n", client.received), client


def fast_path_of(site: DesperadosSite) -> object:
    """
    Return the FastPath of the Site's one connection, None while the channel
    serves it or once it closed after the channel served it.
    """
    (protocol,) = site.test_protocols
    return protocol.fast_path


async def both_paths(
    listen,
    data: bytes,
    plug: object = "desperados.plugs.Default",
    *,
    heads: tuple[bool, ...] = (False,),
    **options: object,
) -> tuple[bytes, bytes, DesperadosSite]:
    """
    Return the bytes that the fast path and the channel send for C{data},
    and the fast path's Site.
    """
    fast_site = make_test_site(plug, fast=True, **options)
    fast, fast_client = await exchange(listen, fast_site, data, heads=heads)
    slow_site = make_test_site(plug, fast=False, **options)
    slow, slow_client = await exchange(listen, slow_site, data, heads=heads)
    fast_client.transport.loseConnection()
    slow_client.transport.loseConnection()
    return fast, slow, fast_site


def _big_body(conn, opts):
    conn.put_resp_header("content-type", "text/plain")
    return conn.send_resp(200, b"x" * 5000).halt()


def _no_content(conn, opts):
    conn.put_resp_header("x-one", "1")
    conn.put_resp_header("x-One", "2")
    conn.put_resp_header("date", "plug date")
    return conn.send_resp(204, b"").halt()


def _echo_conn(conn, opts):
    fields = (
        conn.method,
        conn.http_version,
        conn.scheme,
        conn.host,
        conn.port,
        conn.remote_ip,
        conn.request_path,
        conn.path_info,
        conn.script_name,
        conn.query_string,
        conn.req_headers,
    )
    return conn.send_resp(200, repr(fields)).halt()


def _set_only(conn, opts):
    return conn.resp(201, "created")


def _line_break_in_header(conn, opts):
    # resp_headers is a public list, so a plug can bypass put_resp_header's
    # check.  twisted.web's Headers replaces each line break with a space.
    conn.resp_headers.append(("x-split", "a\r\nInjected: 1\nb\rc"))
    return conn.send_resp(200, "x").halt()


@pytest.mark.parametrize(
    ("data", "plug", "heads"),
    [
        (GET, "desperados.plugs.Default", (False,)),
        (
            b"HEAD /%41/b%2Fc HTTP/1.1\r\nHost: example.com:81\r\n\r\n",
            "desperados.plugs.Default",
            (True,),
        ),
        (
            GET + GET.replace(b"/a/b", b"/second"),
            "desperados.plugs.Default",
            (False, False),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n"
            b"X-A: 1\r\nx-a: 2\r\n\r\n",
            _big_body,
            (False,),
        ),
        (GET, _no_content, (False,)),
        (
            b"POST /p HTTP/1.1\r\nHost: a:81\r\nContent-Length: 0\r\n\r\n"
            + GET.replace(b"127.0.0.1", b"b:82"),
            _echo_conn,
            (False, False),
        ),
        (
            b"GET /%41%2541/b%2Fc//d?q=%41&r HTTP/1.1\r\nHost: [::1]:8080\r\n"
            b"X-B: 1\r\nAccept:  */* \r\nx-b: 2\r\n\r\n",
            _echo_conn,
            (False,),
        ),
        (GET, _set_only, (False,)),
        (GET + GET, _line_break_in_header, (False, False)),
    ],
    ids=[
        "get",
        "head",
        "pipelined",
        "gzip",
        "no-content",
        "empty-post",
        "conn-fields",
        "resp-only",
        "line-break-in-header",
    ],
)
@pytest_twisted.ensureDeferred
async def test_fast_path_sends_channel_bytes(listen, data, plug, heads):
    fast, slow, site = await both_paths(listen, data, plug, heads=heads)
    assert fast == slow
    assert b"\r\nInjected:" not in fast
    assert fast_path_of(site) is not None


@pytest.mark.parametrize(
    "data",
    [
        GET.replace(b"Host: 127.0.0.1\r\n", b"Host: a\r\nHost: b\r\n"),
        b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=[
        "two-hosts",
        "control-byte",
        "space-in-name",
        "obs-fold",
        "http2",
        "bare-lf",
        "gzip-te",
        "two-lengths",
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_head_gets_channel_error(listen, data):
    fast, slow, site = await both_paths(listen, data)
    assert fast == slow
    assert fast.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 "))
    assert b"\r\nconnection: close\r\n" in fast.lower()
    assert fast_path_of(site) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://other/x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\n\r\n",
        b"\r\n" + GET,
    ],
    ids=["absolute-form", "http-1.0", "body", "length-00", "leading-empty-line"],
)
@pytest_twisted.ensureDeferred
async def test_other_requests_are_handed_over(listen, data):
    fast, slow, site = await both_paths(listen, data)
    assert fast == slow
    assert fast.startswith((b"HTTP/1.1 404 ", b"HTTP/1.0 404 "))
    assert site.channel_requests == 1
    # The channel gives a persistent connection back once idle.  An HTTP/1.0
    # request without keep-alive closes the connection.
    given_back = not data.endswith(b"HTTP/1.0\r\n\r\n")
    assert (fast_path_of(site) is not None) is given_back


@pytest_twisted.ensureDeferred
async def test_split_head_is_handed_over(listen):
    site = make_test_site()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listen(site))
    client = await connectProtocol(endpoint, RecordingClient())
    client.send(GET[:20])
    await deferLater(reactor, 0.05, lambda: None)
    client.send(GET[20:])
    response = await client.read_response()
    client.transport.loseConnection()
    assert response.status == 404
    assert site.channel_requests == 1
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_connection_close_closes_after_fast_response(listen):
    data = GET.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive, close\r\n\r\n")
    fast, slow, site = await both_paths(listen, data + GET)
    assert fast == slow
    assert fast.count(b"HTTP/1.1 404") == 1
    assert b"\r\nConnection: close\r\n" in fast


def _close_after(conn, opts):
    conn.put_resp_header("connection", "keep-alive, Close")
    return conn.send_resp(200, "bye").halt()


@pytest_twisted.ensureDeferred
async def test_plug_connection_close_closes(listen):
    """
    RFC 9112 section 9.6: a server that sends the close option closes the
    connection after that response.
    """
    received = {}
    for fast in (True, False):
        site = make_test_site(_close_after, fast=fast)
        data, client = await exchange(listen, site, GET + GET)
        await client.wait_closed()
        received[fast] = _DATE.sub(b"\r\ndate: -\r\n", client.received)
    assert received[True] == received[False]
    assert received[True].count(b"HTTP/1.1 200 OK") == 1


@pytest_twisted.ensureDeferred
async def test_max_requests_counts_fast_and_channel_requests(listen):
    from desperados import HTTPOptions

    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    site = make_test_site(http_options=HTTPOptions(max_requests=3))
    received, client = await exchange(
        listen, site, GET + GET + post + GET, heads=(False,) * 3
    )
    await client.wait_closed()
    assert received.count(b"HTTP/1.1 404") == 3
    assert received.count(b"Connection: close") == 1


class _Counting:
    """
    A plug that counts its calls and returns what C{respond} returns.
    """

    def __init__(self, respond) -> None:
        self.calls = 0
        self.respond = respond

    def __call__(self, conn, opts):
        self.calls += 1
        return self.respond(conn)


async def _later_404(conn):
    await deferLater(reactor, 0, lambda: None)
    return conn.send_resp(404, "later").halt()


async def _stream(conn):
    conn.send_chunked(200)
    await conn.chunk("one ")
    await conn.chunk("two")
    return conn


def _inform_then_404(conn):
    conn.inform(103, [("link", "</s.css>; rel=preload")])
    return conn.send_resp(404, "x")


def _raise(conn):
    raise RuntimeError("plug failed")


class _PlugAborted(BaseException):
    pass


def _raise_base(conn):
    # Twisted's Deferred and Request.process catch BaseException too.
    raise _PlugAborted("plug aborted")


async def _raise_without_waiting(conn):
    raise RuntimeError("plug failed")


def _unset(conn):
    return conn


def _continue_101(conn):
    # A 1xx sent whole: twisted.web sends it chunked.
    return conn.send_resp(100, "")


async def _read_empty_body(conn):
    chunk = await conn.read_body()
    return conn.send_resp(200, f"{chunk.data!r} {chunk.more}")


@pytest.mark.parametrize(
    ("respond", "status", "passed_on", "fast_path_back"),
    [
        (_later_404, 404, False, True),
        (_stream, 200, True, True),
        (_inform_then_404, 103, True, True),
        # The response to a failed pipeline closes the connection.
        (_raise, 500, True, False),
        (_raise_without_waiting, 500, True, False),
        (_raise_base, 500, True, False),
        (_unset, 500, True, False),
        (_continue_101, 100, True, True),
        (_read_empty_body, 200, False, True),
    ],
    ids=[
        "deferred",
        "chunked",
        "inform",
        "raise",
        "raise-async",
        "raise-base-exception",
        "unset",
        "1xx",
        "read-body",
    ],
)
@pytest_twisted.ensureDeferred
async def test_pipeline_runs_once_on_either_path(
    listen, logs, respond, status, passed_on, fast_path_back
):
    fast_plug = _Counting(respond)
    fast_site = make_test_site(Builder([fast_plug]), fast=True)
    fast, fast_client = await exchange(listen, fast_site, GET)
    slow_plug = _Counting(respond)
    slow_site = make_test_site(Builder([slow_plug]), fast=False)
    slow, slow_client = await exchange(listen, slow_site, GET)
    fast_client.transport.loseConnection()
    slow_client.transport.loseConnection()
    assert fast == slow
    assert fast.startswith(b"HTTP/1.1 %d " % status)
    if status == 500:
        assert b"\r\nConnection: close\r\n" in fast
    assert fast_plug.calls == 1
    assert fast_site.channel_requests == (1 if passed_on else 0)
    assert (fast_path_of(fast_site) is not None) is fast_path_back


async def _later_on_slow_path(conn, opts):
    # Only /slow waits, then streams its response, so its request is passed
    # on to the channel.
    if conn.request_path != "/slow":
        return conn.send_resp(404, conn.request_path).halt()
    await deferLater(reactor, 0, lambda: None)
    conn.send_chunked(404)
    await conn.chunk(conn.request_path)
    return conn.halt()


SLOW = GET.replace(b"/a/b?x=1", b"/slow")
FAST = GET.replace(b"/a/b?x=1", b"/fast")


async def open_client(listen, site: DesperadosSite) -> RecordingClient:
    """
    Connect a RecordingClient to C{site}, listening on a new port.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listen(site))
    return await connectProtocol(endpoint, RecordingClient())


@pytest_twisted.ensureDeferred
async def test_fast_path_resumes_after_deferred(listen):
    site = make_test_site(_later_on_slow_path)
    client = await open_client(listen, site)
    client.send(SLOW)
    slow = await client.read_response()
    passed_on = site.channel_requests
    client.send(FAST)
    fast = await client.read_response()
    client.transport.loseConnection()
    assert slow.status == 404
    assert slow.body == b"/slow"
    assert fast.status == 404
    assert fast.body == b"/fast"
    assert passed_on == 1
    assert site.channel_requests == 1
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_pipelined_after_deferred_keeps_order(listen):
    """
    Requests pipelined behind a passed-on one are served by the channel, in
    order, and the fast path serves what comes after them.
    """
    site = make_test_site(_later_on_slow_path)
    client = await open_client(listen, site)
    client.send(SLOW + FAST + SLOW + FAST)
    bodies = [(await client.read_response()).body for _ in range(4)]
    passed_on = site.channel_requests
    client.send(FAST)
    last = await client.read_response()
    client.transport.loseConnection()
    assert bodies == [b"/slow", b"/fast", b"/slow", b"/fast"]
    assert passed_on == 4
    assert last.body == b"/fast"
    assert site.channel_requests == 4
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_channel_keeps_always_deferred_connection(listen):
    """
    A connection whose first request after each return to the fast path is
    passed on again stays on the channel after the second such return.
    """
    site = make_test_site(_later_on_slow_path)
    client = await open_client(listen, site)
    back = []
    for _ in range(3):
        client.send(SLOW)
        await client.read_response()
        back.append(fast_path_of(site) is not None)
    client.send(FAST)
    fast = await client.read_response()
    client.transport.loseConnection()
    assert back == [True, True, False]
    assert fast.body == b"/fast"
    assert site.channel_requests == 4


@pytest_twisted.ensureDeferred
async def test_alternating_requests_keep_returning(listen):
    """
    A request served on the fast path resets the count of futile returns.
    """
    site = make_test_site(_later_on_slow_path)
    client = await open_client(listen, site)
    bodies = []
    for _ in range(4):
        for data in (SLOW, FAST):
            client.send(data)
            bodies.append((await client.read_response()).body)
    client.transport.loseConnection()
    assert bodies == [b"/slow", b"/fast"] * 4
    assert site.channel_requests == 4
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_fast_path_resumes_after_unread_body(listen):
    """
    The channel reads past a body that the response did not wait for, and
    gives the connection back once the body has ended.
    """
    site = make_test_site()
    client = await open_client(listen, site)
    client.send(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    posted = await client.read_response()
    client.send(b"defghij")
    # Let the server read the end of the body before the next request.
    await deferLater(reactor, 0.05, lambda: None)
    client.send(GET)
    got = await client.read_response()
    client.transport.loseConnection()
    assert posted.status == 404
    assert got.status == 404
    assert site.channel_requests == 1
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_drain_closes_given_back_connection(listen):
    site = make_test_site(_later_on_slow_path)
    client = await open_client(listen, site)
    client.send(SLOW)
    slow = await client.read_response()
    given_back = fast_path_of(site) is not None
    await site.drain(timeout=5.0)
    await client.wait_closed()
    assert slow.status == 404
    assert given_back
    assert site.connections == {}


def _return_none(conn, opts):
    return None


def _return_fired_none(conn, opts):
    return succeed(None)


async def _return_none_later(conn, opts):
    await deferLater(reactor, 0, lambda: None)


@pytest.mark.parametrize(
    "plug",
    [_return_none, _return_fired_none, _return_none_later],
    ids=["none", "fired-deferred", "coroutine"],
)
@pytest_twisted.ensureDeferred
async def test_plug_returning_no_conn_gets_500(listen, logs, plug):
    """
    A single plug, not a Builder, whose result is not a Conn.
    """
    fast, slow, _ = await both_paths(listen, GET, plug)
    assert fast == slow
    assert fast.startswith(b"HTTP/1.1 500 ")
    assert b"\r\nConnection: close\r\n" in fast
    errors = logs.with_format("raised while handling")
    assert len(errors) == 2


def _send_then_raise(conn, opts):
    conn.send_resp(404, "sent")
    raise RuntimeError("after the response")


@pytest_twisted.ensureDeferred
async def test_failure_after_fast_response_is_logged(listen, logs):
    site = make_test_site(_send_then_raise)
    received, client = await exchange(listen, site, GET + GET, heads=(False, False))
    client.transport.loseConnection()
    assert received.count(b"HTTP/1.1 404 Not Found") == 2
    failures = [event for event in logs.events if "log_failure" in event]
    assert len(failures) == 2
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_access_log_line_matches_channel(listen, tmp_path):
    lines = []
    for fast in (True, False):
        path = tmp_path / f"access-{fast}.log"
        site = make_test_site(fast=fast, access_log=str(path))
        data = GET.replace(b"\r\n\r\n", b"\r\nReferer: http://r/\r\n\r\n")
        _, client = await exchange(listen, site, data)
        client.transport.loseConnection()
        site.access_log.close()
        (line,) = path.read_text().splitlines()
        lines.append(re.sub(r"\[[^]]*\]", "[time]", line))
    assert lines[0] == lines[1]
    assert '"GET /a/b?x=1 HTTP/1.1" 404 9 "http://r/" "test"' in lines[0]


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def observe(self, event: str, fields: dict) -> None:
        self.events.append((event, fields))


@pytest_twisted.ensureDeferred
async def test_fast_response_emits_request_stop(listen):
    observer = _Events()
    telemetry.add_observer(observer)
    try:
        site = make_test_site()
        _, client = await exchange(listen, site, GET)
        client.transport.loseConnection()
    finally:
        telemetry.remove_observer(observer)
    stops = [
        fields for event, fields in observer.events if event == "http.request.stop"
    ]
    assert len(stops) == 1
    assert stops[0]["method"] == "GET"
    assert stops[0]["status"] == 404
    assert fast_path_of(site) is not None


class _ObserveFromNow:
    """
    A plug that adds its observer while it handles a request.
    """

    def __init__(self) -> None:
        self.observer = _Events()

    def __call__(self, conn, opts):
        telemetry.add_observer(self.observer)
        return conn.send_resp(200, "x").halt()


@pytest_twisted.ensureDeferred
async def test_observer_added_mid_request_sees_next(listen):
    observed = {}
    for fast in (True, False):
        plug = _ObserveFromNow()
        site = make_test_site(Builder([plug]), fast=fast)
        try:
            _, client = await exchange(listen, site, GET)
            first = list(plug.observer.events)
            client.send(GET)
            await client.read_response()
            client.transport.loseConnection()
        finally:
            telemetry.remove_observer(plug.observer)
        observed[fast] = (first, plug.observer.events)
    # The channel observes only the requests that began with an observer.
    for fast in (True, False):
        first, events = observed[fast]
        assert first == [], fast
        assert [event for event, _ in events] == ["http.request.stop"], fast


@pytest_twisted.ensureDeferred
async def test_websocket_after_fast_request(listen):
    site = make_test_site()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listen(site))
    client = await connectProtocol(endpoint, RecordingClient())
    client.send(GET)
    first = await client.read_response()
    client.send(upgrade_request("/ws"))
    upgraded = await client.read_response()
    client.transport.loseConnection()
    assert first.status == 404
    assert upgraded.status == 101
    assert site.connections == {}


@pytest_twisted.ensureDeferred
async def test_drain_closes_after_fast_response(listen):
    received = []
    for fast in (True, False):
        site = make_test_site(fast=fast)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listen(site))
        client = await connectProtocol(endpoint, RecordingClient())
        client.send(GET)
        await client.read_response()
        site.plug_resource.draining = True
        client.send(GET)
        response = await client.read_response()
        await client.wait_closed()
        assert response.header("connection") == "close"
        received.append(_DATE.sub(b"\r\ndate: -\r\n", client.received))
    assert received[0] == received[1]
    assert fast_path_of(site) is None or not fast


def test_builder_pipeline_is_served_fast():
    """
    A pipeline of plain functions stays on the fast path in memory too.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    site = make_site(Builder(["desperados.plugs.Default"]))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8082),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
    )
    protocol = site.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(GET)
    assert transport.value().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert protocol.fast_path is not None
    transport.loseConnection()


# A pipeline that waits on a Deferred and then only sends a whole response
# is served on the fast path, which carries the wait as the channel does.


async def _wait_then_send(conn, opts):
    await deferLater(reactor, 0, lambda: None)
    return conn.send_resp(200, conn.request_path).halt()


@pytest_twisted.ensureDeferred
async def test_waiting_pipeline_stays_on_fast_path(listen):
    site = make_test_site(_wait_then_send)
    client = await open_client(listen, site)
    client.send(SLOW + FAST + SLOW + FAST)
    bodies = [(await client.read_response()).body for _ in range(4)]
    client.transport.loseConnection()
    assert bodies == [b"/slow", b"/fast", b"/slow", b"/fast"]
    assert site.channel_requests == 0
    assert fast_path_of(site) is not None


@pytest_twisted.ensureDeferred
async def test_waiting_pipeline_matches_channel_bytes(listen):
    fast, slow, fast_site = await both_paths(
        listen, GET + GET, _wait_then_send, heads=(False, False)
    )
    assert fast == slow
    assert fast.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert fast_site.channel_requests == 0


@pytest_twisted.ensureDeferred
async def test_pipelined_bytes_past_bound_pause_reading(listen):
    """
    Pipelined requests beyond the channel's eager read size pause reading
    until the waiting response is written, and are then served in order.
    """
    site = make_test_site(_wait_then_send)
    client = await open_client(listen, site)
    count = 2 + 64 * 1024 // len(FAST)
    client.send(SLOW + FAST * count)
    bodies = [(await client.read_response()).body for _ in range(count + 1)]
    client.transport.loseConnection()
    assert bodies == [b"/slow"] + [b"/fast"] * count
    assert site.channel_requests == 0


class _Never:
    """
    A plug whose Deferred never fires unless cancelled.
    """

    def __init__(self) -> None:
        self.cancelled: Deferred = Deferred()

    def __call__(self, conn, opts):
        def cancel(_: Deferred) -> None:
            self.cancelled.callback(None)

        return Deferred(cancel)


@pytest_twisted.ensureDeferred
async def test_response_timeout_on_waiting_fast_request(listen, logs):
    received = {}
    for fast in (True, False):
        plug = _Never()
        site = make_test_site(plug, fast=fast, response_timeout=0.05)
        data, client = await exchange(listen, site, GET)
        await client.wait_closed()
        await plug.cancelled
        received[fast] = (data, site.channel_requests)
    assert received[True][0] == received[False][0]
    assert received[True][0].startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nConnection: close\r\n" in received[True][0]
    assert received[True][1] == 0
    assert len(logs.with_format("did not finish")) == 2


@pytest_twisted.ensureDeferred
async def test_client_leaving_cancels_waiting_fast_request(listen, logs):
    observer = _Events()
    telemetry.add_observer(observer)
    try:
        plug = _Never()
        site = make_test_site(plug)
        client = await open_client(listen, site)
        client.send(GET)
        while not site.plug_resource._waiting:
            await deferLater(reactor, 0.01, lambda: None)
        client.transport.loseConnection()
        await plug.cancelled
    finally:
        telemetry.remove_observer(observer)
    stops = [f for event, f in observer.events if event == "http.request.stop"]
    assert site.channel_requests == 0
    assert site.plug_resource._waiting == {}
    assert [stop["status"] for stop in stops] == [None]
    assert [event for event in logs.events if "log_failure" in event] == []


async def _wait_then_raise(conn, opts):
    await deferLater(reactor, 0, lambda: None)
    raise RuntimeError("plug failed after waiting")


@pytest_twisted.ensureDeferred
async def test_failing_wait_gets_500_logged_once(listen, logs):
    fast, slow, fast_site = await both_paths(listen, GET, _wait_then_raise)
    assert fast == slow
    assert fast.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"\r\nConnection: close\r\n" in fast
    assert fast_site.channel_requests == 0
    assert len(logs.with_format("raised while handling")) == 2


@pytest_twisted.ensureDeferred
async def test_drain_timeout_sends_503_to_waiting_fast_request(listen, logs):
    received = {}
    for fast in (True, False):
        plug = _Never()
        site = make_test_site(plug, fast=fast)
        client = await open_client(listen, site)
        client.send(GET)
        while not site.plug_resource._waiting:
            await deferLater(reactor, 0.01, lambda: None)
        drained = site.drain(timeout=0.05)
        response = await client.read_response()
        await client.wait_closed()
        await drained
        await plug.cancelled
        received[fast] = (response, site.channel_requests)
    response, channel_requests = received[True]
    assert response.status == 503
    assert response.header("connection") == "close"
    assert response.body == b"server is shutting down"
    assert channel_requests == 0
    assert received[False][0].body == response.body


async def _wait_then_inform(conn, opts):
    await deferLater(reactor, 0, lambda: None)
    conn.inform(103, [("link", "</s.css>; rel=preload")])
    return conn.send_resp(200, "after 103").halt()


async def _wait_then_file(conn, opts):
    await deferLater(reactor, 0, lambda: None)
    return conn.send_file(200, opts).halt()


@pytest_twisted.ensureDeferred
async def test_inform_after_wait_is_passed_on(listen):
    fast, slow, fast_site = await both_paths(
        listen, GET + FAST, _wait_then_inform, heads=(False, False, False)
    )
    assert fast == slow
    assert fast.startswith(b"HTTP/1.1 103 ")
    assert fast_site.channel_requests == 2


@pytest_twisted.ensureDeferred
async def test_file_after_wait_is_passed_on(listen, tmp_path):
    path = tmp_path / "file.txt"
    path.write_bytes(b"file body")
    fast_site = make_test_site(Builder([(_wait_then_file, str(path))]))
    fast, client = await exchange(listen, fast_site, GET + FAST, heads=(False, False))
    client.transport.loseConnection()
    assert fast.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert fast.count(b"file body") == 2
    assert fast_site.channel_requests == 2


@pytest_twisted.ensureDeferred
async def test_access_log_of_waiting_request_matches_channel(listen, tmp_path):
    lines = []
    for fast in (True, False):
        path = tmp_path / f"access-{fast}.log"
        site = make_test_site(_wait_then_send, fast=fast, access_log=str(path))
        _, client = await exchange(listen, site, GET)
        client.transport.loseConnection()
        site.access_log.close()
        (line,) = path.read_text().splitlines()
        lines.append(re.sub(r"\[[^]]*\]", "[time]", line))
    assert lines[0] == lines[1]
    assert '"GET /a/b?x=1 HTTP/1.1" 200 4 "-" "test"' in lines[0]


@pytest_twisted.ensureDeferred
async def test_waiting_request_emits_request_stop(listen):
    observer = _Events()
    telemetry.add_observer(observer)
    try:
        site = make_test_site(_wait_then_send)
        _, client = await exchange(listen, site, GET)
        client.transport.loseConnection()
    finally:
        telemetry.remove_observer(observer)
    stops = [f for event, f in observer.events if event == "http.request.stop"]
    assert [stop["status"] for stop in stops] == [200]
    assert site.channel_requests == 0


async def _wait_then_upgrade(conn, opts):
    await deferLater(reactor, 0, lambda: None)
    return conn.upgrade("desperados.endpoints.Websocket").halt()


@pytest_twisted.ensureDeferred
async def test_upgrade_after_wait_matches_channel(listen, logs):
    """
    The fast path never gets the Upgrade header, so the upgrade is rejected.
    """
    fast, slow, fast_site = await both_paths(listen, GET, _wait_then_upgrade)
    assert fast == slow
    assert fast.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close\r\n" in fast
    assert fast_site.channel_requests == 0
