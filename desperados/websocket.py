"""
The WebSocket bridge: an Autobahn protocol that drives an L{IWebSock} handler.

A plug asks for an upgrade with C{Conn.upgrade}; once the pipeline is done,
the HTTP bridge calls L{WebSocketBridge.hand_off}, which moves the TCP (or
TLS) transport from twisted.web's channel to a L{HandlerProtocol}.  From
then on, Autobahn parses and writes frames and the handler sees only
C{(data, opcode)} pairs and its own state.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import Request

from desperados._logging import observer as log_observer
from desperados.errors import BadRequestError
from desperados.websock import WebSocketOptions, WebSocketUpgrade
from desperados.websocket_protocol import HandlerProtocol

# Header value characters rejected before the request head is replayed to
# Autobahn: the control characters (RFC 9110 section 5.5 allows none but
# HTAB) and NEL.  twisted.web splits header lines on CRLF only, but older
# Autobahn releases split the replayed head with str.splitlines(), which also
# breaks lines at VT, FF, FS, GS, RS and NEL, so one header could become two
# (https://github.com/crossbario/autobahn-python/issues/2034).  Autobahn
# 26.11 rejects control characters itself and takes NEL as obs-text.
# Rejecting them here gives every such request the same 400 from this server,
# whatever the Autobahn version.
_INVALID_IN_HEADER_VALUE = frozenset(
    [chr(code) for code in range(0x20) if code != 0x09] + ["\x7f", "\x85"]
)


class WebSocketBridge:
    """
    Hands upgraded requests over to L{HandlerProtocol} connections.

    :ivar connections: the open WebSocket connections, for a graceful stop.
    """

    _log = Logger(observer=log_observer)
    _ended_waiters: list[Deferred[None]]

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.connections: set[HandlerProtocol] = set()
        self._factories: dict[WebSocketOptions, WebSocketServerFactory] = {}
        self._ended_waiters = []

    def shutdown(self) -> Deferred[None]:
        """
        Close every open connection with 1001 (going away).

        Each handler's C{terminate} gets a L{CloseReason} of kind
        C{"shutdown"}.  A peer that does not reply to the Close frame is
        dropped after the connection's C{close_handshake_timeout}.

        :returns: a Deferred that fires once every connection has ended.
        """
        ended = self.when_all_closed()
        for protocol in list(self.connections):
            protocol.shutdown()
        return ended

    def when_all_closed(self) -> Deferred[None]:
        """
        Return a Deferred that fires once no WebSocket connection is open.

        It fires at once when none is open now.  Connections opened in the
        meantime delay it too.
        """
        if not self.connections:
            return succeed(None)
        ended: Deferred[None] = Deferred()
        self._ended_waiters.append(ended)
        return ended

    def _connection_ended(self, protocol: HandlerProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections and self._ended_waiters:
            waiters, self._ended_waiters = self._ended_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def hand_off(self, request: Request, upgrade: WebSocketUpgrade) -> None:
        """
        Move C{request}'s connection to a new L{HandlerProtocol}.

        Autobahn then reads the replayed request, sends 101 and starts the
        handler.  Nothing happens when the client has already gone, as it
        may have while a plug was waiting.

        :raises BadRequestError: for a header value holding a control
            character or NEL; nothing has been changed then.
        """
        channel = request.channel
        if request._disconnected or channel is None or channel.transport is None:
            self._log.debug(
                "client left before the WebSocket upgrade of {path}",
                path=request.path,
            )
            return
        handshake = _replay_bytes(request)

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
            # TLS: the channel's transport is a wrapper that passes the data
            # it receives on.
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        # The HTTP protocol gets no connectionLost for this connection now,
        # so the new protocol ends its count in the Site's connection limit.
        protocol.connection_limit = _take_connection_count(channel)
        protocol.makeConnection(transport)

        # The peer may have sent frames right behind its handshake.  Bytes
        # from later reads wait in HTTPChannel's _dataBuffer, because it
        # pauses reading while a request is handled.  Bytes from the read
        # that held the request head are still in LineReceiver's _buffer when
        # the pipeline finishes at once, and emptying it ends LineReceiver's
        # loop over that read.
        pipelined = b"".join(channel._dataBuffer) + channel._buffer
        channel._dataBuffer = []
        channel._buffer = b""
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


def _take_connection_count(channel: Any) -> Any:
    """
    Return the connection limit that counts C{channel}'s connection, moved
    off its HTTP protocol, or None.
    """
    connections = getattr(channel.site, "connections", None)
    selector = connections.get(channel) if connections is not None else None
    take = getattr(selector, "take_connection_count", None)
    return take() if take is not None else None


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
        # twisted.web has read the whole handshake already (its own timeouts
        # apply there), and hand_off() replays it at once.
        openHandshakeTimeout=0,
        closeHandshakeTimeout=options.close_handshake_timeout,
        autoPingInterval=options.ping_interval or 0,
        autoPingTimeout=options.ping_timeout or 0,
        perMessageCompressionAccept=accept_deflate if options.compress else None,
    )
    return factory


def _replay_bytes(request: Request) -> bytes:
    """
    Rebuild the request head for Autobahn, which parses the handshake itself.

    :raises BadRequestError: for a header value holding a control character
        or NEL.
    """
    lines = [request.method + b" " + request.uri + b" HTTP/1.1"]
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            text = value.decode("latin-1")
            if not _INVALID_IN_HEADER_VALUE.isdisjoint(text):
                msg = (
                    "invalid control character in the value of the "
                    f"{name.decode('latin-1')} header"
                )
                raise BadRequestError(msg)
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"
