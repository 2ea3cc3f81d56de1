"""
The endpoint that upgrades WebSocket requests, and its echo handler.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.logger import Logger
from zope.interface import implementer

from desperados._logging import observer as log_observer
from desperados.conn import Conn
from desperados.interfaces import IPlug, IWebSock
from desperados.websock import Binary, CloseReason, Ok, Push, Text, WebSocketOptions


@implementer(IWebSock)
class Echo:
    """
    Send every message back with the same opcode, and C{pong\\n} for C{ping\\n}.

    The state is the number of C{ping\\n} messages received so far.
    """

    log = Logger(observer=log_observer)

    def init(self, state: int) -> Ok:
        return Ok(state)

    def handle_in(self, frame: tuple[bytes, str], state: int) -> Push:
        data, opcode = frame
        if opcode == "binary":
            return Push(Binary(data), state)
        if data == b"ping\n":
            return Push(Text(b"pong\n"), state + 1)
        return Push(Text(data), state)

    def handle_info(self, message: object, state: int) -> Ok:
        return Ok(state)

    def terminate(self, reason: CloseReason, state: int) -> None:
        self.log.debug(
            "echo connection ended ({kind}, code {code}) after {pings} pings",
            kind=reason.kind,
            code=reason.code,
            pings=state,
        )


class _Options:
    __slots__ = ("handler", "options", "state")

    def __init__(self, handler: object, state: object, options: dict[str, object]):
        self.handler = handler
        self.state = state
        self.options = options


@implementer(IPlug)
class Websocket:
    """
    Upgrade requests that the detection plug marked with C{websocket}, then halt.

    Requests without the C{websocket} assign pass through untouched.  Options
    (a mapping, all optional): C{handler} (an L{IWebSock}, the L{Echo} handler
    by default), C{state} (its initial state, C{0} by default), and any field
    of L{desperados.websock.WebSocketOptions}.
    """

    def init(self, opts: Mapping[str, object] | None) -> _Options:
        options = dict(opts or {})
        handler = options.pop("handler", None) or Echo()
        state = options.pop("state", 0)
        if not IWebSock.providedBy(handler):
            msg = f"expected a handler providing IWebSock, got {handler!r}"
            raise TypeError(msg)
        # Build the options once so that a bad one fails here, not per request.
        WebSocketOptions(**options)  # type: ignore[arg-type]
        return _Options(handler, state, options)

    def call(self, conn: Conn, state: _Options) -> Conn:
        if not conn.assigns.get("websocket"):
            return conn
        return conn.upgrade(state.handler, state.state, **state.options).halt()
