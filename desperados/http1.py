"""
The HTTP/1.1 connection: twisted.web's HTTPChannel with limits and deadlines.

L{HTTPChannel} parses requests.  L{DesperadosChannel} adds what a server on
the open internet needs: size limits (414 and 431), a deadline for the whole
request head (408), keep-alive and body read timeouts, a maximum number of
requests per connection, and strict parsing of the request line and header
fields as RFC 9112 and RFC 9110 require.  Every error response carries
C{connection: close}, and nothing the client sends after it is parsed.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    HTTPChannel,
    _ChunkedTransferDecoder,
    _MalformedChunkedDataError,
    datetimeToString,
)

from desperados import telemetry
from desperados._logging import observer as log_observer
from desperados.access_log import RequestRecord
from desperados.http1_options import HTTPOptions
from desperados.linger import Linger, linger_close

log = Logger(namespace="desperados.http1", observer=log_observer)


# Bytes allowed in a request line: visible ASCII and SP (RFC 9112 section 3).
_REQUEST_LINE_BYTES = bytes(range(0x21, 0x7F)) + b" "
# Bytes allowed in a header field line: HTAB, SP, visible ASCII and obs-text
# (RFC 9110 section 5.5).  Other control characters, including the bare CR,
# LF and NUL that twisted.web already rejects, make the request invalid.
_FIELD_LINE_BYTES = b"\t " + bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A request starts with a method, which is a token, or with the empty lines
# that RFC 9112 section 2.2 lets a server ignore.
_REQUEST_START_BYTES = frozenset(
    b"!#$%&'*+-.^_`|~0123456789"
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n"
)
# RFC 8446 section 5.1: a TLS record of content type 22 (handshake) starts
# with this byte, so a TLS ClientHello does.
_TLS_HANDSHAKE = 0x16
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 9112 section 3.2 and RFC 3986 section 3.2.2: uri-host [ ":" port ].
_HOST = re.compile(
    rb"(\[[0-9A-Za-z:.\-_~!$&'()*+,;=]+\]|[0-9A-Za-z.\-_~!$&'()*+,;=%]*)(:[0-9]*)?"
)

# RFC 9110 section 15; twisted.web's table lacks 431 and uses older names.
_REASON_PHRASES = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}

# RFC 9112 section 3.2.2: absolute-form, http or https only.
_ABSOLUTE_FORM = re.compile(rb"(?i:https?)://([^/?#]*)([^#]*)")

# Deadline kinds: waiting for a request, reading its head, reading its body.
_IDLE = "idle"
_HEAD = "head"
_BODY = "body"


class DesperadosChannel(HTTPChannel):
    """
    An HTTP/1.1 connection with limits, deadlines and strict parsing.

    The Site that builds it sets C{site}, whose C{http_options} (an
    L{HTTPOptions}) it reads when the connection is made.

    twisted.web's own idle timer restarts on every byte, so a client that
    trickles a header byte at a time keeps the connection forever.  This
    channel turns that timer off and keeps one deadline instead, which
    bytes extend only while the body is read.
    """

    options: HTTPOptions = HTTPOptions()
    # Set by twisted.web's Site.buildProtocol before the connection is made.
    site: Any = None

    _rejected = False
    _in_head = False
    _header_count = 0
    _head_size = 0
    _requests_received = 0
    _deadline_kind: str | None = None
    _deadline_at = 0.0
    _deadline_call: Any = None
    _linger: Linger | None = None
    _last_body_read = 0.0
    # The authority of an absolute-form request target, which replaces Host.
    _target_authority: bytes | None = None
    _body_timeout_paused = False
    # What twisted.web was parsing when it called
    # _respondToBadRequestAndDisconnect, which does not say why.
    _parsing: tuple[str, bytes] | None = None

    # Connection lifecycle

    def connectionMade(self) -> None:
        site = self.site
        self._reactor = site.reactor
        self.options = options = getattr(site, "http_options", None) or self.options
        self.MAX_LENGTH = max(
            options.max_request_line_length, options.max_header_length
        )
        self.maxHeaders = options.max_header_count
        # twisted.web's own limit sends a bare 400.  The checks in
        # lineReceived come first and send 431.
        self.totalHeadersSize = options.max_head_size + 1
        # Turn off twisted.web's idle timer (TimeoutMixin), which restarts
        # on every byte; the deadlines below replace it.
        self.timeOut = None
        super().connectionMade()
        self._set_deadline(_IDLE, options.keepalive_timeout)

    def setTimeout(self, period: float | None) -> float | None:
        # twisted.web and the WebSocket bridge call setTimeout(None) when
        # the connection leaves this channel (HTTP/2 after ALPN, a
        # WebSocket hand-off) and when it is lost, so drop the deadline too.
        if period is None:
            self._cancel_deadline()
        return super().setTimeout(period)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        linger, self._linger = self._linger, None
        if linger is not None:
            linger.cancel()
        super().connectionLost(reason)

    # Parsing

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        kind = self._deadline_kind
        if kind is _IDLE:
            self._set_deadline(_HEAD, self.options.header_timeout)
        elif kind is _BODY:
            self._last_body_read = self._reactor.seconds()
        super().dataReceived(data)
        # What the outermost call leaves over in line mode is an unfinished
        # line of a request head.  A client that ends lines with a bare LF
        # would otherwise wait for the header timeout; RFC 9112 section 2.2
        # lets a server reject it.
        if self._busyReceiving or not self.line_mode or self._rejected:
            return
        self._check_unfinished_line()

    def _check_unfinished_line(self) -> None:
        """
        Reject the buffered start of a line that is already invalid.

        Without this, a client whose first bytes cannot start a request, such
        as a TLS ClientHello on a cleartext port, waits for the head
        timeout and gets 408.
        """
        buffered = self._buffer
        if not buffered:
            return
        if not self._in_head:
            reason = _request_start_error(buffered[0])
            if reason is not None:
                self._reject(400, reason)
                return
        if b"\n" in buffered:
            self._reject(400, "bare LF in the request head")

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        if self._deadline_kind is _IDLE:
            # Pipelined bytes, parsed right after the previous response.
            self._set_deadline(_HEAD, self.options.header_timeout)
        if not self._in_head:
            if line:
                checked = self._check_request_line(line)
                if checked is None:
                    return
                line = checked
                self._in_head = True
                self._header_count = 0
                self._head_size = len(line)
            self._parsing = ("request line", line)
        elif line:
            if not self._check_field_line(line):
                return
            self._parsing = ("header", line)
        else:
            self._in_head = False
            self._parsing = None
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver closes the connection without a response.
        start_error = None if self._in_head else _request_start_error(line[0])
        if start_error is not None:
            self._reject(400, start_error)
        elif b"\n" in line[: self.MAX_LENGTH]:
            self._reject(400, "bare LF in the request head")
        elif self._in_head:
            self._reject(431, "header field too long")
        else:
            self._reject(414, "request line too long")

    def _check_request_line(self, line: bytes) -> bytes | None:
        """
        Check a request line and return it in origin-form, or None if rejected.
        """
        self._target_authority = None
        start_error = _request_start_error(line[0])
        if start_error is not None:
            self._reject(400, start_error)
            return None
        if len(line) > self.options.max_request_line_length:
            self._reject(414, "request line too long")
            return None
        if line.translate(None, _REQUEST_LINE_BYTES):
            reason = "bare LF in the request head" if b"\n" in line else None
            self._reject(400, reason or "invalid character in the request line")
            return None
        method, _, rest = line.partition(b" ")
        target, _, version = rest.partition(b" ")
        if _HTTP_VERSION.fullmatch(version) and not version.startswith(b"HTTP/1."):
            self._reject(505, "only HTTP/1.0 and HTTP/1.1 are supported")
            return None
        if target[:1] == b"/" or (target == b"*" and method == b"OPTIONS"):
            return line
        if method == b"CONNECT":
            # Authority-form; the pipeline decides what to do with it.
            return line
        return self._origin_form(method, target, version)

    def _origin_form(
        self, method: bytes, target: bytes, version: bytes
    ) -> bytes | None:
        # RFC 9112 section 3.2.2: for an absolute-form target, the server
        # must ignore Host and use the target's authority.  twisted.web
        # keeps the whole URI as the path; allHeadersReceived sets Host.
        match = _ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            self._reject(400, "invalid request target")
            return None
        authority, path = match.group(1), match.group(2)
        # RFC 9110 section 4.2.4: userinfo in an http(s) URI is an error.
        if not authority or b"@" in authority or not _HOST.fullmatch(authority):
            self._reject(400, "invalid authority in the request target")
            return None
        if not path.startswith(b"/"):
            path = b"/" + path
        self._target_authority = authority
        return method + b" " + path + b" " + version

    def _check_field_line(self, line: bytes) -> bool:
        options = self.options
        if len(line) > options.max_header_length:
            self._reject(431, "header field too long")
            return False
        self._header_count += 1
        if self._header_count > options.max_header_count:
            self._reject(431, "too many header fields")
            return False
        self._head_size += len(line)
        if self._head_size > options.max_head_size:
            self._reject(431, "request head too large")
            return False
        if line[0] in b" \t":
            # RFC 9112 section 5.2 allows replacing obs-fold with SP, which
            # twisted.web does; a proxy in front may not, so reject it.
            self._reject(400, "obsolete line folding in a header field")
            return False
        if line.translate(None, _FIELD_LINE_BYTES):
            reason = "bare LF in the request head" if b"\n" in line else None
            self._reject(400, reason or "invalid character in a header field")
            return False
        return True

    def headerReceived(self, line: bytes) -> bool:
        self._parsing = ("header", line)
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        reason = _check_head(request.requestHeaders, self._version)
        if reason is not None:
            self._reject(400, reason)
            return
        reason = _check_expect(request.requestHeaders)
        if reason is not None:
            self._reject(417, reason)
            return
        decoder = self._transferDecoder
        if type(decoder) is _ChunkedTransferDecoder:
            self._transferDecoder = _CheckedChunkedDecoder(
                decoder.dataCallback, decoder.finishCallback, self._chunk_size_read
            )
        if self._target_authority is not None:
            request.requestHeaders.setRawHeaders(b"host", [self._target_authority])
        if self.length != 0:
            self._set_deadline(_BODY, self.options.body_timeout)
            self._last_body_read = self._reactor.seconds()
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        self._parsing = ("body", b"")
        super().rawDataReceived(data)
        # twisted.web's chunked decoder looks only for CRLF, so a chunk-size
        # or trailer line that ends with a bare LF waits for the body timeout.
        decoder = self._transferDecoder
        if (
            not self._rejected
            and getattr(decoder, "state", None) in ("CHUNK_LENGTH", "TRAILER")
            and _BARE_LF.search(decoder._buffer)
        ):
            self._reject(400, "bare LF in a chunked body")

    def _chunk_size_read(self, size: int) -> None:
        # StreamingRequest checks the size against the maximum body size.
        check = getattr(self.requests[-1], "chunk_size_received", None)
        if check is not None:
            check(size)

    def allContentReceived(self) -> None:
        # twisted.web calls this right after allHeadersReceived, even when
        # that rejected the request.
        if self._rejected:
            return
        self._parsing = None
        self._set_deadline(None, None)
        super().allContentReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        self._requests_received += 1
        if version != b"HTTP/1.1":
            return False
        connection = request.requestHeaders.getRawHeaders(b"connection", [])
        if closes_connection(connection, self._requests_received, self.options):
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def served_elsewhere(self, persistent: bool) -> None:
        """
        Count a request that L{desperados.http1_fast.FastPath} served.

        The request never reached this channel: count it towards
        C{max_requests} and, if C{persistent}, wait for the next one.
        """
        self._requests_received += 1
        if persistent:
            self._set_deadline(_IDLE, self.options.keepalive_timeout)
        else:
            self._set_deadline(None, None)

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            # Bytes of the next request may already be buffered; its head
            # deadline starts now.
            pending = self._buffer or self._dataBuffer
            kind = _HEAD if pending else _IDLE
            timeout = (
                self.options.header_timeout
                if pending
                else self.options.keepalive_timeout
            )
            self._set_deadline(kind, timeout)
        super().requestDone(request)
        # twisted.web parsed the pipelined bytes it had buffered.
        if (
            self.persistent
            and self.line_mode
            and not self._busyReceiving
            and not self._rejected
        ):
            self._check_unfinished_line()

    def pause_body_timeout(self) -> None:
        """
        Stop the body timeout while the server, not the client, is slow.

        Call it when reading is paused because no plug reads the request
        body yet; the client then cannot send, and must not get 408.
        """
        self._body_timeout_paused = True

    def resume_body_timeout(self) -> None:
        """
        Start the body timeout again, counting from now.
        """
        self._body_timeout_paused = False
        self._last_body_read = self._reactor.seconds()

    # Errors

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web calls this for every request it cannot parse, writes a
        # bare "400 Bad Request" without Content-Length or Connection, and
        # closes without reading what the client is still sending.
        reason = getattr(self._transferDecoder, "error_reason", None)
        self._reject(400, reason or _diagnose(self._parsing))

    def _reject(self, status: int, reason: str) -> None:
        """
        Send C{status} with C{reason} as the body, then close the connection.

        Nothing the client sends afterwards is parsed.
        """
        if self._rejected:
            return
        log.info(
            "rejected a request from {peer} with {status}: {reason}",
            peer=_peer_address(self.transport),
            status=status,
            reason=reason,
        )
        # A response already under way (its body still streaming while the
        # request body arrives) cannot be followed by another: just close.
        if not any(request.startedWriting for request in self.requests):
            self.transport.write(
                _error_response(status, reason, self._reactor.seconds())
            )
            # A request whose pipeline runs, such as one with a streaming
            # body, writes its own access log line and telemetry.
            dispatched = any(
                getattr(request, "dispatched", False) for request in self.requests
            )
            if not dispatched:
                self._record_rejection(status, len(_error_body(reason)))
        self._close()

    def _record_rejection(self, status: int, sent_length: int) -> None:
        """
        Write the access log line and emit the telemetry of a rejected request.

        The method and target are those of the request line if it was
        parsed, and None otherwise.
        """
        method = getattr(self, "_command", None)
        target = getattr(self, "_path", None)
        version = getattr(self, "_version", None)
        if telemetry.observers:
            telemetry.emit(
                "http.request.reject",
                method=None if method is None else method.decode("latin-1"),
                status=status,
            )
        log_request = getattr(self.site, "log", None)
        if log_request is None:
            return
        headers = self.requests[-1].requestHeaders if self.requests else None
        record = RequestRecord(
            method,
            target,
            version,
            headers,
            self.transport.getPeer(),
            status,
            sent_length,
        )
        log_request(record)

    def _close(self) -> None:
        """
        Close the connection without parsing anything more from it.
        """
        if self._linger is not None:
            return
        self._rejected = True
        self._cancel_deadline()
        self.clearLineBuffer()
        self._dataBuffer = []
        self._networkProducer.unregisterProducer()
        self._linger = linger_close(
            self.transport,
            self._reactor,
            self.options.linger_timeout,
            self.options.keepalive_timeout,
        )

    # Deadlines

    def _set_deadline(self, kind: str | None, timeout: float | None) -> None:
        """
        Replace the deadline with one of C{kind} in C{timeout} seconds.

        One DelayedCall per connection: moving a deadline later leaves the
        call where it is, and L{_deadline_reached} schedules it again.
        """
        if timeout is None:
            self._deadline_kind = None
            return
        self._deadline_kind = kind
        call = self._deadline_call
        if call is not None:
            # reset() only when the deadline moves earlier.
            now = self._reactor.seconds()
            self._deadline_at = now + timeout
            if call.getTime() > self._deadline_at:
                call.reset(timeout)
            return
        self._deadline_at = self._reactor.seconds() + timeout
        self._deadline_call = self._reactor.callLater(timeout, self._deadline_reached)

    def _cancel_deadline(self) -> None:
        self._deadline_kind = None
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()

    def _deadline_reached(self) -> None:
        self._deadline_call = None
        kind = self._deadline_kind
        if kind is None:
            return
        deadline = self._deadline_at
        if kind is _BODY:
            # While the body timeout is paused, the last read counts as now.
            if self._body_timeout_paused:
                self._last_body_read = self._reactor.seconds()
            deadline = self._last_body_read + (self.options.body_timeout or 0.0)
        remaining = deadline - self._reactor.seconds()
        if remaining > 0:
            self._deadline_call = self._reactor.callLater(
                remaining, self._deadline_reached
            )
            return

        self._deadline_kind = None
        if kind is _IDLE:
            log.debug(
                "closing idle connection from {peer}",
                peer=_peer_address(self.transport),
            )
            # The idle time counts from the end of the last response as
            # queued, but the close lingers until that response is sent.
            self._close()
        elif kind is _HEAD:
            self._reject(408, "timed out reading the request head")
        else:
            self._reject(408, "timed out reading the request body")


def closes_connection(
    connection: list[bytes], requests_received: int, options: HTTPOptions
) -> bool:
    """
    Say whether an HTTP/1.1 request ends its connection after the response.

    It does when its C{Connection} header lists C{close}, or when it is
    request number C{options.max_requests} of the connection.  twisted.web
    reads only the first Connection header and splits it on spaces, so
    "keep-alive,close" would keep the connection open; RFC 9110 section
    7.6.1 makes it a comma-separated list.

    :param connection: the values of the request's C{Connection} headers.
    :param requests_received: the number of requests on the connection so
        far, this one included.
    """
    if lists_close(connection):
        return True
    max_requests = options.max_requests
    return bool(max_requests and requests_received >= max_requests)


def lists_close(connection: list[bytes]) -> bool:
    """
    Say whether C{Connection} header values list the C{close} option.
    """
    for value in connection:
        for token in value.split(b","):
            if token.strip().lower() == b"close":
                return True
    return False


def _peer_address(transport: Any) -> str:
    """
    Format the client's address as C{host:port}, or as Twisted does when
    it has no port (a UNIX socket).
    """
    peer = transport.getPeer()
    port = getattr(peer, "port", None)
    if port is None:
        return str(peer)
    return f"{peer.host}:{port}"


def _request_start_error(first: int) -> str | None:
    """
    Say why a request cannot start with the byte C{first}, or return None.
    """
    if first in _REQUEST_START_BYTES:
        return None
    if first == _TLS_HANDSHAKE:
        return (
            "the request looks like a TLS handshake, "
            "but this port serves cleartext HTTP"
        )
    return "invalid first byte of the request line"


def _check_expect(headers: Any) -> str | None:
    """
    Check that every expectation in the Expect header is C{100-continue}.

    RFC 9110 section 10.1.1 defines no other expectation and lets a server
    respond to any other with 417.  An HTTP/1.0 client's C{100-continue} is
    accepted here and ignored later, as that section requires.

    :returns: why the request is rejected, or None.
    """
    for value in headers.getRawHeaders(b"expect", []):
        for member in value.split(b","):
            member = member.strip()
            if member and member.lower() != b"100-continue":
                return "unsupported Expect header, expected '100-continue'"
    return None


def _check_trailer_line(line: bytes) -> str | None:
    """
    Check a trailer field line of a chunked body, which RFC 9112 section
    7.1.2 gives the syntax of a header field line.

    :returns: why the line is invalid, or None.
    """
    name, colon, value = line.partition(b":")
    if not colon:
        return "trailer field without a colon"
    if not _TOKEN.fullmatch(name):
        return "invalid trailer field name"
    if value.translate(None, _FIELD_LINE_BYTES):
        return "invalid character in a trailer field"
    return None


class _CheckedChunkedDecoder(_ChunkedTransferDecoder):
    """
    twisted.web's chunked decoder, which also checks trailer field lines
    and reports each chunk size as soon as its line is read.

    twisted.web collects trailer lines without looking at them.

    :ivar error_reason: why the body was found malformed, when this decoder
        and not twisted.web's found it.
    """

    error_reason: str | None = None

    def __init__(
        self,
        data_callback: Any,
        finish_callback: Any,
        chunk_size_callback: Any,
    ) -> None:
        super().__init__(data_callback, finish_callback)
        self._chunk_size_callback = chunk_size_callback

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        done = super()._dataReceived_CHUNK_LENGTH()
        if done and self.length:
            self._chunk_size_callback(self.length)
        return done

    def _dataReceived_TRAILER(self) -> bool:
        count = len(self._trailerHeaders)
        more = super()._dataReceived_TRAILER()
        if len(self._trailerHeaders) > count:
            reason = _check_trailer_line(bytes(self._trailerHeaders[-1]))
            if reason is not None:
                self.error_reason = reason
                raise _MalformedChunkedDataError(reason)
        return more


def _check_head(headers: Any, version: bytes) -> str | None:
    """
    Check the header fields that RFC 9112 requires a server to check.

    :returns: why the request is invalid, or None.
    """
    hosts = headers.getRawHeaders(b"host")
    if hosts is None:
        if version == b"HTTP/1.1":
            return "missing Host header"
    elif len(hosts) > 1:
        return "more than one Host header"
    elif not _HOST.fullmatch(hosts[0]):
        return "invalid Host header"

    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None:
        # RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message
        # means faulty framing.  twisted.web accepts it, and ignores
        # "identity", which a proxy in front may read as chunked.
        if version != b"HTTP/1.1":
            return "Transfer-Encoding in an HTTP/1.0 request"
        if [value.strip().lower() for value in codings] != [b"chunked"]:
            return "unsupported Transfer-Encoding, expected 'chunked'"
    return None


def _diagnose(parsing: tuple[str, bytes] | None) -> str:
    """
    Say why twisted.web rejected what it was parsing.
    """
    if parsing is None:
        return "malformed request"
    part, line = parsing
    if part == "request line":
        return "malformed request line"
    if part == "body":
        return "malformed chunked body"
    name, colon, value = line.partition(b":")
    if not colon:
        return "header field without a colon"
    if name[-1:] in (b" ", b"\t"):
        return "whitespace before the colon in a header field"
    if not _TOKEN.fullmatch(name):
        return "invalid header field name"
    if name.lower() in (b"content-length", b"transfer-encoding"):
        return "invalid or conflicting Content-Length and Transfer-Encoding"
    return "invalid header field"


def _error_body(reason: str) -> bytes:
    return reason.encode("ascii") + b"\n"


def _error_response(status: int, reason: str, now: float) -> bytes:
    body = _error_body(reason)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASON_PHRASES[status]),
            b"date: " + datetimeToString(now) + b"\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )
