"""
Graceful stop of a Site: finish the requests in flight, close the rest.

Twisted's reactor drops every open connection when it shuts down.  A server
that stops without losing requests has to do the work itself, after it has
stopped listening: close idle keep-alive connections, let requests in flight
finish with C{connection: close}, send HTTP/2 GOAWAY, close WebSockets with
1001 Going Away.  When the drain timeout ends, requests still waiting for
their pipeline get 503, and whatever else is still open is cut.
A drain may instead let open WebSockets run until they close on their own,
and close only those still open at the timeout with 1001.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web._http2 import H2Connection
from twisted.web.http import HTTPChannel

from desperados._logging import observer as log_observer
from desperados.channel import HTTPChannelSelector
from desperados.websocket import WebSocketBridge

DEFAULT_DRAIN_TIMEOUT = 15.0

log = Logger(namespace="desperados.drain", observer=log_observer)


class Drain:
    """
    One graceful close of every connection, cutting those still open after C{timeout}.

    The caller stops listening first and stops new requests from being kept
    alive or upgraded (see C{PlugResource.draining}).  The drain starts when
    the object is built.

    :param http: the open HTTP connections.
    :param websockets: the bridge that tracks the open WebSocket connections.
    :param timeout: seconds to wait before the remaining connections are
        aborted.
    :param reactor: the reactor for the timeouts.
    :param wait_for_websockets: leave the open WebSocket connections running
        until they close on their own, and close those still open when
        C{timeout} ends with 1001 instead of aborting them.  By default they
        are closed with 1001 at once.
    :param give_up_requests: called when C{timeout} ends, before anything is
        aborted: it sends 503 to the requests still in flight, or closes
        those whose response has started, and returns their connections
        (see C{PlugResource.give_up_requests}).
    :param close_timeout: seconds that those connections get to send the
        503 and close before they are aborted too.
    :ivar done: a Deferred that fires once every connection is closed.
    """

    def __init__(
        self,
        http: Iterable[HTTPChannelSelector],
        websockets: WebSocketBridge,
        *,
        timeout: float,
        reactor: Any,
        wait_for_websockets: bool = False,
        give_up_requests: Callable[[], list[object]] | None = None,
        close_timeout: float = 2.0,
    ) -> None:
        self._http = list(http)
        self._websockets = websockets
        self._closing_websockets = not wait_for_websockets
        self.timeout = timeout
        self._reactor = reactor
        self._give_up_requests = give_up_requests
        self._close_timeout = close_timeout
        self.done: Deferred[None] = Deferred()
        if wait_for_websockets:
            message = (
                "draining {http} HTTP connections and letting {websockets} "
                "WebSocket connections finish for at most {timeout} s"
            )
        else:
            message = (
                "draining {http} HTTP and {websockets} WebSocket connections "
                "for at most {timeout} s"
            )
        log.info(
            message,
            http=len(self._http),
            websockets=len(websockets.connections),
            timeout=timeout,
        )

        waits: list[Deferred[Any]] = []
        for protocol in self._http:
            waits.append(protocol.when_closed())
            _drain_http(protocol)
        if wait_for_websockets:
            waits.append(websockets.when_all_closed())
        else:
            waits.append(websockets.shutdown())

        self._timer = reactor.callLater(timeout, self._time_out)
        DeferredList(waits, consumeErrors=True).addCallback(self._finished)

    def abort(self) -> None:
        """
        Abort the connections still open now, without waiting for the timeout.
        """
        if self.done.called:
            return
        if self._timer.active():
            self._timer.cancel()
        http, websockets = self._still_open()
        log.warn(
            "drain stopped early: aborting {http} HTTP and {websockets} "
            "WebSocket connections",
            http=len(http),
            websockets=len(websockets),
        )
        _abort(http, websockets)

    def close_websockets(self) -> None:
        """
        Close the WebSocket connections that this drain lets finish with 1001 now.

        Nothing happens when this drain has closed them already or is done.
        """
        if self._closing_websockets or self.done.called:
            return
        self._closing_websockets = True
        log.info(
            "closing {websockets} WebSocket connections with 1001",
            websockets=len(self._websockets.connections),
        )
        self._websockets.shutdown()

    def _time_out(self) -> None:
        closing: list[object] = []
        if self._give_up_requests is not None:
            closing = self._give_up_requests()
        http, websockets = self._still_open()
        aborted = [protocol for protocol in http if protocol._channel not in closing]
        if self._closing_websockets:
            log.warn(
                "drain timed out after {timeout} s: gave up on {requests} "
                "requests in flight, aborting {http} HTTP and {websockets} "
                "WebSocket connections",
                timeout=self.timeout,
                requests=len(closing),
                http=len(aborted),
                websockets=len(websockets),
            )
            _abort(aborted, websockets)
        else:
            # The Close handshake of each WebSocket is bounded by its
            # close_handshake_timeout, after which Autobahn drops it.
            log.warn(
                "drain timed out after {timeout} s: gave up on {requests} "
                "requests in flight, aborting {http} HTTP connections and "
                "closing {websockets} WebSocket connections with 1001",
                timeout=self.timeout,
                requests=len(closing),
                http=len(aborted),
                websockets=len(websockets),
            )
            _abort(aborted, [])
            self._closing_websockets = True
            self._websockets.shutdown()
        if len(aborted) < len(http):
            self._timer = self._reactor.callLater(
                self._close_timeout, self._close_timed_out
            )

    def _close_timed_out(self) -> None:
        http, _ = self._still_open()
        log.warn(
            "aborting {http} HTTP connections still open {close_timeout} s "
            "after the drain gave up on their requests",
            http=len(http),
            close_timeout=self._close_timeout,
        )
        _abort(http, [])

    def _still_open(self) -> tuple[list[HTTPChannelSelector], list[Any]]:
        http = [protocol for protocol in self._http if protocol.tracked]
        return http, list(self._websockets.connections)

    def _finished(self, _: object) -> None:
        if self._timer.active():
            self._timer.cancel()
        log.info("drained all connections")
        self.done.callback(None)


def _abort(http: list[HTTPChannelSelector], websockets: list[Any]) -> None:
    transports = [protocol._channel.transport for protocol in http]
    transports += [websocket.transport for websocket in websockets]
    for transport in transports:
        if transport is not None:
            transport.abortConnection()


def _drain_http(protocol: HTTPChannelSelector) -> None:
    channel = protocol._channel
    if isinstance(channel, HTTPChannel):
        _drain_http1(channel)
    elif isinstance(channel, H2Connection):
        _drain_h2(channel)
    elif protocol.transport is not None:
        protocol.transport.loseConnection()


def _drain_http1(channel: HTTPChannel) -> None:
    if not channel.requests and getattr(channel, "waiting_request", None) is None:
        # Idle keep-alive, or a request head still arriving: RFC 9112
        # section 9.6 lets a server close such a connection at any time, and
        # clients retry requests it had not started.
        channel.loseConnection()
        return
    # NOTE: HTTPChannel recomputes persistent once a request body is
    # complete; PlugResource sets it again when it renders during a drain.
    channel.persistent = False
    for request in channel.requests:
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])


def _drain_h2(channel: H2Connection) -> None:
    # hyper-h2's close_connection() moves its state machine to CLOSED, after
    # which the responses still in flight could not be sent.  RFC 9113
    # section 6.8 allows a GOAWAY while streams finish, so write the frame
    # ourselves, naming the last stream this server will respond to, and close
    # for real once those streams are done.
    last_stream_id = channel.conn.highest_inbound_stream_id
    refuse_streams_after = getattr(channel, "refuse_streams_after", None)
    if refuse_streams_after is not None:
        refuse_streams_after(last_stream_id)
    channel.transport.write(GoAwayFrame(0, last_stream_id=last_stream_id).serialize())

    streams = list(channel._streamCleanupCallbacks.values())

    def close(_: object) -> None:
        transport = channel.transport
        if transport is None:
            return
        channel.conn.close_connection(last_stream_id=last_stream_id)
        transport.write(channel.conn.data_to_send())
        channel.lose_connection()

    DeferredList(streams, consumeErrors=True).addCallback(close)
