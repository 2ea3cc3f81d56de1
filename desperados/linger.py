"""
Closing a connection after its last response without a TCP reset.

Closing a socket whose input has not all been read makes the kernel send a
reset, which can destroy the response before the client reads it (RFC 9112
section 9.6).  L{linger_close} closes only the writing side, lets the
protocol discard what still arrives, and aborts the connection
C{linger_timeout} seconds after the response has been sent if the client
has not closed by then.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.logger import Logger
from zope.interface import alsoProvides

from desperados._logging import observer as log_observer

log = Logger(namespace="desperados.linger", observer=log_observer)


class HalfCloseable:
    """
    Mixin for a protocol whose connection L{linger_close} may half-close.

    Twisted calls C{writeConnectionLost} on a protocol that provides
    C{IHalfCloseableProtocol} once the writing side is shut down.
    L{Linger} declares that interface on the protocol instance only while
    it lingers, so that before then the client's end of input still loses
    the connection as usual.
    """

    linger: Linger | None = None

    def writeConnectionLost(self) -> None:  # noqa: N802
        if self.linger is not None:
            self.linger.write_connection_lost()

    def readConnectionLost(self) -> None:  # noqa: N802
        if self.linger is not None:
            self.linger.read_connection_lost()


class Linger:
    """
    The closing of one connection by L{linger_close}.

    :param transport: the transport to close; its protocol must drop input.
    :param reactor: the reactor that schedules the checks and the abort.
    :param timeout: seconds to wait for the client to close once the
        response has been sent.
    :param stall_timeout: seconds without any byte sent before a client
        that does not read is aborted, or None for no limit.
    """

    def __init__(
        self,
        transport: Any,
        reactor: Any,
        timeout: float,
        stall_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._reactor = reactor
        self._timeout = timeout
        self._stall_timeout = stall_timeout
        self._call: Any = None
        self._queued: int | None = None
        self._stalled_since = 0.0
        self._sent = False

    def start(self) -> None:
        """
        Close the writing side once the output is sent and start watching.
        """
        transport = self._transport
        protocol = getattr(transport, "protocol", None)
        if (
            ISSLTransport.providedBy(transport)
            or not hasattr(transport, "loseWriteConnection")
            or not isinstance(protocol, HalfCloseable)
        ):
            # Twisted's TLSMemoryBIOProtocol has no half-close: its
            # loseConnection sends close_notify once its output is written
            # and closes TCP only after the client's close_notify, reading
            # on until then.  The watch below detects when the output is sent.
            transport.loseConnection()
        else:
            protocol.linger = self
            alsoProvides(protocol, IHalfCloseableProtocol)
            transport.loseWriteConnection()
            # Reading is how the client's close is noticed, and twisted.web
            # may have paused the transport while it handled a request.
            transport.resumeProducing()
        self._watch()

    def cancel(self) -> None:
        """
        Stop the checks and the abort, once the connection is lost.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def write_connection_lost(self) -> None:
        """
        Start the abort timer: the output is sent and TCP has sent FIN.
        """
        self.cancel()
        self._sent = True
        self._call = self._reactor.callLater(self._timeout, self._abort)

    def read_connection_lost(self) -> None:
        """
        Close the connection once the output is sent: the client has closed
        its writing side.  The watch still aborts a client that stops reading.
        """
        self._transport.loseConnection()

    def _watch(self) -> None:
        # Check every linger timeout whether the output is sent, so that the
        # abort comes between one and two linger timeouts after it.  The
        # half-closed TCP transport calls write_connection_lost earlier.
        self._call = None
        if self._sent:
            return
        queued = _queued_bytes(self._transport)
        if not queued:
            # Sent, or a transport whose buffer cannot be read: then the
            # abort timer starts at once.
            self.write_connection_lost()
            return
        if queued != self._queued:
            self._queued = queued
            self._stalled_since = self._reactor.seconds()
        elif (
            self._stall_timeout is not None
            and self._reactor.seconds() - self._stalled_since >= self._stall_timeout
        ):
            log.info(
                "aborting the closing connection from {peer}: none of its "
                "{queued} queued bytes were sent in {seconds} seconds",
                peer=self._transport.getPeer(),
                queued=queued,
                seconds=self._stall_timeout,
            )
            self._transport.abortConnection()
            return
        self._call = self._reactor.callLater(self._timeout, self._watch)

    def _abort(self) -> None:
        self._call = None
        self._transport.abortConnection()


def _queued_bytes(transport: Any) -> int | None:
    """
    Count the bytes that C{transport} has not yet handed to the kernel.

    C{transport} is a Twisted TCP transport or a TLSMemoryBIOProtocol over
    one; the counts read their private buffers (Twisted 26.10).  Returns
    None for another transport.
    """
    queued = 0
    tls_buffer = getattr(transport, "_appSendBuffer", None)
    if tls_buffer is not None:
        queued += sum(len(data) for data in tls_buffer)
        transport = transport.transport
    try:
        buffered = len(transport.dataBuffer) - transport.offset
        return queued + buffered + transport._tempDataLen
    except AttributeError:
        return None


def linger_close(
    transport: Any,
    reactor: Any,
    timeout: float,
    stall_timeout: float | None = None,
) -> Linger:
    """
    Close C{transport} once its output is sent, without a TCP reset.

    See L{Linger} for the parameters.  Returns the L{Linger}, which the
    protocol must cancel when the connection is lost.
    """
    linger = Linger(transport, reactor, timeout, stall_timeout)
    linger.start()
    return linger
