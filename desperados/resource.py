"""
PlugResource: the twisted.web resource that runs a plug pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from time import perf_counter
from typing import IO, Any
from weakref import WeakKeyDictionary

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from desperados import telemetry
from desperados._logging import observer as log_observer
from desperados.body import BodyChunk
from desperados.builder import PlugSpec, _not_a_conn, compile_plug
from desperados.compression import Compression, compression_option, start_compression
from desperados.conn import CHUNKED, SENT, SET, UNSET, UPGRADED, Conn
from desperados.errors import BadRequestError, ClientDisconnectedError, DesperadosError
from desperados.http1 import lists_close
from desperados.response import wire_response
from desperados.streaming import (
    ResponseStream,
    read_buffered_body,
    send_file_range,
    send_informational,
)
from desperados.upgrade import is_websocket_upgrade
from desperados.websocket import WebSocketBridge

_HTTP2 = b"HTTP/2"

DEFAULT_RESPONSE_TIMEOUT = 60.0


class _RequestAdapter:
    """
    Writes a Conn's response to the twisted.web request it came from.
    """

    __slots__ = ("clock", "compression", "request", "stream")

    def __init__(
        self, request: Request, compression: Compression | None, clock: Any
    ) -> None:
        self.request = request
        self.compression = compression
        self.clock = clock
        self.stream: ResponseStream | None = None

    def read_body(
        self, conn: Conn, length: int, timeout: float | None
    ) -> Deferred[BodyChunk]:
        request = self.request
        body = getattr(request, "body", None)
        if body is None:
            # A plain twisted.web Request, in a tree the user built: the
            # whole body is already in request.content.
            return read_buffered_body(request, length)
        request.send_continue()
        return body.read(length, timeout, self.clock)

    def send_chunked(self, conn: Conn) -> None:
        request = self.request
        if request.finished or request._disconnected:
            return
        headers, compressor = start_compression(
            conn.status,
            conn.resp_headers,
            conn.get_req_header("accept-encoding"),
            self.compression,
        )
        self._write_head(conn, headers)
        self.stream = ResponseStream(request, compressor)

    def chunk(self, conn: Conn, data: bytes) -> Deferred[Conn]:
        stream = self.stream
        if stream is None or self.request._disconnected:
            msg = "cannot send a chunk: the client closed the connection"
            raise ClientDisconnectedError(msg)
        return stream.write(data).addCallback(lambda _: conn)

    def finish_chunked(self) -> None:
        """
        End a chunked response once the pipeline is done with it.
        """
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.finish()

    def send_file(self, conn: Conn, file: IO[bytes], offset: int, length: int) -> None:
        request = self.request
        if request.finished or request._disconnected:
            file.close()
            return
        # Not compressed: the Content-Length is the file's, and a compressed
        # range would need the ranges counted in compressed bytes.
        self._write_head(conn, conn.resp_headers)
        send_file_range(request, file, offset, length)

    def inform(self, conn: Conn, status: int, headers: list[tuple[str, str]]) -> None:
        send_informational(self.request, status, headers)

    def _write_head(self, conn: Conn, headers: list[tuple[str, str]]) -> None:
        request = self.request
        # A plug such as ProxyHeaders may have changed the client address.
        request.access_log_client = conn.remote_ip
        request.setResponseCode(conn.status)
        response_headers = request.responseHeaders
        for name, value in headers:
            encoded = value.encode("latin-1")
            if (
                name == "connection"
                and request.clientproto != _HTTP2
                and lists_close([encoded])
            ):
                # RFC 9112 section 9.6: a server that sends the close
                # option closes the connection after the response.
                request.channel.persistent = False
            response_headers.addRawHeader(name.encode("latin-1"), encoded)

    def send_resp(self, conn: Conn, body: bytes) -> None:
        request = self.request
        if request.finished or request._disconnected:
            return
        headers, body = wire_response(conn, body, self.compression)
        self._write_head(conn, headers)
        if body:
            request.write(body)
        request.finish()


class PlugResource(Resource):
    """
    A leaf resource that runs a plug, or a pipeline of them, for every request.

    Mount it anywhere in a twisted.web tree: it serves every path below the
    point where it is mounted, and C{conn.script_name} holds the path of that
    point.  For each request it builds a L{Conn}, runs the plug, then writes
    the response the plug stored, hands the connection to the WebSocket
    bridge, or answers 500 when no response was set or a plug raised.

    :param plug: a plug class or instance, a function C{f(conn, opts)}, or a
        dotted name of one of them.
    :param opts: the options given to the plug's C{init}.
    :param reactor: the reactor for timers; the global one if None.
    :param compress: compress responses with gzip or deflate when the client
        accepts it (True, the default), never (False), or with the given
        L{Compression} options.
    :param response_timeout: seconds the plug may take to start its
        response, and then between two writes of a streamed body, before it
        is cancelled and the request answered with 503 (or the connection
        closed, if the response has started); None for no limit.

    :ivar draining: set while the server stops: responses then carry
        C{connection: close} and upgrades are answered with 503.
    """

    isLeaf = True
    log = Logger(observer=log_observer)

    def __init__(
        self,
        plug: PlugSpec,
        opts: object = None,
        *,
        reactor: Any = None,
        compress: bool | Compression = True,
        response_timeout: float | None = DEFAULT_RESPONSE_TIMEOUT,
    ):
        super().__init__()
        if response_timeout is not None and response_timeout <= 0:
            msg = (
                "expected a positive response_timeout or None, "
                f"got {response_timeout!r}"
            )
            raise ValueError(msg)
        self.compression = compression_option(compress)
        self._plug = compile_plug((plug, opts))
        self.websockets = WebSocketBridge(reactor)
        self.reactor = self.websockets.reactor
        self.response_timeout = response_timeout
        self.draining = False
        # The requests whose pipeline is still running, each with the
        # function that gives up on it (see _wait).
        self._waiting: dict[Request, Callable[[], None]] = {}

    def give_up_requests(self) -> list[object]:
        """
        Give up on every request whose pipeline is still running.

        Each pipeline is cancelled.  A request whose response has not
        started gets C{503 server is shutting down} (over HTTP/1.1 with
        C{connection: close}), and a request whose response has started has
        its HTTP/1.1 connection closed or its HTTP/2 stream reset.  A drain
        calls this when its timeout ends.

        :returns: the connections that close once the 503 or the cut
            response is sent: the HTTP/1.1 channel, or the HTTP/2 connection
            of the stream.  A request whose response was complete before its
            pipeline returned adds none.
        """
        connections = []
        for request, give_up in list(self._waiting.items()):
            if not request.finished:
                channel = request.channel
                # An HTTP/2 request's channel is its H2Stream.
                connections.append(getattr(channel, "_conn", channel))
            give_up()
        return connections

    def render(self, request: Request) -> int:
        # twisted.web's Site sets these before rendering; a plug decides the
        # content type, and the server's name and version are nobody's concern.
        request.defaultContentType = None
        request.responseHeaders.removeHeader(b"server")

        if self.draining:
            _close_after_response(request)

        adopted = getattr(request.channel, "adopted_conn", None)
        if adopted is not None:
            # desperados.http1_fast is running the pipeline for this request
            # and passed it on, because the pipeline needs a twisted.web
            # request.  The running Conn gets this request under it.
            request.channel.adopted_conn = None
            adopted.adapter = _RequestAdapter(request, self.compression, self.reactor)
            if telemetry.observers:
                _observe_request(request, adopted)
            return NOT_DONE_YET

        conn = self._conn_from(request)
        if telemetry.observers:
            _observe_request(request, conn)
        try:
            result = self._plug.call(conn, self._plug.state)
        except BaseException:
            # Not only Exception: a Deferred turns any BaseException, such
            # as asyncio.CancelledError, into a failure, so a plug that
            # raises one at once gets the same 500 as a coroutine would.
            self._fail(Failure(), request, conn)
            return NOT_DONE_YET
        self.complete(result, request, conn)
        return NOT_DONE_YET

    def complete(self, result: object, request: Any, conn: Conn) -> None:
        """
        Finish C{request} with what the pipeline returned for C{conn}.

        :param result: a Conn, a Deferred or awaitable of one, or a Failure
            of the pipeline.
        :param request: the twisted.web request, or for a response that
            L{desperados.http1_fast.FastPath} sent, its record.
        """
        if isinstance(result, Failure):
            self._fail(result, request, conn)
            return
        if inspect.isawaitable(result) and not isinstance(result, Deferred):
            # A Builder turns its plugs' coroutines into Deferreds, but a
            # single plug mounted on its own returns its coroutine as is.
            result = ensureDeferred(_awaited(result))
        # A Builder checks that each of its plugs returns a Conn, and this
        # checks a single plug mounted on its own.
        name = self._plug.name
        if isinstance(result, Deferred):
            result.addCallback(_expect_conn, name)
            if not result.called:
                self._wait(result, request, conn)
                return
            result.addCallbacks(
                self._finish,
                self._fail,
                callbackArgs=(request,),
                errbackArgs=(request, conn),
            )
        elif isinstance(result, Conn):
            self._finish(result, request)
        else:
            self._fail(Failure(TypeError(_not_a_conn(name, result))), request, conn)

    def _wait(self, pending: Deferred[Conn], request: Request, conn: Conn) -> None:
        """
        Finish the request when C{pending} fires, within the response timeout.

        The timeout bounds the time until the response starts, then the time
        between two writes of a streamed body, so that a long stream that
        makes progress goes on.  C{pending} is cancelled when the client goes
        away, the response times out or a drain gives up on the request; the
        plug's later writes to the Conn are then ignored, because the request
        is finished or disconnected.
        """
        abandoned = False
        timer = None
        sent_length = 0

        def abandon(body: bytes) -> None:
            nonlocal abandoned
            abandoned = True
            self._waiting.pop(request, None)
            self._send_error(request, 503, body)
            pending.cancel()

        def shut_down() -> None:
            if timer is not None and timer.active():
                timer.cancel()
            self.log.info(
                "gave up on {method} {path} from {remote_ip} at the end of the "
                "drain: {outcome}",
                method=conn.method,
                path=conn.request_path,
                remote_ip=conn.remote_ip,
                outcome=_give_up_outcome(request),
            )
            abandon(b"server is shutting down")

        def time_out() -> None:
            nonlocal timer, sent_length
            if request.startedWriting and request.sentLength > sent_length:
                sent_length = request.sentLength
                timer = self.reactor.callLater(self.response_timeout, time_out)
                return
            self.log.error(
                "{plug} did not finish {method} {path} within {timeout} s",
                plug=self._plug.name,
                method=conn.method,
                path=conn.request_path,
                timeout=self.response_timeout,
                started=bool(request.startedWriting),
            )
            abandon(b"service unavailable")

        def client_gone(failure: Failure) -> None:
            # A client that closes its connection early is not an error of
            # ours: stop the plug's work and log nothing.
            nonlocal abandoned
            self._waiting.pop(request, None)
            if not pending.called:
                abandoned = True
                pending.cancel()

        def finished(result: Conn) -> None:
            self._waiting.pop(request, None)
            if timer is not None and timer.active():
                timer.cancel()
            if not abandoned:
                self._finish(result, request)

        def failed(failure: Failure) -> None:
            self._waiting.pop(request, None)
            if timer is not None and timer.active():
                timer.cancel()
            if not (abandoned and failure.check(CancelledError)):
                self._fail(failure, request, conn)

        self._waiting[request] = shut_down
        if self.response_timeout is not None:
            timer = self.reactor.callLater(self.response_timeout, time_out)
        request.notifyFinish().addErrback(client_gone)
        pending.addCallbacks(finished, failed)

    def _conn_from(self, request: Request) -> Conn:
        # twisted.web's Request.process has already percent-decoded each
        # segment of prepath and postpath; decoding again would turn %2541
        # into A instead of %41.
        conn = build_conn(
            _RequestAdapter(request, self.compression, self.reactor),
            method=request.method,
            http_version=_http_version(request),
            secure=_is_secure(request),
            host_header=request.getHeader(b"host"),
            local=request.getHost(),
            client=request.getClientAddress(),
            uri=request.uri,
            path_info=request.postpath or (),
            req_headers=request.requestHeaders.getAllRawHeaders(),
        )
        conn.script_name = [
            segment.decode("latin-1") for segment in request.prepath or () if segment
        ]
        return conn

    def _finish(self, conn: Conn, request: Request) -> None:
        request.access_log_client = conn.remote_ip
        if conn.state == SENT:
            return
        if conn.state == CHUNKED:
            assert isinstance(conn.adapter, _RequestAdapter)
            conn.adapter.finish_chunked()
            return
        if conn.state == SET:
            try:
                conn.send_resp()
            except BaseException:
                # A before-send callback raised.
                self._fail(Failure(), request, conn)
            return
        if conn.state == UPGRADED and conn.upgrade_request is not None:
            if self.draining:
                self._send_error(request, 503, b"server is shutting down")
                return
            body = getattr(request, "body", None)
            if body is not None and not body.complete:
                # The pipeline ran before the body arrived; the rest of it
                # would reach the WebSocket as frames.
                error = BadRequestError("a WebSocket upgrade request must not have a body")
                self._reject(error, request, conn)
                return
            try:
                self.websockets.hand_off(request, conn.upgrade_request)
            except DesperadosError as error:
                self._reject(error, request, conn)
                return
            _forget_http_connection(request)
            log_upgrade = getattr(getattr(request, "site", None), "log_upgrade", None)
            if log_upgrade is not None:
                log_upgrade(request)
            if telemetry.observers:
                _observe_upgrade(request, conn)
            return
        if conn.state == UNSET:
            self.log.error(
                "no response was set or sent for {method} {path} by {plug}",
                method=conn.method,
                path=conn.request_path,
                plug=self._plug.name,
            )
        self._send_error(request, 500, b"internal server error")

    def _fail(self, failure: Failure, request: Request, conn: Conn) -> None:
        request.access_log_client = conn.remote_ip
        error = failure.value
        if isinstance(error, ClientDisconnectedError):
            # Nobody is left to answer, and a client leaving is not an error.
            self.log.debug(
                "client closed the connection during {method} {path}: {reason}",
                method=conn.method,
                path=conn.request_path,
                reason=str(error),
            )
            return
        if isinstance(error, DesperadosError) and error.status < 500:
            self._reject(error, request, conn)
            return
        self.log.failure(
            "{plug} raised while handling {method} {path}",
            failure,
            plug=self._plug.name,
            method=conn.method,
            path=conn.request_path,
        )
        self._send_error(request, 500, b"internal server error")

    def _reject(self, error: DesperadosError, request: Request, conn: Conn) -> None:
        if telemetry.observers and (
            conn.assigns.get("websocket") or is_websocket_upgrade(conn)
        ):
            telemetry.emit(
                "websocket.upgrade.reject", status=error.status, reason=str(error)
            )
        # A client error is the client's problem: log it below error level.
        self.log.info(
            "rejected {method} {path} from {remote_ip} with {status}: {reason}",
            method=conn.method,
            path=conn.request_path,
            remote_ip=conn.remote_ip,
            status=error.status,
            reason=str(error),
        )
        self._send_error(request, error.status, str(error).encode("utf-8"), error.headers)

    def _send_error(
        self,
        request: Request,
        status: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """
        Answer with C{status} and a plain-text body, then close the connection.

        Headers a plug already stored are dropped: they belonged to the
        response that failed.  The connection is closed because the state of
        the request that failed (an unread body, a half-run plug) is unknown.
        """
        if request.finished or request._disconnected:
            return
        if request.startedWriting:
            # The status line is gone; all that is left is to cut the response.
            if request.clientproto == _HTTP2:
                # Ending the stream would make the cut response look complete;
                # RST_STREAM tells the client it is not.
                request.channel.abortConnection()
            else:
                request.channel.loseConnection()
            return
        request.setResponseCode(status)
        response_headers = request.responseHeaders
        for name in [name for name, _ in response_headers.getAllRawHeaders()]:
            if name.lower() != b"date":
                response_headers.removeHeader(name)
        for name, value in headers:
            response_headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        response_headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        response_headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if request.clientproto != _HTTP2:
            response_headers.setRawHeaders(b"connection", [b"close"])
            request.channel.persistent = False
        request.write(body)
        request.finish()


_STARTED = "desperados.started"


def _observe_request(request: Request, conn: Conn) -> None:
    """
    Emit C{http.request.stop} once twisted.web has finished C{request}.

    An upgraded request never finishes in twisted.web's eyes, so
    L{_observe_upgrade} emits its event instead.
    """
    started = perf_counter()
    conn.private[_STARTED] = started
    method = conn.method

    def finished(result: object) -> None:
        telemetry.emit(
            "http.request.stop",
            method=method,
            status=request.code if request.startedWriting else None,
            duration=perf_counter() - started,
        )

    # notifyFinish fails when the client disconnects first; both end the request.
    request.notifyFinish().addBoth(finished)


def _observe_upgrade(request: Request, conn: Conn) -> None:
    started = conn.private.get(_STARTED)
    telemetry.emit(
        "http.request.stop",
        method=conn.method,
        status=101,
        duration=0.0 if started is None else perf_counter() - started,
    )
    site = getattr(request.channel, "site", None)
    if getattr(site, "emits_connection_events", False):
        telemetry.emit("http.connection.upgrade")
def _give_up_outcome(request: Any) -> str:
    if request.finished:
        return "cancelled the pipeline, the response was complete"
    if request.startedWriting:
        return "closed the connection mid-response"
    return "sent 503"


async def _awaited(awaitable: Any) -> object:
    return await awaitable


def _expect_conn(result: object, name: str) -> Conn:
    if not isinstance(result, Conn):
        raise TypeError(_not_a_conn(name, result))
    return result


def _close_after_response(request: Request) -> None:
    if request.clientproto != _HTTP2:
        request.channel.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])


def _forget_http_connection(request: Request) -> None:
    # The transport now belongs to the WebSocket protocol, so the Site's
    # HTTP protocol never learns when the connection closes; drop it from
    # the Site's registry here (see HTTPChannelSelector.track).
    channel = request.channel
    if channel is None:
        # The client left before the hand-off, and the channel knows it.
        return
    forget = getattr(channel.site, "forget_connection", None)
    if forget is not None:
        forget(channel)


# Whether the connection of each twisted.web channel uses TLS.
_secure_channels: WeakKeyDictionary[object, bool] = WeakKeyDictionary()


def _is_secure(request: Request) -> bool:
    """
    Return C{request.isSecure()}, asking twisted.web once per connection.

    twisted.web 26.10 adapts the channel's transport to C{ISSLTransport} on
    every call, through zope.interface's adapter hooks and the
    C{ProtocolWrapper.__getattr__} of a wrapped transport: about 5% of the CPU
    of a 404 in bench/micro.py.  A connection keeps its transport, so the
    answer is kept per channel; C{Request.setHost(..., ssl=True)} still
    counts for its own request.
    """
    if getattr(request, "_forceSSL", False):
        return True
    channel = request.channel
    try:
        secure = _secure_channels.get(channel)
        if secure is None:
            secure = _secure_channels[channel] = request.isSecure()
    except TypeError:  # a channel that takes no weak reference, such as None
        return request.isSecure()
    return secure


def _http_version(request: Request) -> str:
    version = request.clientproto
    if version == _HTTP2:
        return "HTTP/2"
    return version.decode("latin-1")


def build_conn(
    adapter: Any,
    *,
    method: bytes,
    http_version: str,
    secure: bool,
    host_header: bytes | None,
    local: Any,
    client: Any,
    uri: bytes,
    path_info: Iterable[bytes],
    req_headers: Iterable[tuple[bytes, Sequence[bytes]]],
) -> Conn:
    """
    Build the Conn of a parsed request.

    :param local: the server's address, for a request without Host.
    :param client: the client's address.
    :param path_info: the percent-decoded segments of the path.
    :param req_headers: the header names, any case, each with its values.
    """
    local_port = getattr(local, "port", 0)
    host, port = _split_host(host_header, local_port)
    if not host:
        host = getattr(local, "host", "") or ""
    path, _, query = uri.partition(b"?")
    return Conn(
        adapter=adapter,
        method=method.decode("latin-1"),
        http_version=http_version,
        scheme="https" if secure else "http",
        host=host,
        port=port,
        remote_ip=getattr(client, "host", None) or "",
        request_path=path.decode("latin-1"),
        path_info=[segment.decode("latin-1") for segment in path_info if segment],
        query_string=query.decode("latin-1"),
        req_headers=[
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, values in req_headers
            for value in values
        ],
    )


def _split_host(host_header: bytes | None, default_port: int) -> tuple[str, int]:
    if not host_header:
        return "", default_port
    host = host_header.decode("latin-1")
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        address, _, port_text = host.partition(":")
    if port_text.isdigit():
        return address, int(port_text)
    return address, default_port
