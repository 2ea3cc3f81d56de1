"""
The per-connection protocol that picks HTTP/1.1 or HTTP/2 for a connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from zope.interface import implementer

from desperados.connection_limit import ConnectionLimit, handshake_timed_out
from desperados.http1_fast import FastPath
from desperados.http2 import H2Connection
from desperados.linger import HalfCloseable
from desperados.request import StreamingChannel
from desperados.resource import PlugResource

# RFC 9113 section 3.4: a client that knows the server speaks HTTP/2 starts
# the connection with these 24 bytes instead of an HTTP/1.1 request.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@implementer(IHandshakeListener)
class HTTPChannelSelector(HalfCloseable, _GenericHTTPChannelProtocol):
    """
    Start every connection as HTTP/1.1 and switch it to HTTP/2 when asked.

    twisted.web's own C{_GenericHTTPChannelProtocol} switches a connection
    to its C{H2Connection} only when TLS ALPN negotiated C{h2}; a cleartext
    client with prior knowledge (RFC 9113 section 3.3) gets an HTTP/1.1
    channel, which reads the preface as a malformed request.  This subclass
    also switches when no protocol was negotiated and the first bytes are
    the connection preface, and it switches to desperados'
    L{H2Connection}, which carries the HTTP/2 corrections.

    It also registers itself with its Site so that a drain can find the
    idle connections and those with a request in flight (see L{track}),
    and counts itself in its C{connection_limit} while it is connected.
    Over TLS it aborts the connection when the handshake is not complete
    within the limit's C{tls_handshake_timeout}: Twisted's TLS protocol
    calls L{handshakeCompleted} on the protocol it wraps, which is this one.

    :ivar first_channel: the HTTPChannel this protocol started with, the key
        in the Site's registry; C{_channel} becomes an H2Connection after
        the switch to HTTP/2.
    """

    _received = b""
    _registry: dict[HTTPChannel, HTTPChannelSelector] | None = None

    fast_path: FastPath | None = None
    """The server of the simple HTTP/1.1 requests until it hands over to
    C{_channel}, or None."""

    connection_limit: ConnectionLimit | None = None
    """The Site's count of open connections, set by L{ConnectionLimit.build}."""

    _counted = False
    _handshake_call: Any = None

    def __init__(self, channel: HTTPChannel) -> None:
        super().__init__(channel)
        self.first_channel = channel
        self._closed: list[Deferred[None]] = []

    def track(self, registry: dict[HTTPChannel, HTTPChannelSelector]) -> None:
        """
        Add this connection to C{registry} until it is lost or handed off.

        A connection that becomes a WebSocket leaves the registry through
        L{untrack}: its transport then belongs to another protocol, and this
        one never hears of the connection again.
        """
        self._registry = registry
        registry[self.first_channel] = self

    def untrack(self) -> None:
        """
        Remove this connection from its registry and fire L{when_closed}.
        """
        if self._registry is not None:
            self._registry.pop(self.first_channel, None)
            self._registry = None
        closed, self._closed = self._closed, []
        for waiting in closed:
            waiting.callback(None)

    @property
    def tracked(self) -> bool:
        """
        Whether the connection is still in its registry.
        """
        return self._registry is not None

    def when_closed(self) -> Deferred[None]:
        """
        Return a Deferred that fires once the connection is lost or handed off.
        """
        if self._registry is None:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed.append(closed)
        return closed

    def makeConnection(self, transport: Any) -> None:
        limit = self.connection_limit
        if limit is not None:
            limit.add()
            self._counted = True
            timeout = limit.tls_handshake_timeout
            if timeout is not None and ISSLTransport.providedBy(transport):
                self._handshake_call = limit.reactor.callLater(
                    timeout, self._handshake_timed_out, transport, timeout
                )
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        self._cancel_handshake_timeout()

    def take_connection_count(self) -> ConnectionLimit | None:
        """
        Stop counting this connection here and return the limit that counts it.

        The caller, a protocol that takes the connection over, must call the
        limit's C{remove} once the connection is lost.  Returns None if this
        protocol does not count the connection.
        """
        if not self._counted:
            return None
        self._counted = False
        return self.connection_limit

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_handshake_timeout()
        fast_path = self.fast_path
        if fast_path is not None:
            fast_path.connection_lost(reason)
        try:
            self._channel.connectionLost(reason)
        finally:
            self.untrack()
            if self._counted:
                self._counted = False
                assert self.connection_limit is not None
                self.connection_limit.remove()

    def _handshake_timed_out(self, transport: Any, timeout: float) -> None:
        self._handshake_call = None
        handshake_timed_out(transport, timeout)

    def _cancel_handshake_timeout(self) -> None:
        call, self._handshake_call = self._handshake_call, None
        if call is not None and call.active():
            call.cancel()

    def dataReceived(self, data: bytes) -> None:
        fast_path = self.fast_path
        if fast_path is not None:
            fast_path.data_received(data)
            return
        if self._negotiatedProtocol is not None:
            self._channel.dataReceived(data)
            return

        negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            self._switch_to_http2()
        elif negotiated is not None:
            self._negotiatedProtocol = negotiated
        else:
            if self._received:
                data = self._received + data
            if len(data) < len(PREFACE) and PREFACE.startswith(data):
                # Too short to tell; HTTPChannel's idle timeout still runs.
                self._received = data
                return
            self._received = b""
            if data.startswith(PREFACE):
                self._switch_to_http2()
            else:
                self._negotiatedProtocol = b"http/1.1"
        if self._negotiatedProtocol != b"h2" and self._start_fast_path():
            assert self.fast_path is not None
            self.fast_path.data_received(data)
            return
        self._channel.dataReceived(data)

    def _start_fast_path(self) -> bool:
        """
        Serve simple HTTP/1.1 requests with a L{FastPath}, if the Site allows.

        It needs a Site whose C{http1_fast_path} is true, desperados'
        HTTP/1.1 channel, and a L{PlugResource} that serves every path.
        """
        channel = self._channel
        site = getattr(channel, "site", None)
        if (
            not getattr(site, "http1_fast_path", False)
            or not isinstance(channel, StreamingChannel)
            or not isinstance(getattr(site, "resource", None), PlugResource)
        ):
            return False
        self.fast_path = FastPath(self, channel)
        return True

    def _switch_to_http2(self) -> None:
        # These are the steps of twisted.web's own switch after ALPN. The
        # HTTPChannel registered itself as the transport's producer and armed
        # its idle timeout, and the H2Connection takes over both.
        http1 = self._channel
        transport = http1.transport
        network_producer = http1._networkProducer
        network_producer.unregisterProducer()
        http1.setTimeout(None)

        factory = self._factory
        http2 = H2Connection(reactor=getattr(factory, "reactor", None))
        http2.requestFactory = self._requestFactory
        http2.site = self._site
        http2.factory = factory
        http2.timeOut = self._timeOut
        http2.callLater = self._callLater
        self._channel = http2
        self._negotiatedProtocol = b"h2"
        http2.makeConnection(transport)
        network_producer.registerProducer(http2, True)


def build_channel(site: Any) -> HTTPChannelSelector:
    """
    Build the protocol for one connection to C{site}.

    This is the C{protocol} of desperados' Site; the Site then sets the
    factory, request factory, timeout and clock on the result.
    """
    return HTTPChannelSelector(StreamingChannel())
