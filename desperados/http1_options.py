"""
HTTPOptions: the limits and timeouts of HTTP/1.1 connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HTTPOptions:
    """
    Limits and timeouts of HTTP/1.1 connections.

    The defaults are meant for a server on the open internet.  The line
    and header limits and C{max_requests} are Bandit's defaults, and
    C{max_connections} and the timeouts are those of Thousand Island, the
    socket layer under Bandit.  Bandit has no limit on the whole head; 64
    KiB keeps the memory a connection can take while its head arrives
    within four times the 16 KiB of twisted.web and Node.js.

    :ivar max_request_line_length: the longest request line accepted, in
        bytes without the CRLF; longer ones get 414.
    :ivar max_header_length: the longest header field line accepted, name
        and value, in bytes without the CRLF; longer ones get 431.
    :ivar max_header_count: the maximum number of header fields in one
        request; more get 431.
    :ivar max_head_size: the largest request head accepted, request line
        and header field lines without their CRLFs, in bytes; larger ones
        get 431.
    :ivar max_requests: requests served on one connection before the
        response carries C{connection: close}; C{None} for no limit.
    :ivar max_connections: the maximum number of open connections,
        WebSockets included.  A new connection beyond it gets 503 and is
        closed, and the open ones are not affected.  C{None} for no limit.
    :ivar keepalive_timeout: seconds a connection may wait for the first
        byte of its next request (or of its first one) before it is closed
        without a response.  It is also the idle timeout of HTTP/2
        connections, and a closing connection whose client reads nothing
        of the response for this long is aborted.
    :ivar header_timeout: seconds from the first byte of a request until
        its head is complete; then 408.  Bytes that trickle in do not
        extend it.
    :ivar body_timeout: seconds without any byte of the request body while
        the body is being received; then 408.
    :ivar linger_timeout: seconds that a closing connection keeps reading
        and discarding input after its last response has been sent, before
        it is aborted, so that a client still sending gets the whole
        response instead of a TCP reset.
    :ivar tls_handshake_timeout: seconds from the TCP connection until the
        TLS handshake must be complete.  A connection still in its handshake
        then is aborted, because no HTTP response can be sent before the
        handshake ends.  C{None} for no limit other than C{keepalive_timeout}.
    """

    max_request_line_length: int = 10_000
    max_header_length: int = 10_000
    max_header_count: int = 50
    max_head_size: int = 65_536
    max_requests: int | None = None
    max_connections: int | None = 16_384
    keepalive_timeout: float | None = 60.0
    header_timeout: float | None = 60.0
    body_timeout: float | None = 60.0
    linger_timeout: float = 2.0
    tls_handshake_timeout: float | None = 10.0

    def __post_init__(self) -> None:
        for name in (
            "max_request_line_length",
            "max_header_length",
            "max_header_count",
            "max_head_size",
        ):
            _check_positive(name, getattr(self, name), int, optional=False)
        for name in ("max_requests", "max_connections"):
            _check_positive(name, getattr(self, name), int, optional=True)
        for name in (
            "keepalive_timeout",
            "header_timeout",
            "body_timeout",
            "tls_handshake_timeout",
        ):
            _check_positive(name, getattr(self, name), (int, float), optional=True)
        _check_positive(
            "linger_timeout", self.linger_timeout, (int, float), optional=False
        )


def _check_positive(name: str, value: object, kind: Any, *, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        expected = "a positive number" if kind is not int else "a positive int"
        if optional:
            expected += " or None"
        msg = f"expected {expected} for {name}, got {value!r}"
        raise ValueError(msg)
