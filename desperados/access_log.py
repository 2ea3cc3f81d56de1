"""
The access log: one line per request in the combined log format.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.http import datetimeToLogString
from twisted.web.http_headers import Headers

from desperados._logging import observer as log_observer

log = Logger(namespace="desperados.access_log", observer=log_observer)

# nginx's status for a request whose client closed the connection before
# any response was sent; no response status exists for it.
CLIENT_CLOSED = 499

_HTTP2 = b"HTTP/2"

# Bytes written as is inside a quoted field: printable ASCII but the quote
# and the backslash, which get a backslash, as Apache escapes them.
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord('"'), ord("\\")}


class AccessLog:
    """
    Writes a combined log format line for each request to a file or stdout.

    The format is Apache's C{combined}: client address (C{conn.remote_ip},
    so that a plug such as C{ProxyHeaders} can set it), C{-}, C{-}, time,
    request line, status, body bytes sent (C{-} for none), Referer and
    User-Agent.  The request line of an HTTP/2 request ends in C{HTTP/2.0}.
    A request whose client left before any response gets status
    499, as in nginx; WebSocket upgrades are logged with 101 when handed
    over.  A request rejected before the pipeline ran gets its error
    status, and C{-} as the request line if that line was not parsed.

    :param destination: a file path, opened for appending, or C{"-"} for
        standard output.
    :param clock: an C{IReactorTime} for the timestamps.
    """

    def __init__(self, destination: str, clock: Any) -> None:
        self.destination = destination
        self.clock = clock
        self._file: IO[str] | None = None

    def open(self) -> None:
        """
        Open the destination, unless it is open already.
        """
        if self._file is not None:
            return
        if self.destination == "-":
            self._file = sys.stdout
        else:
            # Line buffered, so that a line is complete on disk once written.
            self._file = open(self.destination, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        """
        Close the destination file; standard output stays open.
        """
        file, self._file = self._file, None
        if file is not None and file is not sys.stdout:
            file.close()

    def write(self, request: Any, status: int | None = None) -> None:
        """
        Write the line for C{request}, opening the destination if needed.

        A failed write (a full disk, a file removed) is logged and the line
        dropped: the response must not fail because of its log line.

        :param status: the status to log instead of the request's own.
        """
        line = format_line(request, self.clock.seconds(), status) + "\n"
        try:
            self.open()
            assert self._file is not None
            self._file.write(line)
            if self._file is sys.stdout:
                self._file.flush()
        except OSError as error:
            log.error(
                "cannot write to the access log {destination}: {error}",
                destination=self.destination,
                error=str(error),
            )


class RequestRecord:
    """
    A request served without a twisted.web request, with the attributes
    of a finished one that L{format_line} reads: one that the HTTP/1.1
    channel rejected before the pipeline ran, or one that the fast path
    served.

    :param method: the method, or None if the request line was not parsed.
    :param uri: the request target, or None with C{method}.
    :param clientproto: the HTTP version, or None with C{method}.
    :param headers: the header fields parsed before the rejection, or None.
    :param client: the client's address.
    :param code: the status sent.
    :param sent_length: the length of the response body sent.
    """

    finished = True
    startedWriting = True  # noqa: N815
    access_log_client: str | None = None

    def __init__(
        self,
        method: bytes | None,
        uri: bytes | None,
        clientproto: bytes | None,
        headers: Headers | None,
        client: Any,
        code: int,
        sent_length: int,
    ) -> None:
        self.method = method
        self.uri = uri
        self.clientproto = clientproto
        self._headers = headers
        self._client = client
        self.code = code
        self.sentLength = sent_length

    def getClientAddress(self) -> Any:  # noqa: N802
        return self._client

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
        if self._headers is None:
            return None
        values = self._headers.getRawHeaders(name)
        return values[-1] if values else None


def format_line(request: Any, now: float, status: int | None = None) -> str:
    """
    Format the combined log format line of C{request} at time C{now}.
    """
    host = getattr(request, "access_log_client", None)
    if not host:
        client = request.getClientAddress()
        host = client.host if isinstance(client, (IPv4Address, IPv6Address)) else "-"
    if request.method is None:
        # The request was rejected before its request line was parsed.
        request_line = b"-"
    else:
        version = b"HTTP/2.0" if request.clientproto == _HTTP2 else request.clientproto
        request_line = b"%s %s %s" % (request.method, request.uri, version)
    if status is None:
        started = request.startedWriting or request.finished
        status = request.code if started else CLIENT_CLOSED
    sent = request.sentLength
    referer = request.getHeader(b"referer") or b"-"
    agent = request.getHeader(b"user-agent") or b"-"
    return (
        f'{host} - - {datetimeToLogString(now)} "{_escape(request_line)}" '
        f'{status} {sent or "-"} "{_escape(referer)}" "{_escape(agent)}"'
    )


def _escape(value: bytes) -> str:
    return "".join(
        chr(byte) if byte in _PLAIN else _escaped_byte(byte) for byte in value
    )


def _escaped_byte(byte: int) -> str:
    if byte in (ord('"'), ord("\\")):
        return "\\" + chr(byte)
    return f"\\x{byte:02x}"
