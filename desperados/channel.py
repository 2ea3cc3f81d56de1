"""
The per-connection protocol that picks HTTP/1.1 or HTTP/2 for a connection.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

from desperados.http2 import H2Connection

# RFC 9113 section 3.4: a client that knows the server speaks HTTP/2 starts
# the connection with these 24 bytes instead of an HTTP/1.1 request.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class HTTPChannelSelector(_GenericHTTPChannelProtocol):
    """
    Start every connection as HTTP/1.1 and switch it to HTTP/2 when asked.

    twisted.web's own C{_GenericHTTPChannelProtocol} switches a connection
    to its C{H2Connection} only when TLS ALPN negotiated C{h2}; a cleartext
    client with prior knowledge (RFC 9113 section 3.3) gets an HTTP/1.1
    channel, which reads the preface as a malformed request.  This subclass
    also switches when no protocol was negotiated and the first bytes are
    the connection preface, and it switches to desperados'
    L{H2Connection}, which carries the HTTP/2 corrections.
    """

    _received = b""

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is not None:
            self._channel.dataReceived(data)
            return

        negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            self._switch_to_http2()
        elif negotiated is not None:
            self._negotiatedProtocol = negotiated
        else:
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
        self._channel.dataReceived(data)

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
    return HTTPChannelSelector(HTTPChannel())
