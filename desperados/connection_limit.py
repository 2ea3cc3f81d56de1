"""
ConnectionLimit: the limit on a Site's open connections.

Connections beyond the limit get a 503 and are closed.  This module also
aborts TLS connections whose handshake takes too long.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from desperados._logging import observer as log_observer
from desperados.http1 import _error_response, _peer_address
from desperados.linger import HalfCloseable, Linger, linger_close

log = Logger(namespace="desperados.http1", observer=log_observer)


class ConnectionLimit:
    """
    Counts a Site's open connections and rejects those beyond its limit.

    The protocols that L{build} returns count themselves: they call L{add}
    once connected and L{remove} once lost.  L{desperados.channel.HTTPChannelSelector}
    does, and a WebSocket hand-off moves the count to the WebSocket
    protocol, which calls L{remove} when the connection is lost.

    :param limit: the maximum number of open connections, or None for no limit.
    :param reactor: the reactor that schedules the abort of rejected ones.
    :param linger_timeout: see L{HTTPOptions.linger_timeout}.
    :param tls_handshake_timeout: see L{HTTPOptions.tls_handshake_timeout}.
    :ivar count: the number of open connections, rejected ones not included.
    """

    def __init__(
        self,
        limit: int | None,
        reactor: Any,
        linger_timeout: float,
        tls_handshake_timeout: float | None = None,
    ) -> None:
        self.limit = limit
        self.count = 0
        self.reactor = reactor
        self.tls_handshake_timeout = tls_handshake_timeout
        self._linger_timeout = linger_timeout
        self._rejected_count = 0

    def build(self, build_protocol: Any, addr: Any) -> Any:
        """
        Return C{build_protocol(addr)}, or a protocol that rejects the connection.

        The protocol built gets this limit as its C{connection_limit}.
        """
        if self.limit is not None and self.count >= self.limit:
            if self._rejected_count == 0:
                log.warn(
                    "reached the limit of {max_connections} open connections, "
                    "rejecting new ones with 503",
                    max_connections=self.limit,
                )
            self._rejected_count += 1
            return _RejectedConnection(self.reactor, self._linger_timeout)
        protocol = build_protocol(addr)
        if protocol is not None:
            protocol.connection_limit = self
        return protocol

    def add(self) -> None:
        """
        Count a connection that is now open.
        """
        self.count += 1

    def remove(self) -> None:
        """
        Stop counting a connection that L{add} counted, once it is lost.
        """
        self.count -= 1
        if self._rejected_count and self.count < (self.limit or 0):
            log.info(
                "below the limit of {max_connections} open connections again, "
                "{rejected} connections were rejected with 503",
                max_connections=self.limit,
                rejected=self._rejected_count,
            )
            self._rejected_count = 0


def handshake_timed_out(transport: Any, timeout: float) -> None:
    """
    Abort a TLS connection whose handshake took more than C{timeout} seconds.
    """
    log.info(
        "closing the connection from {peer}: the TLS handshake timed out "
        "after {timeout} seconds",
        peer=_peer_address(transport),
        timeout=timeout,
    )
    transport.abortConnection()


class _RejectedConnection(HalfCloseable, Protocol):
    """
    A connection beyond the limit, which gets 503 and is closed.
    """

    def __init__(self, reactor: Any, linger_timeout: float) -> None:
        self._reactor = reactor
        self._linger_timeout = linger_timeout
        self._linger: Linger | None = None

    def connectionMade(self) -> None:
        reason = "too many open connections, try again later"
        self.transport.write(_error_response(503, reason, self._reactor.seconds()))
        self._linger = linger_close(
            self.transport, self._reactor, self._linger_timeout
        )

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None:
            self._linger.cancel()
