"""
The WebSocket bridge: an Autobahn protocol that drives an L{IWebSock} handler.

A plug asks for an upgrade with C{Conn.upgrade}; once the pipeline is done,
the HTTP bridge calls L{WebSocketBridge.hand_off}, which moves the TCP (or
TLS) transport from twisted.web's channel to a L{HandlerProtocol}.  From
then on, Autobahn parses and writes frames and the handler sees only
C{(data, opcode)} pairs and its own state.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.web.http import Request

from desperados._logging import observer as log_observer
from desperados import telemetry, websock
from desperados.errors import BadRequestError
from desperados.interfaces import IWebSockControl
from desperados.websock import (
    Binary,
    CloseReason,
    Ok,
    Ping,
    Pong,
    Push,
    Stop,
    Text,
    WebSocketHandle,
    WebSocketOptions,
    WebSocketUpgrade,
)

# Characters that str.splitlines() treats as line breaks on top of CR and LF.
# Autobahn parses the replayed handshake with splitlines(), while twisted.web
# splits header lines on CRLF only, so a header value holding one of these
# would be read as two headers by Autobahn.
_LINE_BREAKS_FOR_STR = frozenset("\x0b\x0c\x1c\x1d\x1e\x85")

_RESULT_TYPES = (Ok, Push, Stop)

# Marks a callback that takes only the state (init), since a handle_info
# message may itself be None.
_STATE_ONLY = object()


class HandlerProtocol(WebSocketServerProtocol):
    """
    One WebSocket connection, running the callbacks of an L{IWebSock} handler.

    Callbacks run one at a time: while a callback's Deferred or coroutine is
    pending, later events wait in a queue.
    """

    _log = Logger(observer=log_observer)

    upgrade: WebSocketUpgrade
    bridge: WebSocketBridge

    def __init__(self) -> None:
        super().__init__()
        self._state: object = None
        self._opened = False
        self._terminated = False
        self._pending = False
        self._queue: deque[tuple[str, object]] = deque()
        self._close_reason: CloseReason | None = None
        self._idle_call: Any = None
        self._last_received = 0.0
        self.handle = WebSocketHandle(self._deliver_info)

    # Autobahn entry points

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own dataReceived formats a debug message on every read;
        # skip it and record activity for the idle timeout instead.
        self._last_received = self.bridge.reactor.seconds()
        self._dataReceived(data)

    def onConnect(self, request: Any) -> tuple[str | None, dict[str, str]]:
        return _select_subprotocol(request.protocols, self.upgrade.options), {}

    def onOpen(self) -> None:
        self._opened = True
        self._state = self.upgrade.state
        self.bridge.connections.add(self)
        if telemetry.observers:
            telemetry.emit("websocket.open")
        self._start_idle_timer()
        self._dispatch("init", _STATE_ONLY)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        opcode = "binary" if isBinary else "text"
        if telemetry.observers:
            telemetry.emit("websocket.message.in", opcode=opcode, size=len(payload))
        self._dispatch("handle_in", (payload, opcode))

    def onPing(self, payload: bytes) -> None:
        super().onPing(payload)
        if IWebSockControl.providedBy(self.upgrade.handler):
            self._dispatch("handle_control", (payload, "ping"))

    def onPong(self, payload: bytes) -> None:
        if IWebSockControl.providedBy(self.upgrade.handler):
            self._dispatch("handle_control", (payload, "pong"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.bridge.connections.discard(self)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self.handle._close()
        if self._opened and telemetry.observers:
            telemetry.emit("websocket.close")
        if self._opened and not self._terminated:
            self._terminate(self._ending_reason(wasClean, code, reason))

    # Server-side actions

    def shutdown(self) -> None:
        """
        Close the connection with 1001 because the server is stopping.
        """
        self._close(CloseReason("shutdown", websock.GOING_AWAY, "server shutdown"))

    # Callback dispatch

    def _dispatch(self, callback: str, argument: object) -> None:
        if self._terminated or self._close_reason is not None:
            return
        if self._pending:
            self._queue.append((callback, argument))
            return
        self._invoke(callback, argument)

    def _invoke(self, callback: str, argument: object) -> None:
        handler = self.upgrade.handler
        token = websock._current_handle.set(self.handle)
        try:
            if argument is _STATE_ONLY:
                result = getattr(handler, callback)(self._state)
            else:
                result = getattr(handler, callback)(argument, self._state)
        except Exception:
            self._callback_failed(Failure(), callback)
            return
        finally:
            websock._current_handle.reset(token)

        if isinstance(result, _RESULT_TYPES):
            self._apply(result, callback)
        elif isinstance(result, Deferred) or inspect.isawaitable(result):
            self._wait_for(result, callback)
        else:
            self._apply(result, callback)

    def _wait_for(self, pending: Any, callback: str) -> None:
        self._pending = True
        if not isinstance(pending, Deferred):
            pending = ensureDeferred(pending)

        def resolved(result: object) -> None:
            self._pending = False
            self._apply(result, callback)
            self._drain_queue()

        def failed(failure: Failure) -> None:
            self._pending = False
            self._callback_failed(failure, callback)

        pending.addCallbacks(resolved, failed)

    def _drain_queue(self) -> None:
        while self._queue and not self._pending:
            callback, argument = self._queue.popleft()
            self._dispatch(callback, argument)

    def _apply(self, result: object, callback: str) -> None:
        if self._terminated:
            return
        if type(result) is Push:
            self._state = result.state
            for frame in websock.frames_of(result):
                self._send_frame(frame)
        elif type(result) is Ok:
            self._state = result.state
        elif type(result) is Stop:
            self._state = result.state
            self._close(CloseReason("local", result.code, result.reason))
        else:
            msg = (
                f"{callback}() of {self.upgrade.handler!r} returned {result!r}, "
                "expected Ok, Push or Stop"
            )
            self._callback_failed(Failure(TypeError(msg)), callback)

    def _send_frame(self, frame: object) -> None:
        if self.state != self.STATE_OPEN:
            return
        if type(frame) is Text:
            data = frame.data
            payload = data.encode("utf-8") if isinstance(data, str) else data
            self.sendMessage(payload)
            if telemetry.observers:
                telemetry.emit("websocket.message.out", opcode="text", size=len(payload))
        elif type(frame) is Binary:
            self.sendMessage(frame.data, isBinary=True)
            if telemetry.observers:
                telemetry.emit("websocket.message.out", opcode="binary", size=len(frame.data))
        elif type(frame) is Ping:
            self.sendPing(frame.data or None)
        elif type(frame) is Pong:
            self.sendPong(frame.data or None)
        else:
            msg = f"expected a Text, Binary, Ping or Pong frame, got {frame!r}"
            raise TypeError(msg)

    def _deliver_info(self, message: object) -> None:
        reactor = self.bridge.reactor
        if isInIOThread():
            reactor.callLater(0, self._dispatch, "handle_info", message)
        else:
            reactor.callFromThread(self._dispatch, "handle_info", message)

    # Endings

    def _callback_failed(self, failure: Failure, callback: str) -> None:
        self._log.failure(
            "WebSocket handler {handler!r} raised in {callback}() for {peer}",
            failure,
            handler=self.upgrade.handler,
            callback=callback,
            peer=self.peer,
        )
        self._close(CloseReason("error", websock.INTERNAL_ERROR, "internal error"))

    def _close(self, reason: CloseReason) -> None:
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._queue.clear()
        if self.state == self.STATE_OPEN:
            self.sendClose(reason.code, reason.reason or None)

    def _ending_reason(self, was_clean: bool, code: int | None, reason: str | None) -> CloseReason:
        if self._close_reason is not None:
            return self._close_reason
        if self.closedByMe and self.localCloseCode is not None:
            # Autobahn closed because the peer broke the protocol (1002),
            # sent invalid UTF-8 (1007) or too large a message (1009).
            return CloseReason("protocol", self.localCloseCode, self.localCloseReason or "")
        if self.remoteCloseCode is not None:
            return CloseReason("remote", self.remoteCloseCode, self.remoteCloseReason or "")
        return CloseReason("error", code, reason or "connection lost")

    def _terminate(self, reason: CloseReason) -> None:
        self._terminated = True
        self._queue.clear()
        token = websock._current_handle.set(self.handle)
        try:
            self.upgrade.handler.terminate(reason, self._state)
        except Exception:
            self._log.failure(
                "WebSocket handler {handler!r} raised in terminate() for {peer}",
                handler=self.upgrade.handler,
                peer=self.peer,
            )
        finally:
            websock._current_handle.reset(token)

    # Idle timeout

    def _start_idle_timer(self) -> None:
        timeout = self.upgrade.options.timeout
        if timeout is not None:
            self._last_received = self.bridge.reactor.seconds()
            self._idle_call = self.bridge.reactor.callLater(timeout, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per connection, pushed back lazily: reads only record a
        # timestamp, which is cheaper than resetting a DelayedCall per frame.
        timeout = self.upgrade.options.timeout
        assert timeout is not None
        idle = self.bridge.reactor.seconds() - self._last_received
        if idle < timeout:
            self._idle_call = self.bridge.reactor.callLater(timeout - idle, self._check_idle)
            return
        self._idle_call = None
        self._close(CloseReason("timeout", websock.GOING_AWAY, "idle timeout"))


class WebSocketBridge:
    """
    Hands upgraded requests over to L{HandlerProtocol} connections.

    :ivar connections: the open WebSocket connections, for a graceful stop.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.connections: set[HandlerProtocol] = set()
        self._factories: dict[WebSocketOptions, WebSocketServerFactory] = {}

    def hand_off(self, request: Request, upgrade: WebSocketUpgrade) -> None:
        """
        Move C{request}'s connection to a new L{HandlerProtocol}.

        Autobahn then reads the replayed request, answers 101 and starts the
        handler.

        :raises BadRequestError: if a header holds a character that Autobahn
            would read as a line break; nothing has been changed then.
        """
        handshake = _replay_bytes(request)

        channel = request.channel
        transport = channel.transport
        protocol = self._factory_for(upgrade.options).buildProtocol(transport.getPeer())
        protocol.upgrade = upgrade
        protocol.bridge = self

        # twisted.web has no API to give a connection to another protocol
        # (https://github.com/twisted/twisted/issues/3204), so detach the
        # channel by hand: stop its timeout, unregister it as the transport's
        # producer so the new protocol can register one, and point the
        # transport at the new protocol.
        channel.setTimeout(None)
        channel.transport = None
        transport.unregisterProducer()
        if isinstance(transport, ProtocolWrapper):
            # TLS: the channel's transport is the TLSMemoryBIOProtocol.
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)

        # HTTPChannel pauses reading while a request is being handled and
        # keeps any bytes that came after the request head; the peer may have
        # sent frames right behind its handshake.
        pipelined = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        transport.resumeProducing()

        protocol.dataReceived(handshake)
        if pipelined:
            protocol.dataReceived(pipelined)

    def _factory_for(self, options: WebSocketOptions) -> WebSocketServerFactory:
        factory = self._factories.get(options)
        if factory is None:
            factory = _make_factory(options)
            self._factories[options] = factory
        return factory


def _make_factory(options: WebSocketOptions) -> WebSocketServerFactory:
    factory = WebSocketServerFactory(server=None)
    factory.protocol = HandlerProtocol

    def accept_deflate(offers: list[object]) -> PerMessageDeflateOfferAccept | None:
        # Accept the client's first permessage-deflate offer with its own
        # parameters (RFC 7692 section 7.1); Autobahn limits the inflated size
        # of each message to max_message_size.
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(
                    offer, max_message_size=options.max_message_size
                )
        return None

    factory.setProtocolOptions(
        # Answer protocol errors with a Close frame carrying the code (1002,
        # 1007, 1009) instead of Autobahn's default of dropping TCP, so that
        # replies to messages received before the error still go out.
        failByDrop=False,
        maxFramePayloadSize=options.max_frame_size,
        maxMessagePayloadSize=options.max_message_size,
        utf8validateIncoming=options.validate_utf8,
        openHandshakeTimeout=options.open_handshake_timeout,
        closeHandshakeTimeout=options.close_handshake_timeout,
        autoPingInterval=options.ping_interval or 0,
        autoPingTimeout=options.ping_timeout or 0,
        perMessageCompressionAccept=accept_deflate if options.compress else None,
    )
    return factory


def _select_subprotocol(offered: list[str], options: WebSocketOptions) -> str | None:
    for subprotocol in options.subprotocols:
        if subprotocol in offered:
            return subprotocol
    return None


def _replay_bytes(request: Request) -> bytes:
    """
    Rebuild the request head for Autobahn, which parses the handshake itself.

    :raises BadRequestError: for a header that Autobahn would split in two.
    """
    lines = [request.method + b" " + request.uri + b" HTTP/1.1"]
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            text = value.decode("latin-1")
            if not _LINE_BREAKS_FOR_STR.isdisjoint(text):
                msg = f"invalid character in the {name.decode('latin-1')} header"
                raise BadRequestError(msg)
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"
