"""
Request bodies streamed to the plugs: L{StreamingRequest} runs the pipeline
at the end of the request head and queues the body for C{Conn.read_body};
L{StreamingChannel} is the HTTP/1.1 connection that dispatches it that early.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from desperados import telemetry
from desperados._logging import observer as log_observer
from desperados.body import RequestBody
from desperados.errors import (
    BodyTooLargeError,
    ClientDisconnectedError,
    DesperadosError,
    ExpectationFailedError,
)
from desperados.http1 import DesperadosChannel, _check_expect

DEFAULT_MAX_BODY_SIZE = 8_000_000
"""Largest request body accepted by default, in bytes (Plug's default read length)."""

DISCARD_LIMIT = 256 * 1024
"""Unread body bytes the server still reads past to keep a connection alive."""

_HTTP11 = b"HTTP/1.1"
_HTTP2 = b"HTTP/2"


# Reason phrases of RFC 9110 (421, 422, 426), RFC 6585 (428, 429, 431, 511),
# RFC 7725 (451) and RFC 8470 (425).
_EXTRA_REASON_PHRASES = {
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    425: b"Too Early",
    426: b"Upgrade Required",
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    451: b"Unavailable For Legal Reasons",
    511: b"Network Authentication Required",
}


def reason_phrase(code: int) -> bytes:
    """
    Return the reason phrase of status C{code}, as twisted.web would send it.
    """
    return _EXTRA_REASON_PHRASES.get(code) or RESPONSES.get(code, b"Unknown Status")


class StreamingRequest(Request):
    """
    A request whose body is read by the plugs instead of buffered up front.

    twisted.web's C{Request} writes the whole body to C{request.content}
    (memory or a temporary file) and only then calls C{process}.  This one
    queues the body in a L{RequestBody} instead, and L{StreamingChannel}
    calls L{headReceived} as soon as the head is parsed, so the pipeline runs
    while the body is still arriving.  A channel that never calls
    L{headReceived} (twisted.web's own) still works: the request is
    dispatched when the body is complete, with the body queued in memory.

    C{content} is always None: read the body with C{Conn.read_body}.

    :ivar body: the body queue, set when the channel reports the length.
    :ivar continue_expected: whether the client sent C{Expect: 100-continue}
        and is still waiting for the C{100 Continue}.
    """

    log = Logger(observer=log_observer)

    body: RequestBody | None = None
    continue_expected = False
    dispatched = False

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        # twisted.web 26.10's RESPONSES table has no reason phrase for these
        # codes and sends "Unknown Status" instead.
        if message is None:
            message = reason_phrase(code)
        super().setResponseCode(code, message)

    def _handleStar(self) -> None:  # noqa: N802
        # twisted.web's Request.process responds to OPTIONS * here, without
        # rendering PlugResource, which removes the Server header that
        # process set from every other response.
        self.responseHeaders.removeHeader(b"server")
        super()._handleStar()

    def gotLength(self, length: int | None) -> None:
        # twisted.web would open a BytesIO or a temporary file here.
        self.content = None
        self.body = RequestBody(
            expected_length=length,
            max_size=_max_body_size(self.channel),
            pause=self._pause_reading,
            resume=self._resume_reading,
        )

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is None or self.finished:
            return
        self.body.feed(data)

    def chunk_size_received(self, size: int) -> None:
        """
        Check the size of the next chunk of a chunked body against the
        maximum body size before its bytes arrive.
        """
        if self.body is not None:
            self.body.expect_chunk(size)

    def headReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Run the pipeline now, before the body arrives.

        Called by the channel at the end of the request head; the body then
        keeps flowing to L{handleContentChunk} and ends with
        L{requestReceived}.
        """
        if self.body is None:
            self.gotLength(None)
        self._dispatch(command, path, version)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body is None:
            self.gotLength(0)
        assert self.body is not None
        self.body.finish()
        if not self.dispatched:
            self._dispatch(command, path, version)

    def _dispatch(self, command: bytes, path: bytes, version: bytes) -> None:
        self.dispatched = True
        self.method, self.uri = command, path
        self.clientproto = version
        self.path, _, query = path.partition(b"?")
        # As twisted.web does; desperados itself reads conn.query_string.
        self.args = parse_qs(query, 1) if query else {}

        body = self.body
        assert body is not None
        if not body.complete:
            expect = self.requestHeaders.getRawHeaders(b"expect") or []
            self.continue_expected = version in (_HTTP11, _HTTP2) and any(
                value.lower() == b"100-continue" for value in expect
            )
        if version == _HTTP2:
            # The HTTP/1.1 channel checks Expect before the request exists.
            reason = _check_expect(self.requestHeaders)
            if reason is not None:
                self._reject_before_pipeline(ExpectationFailedError(reason))
                return
        if body.too_large:
            error = BodyTooLargeError(
                f"request body larger than the maximum of {body.max_size} bytes"
            )
            self._reject_before_pipeline(error)
            return
        self.process()

    # Used by the HTTP bridge

    def send_continue(self) -> None:
        """
        Send C{100 Continue} if the client waits for it and nothing was sent.

        RFC 9110 section 10.1.1: the client may wait for it before sending
        the body, so it goes out when a plug starts reading the body.
        """
        if not self.continue_expected:
            return
        self.continue_expected = False
        if self.startedWriting or self._disconnected or self.finished:
            return
        self.channel.writeHeaders(_HTTP11, b"100", b"Continue", Headers())

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._close_if_body_unread()
        super().write(data)

    def finish(self) -> None:
        body = self.body
        if body is not None and not body.complete:
            # Nobody reads the rest now; resume reading so the channel can get
            # past it (or close the connection) before the next request.
            body.discard()
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        if self.body is not None:
            msg = "the client closed the connection"
            self.body.fail(ClientDisconnectedError(msg))
        super().connectionLost(reason)
        # twisted.web logs a request when it finishes, which this one never
        # will; the access log still gets its line.
        site = getattr(self, "site", None)
        if self.dispatched and not self.finished and site is not None:
            site.log(self)

    # Internals

    def _close_if_body_unread(self) -> None:
        """
        Ask for the connection to close after this response when the rest of
        the body is too much to read past, or may never come.

        A client that sent C{Expect: 100-continue} and got no C{100 Continue}
        may never send the body (RFC 9110 section 10.1.1), so waiting for it
        would hang the connection.
        """
        body = self.body
        if body is None or body.complete or self.clientproto == _HTTP2:
            return
        remaining = body.remaining
        if (
            self.continue_expected
            or body.error is not None
            or (remaining is not None and remaining > DISCARD_LIMIT)
        ):
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            self.channel.persistent = False

    def _reject_before_pipeline(self, error: DesperadosError) -> None:
        self.log.info(
            "rejected {method} {path} from {remote_ip} with {status}: {reason}",
            method=self.method.decode("latin-1"),
            path=self.path.decode("latin-1"),
            remote_ip=getattr(self.getClientAddress(), "host", ""),
            status=error.status,
            reason=str(error),
        )
        if telemetry.observers:
            telemetry.emit(
                "http.request.reject",
                method=self.method.decode("latin-1"),
                status=error.status,
            )
        if self.body is not None:
            self.body.fail(error)
        message = str(error).encode("utf-8")
        self.setResponseCode(error.status)
        self.responseHeaders = Headers()
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.setHeader(b"content-length", b"%d" % len(message))
        self.write(message)
        self.finish()

    def _pause_reading(self) -> None:
        producer = self._network_producer()
        if producer is None:
            return
        producer.pauseProducing()
        # The client cannot send now, so its body timeout must not run.
        pause_timeout = getattr(self.channel, "pause_body_timeout", None)
        if pause_timeout is not None:
            pause_timeout()

    def _resume_reading(self) -> None:
        producer = self._network_producer()
        if producer is None:
            return
        resume_timeout = getattr(self.channel, "resume_body_timeout", None)
        if resume_timeout is not None:
            resume_timeout()
        producer.resumeProducing()

    def _network_producer(self) -> Any:
        """
        Return what pauses the reading of this request's body, or None.

        Over HTTP/1.1 that is the TCP (or TLS) transport.  Over HTTP/2 it is
        the stream: a paused stream buffers what arrives and stops granting
        flow-control window, so the client stops sending.  Before dispatch
        nothing is paused: a channel that dispatches at the end of the body
        would otherwise wait for ever.
        """
        # Request._cleanup deletes the channel attribute; connectionLost sets None.
        channel = getattr(self, "channel", None)
        if channel is None or not self.dispatched:
            return None
        if self.clientproto == _HTTP2:
            return channel
        return IPushProducer(channel.transport, None)


def _max_body_size(channel: Any) -> int | None:
    site = getattr(channel, "site", None)
    return getattr(site, "max_body_size", DEFAULT_MAX_BODY_SIZE)


class StreamingChannel(DesperadosChannel):
    """
    The HTTP/1.1 connection, running the pipeline before the body arrives.

    twisted.web's C{HTTPChannel} hands a request over only once its whole
    body has arrived (C{allContentReceived}), and answers C{Expect:
    100-continue} as soon as the head is parsed.  For a request that
    provides C{headReceived} (L{StreamingRequest}) this channel instead:

      - calls C{headReceived} at the end of the head when a body follows,
        and keeps feeding the body to the request while the pipeline runs;
      - leaves C{100 Continue} to the request, which sends it when a plug
        starts reading the body;
      - when the response is complete before the body, reads past the rest
        of the body (up to L{DISCARD_LIMIT} bytes, else it closes the
        connection) before parsing the next request, so that body bytes are
        never parsed as a request.
    """

    _streaming: Any = None
    """The request dispatched at the end of its head whose body is still arriving."""

    _streaming_done = False
    """Whether C{_streaming}'s response is complete, waiting for the body's end."""

    _discard_budget = 0

    adopted_conn: Any = None
    """The Conn that the next request rendered takes over instead of running
    the pipeline, set by L{desperados.http1_fast.FastPath}."""

    handed_over_by: Any = None
    """The L{desperados.http1_fast.FastPath} that handed this connection over,
    which gets it back once the connection is idle (see L{_give_back})."""

    waiting_request: Any = None
    """The request whose pipeline L{desperados.http1_fast.FastPath} waits for."""

    _closing = False
    """Whether the connection closes after a response sent before the body's end."""

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        request = self.requests[-1]
        if self._rejected or self.length == 0 or not hasattr(request, "headReceived"):
            return
        self._streaming = request
        self._streaming_done = False
        # The pipeline may answer before this method returns; what follows
        # the head is body, so switch to raw mode first, as lineReceived
        # would right after this call.
        self.setRawMode()
        request.headReceived(self._command, self._path, self._version)

    def _send100Continue(self) -> None:
        # Called by allHeadersReceived for every "Expect: 100-continue".  The
        # streaming request sends it when a plug starts reading the body.
        if not hasattr(self.requests[-1], "headReceived"):
            super()._send100Continue()

    def rawDataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._streaming_done and not self._handlingRequest:
            self._discard_budget -= len(data)
            if self._discard_budget < 0:
                self._close_unread()
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._closing:
            # The body decoder may still be running on the last bytes read.
            return
        request = self._streaming
        done = self._streaming_done
        self._streaming = None
        self._streaming_done = False
        super().allContentReceived()
        if request is not None and done:
            super().requestDone(request)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.handed_over_by is not None and not self._busyReceiving:
            self._give_back()

    def requestDone(self, request: Any) -> None:
        if request is self._streaming and self.persistent:
            # The next request starts after this body: wait for its end.
            self._streaming_done = True
            self._discard_budget = DISCARD_LIMIT
            return
        if request is self._streaming:
            self._streaming = None
            self._ignore_rest()
        super().requestDone(request)
        # Inside dataReceived, the bytes after this request are still being
        # parsed, and dataReceived gives the connection back at its end.
        if self.handed_over_by is not None and not self._busyReceiving:
            self._give_back()

    def _give_back(self) -> None:
        """
        Give the connection back to the fast path that handed it over, if idle.

        Idle means a persistent connection in line mode, no request in
        flight, no byte buffered and no request head begun, so the next
        bytes that arrive start a new request.
        """
        if (
            self.requests
            or not self.persistent
            or not self.line_mode
            or self._handlingRequest
            or self._buffer
            or self._dataBuffer
            or self._in_head
            or self._rejected
            or self._closing
            or self._streaming is not None
            or self.transport is None
        ):
            return
        fast_path, self.handed_over_by = self.handed_over_by, None
        fast_path.take_back()

    def loseConnection(self) -> None:
        # Lingering keeps reading, so that neither an unread request body
        # nor a request sent after this response makes the kernel reset the
        # connection and destroy the response's tail.
        self._close()

    def _close_unread(self) -> None:
        request = self._streaming
        self._streaming = None
        self._streaming_done = False
        self.persistent = False
        self._ignore_rest()
        super().requestDone(request)

    def _ignore_rest(self) -> None:
        # Nothing after this point is parsed: the connection is closing.
        self._closing = True
