"""
The values a WebSocket handler works with: frames, callback results, options.

Nothing here depends on Autobahn, so handlers can be written and unit tested
without a connection.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# Close codes from RFC 6455 section 7.4.1.
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

# Codes an endpoint may put in a Close frame: RFC 6455 section 7.4.1 and the
# IANA registry (1012-1014), plus 3000-4999 for libraries and applications.
# 1004, 1005, 1006 and 1015 must never be sent.
_SENDABLE_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)

# A Close frame's payload is a control frame payload (at most 125 bytes)
# holding the 2-byte code, which leaves 123 bytes for the reason.
MAX_CLOSE_REASON_BYTES = 123
MAX_CONTROL_PAYLOAD = 125


def is_sendable_close_code(code: int) -> bool:
    """
    Tell whether C{code} may be sent in a Close frame.
    """
    return code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class Text:
    """
    A text frame to send; C{str} is encoded as UTF-8, C{bytes} must already be.
    """

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Binary:
    """
    A binary frame to send.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """
    A ping frame to send; its payload is at most 125 bytes (RFC 6455 section 5.5).
    """

    data: bytes = b""

    def __post_init__(self) -> None:
        _check_control_payload(self)


@dataclass(frozen=True, slots=True)
class Pong:
    """
    An unsolicited pong frame to send (RFC 6455 section 5.5.3 allows them).
    """

    data: bytes = b""

    def __post_init__(self) -> None:
        _check_control_payload(self)


def _check_control_payload(frame: Ping | Pong) -> None:
    if len(frame.data) > MAX_CONTROL_PAYLOAD:
        msg = (
            f"expected a {type(frame).__name__} payload of at most "
            f"{MAX_CONTROL_PAYLOAD} bytes, got {len(frame.data)} bytes"
        )
        raise ValueError(msg)


Frame = Text | Binary | Ping | Pong


@dataclass(frozen=True, slots=True)
class Ok:
    """
    Callback result: keep the connection open with a new state.
    """

    state: object


@dataclass(frozen=True, slots=True)
class Push:
    """
    Callback result: send one or more frames, in order, then go on with C{state}.
    """

    frames: Frame | Sequence[Frame]
    state: object


@dataclass(frozen=True, slots=True)
class Stop:
    """
    Callback result: close the connection with C{code} and C{reason}.

    The handler's C{terminate} is called with a L{CloseReason} of kind
    C{"local"} once the connection is closed.

    :raises ValueError: for a code that may not be sent in a Close frame
        (1000-1003, 1007-1014 and 3000-4999 may), or a reason longer than
        123 bytes in UTF-8.
    """

    state: object
    code: int = NORMAL
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or not is_sendable_close_code(self.code):
            msg = (
                "expected a close code of 1000-1003, 1007-1014 or 3000-4999, "
                f"got {self.code!r}"
            )
            raise ValueError(msg)
        if len(self.reason.encode("utf-8")) > MAX_CLOSE_REASON_BYTES:
            msg = (
                f"expected a close reason of at most {MAX_CLOSE_REASON_BYTES} "
                f"bytes in UTF-8, got {self.reason!r}"
            )
            raise ValueError(msg)


Result = Ok | Push | Stop


@dataclass(frozen=True, slots=True)
class CloseReason:
    """
    The cause of a connection's end, given to the handler's C{terminate}.

    :ivar kind: C{"local"} (the handler returned L{Stop}), C{"remote"} (the
        peer sent a Close frame), C{"timeout"} (the idle timeout, or no pong
        to a server ping in time), C{"shutdown"} (the server is stopping),
        C{"protocol"} (the peer broke the protocol and was sent a Close frame
        with C{code}), C{"error"} (a callback raised, and 1011 was sent) or
        C{"lost"} (the transport closed without a closing handshake).
    :ivar code: the close code sent or received, when there was one.
    :ivar reason: the close reason text, or a description of the error.
    """

    kind: str
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WebSocketOptions:
    """
    How an upgraded connection behaves; given as keywords to C{Conn.upgrade}.

    The defaults are meant for a server on the open internet.

    :ivar timeout: seconds without any data from the peer before the
        connection is closed with 1001; C{None} disables it.
    :ivar compress: accept permessage-deflate (RFC 7692) when the client
        offers it.
    :ivar max_frame_size: the largest frame payload accepted, in bytes;
        larger frames close the connection with 1009.
    :ivar max_message_size: the largest message accepted, in bytes, counted
        after decompression; larger messages close the connection with 1009.
    :ivar validate_utf8: close with 1007 when a text message is not UTF-8.
    :ivar origins: the C{Origin} values allowed to connect, such as
        C{"https://example.com"}, compared case-insensitively; C{None}
        allows any.  A request with another Origin gets 403
        before the upgrade.  A request without Origin is allowed, because
        only browsers send it and the check exists to stop other sites'
        pages from opening connections with the user's cookies.
    :ivar subprotocols: the subprotocols this handler speaks, in order of
        preference; the first one that the client also offers is selected.
    :ivar close_handshake_timeout: seconds to wait for the peer's Close frame
        after ours before the TCP connection is dropped.
    :ivar ping_interval: seconds between server pings, or C{None} for none.
    :ivar ping_timeout: seconds to wait for the pong before closing.
    :ivar max_inflate_ratio: the largest ratio of a compressed message's
        inflated size to its compressed size; a message that inflates
        further closes the connection with 1009, before the rest is
        inflated.  C{None} disables the check.
    :ivar inflate_ratio_min_size: the inflated size of a message, in bytes,
        up to which C{max_inflate_ratio} is not checked, so that small
        messages that compress well (or reuse earlier messages through
        context takeover) are accepted.
    """

    timeout: float | None = 60.0
    compress: bool = True
    max_frame_size: int = 16 * 1024 * 1024
    max_message_size: int = 16 * 1024 * 1024
    validate_utf8: bool = True
    origins: tuple[str, ...] | None = None
    subprotocols: tuple[str, ...] = ()
    close_handshake_timeout: float = 5.0
    ping_interval: float | None = None
    ping_timeout: float | None = None
    # NOTE: both defaults are a judgment, not taken from another server.
    # Deflate compresses zeros about 1000 times, but a message over 1 MiB
    # that repeats one JSON record can also pass 100 and is then rejected.
    max_inflate_ratio: float | None = 100.0
    inflate_ratio_min_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_frame_size", "max_message_size", "inflate_ratio_min_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                msg = f"expected a positive int for {name}, got {value!r}"
                raise ValueError(msg)
        for name in ("timeout", "ping_interval", "ping_timeout"):
            _check_seconds(name, getattr(self, name), optional=True)
        ratio = self.max_inflate_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1
        ):
            msg = (
                "expected a number of 1 or more or None for max_inflate_ratio, "
                f"got {ratio!r}"
            )
            raise ValueError(msg)
        _check_seconds(
            "close_handshake_timeout", self.close_handshake_timeout, optional=False
        )
        if isinstance(self.origins, str) or isinstance(self.subprotocols, str):
            msg = (
                "expected a list of strings for origins and subprotocols, got a string"
            )
            raise TypeError(msg)
        if self.origins is not None:
            origins = tuple(origin.rstrip("/").lower() for origin in self.origins)
            object.__setattr__(self, "origins", origins)
        object.__setattr__(self, "subprotocols", tuple(self.subprotocols))


def _check_seconds(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        expected = "positive seconds or None" if optional else "positive seconds"
        msg = f"expected {expected} for {name}, got {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class WebSocketUpgrade:
    """
    A plug's request to turn its connection into a WebSocket.

    Stored on the Conn by C{Conn.upgrade} and carried out by the HTTP bridge
    once the pipeline has finished.
    """

    handler: object
    state: object
    options: WebSocketOptions = field(default_factory=WebSocketOptions)


class WebSocketHandle:
    """
    A reference to one open WebSocket connection that can be stored anywhere.

    C{send} may be called from any thread; the message reaches the handler's
    C{handle_info} on the reactor thread, after the callback that is running
    now (if any) has returned.
    """

    __slots__ = ("_deliver", "_open")

    def __init__(self, deliver: Callable[[object], None]) -> None:
        self._deliver = deliver
        self._open = True

    @property
    def open(self) -> bool:
        """
        Whether messages sent now can still reach the handler.
        """
        return self._open

    def send(self, message: object) -> bool:
        """
        Deliver C{message} to the connection's C{handle_info}.

        :returns: C{False} when the connection has already closed, in which
            case the message is dropped.
        """
        if not self._open:
            return False
        self._deliver(message)
        return True

    def _close(self) -> None:
        self._open = False


_current_handle: contextvars.ContextVar[WebSocketHandle] = contextvars.ContextVar(
    "desperados_websocket_handle"
)


def current_handle() -> WebSocketHandle:
    """
    Return the handle of the connection whose callback is running.

    Call it from inside a handler callback (C{init}, C{handle_in}, ...) to
    learn the connection's own handle, for example to register it with a
    chat room; it is the Python counterpart of Elixir's C{self()}.

    :raises RuntimeError: outside a handler callback.
    """
    try:
        return _current_handle.get()
    except LookupError:
        msg = "current_handle() called outside a WebSocket handler callback"
        raise RuntimeError(msg) from None


def frames_of(result: Push) -> Iterable[Frame]:
    """
    Return the frames of a L{Push} result as an iterable, one frame or many.
    """
    frames = result.frames
    if isinstance(frames, (Text, Binary, Ping, Pong)):
        return (frames,)
    return frames
