"""
HandlerProtocol: one WebSocket connection that drives an L{IWebSock} handler.

L{desperados.websocket.WebSocketBridge} moves an upgraded connection to it.
Autobahn parses and writes the frames, and the protocol runs the handler's
callbacks one at a time with its state.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.compress import (
    PERMESSAGE_COMPRESSION_EXTENSION,
    PerMessageDeflate,
)
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from desperados import telemetry, websock
from desperados._logging import observer as log_observer
from desperados.deflate import RatioLimitedDeflate
from desperados.http1 import _peer_address
from desperados.interfaces import IWebSockControl
from desperados.websock import (
    Binary,
    CloseReason,
    Frame,
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
from desperados.websocket_frames import FastFrameProtocol

if TYPE_CHECKING:
    from desperados.websocket import WebSocketBridge

# Callback results that are neither a Deferred nor awaitable.
_RESULT_TYPES = (Ok, Push, Stop)

# The frame types of data messages, as opposed to control frames.
_MESSAGE_TYPES = (Text, Binary)

# Marks a callback that takes only the state (init), since a handle_info
# message may itself be None.
_STATE_ONLY = object()


class HandlerProtocol(FastFrameProtocol):
    """
    One WebSocket connection, running the callbacks of an L{IWebSock} handler.

    Callbacks run one at a time: while a callback's Deferred or coroutine is
    pending, later events wait in a queue, and the transport stops reading
    until the queue is drained.
    """

    _log = Logger(observer=log_observer)

    upgrade: WebSocketUpgrade
    bridge: WebSocketBridge
    # The Site's connection limit, whose count this protocol ends when the
    # connection is lost (see WebSocketBridge.hand_off), or None.
    connection_limit: Any = None

    def __init__(self) -> None:
        super().__init__()
        self._state: object = None
        self._opened = False
        self._terminated = False
        self._pending = False
        self._reading_paused = False
        self._queue: deque[tuple[str, object]] = deque()
        self._close_reason: CloseReason | None = None
        self._close_frame_received = False
        self._close_sent_in_read = False
        self._idle_call: Any = None
        self._last_received = 0.0
        self.handle = WebSocketHandle(self._deliver_info)

    # Autobahn entry points

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own dataReceived formats a debug message on every read;
        # skip it and record activity for the idle timeout instead.
        self._last_received = self.bridge.reactor.seconds()
        self._close_sent_in_read = False
        if not self._between_messages():
            self._dataReceived(data)
            return
        # The steps of Autobahn 26.11's _dataReceived, with the whole
        # messages at the start of this read taken first.
        self.trafficStats.incomingOctetsWireLevel += len(data)
        rest = self._receive_whole_messages(data)
        if rest:
            self.data = rest
            # Autobahn's parser stops once the connection is closed.
            if self.state != self.STATE_CLOSED:
                self.consumeData()

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        self._close_sent_in_read = True
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)

    def _fail_connection(
        self, code: int = WebSocketServerProtocol.CLOSE_STATUS_CODE_GOING_AWAY,
        reason: str = "going away",
    ) -> None:
        # Autobahn 26.11 reads on after it fails a connection, so one bad
        # message can fail it again (invalid UTF-8, then a message that ends
        # inside a code point).  The second failure logs another warning and
        # drops TCP before the peer's Close frame arrives.  Keep the first.
        if self.failedByMe and self.state == self.STATE_CLOSING:
            return
        if self.state == self.STATE_CLOSED:
            return
        # Autobahn's own _fail_connection logs this at warn level without
        # the peer.  The steps below are its steps (Autobahn 26.11) without
        # that line.
        self._log.info(
            "failing WebSocket connection from {peer} with {code}: {reason}",
            peer=_peer_address(self.transport),
            code=code,
            reason=reason,
        )
        self.failedByMe = True
        if self.failByDrop:
            self.wasClean = False
            self.wasNotCleanReason = f"I dropped the WebSocket TCP connection: {reason}"
            self.dropConnection(abort=True)
        elif self.state != self.STATE_CLOSING:
            self.sendCloseFrame(
                code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False
            )
        else:
            self.dropConnection(abort=False)

    def _max_message_size_exceeded(
        self, msg_size: int, max_msg_size: int, reason: str
    ) -> None:
        extension = self._perMessageCompress
        if isinstance(extension, RatioLimitedDeflate) and extension.ratio_exceeded:
            reason = (
                f"compressed message inflated past {extension.max_inflate_ratio:g} "
                f"times its {extension.compressed_size} bytes"
            )
        super()._max_message_size_exceeded(msg_size, max_msg_size, reason)

    def dropConnection(self, abort: bool = False) -> None:
        # Autobahn 26.11 answers an invalid Close frame (a one-byte payload,
        # a reserved code, a reason that is not UTF-8) with a Close frame of
        # its own (1002 or 1007), then takes the invalid frame as the reply
        # and aborts TCP: the reset discards the Close frame that is still in
        # the write buffer.  A Close frame sent during this read goes out
        # first, with a plain close.
        if abort and self._close_sent_in_read:
            abort = False
        super().dropConnection(abort)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            limit, self.connection_limit = self.connection_limit, None
            if limit is not None:
                limit.remove()

    def _parseExtensionsHeader(
        self, header: str, removeQuotes: bool = True
    ) -> list[tuple[str, dict[str, list[object]]]]:
        # Autobahn 26.11 fails the handshake (a bare 400 with the error as
        # its reason phrase) when a permessage-deflate offer has an unknown
        # parameter or an invalid value.  RFC 7692 section 5 has the server
        # decline such an offer instead: leave it out, so that the next
        # offer, or no compression, is used.
        extensions = super()._parseExtensionsHeader(header, removeQuotes)
        return [
            (name, params)
            for name, params in extensions
            if _is_valid_offer(name, params)
        ]

    def onConnect(self, request: Any) -> tuple[str | None, dict[str, str]]:
        # Autobahn sends the Sec-WebSocket-Protocol header for the returned
        # subprotocol, or none when it is None (RFC 6455 section 4.2.2).
        return _select_subprotocol(request.protocols, self.upgrade.options), {}

    def onOpen(self) -> None:
        self._limit_inflation()
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
        if _has_handle_control(self.upgrade.handler):
            self._dispatch("handle_control", (payload, "ping"))

    def onPong(self, payload: bytes) -> None:
        if _has_handle_control(self.upgrade.handler):
            self._dispatch("handle_control", (payload, "pong"))

    def onFrameData(self, payload: bytes) -> bool | None:
        result = super().onFrameData(payload)
        if result is False and self.failedByMe and self._failed_frame_read():
            # NOTE: Autobahn 26.11 keeps a frame it failed on (such as a
            # compressed message that inflates past max_message_size) as the
            # current frame.  It then never parses the peer's Close frame and
            # drops TCP only after the closing handshake timeout.  Once the
            # failed frame is read in full, go on with the next one.
            self.current_frame = None
        return result

    def _limit_inflation(self) -> None:
        extension = self._perMessageCompress
        if not isinstance(extension, PerMessageDeflate):
            return
        options = self.upgrade.options
        limited = RatioLimitedDeflate.replacing(
            extension, options.max_inflate_ratio, options.inflate_ratio_min_size
        )
        self._perMessageCompress = limited
        in_use = self.websocket_extensions_in_use
        in_use[in_use.index(extension)] = limited

    def _failed_frame_read(self) -> bool:
        frame = self.current_frame
        return frame is not None and self.current_frame_masker.pointer() == frame.length

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        self._close_frame_received = True
        return super().onCloseFrame(code, reasonRaw)

    def onAutoPingTimeout(self) -> None:
        if self._close_reason is None:
            self._close_reason = CloseReason(
                "timeout", None, "no pong to a ping in time"
            )
        super().onAutoPingTimeout()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self.handle._close()
        if self._opened and telemetry.observers:
            telemetry.emit("websocket.close")
        if self._opened and not self._terminated:
            self._terminate(self._ending_reason())
        if self._opened:
            self.bridge._connection_ended(self)

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
        if self.state != self.STATE_OPEN:
            return
        if self._pending:
            # Stop reading until the queue is drained, so that a peer that
            # keeps sending cannot make it grow without bound.  The cost is
            # that a lost connection shows only once reading resumes.
            self._queue.append((callback, argument))
            self._pause_reading()
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
            # Twisted runs a coroutine in a copy of the context current when
            # ensureDeferred() is called, so call it while the handle is set
            # and current_handle() works inside the coroutine too.
            if type(result) in _RESULT_TYPES:
                pass
            elif inspect.iscoroutine(result):
                result = ensureDeferred(result)
            elif not isinstance(result, Deferred) and inspect.isawaitable(result):
                result = ensureDeferred(_await(result))
        except Exception:
            self._callback_failed(Failure(), callback)
            return
        finally:
            websock._current_handle.reset(token)

        if isinstance(result, Deferred):
            self._wait_for(result, callback)
        else:
            self._apply(result, callback)

    def _wait_for(self, pending: Deferred[object], callback: str) -> None:
        self._pending = True
        pending.addCallbacks(
            self._resolved,
            self._rejected,
            callbackArgs=(callback,),
            errbackArgs=(callback,),
        )

    def _resolved(self, result: object, callback: str) -> None:
        self._pending = False
        self._apply(result, callback)
        while self._queue and not self._pending:
            next_callback, argument = self._queue.popleft()
            self._dispatch(next_callback, argument)
        if not self._queue:
            self._resume_reading()

    def _rejected(self, failure: Failure, callback: str) -> None:
        self._pending = False
        self._callback_failed(failure, callback)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _apply(self, result: object, callback: str) -> None:
        if self._terminated:
            return
        try:
            if type(result) is Push and type(result.frames) in _MESSAGE_TYPES:
                self._state = result.state
                self._send_frame(result.frames)
            elif isinstance(result, Push):
                frames = _checked_frames(result)
                self._state = result.state
                for frame in frames:
                    self._send_frame(frame)
            elif isinstance(result, Ok):
                self._state = result.state
            elif isinstance(result, Stop):
                self._state = result.state
                self._close(CloseReason("local", result.code, result.reason))
            else:
                msg = (
                    f"{callback}() of {self.upgrade.handler!r} returned {result!r}, "
                    "expected Ok, Push or Stop"
                )
                raise TypeError(msg)
        except Exception:
            self._callback_failed(Failure(), callback)

    def _send_frame(self, frame: Frame) -> None:
        if self.state != self.STATE_OPEN:
            return
        if isinstance(frame, Text):
            data = frame.data
            payload = data.encode("utf-8") if isinstance(data, str) else data
            self._send_message(payload, False)
            if telemetry.observers:
                telemetry.emit(
                    "websocket.message.out", opcode="text", size=len(payload)
                )
        elif isinstance(frame, Binary):
            self._send_message(frame.data, True)
            if telemetry.observers:
                telemetry.emit(
                    "websocket.message.out", opcode="binary", size=len(frame.data)
                )
        elif isinstance(frame, Ping):
            self.sendPing(frame.data or None)
        else:
            self.sendPong(frame.data or None)

    def _deliver_info(self, message: object) -> None:
        # callFromThread is safe from any thread, the reactor's included, and
        # keeps the messages of one sender in order.  callLater(0) would not,
        # because calls due at the same time may run in any order.
        self.bridge.reactor.callFromThread(self._dispatch, "handle_info", message)

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
        # Only the first ending counts, and only while the connection is
        # open, because once the peer's Close frame came, that ended it.
        if self._close_reason is not None or self.state != self.STATE_OPEN:
            return
        self._close_reason = reason
        self._queue.clear()
        # The peer's Close frame must be read to finish the handshake.
        self._resume_reading()
        self._send_close(reason.code, reason.reason)

    def _send_close(self, code: int | None, reason: str) -> None:
        # Autobahn's sendClose() accepts only 1000 and 3000-4999, the codes
        # an application picks.  A server also sends 1001 (going away) and
        # 1011 (internal error), RFC 6455 section 7.4.1, so use
        # sendCloseFrame(), which Autobahn itself uses for 1002, 1007 and 1009.
        reason_bytes = reason.encode("utf-8")[: websock.MAX_CLOSE_REASON_BYTES]
        self.sendCloseFrame(code=code, reasonUtf8=reason_bytes or None, isReply=False)

    def _ending_reason(self) -> CloseReason:
        if self._close_reason is not None:
            return self._close_reason
        if self.failedByMe and self.localCloseCode is not None:
            # Autobahn closed because the peer broke the protocol (1002),
            # sent invalid UTF-8 (1007) or too large a frame or message (1009).
            local_reason = (self.localCloseReason or b"").decode("utf-8", "replace")
            return CloseReason("protocol", self.localCloseCode, local_reason)
        if self._close_frame_received:
            return CloseReason(
                "remote", self.remoteCloseCode, self.remoteCloseReason or ""
            )
        return CloseReason("lost", None, self.wasNotCleanReason or "connection lost")

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
        now = self.bridge.reactor.seconds()
        if self._pending:
            # A slow callback is not the peer's idleness, and reading may be
            # paused meanwhile, so count from now.
            self._last_received = now
        idle = now - self._last_received
        if idle < timeout:
            self._idle_call = self.bridge.reactor.callLater(
                timeout - idle, self._check_idle
            )
            return
        self._idle_call = None
        self._close(CloseReason("timeout", websock.GOING_AWAY, "idle timeout"))


def _is_valid_offer(name: str, params: dict[str, list[object]]) -> bool:
    extension = PERMESSAGE_COMPRESSION_EXTENSION.get(name)
    if extension is None:
        return True
    try:
        extension["Offer"].parse(params)
    except Exception:
        # Autobahn raises a bare Exception for invalid parameters.
        return False
    return True


def _has_handle_control(handler: object) -> bool:
    return IWebSockControl.providedBy(handler) or callable(
        getattr(handler, "handle_control", None)
    )


def _checked_frames(result: Push) -> tuple[Frame, ...]:
    # Check every frame before sending any, so a bad one sends nothing.
    frames = tuple(websock.frames_of(result))
    for frame in frames:
        if not isinstance(frame, (Text, Binary, Ping, Pong)):
            msg = f"expected a Text, Binary, Ping or Pong frame, got {frame!r}"
            raise TypeError(msg)
    return frames


async def _await(awaitable: Any) -> object:
    return await awaitable


def _select_subprotocol(offered: list[str], options: WebSocketOptions) -> str | None:
    for subprotocol in options.subprotocols:
        if subprotocol in offered:
            return subprotocol
    return None
