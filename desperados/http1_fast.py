"""
The HTTP/1.1 fast path: simple requests served without twisted.web's Request.

L{FastPath} parses a whole request head in one pass straight into a Conn,
runs the pipeline and writes the response with one C{transport.write}.  It
serves the HTTP/1.1 requests without a body (or with C{Content-Length: 0}),
C{Expect} or C{Upgrade} whose response is sent whole (C{Conn.send_resp})
before the pipeline returns.  Everything else goes to the connection's
L{desperados.request.StreamingChannel} in one of two ways:

  - A request head that is incomplete, invalid or not served here is
    handed over before the pipeline runs, together with every byte that
    follows it.  The channel sends its own error response for an invalid
    head and closes the connection.
  - A request whose pipeline needs more than C{send_resp} and the read of
    the empty body (a streamed or file response, an informational
    response, a failure before the pipeline waits) is passed on while it
    runs.  The channel parses the same head again, and the bridge puts the
    new twisted.web request under the running Conn instead of running the
    pipeline twice (see L{desperados.resource.PlugResource.render}).

A pipeline that waits on a Deferred that has not fired is carried here
(L{FastPath._wait}) by the bridge's own C{PlugResource.complete}, with the
response timeout, the client leaving and a drain giving up on it.  Bytes
that arrive meanwhile are kept and served after its response.  If the
pipeline calls a function of the first kind after the wait, the request
and the kept bytes are passed on at that point.

Once the channel has no request in flight and no byte buffered, it gives
a persistent connection back to this path (L{FastPath.take_back}).

The responses are those of the channel: the same status line, header order
and header name case, C{Date}, C{connection: close} rules, access-log line
and telemetry.
"""

from __future__ import annotations

from inspect import iscoroutine
from time import perf_counter
from typing import IO, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import _nameEncoder

from desperados import telemetry
from desperados._logging import observer as log_observer
from desperados.body import BodyChunk, RequestBody
from desperados.conn import SENT, SET, Conn
from desperados.errors import ClientDisconnectedError
from desperados.http1 import closes_connection, lists_close
from desperados.http1_fast_head import _parse_head, _ParsedRequest
from desperados.http1_fast_requests import _http_date, _SentRequest, _WaitingRequest
from desperados.request import reason_phrase
from desperados.resource import PlugResource, build_conn
from desperados.response import wire_response

log = Logger(namespace="desperados.http1_fast", observer=log_observer)

# The channel keeps a connection for good once it has given it back this
# many times in a row and each time the next request was handed over again.
# Such a request has its head parsed twice, so a connection whose every
# request needs the channel (a pipeline that always streams its response)
# pays that twice and then costs what it costs without this path.
_MAX_FUTILE_RETURNS = 2


class FastPath:
    """
    The server of the simple requests of one HTTP/1.1 connection.

    Create it only for a Site whose resource is a L{PlugResource} and whose
    channel is a L{desperados.request.StreamingChannel}.

    :param selector: the connection's
        L{desperados.channel.HTTPChannelSelector}, whose C{fast_path}
        L{hand_over} sets to None and L{take_back} sets to this path again.
    :param channel: the connection's HTTP/1.1 channel, already connected.
    """

    def __init__(self, selector: Any, channel: Any) -> None:
        self._selector = selector
        self._channel = channel
        self._resource: PlugResource = channel.site.resource
        self._options = channel.options
        transport = channel.transport
        self._transport = transport
        self._local = transport.getHost()
        self._client = transport.getPeer()
        # providedBy skips zope.interface's adapter hooks, which
        # request.isSecure goes through.
        self._secure = ISSLTransport.providedBy(transport)
        self._closed = False
        # Whether the channel gave the connection back and no request has
        # been served here since.
        self._returned = False
        self._futile_returns = 0
        # The request whose pipeline this path is waiting for.
        self._waiting: _WaitingRequest | None = None
        self._paused = False

    def data_received(self, data: bytes) -> None:
        """
        Serve every complete request in C{data}, and hand over the rest.
        """
        if self._closed:
            # As the channel does after a response with connection: close.
            return
        waiting = self._waiting
        if waiting is not None:
            self._buffer(waiting, data)
            return
        while data:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                # The channel starts the head deadline of an incomplete head.
                self.hand_over(data)
                return
            request = _parse_head(data[:end], self._options)
            if request is None:
                self.hand_over(data)
                return
            if not self._serve(request, data, end + 4):
                return
            data = data[end + 4 :]

    def hand_over(self, data: bytes) -> None:
        """
        Give the connection, starting with C{data}, to the channel until it is idle.

        The channel calls L{take_back} once it has no request in flight
        and nothing buffered, unless the connection came back
        L{_MAX_FUTILE_RETURNS} times in a row only to be handed over again.
        """
        self._selector.fast_path = None
        if self._returned:
            self._returned = False
            self._futile_returns += 1
        if self._futile_returns < _MAX_FUTILE_RETURNS:
            self._channel.handed_over_by = self
        if data:
            self._channel.dataReceived(data)

    def _buffer(self, waiting: _WaitingRequest, data: bytes) -> None:
        """
        Keep C{data}, which follows the request that C{waiting} carries.

        Past the channel's C{_optimisticEagerReadSize}, reading stops until
        the response is written, as twisted.web's channel does with the
        requests pipelined behind one in flight.
        """
        adapter = waiting.adapter
        adapter._data += data
        if (
            not self._paused
            and len(adapter._data) - waiting.head_length
            > self._channel._optimisticEagerReadSize
        ):
            self._paused = True
            self._transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._transport.resumeProducing()

    def connection_lost(self, reason: Failure) -> None:
        """
        Tell the request that this path waits for, if any, that its client left.
        """
        self._closed = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._channel.waiting_request = None
            waiting.client_gone(reason)

    def take_back(self) -> None:
        """
        Serve the connection's next requests here again.
        """
        selector = self._selector
        if selector._channel is self._channel:
            selector.fast_path = self
            self._returned = True

    # Serving one request

    def _serve(self, request: _ParsedRequest, data: bytes, end_of_head: int) -> bool:
        """
        Run the pipeline for C{request}, whose head of C{end_of_head} bytes
        starts C{data}.

        :returns: whether this path goes on with the next request.
        """
        channel = self._channel
        resource = self._resource
        # The channel's checkPersistence decides the same way, and counts a
        # request that is passed on.
        persistent = not closes_connection(
            request.fields.get(b"connection", []),
            channel._requests_received + 1,
            self._options,
        )
        adapter = _FastAdapter(self, request, data, persistent)
        conn = build_conn(
            adapter,
            method=request.method,
            http_version="HTTP/1.1",
            secure=self._secure,
            host_header=request.fields[b"host"][-1],
            local=self._local,
            client=self._client,
            uri=request.uri,
            path_info=request.path_info(),
            req_headers=request.fields.items(),
        )

        plug = resource._plug
        result: object
        try:
            result = plug.call(conn, plug.state)
            if iscoroutine(result):
                # A plug mounted on its own returns its coroutine as is.
                # Running it now serves here one that does not wait.
                result = ensureDeferred(result)
            result = _settled(result)
            if adapter.is_fresh() and type(result) is Conn and result.state == SET:
                result.send_resp()
        except BaseException:
            # As PlugResource.render: the plug's failure gets a 500.
            result = Failure()

        if adapter.is_fresh() and isinstance(result, Deferred):
            # The pipeline waits, and has only called what this path serves.
            self._wait(adapter, conn, result, end_of_head)
            return False
        if adapter.is_fresh():
            try:
                adapter.pass_on(conn)
            except ClientDisconnectedError:
                return False
        if adapter.passed_on is not None:
            resource.complete(result, adapter.passed_on, conn)
            return False

        record = adapter.record
        assert record is not None
        self._returned = False
        self._futile_returns = 0
        persistent = record.persistent
        channel.served_elsewhere(persistent)
        if type(result) is not Conn or result.state != SENT:
            # A pending Deferred or a failure after the response was sent.
            resource.complete(result, record, conn)
        if not persistent:
            self._closed = True
            channel.loseConnection()
            return False
        return True

    def _wait(
        self,
        adapter: _FastAdapter,
        conn: Conn,
        pending: Deferred[Any],
        head_length: int,
    ) -> None:
        """
        Keep the connection while C{pending} runs, then write its response.

        L{PlugResource.complete} carries the request as for a twisted.web
        request: the response timeout, the client leaving, a drain giving
        up on it and a failure.  Bytes that arrive meanwhile are kept (see
        L{_buffer}) and served once the response is written.
        """
        waiting = _WaitingRequest(self, adapter, head_length)
        adapter.waiting = waiting
        self._waiting = waiting
        channel = self._channel
        # A drain counts the request as in flight and waits for it.
        channel.waiting_request = waiting
        # No idle timeout while the server, not the client, is the slow one.
        channel._set_deadline(None, None)
        self._resource.complete(pending, waiting, conn)

    def finish_waiting(self, waiting: _WaitingRequest, persistent: bool) -> None:
        """
        Serve the requests buffered behind C{waiting}, whose response is written.
        """
        if self._waiting is not waiting:
            return
        self._waiting = None
        channel = self._channel
        channel.waiting_request = None
        self._returned = False
        self._futile_returns = 0
        channel.served_elsewhere(persistent)
        if not persistent:
            self._closed = True
            channel.loseConnection()
            return
        self._resume_reading()
        rest = waiting.adapter._data[waiting.head_length :]
        if rest:
            self.data_received(rest)

    def pass_on_waiting(self, waiting: _WaitingRequest) -> None:
        """
        Stop keeping bytes for C{waiting}, whose request goes to the channel.
        """
        self._waiting = None
        self._channel.waiting_request = None
        # The channel pauses and resumes reading by its own rules.
        self._resume_reading()

    def write_response(
        self, request: _ParsedRequest, conn: Conn, body: bytes, persistent: bool
    ) -> _SentRequest | None:
        """
        Write C{conn}'s response with one C{transport.write}, as the channel would.

        :param persistent: whether the request leaves the connection open,
            as the channel's C{checkPersistence} decides.
        :returns: the record of the sent request, or None for a 1xx status,
            which the channel has to send (twisted.web sends it chunked).
        """
        status = conn.status
        assert status is not None
        if status < 200:
            return None
        headers, body = wire_response(conn, body, self._resource.compression)

        # This is the order in which twisted.web's Headers writes them, with
        # names in Http-Header-Case and the values of a name together where
        # the name first appeared.  checkPersistence sets Connection before
        # Request.process sets Date, and while the server drains, the bridge
        # sets Connection after Date.
        fields: dict[bytes, list[bytes]] = {}
        if not persistent:
            fields[b"Connection"] = [b"close"]
        fields[b"Date"] = [_http_date()]
        if self._resource.draining:
            fields[b"Connection"] = [b"close"]
            persistent = False
        encode_name = _nameEncoder.encode
        for name, value in headers:
            encoded = value.encode("latin-1")
            if b"\r" in encoded or b"\n" in encoded:
                # put_resp_header rejects line breaks, but a plug can append
                # to resp_headers directly.  twisted.web's Headers replaces
                # each one with a space, so that no value starts a header.
                encoded = b" ".join(encoded.splitlines())
            if name == "connection" and lists_close([encoded]):
                # RFC 9112 section 9.6: a server that sends the close
                # option closes the connection after the response.
                persistent = False
            fields.setdefault(encode_name(name), []).append(encoded)

        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
        for name, values in fields.items():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        lines.append(body)
        self._transport.write(b"".join(lines))

        record = _SentRequest(request, self._client, status, len(body), persistent)
        record.access_log_client = conn.remote_ip
        self._channel.site.log(record)
        return record


class _FastAdapter:
    """
    The adapter that writes a Conn's response for L{FastPath} or passes the
    request on.

    :ivar record: the sent request, once the response is written.
    :ivar passed_on: the twisted.web request, once passed on to the channel.
    """

    __slots__ = (
        "_body",
        "_data",
        "_path",
        "_persistent",
        "_request",
        "passed_on",
        "record",
        "started",
        "waiting",
    )

    def __init__(
        self, path: FastPath, request: _ParsedRequest, data: bytes, persistent: bool
    ) -> None:
        self._path = path
        self._request = request
        self._data = data
        self._persistent = persistent
        self._body: RequestBody | None = None
        self.started: float | None = (
            perf_counter() if telemetry.observers else None
        )
        self.record: _SentRequest | None = None
        self.passed_on: Any = None
        self.waiting: _WaitingRequest | None = None

    def is_fresh(self) -> bool:
        """
        Say whether the response is neither sent nor passed on.
        """
        return self.record is None and self.passed_on is None

    def pass_on(self, conn: Conn) -> Any:
        """
        Hand the connection, from this request on, to the channel.

        The channel parses the request head again, and the bridge puts its
        twisted.web request under C{conn} instead of running the pipeline.

        :returns: C{conn}'s new adapter.
        :raises ClientDisconnectedError: if the channel did not dispatch the
            request, because it rejected the head and closed the connection.
        """
        path = self._path
        channel = path._channel
        waiting = self.waiting
        if waiting is not None:
            path.pass_on_waiting(waiting)
        channel.adopted_conn = conn
        path.hand_over(self._data)
        if channel.adopted_conn is not None:
            # _parse_head accepts no head that the channel rejects, so this
            # is a bug in one of them.
            channel.adopted_conn = None
            log.error(
                "the HTTP/1.1 channel rejected a request that the fast path "
                "accepted: {request_line!r}",
                request_line=self._data.partition(b"\r\n")[0][:200],
            )
            msg = "the connection was closed"
            raise ClientDisconnectedError(msg)
        self.passed_on = conn.adapter.request
        if waiting is not None:
            waiting.pass_on(self.passed_on)
        return conn.adapter

    def _channel_adapter(self, conn: Conn) -> Any:
        if self.passed_on is None:
            return self.pass_on(conn)
        return conn.adapter

    def send_resp(self, conn: Conn, body: bytes) -> None:
        if self.passed_on is None:
            self.record = self._path.write_response(
                self._request, conn, body, self._persistent
            )
            if self.record is not None:
                # As on the channel, only a request that began with an
                # observer is observed.
                started = self.started
                if started is not None and telemetry.observers:
                    telemetry.emit(
                        "http.request.stop",
                        method=conn.method,
                        status=conn.status,
                        duration=perf_counter() - started,
                    )
                waiting = self.waiting
                if waiting is not None:
                    waiting.finished = True
                    self._path.finish_waiting(waiting, self.record.persistent)
                return
        self._channel_adapter(conn).send_resp(conn, body)

    def read_body(
        self, conn: Conn, length: int, timeout: float | None
    ) -> Deferred[BodyChunk]:
        # The request has no body, so read the empty body as the channel's.
        body = self._body
        if body is None:
            body = self._body = RequestBody(
                expected_length=0, max_size=None, pause=_nothing, resume=_nothing
            )
            body.finish()
        return body.read(length, timeout, self._path._resource.reactor)

    def send_chunked(self, conn: Conn) -> None:
        self._channel_adapter(conn).send_chunked(conn)

    def chunk(self, conn: Conn, data: bytes) -> Deferred[Conn]:
        # Conn.chunk comes after send_chunked, which passed the request on.
        return conn.adapter.chunk(conn, data)

    def send_file(self, conn: Conn, file: IO[bytes], offset: int, length: int) -> None:
        self._channel_adapter(conn).send_file(conn, file, offset, length)

    def inform(self, conn: Conn, status: int, headers: list[tuple[str, str]]) -> None:
        self._channel_adapter(conn).inform(conn, status, headers)


def _nothing() -> None:
    pass


def _settled(result: object) -> object:
    """
    Return the Conn or Failure of a Deferred that already fired, else C{result}.

    A Builder of coroutines that do not wait, such as one that reads the
    empty body, returns a Deferred that has already fired.
    """
    if not isinstance(result, Deferred) or not result.called:
        return result
    settled: list[object] = []

    def keep(value: object) -> object:
        settled.append(value)
        return value

    result.addBoth(keep)
    if not settled:
        # It waits on a chained Deferred.
        return result
    if isinstance(settled[0], Failure):
        # The caller handles this failure, so the Deferred must not log it.
        result.addErrback(lambda _: None)
    return settled[0]
