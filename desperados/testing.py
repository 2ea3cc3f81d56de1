"""
Testing plugs without a socket: build a Conn, run a plug, inspect the response.

In the spirit of Plug.Test::

    from desperados import testing

    conn = testing.call_sync(App, testing.conn("GET", "/users/7?tab=posts"))
    assert conn.status == 200
    assert testing.sent(conn).body == b"user 7"

L{call} returns a Deferred for plugs that wait; L{call_sync} is for plugs
that finish at once.  The response goes through the same code as over the
network (before-send callbacks, cookies, compression, Content-Length, HEAD
and 204/304 rules), so L{sent} shows what a client would receive.  Chunked
responses, files, informational responses and C{read_body} work too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, cast
from urllib.parse import unquote

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from desperados.body import BodyChunk
from desperados.builder import Builder, PlugSpec, compile_plug
from desperados.compression import (
    Compression,
    Compressor,
    compression_option,
    start_compression,
)
from desperados.conn import CHUNKED, SET, UPGRADED, Conn
from desperados.response import has_body, wire_response

__all__ = [
    "MemoryAdapter",
    "SentResponse",
    "call",
    "call_sync",
    "conn",
    "sent",
    "upgraded",
]


@dataclass
class SentResponse:
    """
    A response as it would go on the wire.

    Framing that depends on the HTTP version, such as C{Transfer-Encoding:
    chunked}, is left out.

    :ivar headers: C{(name, value)} pairs with lower-case names, in order.
    :ivar body: the body bytes, compressed if compression applied; for a
        chunked response, the parts sent so far joined.
    :ivar chunks: for a chunked response, each part as sent (compressed
        parts end with a flush, the last one ends the compressed stream);
        None for other responses.
    :ivar finished: False while a chunked response is still open.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[bytes] | None = None
    finished: bool = True

    def header(self, name: str) -> str | None:
        """
        Return the first value of the header C{name}, or None.
        """
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        """
        Return every value of the header C{name}, in order.
        """
        name = name.lower()
        return [value for key, value in self.headers if key == name]


@dataclass
class MemoryAdapter:
    """
    A L{desperados.conn.ConnAdapter} that keeps the response in memory.

    :ivar request_body: the request body given to L{conn}, which
        C{conn.read_body} returns.
    :ivar compression: the compression options, None when off.
    :ivar responses: every final response sent, in order; a Conn sends at
        most one.
    :ivar informational: the C{(status, headers)} of every 1xx response.
    """

    request_body: bytes = b""
    compression: Compression | None = None
    responses: list[SentResponse] = field(default_factory=list)
    informational: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)
    _body_offset: int = 0
    _compressor: Compressor | None = None

    def send_resp(self, conn: Conn, body: bytes) -> None:
        headers, body = wire_response(conn, body, self.compression)
        assert conn.status is not None
        self.responses.append(SentResponse(conn.status, list(headers), body))

    def read_body(
        self, conn: Conn, length: int, timeout: float | None
    ) -> Deferred[BodyChunk]:
        if not isinstance(length, int) or length < 1:
            msg = f"expected a read_body length of 1 or more, got {length!r}"
            raise ValueError(msg)
        start = self._body_offset
        self._body_offset = min(start + length, len(self.request_body))
        data = self.request_body[start : self._body_offset]
        return succeed(BodyChunk(data, self._body_offset < len(self.request_body)))

    def send_chunked(self, conn: Conn) -> None:
        assert conn.status is not None
        headers, self._compressor = start_compression(
            conn.status,
            conn.resp_headers,
            conn.get_req_header("accept-encoding"),
            self.compression,
        )
        response = SentResponse(conn.status, list(headers), b"", [], finished=False)
        self.responses.append(response)

    def chunk(self, conn: Conn, data: bytes) -> Deferred[Conn]:
        compressor = self._compressor
        if compressor is not None and data:
            data = compressor.compress(data) + compressor.flush()
        self._write_part(conn, data)
        return succeed(conn)

    def finish_chunked(self, conn: Conn) -> None:
        """
        End a chunked response, as the HTTP bridge does once the pipeline returns.
        """
        response = self.responses[-1]
        if self._compressor is not None:
            self._write_part(conn, self._compressor.finish())
        response.finished = True

    def send_file(self, conn: Conn, file: IO[bytes], offset: int, length: int) -> None:
        # Not compressed, like the HTTP bridge's files.
        with file:
            file.seek(offset)
            body = file.read(length)
        assert conn.status is not None
        if conn.method == "HEAD" or not has_body(conn.status):
            body = b""
        self.responses.append(SentResponse(conn.status, list(conn.resp_headers), body))

    def inform(self, conn: Conn, status: int, headers: list[tuple[str, str]]) -> None:
        self.informational.append((status, list(headers)))

    def _write_part(self, conn: Conn, data: bytes) -> None:
        response = self.responses[-1]
        # twisted.web drops the body of a HEAD, 204 or 304 response.
        if not data or conn.method == "HEAD" or not has_body(response.status):
            return
        assert response.chunks is not None
        response.chunks.append(data)
        response.body += data


def conn(
    method: str = "GET",
    path: str = "/",
    body: bytes | str = b"",
    *,
    headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    scheme: str = "http",
    host: str = "www.example.com",
    port: int | None = None,
    remote_ip: str = "127.0.0.1",
    http_version: str = "HTTP/1.1",
    compress: bool | Compression = True,
) -> Conn:
    """
    Build a Conn for a request, as the HTTP bridge would.

    :param path: the request target, with its query string if any, such as
        C{"/users/7?tab=posts"}.
    :param body: the request body; a str is encoded as UTF-8.
    :param headers: request headers, as pairs or a mapping; names are
        lower-cased, and a Host header is added unless given.
    :param port: the server port; 80 for http and 443 for https when None.
    :param compress: response compression, as the server's C{compress} option.
    """
    request_path, _, query_string = path.partition("?")
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    req_headers = [(name.lower(), value) for name, value in pairs]
    if not any(name == "host" for name, _ in req_headers):
        req_headers.insert(0, ("host", host))
    if port is None:
        port = 443 if scheme == "https" else 80

    adapter = MemoryAdapter(
        request_body=body.encode("utf-8") if isinstance(body, str) else bytes(body),
        compression=compression_option(compress),
    )
    return Conn(
        adapter=adapter,
        method=method.upper(),
        http_version=http_version,
        scheme=scheme,
        host=host,
        port=port,
        remote_ip=remote_ip,
        request_path=request_path,
        path_info=[unquote(segment) for segment in request_path.split("/") if segment],
        query_string=query_string,
        req_headers=req_headers,
    )


def call(plug: PlugSpec, conn: Conn, opts: object = None) -> Deferred[Conn]:
    """
    Initialize C{plug} with C{opts}, run it on C{conn}, and send a stored response.

    As in the HTTP bridge, a response stored with C{conn.resp} is sent, and
    a chunked response ends, once the plug returns.  Unlike the bridge, an
    exception is not turned into a 500: the Deferred fails with it, so the
    test sees it.

    :param plug: anything a L{desperados.Builder} accepts as an entry.
    :returns: a Deferred that fires with the Conn.
    """
    try:
        pipeline = compile_plug(Builder([(plug, opts)]))
        result = pipeline.call(conn, pipeline.state)
    except Exception:
        return fail()

    pending: Deferred[Conn] = (
        result if isinstance(result, Deferred) else succeed(cast(Conn, result))
    )
    return pending.addCallback(_send_stored)


def _send_stored(conn: Conn) -> Conn:
    if conn.state == SET:
        conn.send_resp()
    elif conn.state == CHUNKED and isinstance(conn.adapter, MemoryAdapter):
        conn.adapter.finish_chunked(conn)
    return conn


def call_sync(plug: PlugSpec, conn: Conn, opts: object = None) -> Conn:
    """
    Run C{plug} like L{call} and return the Conn at once.

    :raises RuntimeError: when the plug is still waiting on a Deferred or a
        coroutine; use L{call} and wait for its result instead.
    :raises Exception: whatever the plug raised.
    """
    outcome: list[Conn | Failure] = []
    call(plug, conn, opts).addBoth(outcome.append)
    if not outcome:
        msg = "the plug is still waiting on a Deferred; use testing.call() and await it"
        raise RuntimeError(msg)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


def sent(conn: Conn) -> SentResponse:
    """
    Return the response sent for C{conn}, as a client would receive it.

    :raises ValueError: if no response was sent, or C{conn} was not built
        by L{conn}.
    """
    adapter = conn.adapter
    if not isinstance(adapter, MemoryAdapter):
        msg = (
            f"expected a Conn built by desperados.testing.conn, got adapter {adapter!r}"
        )
        raise ValueError(msg)
    if not adapter.responses:
        msg = f"no response was sent; the Conn is {conn.state!r}"
        raise ValueError(msg)
    return adapter.responses[-1]


def upgraded(conn: Conn) -> bool:
    """
    Say whether a plug asked for C{conn} to become a WebSocket.
    """
    return conn.state == UPGRADED and conn.upgrade_request is not None
