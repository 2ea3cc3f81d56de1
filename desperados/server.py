"""
Listening for connections: endpoints from options, the Site, the service.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger, LogLevel
from twisted.web.http import HTTPChannel
from twisted.web.server import Site
from zope.interface import implementer

from desperados import __version__, telemetry
from desperados._logging import observer as log_observer
from desperados.access_log import AccessLog
from desperados.builder import PlugSpec
from desperados.channel import HTTPChannelSelector, build_channel
from desperados.compression import Compression
from desperados.connection_limit import ConnectionLimit
from desperados.drain import DEFAULT_DRAIN_TIMEOUT, Drain
from desperados.http1_options import HTTPOptions
from desperados.request import DEFAULT_MAX_BODY_SIZE, StreamingRequest
from desperados.resource import DEFAULT_RESPONSE_TIMEOUT, PlugResource
from desperados.tls import TLSServerEndpoint, certificate_options

DEFAULT_PORT = 8082
DEFAULT_PLUG = "desperados.plugs.Default"

log = Logger(namespace="desperados.server", observer=log_observer)


class DesperadosSite(Site):
    """
    A twisted.web Site serving one L{PlugResource} on every path.

    twisted.web's Site writes an access-log line per request to the global
    log unless told otherwise; this one writes one only when given
    C{access_log}.  It emits the C{http.connection} events of L{desperados.telemetry}.  Each connection
    starts as HTTP/1.1 and switches to HTTP/2 after TLS ALPN chose C{h2} or
    when a cleartext client starts with the HTTP/2 connection preface.
    The Site keeps its open HTTP connections so that L{drain} can close them
    gracefully.  Requests are L{StreamingRequest}s: the pipeline runs as
    soon as the head arrives and plugs read the body with C{Conn.read_body}.

    :param resource: the resource that serves every request.
    :param http_options: limits and timeouts of the connections; the
        defaults of L{HTTPOptions} when None.
    :param max_body_size: the largest request body accepted, in bytes; a
        larger one is answered with 413.  None means no limit.
    :param access_log: where to write a combined log format line per
        request: a file path, C{"-"} for standard output, or None for none.
    :ivar connections: the open HTTP connections, by their first channel
        (see L{desperados.channel.HTTPChannelSelector.track}).
    :ivar connection_limit: the count of open connections, and their limit.
    """

    emits_connection_events = True
    http1_fast_path = True
    """Whether L{desperados.http1_fast.FastPath} serves the simple HTTP/1.1
    requests; when false, twisted.web's Request carries every request."""

    protocol = build_channel
    # Site logs "Starting factory" and "Stopping factory" for every listener.
    noisy = False
    requestFactory = StreamingRequest

    def __init__(
        self,
        resource: PlugResource,
        *,
        http_options: HTTPOptions | None = None,
        max_body_size: int | None = DEFAULT_MAX_BODY_SIZE,
        access_log: str | None = None,
        **kwargs: Any,
    ) -> None:
        options = http_options or HTTPOptions()
        # The Site's timeout is the idle timeout of HTTP/2 connections;
        # desperados' HTTP/1.1 channel keeps its own deadlines.
        kwargs.setdefault("timeout", options.keepalive_timeout)
        super().__init__(resource, **kwargs)
        self.plug_resource = resource
        self.connections: dict[HTTPChannel, HTTPChannelSelector] = {}
        self._drains: list[Drain] = []
        self._abort_requested = False
        self._websocket_close_requested = False
        self.http_options = options
        self.max_body_size = max_body_size
        self.access_log = None
        if access_log is not None:
            self.access_log = AccessLog(access_log, self.reactor)
            # Open now, so that a path that cannot be written fails at start.
            self.access_log.open()
        self.connection_limit = ConnectionLimit(
            options.max_connections,
            self.reactor,
            options.linger_timeout,
            options.tls_handshake_timeout,
        )

    def buildProtocol(self, addr: Any) -> Any:
        return self.connection_limit.build(self._build_http_protocol, addr)

    def _build_http_protocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if isinstance(protocol, HTTPChannelSelector):
            protocol.track(self.connections)
        if telemetry.observers and protocol is not None:
            _observe_connection(protocol)
        return protocol

    def acceptableProtocols(self) -> list[bytes]:
        # The ALPN protocols offered on TLS connections, in order of preference.
        return [b"h2", b"http/1.1"]

    def log(self, request: Any) -> None:
        # Called by twisted.web's Request.finish, and by StreamingRequest
        # for a request whose client left.
        if self.access_log is not None:
            self.access_log.write(request)

    def log_upgrade(self, request: Any) -> None:
        """
        Write the access log line of a request handed to the WebSocket bridge.
        """
        if self.access_log is not None:
            self.access_log.write(request, status=101)

    def stopFactory(self) -> None:
        super().stopFactory()
        if self.access_log is not None:
            self.access_log.close()

    def forget_connection(self, channel: HTTPChannel) -> None:
        """
        Stop tracking the connection of C{channel}, which became a WebSocket.
        """
        protocol = self.connections.get(channel)
        if protocol is not None:
            protocol.untrack()

    def drain(
        self,
        timeout: float = DEFAULT_DRAIN_TIMEOUT,
        *,
        wait_for_websockets: bool = False,
    ) -> Deferred[None]:
        """
        Close every connection gracefully; call it once the ports are closed.

        Requests in flight get up to C{timeout} seconds to finish and are
        answered with C{connection: close}; idle keep-alive connections are
        closed now; HTTP/2 connections get GOAWAY; WebSocket handlers are
        terminated with a C{"shutdown"} reason and their connections closed
        with 1001 Going Away.  When C{timeout} ends, a request whose pipeline
        still runs gets 503 with C{connection: close} if its response has
        not started, and its connection is closed if it has; every other
        HTTP connection still open is aborted, and those closing after a 503
        are aborted after C{linger_timeout}.

        :param wait_for_websockets: leave open WebSockets running until they
            close on their own or C{timeout} ends, and only then close them
            with 1001 and a C{"shutdown"} reason (see L{close_websockets}).
        :returns: a Deferred that fires once every connection is closed.
        """
        resource = self.plug_resource
        resource.draining = True
        drain = Drain(
            self.connections.values(),
            resource.websockets,
            timeout=timeout,
            reactor=self.reactor,
            wait_for_websockets=(
                wait_for_websockets and not self._websocket_close_requested
            ),
            give_up_requests=resource.give_up_requests,
            close_timeout=self.http_options.linger_timeout,
        )
        self._drains.append(drain)
        if self._abort_requested:
            drain.abort()
        return drain.done

    def end_drain(self) -> None:
        """
        Serve normally again after a drain, as when a stopped service restarts.
        """
        self.plug_resource.draining = False
        self._abort_requested = False
        self._websocket_close_requested = False
        self._drains = [drain for drain in self._drains if not drain.done.called]

    def close_websockets(self) -> None:
        """
        Close with 1001 the WebSockets that a drain lets finish, now or once it starts.
        """
        self._websocket_close_requested = True
        for drain in self._drains:
            drain.close_websockets()

    def abort_drain(self) -> None:
        """
        Abort the connections that a drain still waits for, now or once it starts.
        """
        self._abort_requested = True
        for drain in self._drains:
            drain.abort()


def _observe_connection(protocol: Any) -> None:
    # The protocol is twisted.web's wrapper that picks HTTP/1.1 or HTTP/2; it
    # sees connectionLost unless the WebSocket bridge took the transport over,
    # and then the bridge emits http.connection.upgrade instead.
    telemetry.emit("http.connection.open")
    connection_lost = protocol.connectionLost

    def emit_and_forward(reason: Any) -> None:
        telemetry.emit("http.connection.close")
        connection_lost(reason)

    protocol.connectionLost = emit_and_forward


def make_site(
    plug: PlugSpec = DEFAULT_PLUG,
    opts: object = None,
    *,
    reactor: Any = None,
    compress: bool | Compression = True,
    response_timeout: float | None = DEFAULT_RESPONSE_TIMEOUT,
    http_options: HTTPOptions | None = None,
    max_body_size: int | None = DEFAULT_MAX_BODY_SIZE,
    access_log: str | None = None,
) -> DesperadosSite:
    """
    Build the Site that runs C{plug} for every request.

    :param plug: a plug, a pipeline, or a dotted name of either.
    :param opts: the options given to the plug's C{init}.
    :param compress: response compression, see L{PlugResource}.
    :param response_timeout: seconds a pipeline may take before the
        request is answered with 503; None for no limit.
    :param http_options: limits and timeouts of the connections.
    :param max_body_size: the largest request body accepted, in bytes, or
        None for no limit.
    :param access_log: a file path or C{"-"} for an access log, None for none.
    """
    return DesperadosSite(
        PlugResource(
            plug,
            opts,
            reactor=reactor,
            compress=compress,
            response_timeout=response_timeout,
        ),
        http_options=http_options,
        max_body_size=max_body_size,
        access_log=access_log,
        reactor=reactor,
    )


def make_endpoint(
    reactor: Any,
    *,
    port: int = DEFAULT_PORT,
    ip: str | None = None,
    listen: str | None = None,
    tls: CertificateOptions | None = None,
) -> IStreamServerEndpoint:
    """
    Build the server endpoint for C{listen}, or else for C{port} and C{ip}.

    :param listen: a Twisted endpoint description such as
        C{tcp:8082:interface=127.0.0.1}, C{unix:/run/desperados.sock} or
        C{ssl:8443:privateKey=key.pem:certKey=cert.pem}.
    :param port: the TCP port; 0 picks a free one.
    :param ip: the address to bind; all IPv4 interfaces when None.  An IPv6
        address such as C{::} or C{::1} listens on IPv6.
    :param tls: serve TLS with these options on top of the endpoint, such as
        the result of L{tls_options}.
    :raises ValueError: if C{tls} is given for an C{ssl:} description, which
        carries its own certificate.
    """
    if listen is not None:
        if tls is not None and _is_ssl_description(listen):
            msg = f"{listen!r} already serves TLS with its own certificate; use tcp: instead"
            raise ValueError(msg)
        endpoint = serverFromString(reactor, listen)
    elif ip is not None and ":" in ip:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=ip)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=ip or "")
    if tls is not None:
        endpoint = TLSServerEndpoint(endpoint, tls)
    return endpoint


def tls_options(
    scheme: str, certfile: str | None, keyfile: str | None
) -> CertificateOptions | None:
    """
    Check the scheme options and load the certificate for C{https}.

    :param scheme: C{http} or C{https}.
    :param certfile: the PEM certificate, then its chain; C{https} only.
    :param keyfile: the PEM private key of the certificate; C{https} only.
    :returns: the TLS options for C{https}, None for C{http}.
    :raises ValueError: for another scheme, for C{https} without both files,
        for C{http} with either, or for unusable files.
    :raises OSError: if a file cannot be read.
    """
    if scheme == "http":
        if certfile is not None or keyfile is not None:
            msg = "certfile and keyfile need scheme 'https', got scheme 'http'"
            raise ValueError(msg)
        return None
    if scheme != "https":
        msg = f"expected scheme 'http' or 'https', got {scheme!r}"
        raise ValueError(msg)
    if certfile is None or keyfile is None:
        msg = "scheme 'https' needs both certfile and keyfile"
        raise ValueError(msg)
    return certificate_options(certfile, keyfile)


def endpoint_scheme(endpoint: IStreamServerEndpoint) -> str:
    """
    Return C{https} for an endpoint that serves TLS, else C{http}.
    """
    if isinstance(endpoint, (TLSServerEndpoint, SSL4ServerEndpoint)):
        return "https"
    return "http"


def _is_ssl_description(description: str) -> bool:
    return description.partition(":")[0].strip().lower() == "ssl"


def format_address(address: object) -> str:
    """
    Format a listening address as C{host:port}, C{[v6]:port} or a socket path.
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address)


def _log_startup(level: LogLevel | None, plug_name: str, port: IListeningPort, scheme: str) -> None:
    if level is None:
        return
    log.emit(
        level,
        "Running {plug} with desperados {version} at {address} ({scheme})",
        plug=plug_name,
        version=__version__,
        address=format_address(port.getHost()),
        scheme=scheme,
    )


def start_link(
    plug: PlugSpec = DEFAULT_PLUG,
    opts: object = None,
    *,
    port: int = DEFAULT_PORT,
    ip: str | None = None,
    listen: str | None = None,
    scheme: str = "http",
    certfile: str | None = None,
    keyfile: str | None = None,
    reactor: Any = None,
    startup_log: LogLevel | None = LogLevel.info,
    compress: bool | Compression = True,
    response_timeout: float | None = DEFAULT_RESPONSE_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    http_options: HTTPOptions | None = None,
    max_body_size: int | None = DEFAULT_MAX_BODY_SIZE,
    access_log: str | None = None,
) -> Deferred[Server]:
    """
    Start serving C{plug} and fire with the running L{Server}.

    Stop it gracefully with C{server.stop()}, which stops listening, lets
    requests in flight finish and closes WebSockets with 1001 Going Away.
    The Server is also an C{IListeningPort}: C{server.getHost().port} is
    the port, and C{stopListening()} only stops accepting connections.
    Over TLS, ALPN offers HTTP/2 (C{h2}) and HTTP/1.1; without TLS, a client
    may start HTTP/2 with prior knowledge by sending the HTTP/2 connection
    preface.

    :param plug: a plug, a pipeline, or a dotted name of either.
    :param opts: the options given to the plug's C{init}.
    :param port: the TCP port; 0 picks a free one, read it from
        C{port.getHost().port}.
    :param ip: the address to bind; all IPv4 interfaces when None.
    :param listen: a Twisted endpoint description, used instead of port and
        ip; an C{ssl:} description serves TLS with its own certificate.
    :param scheme: C{https} serves TLS with C{certfile} and C{keyfile}.
    :param certfile: the PEM certificate, then any intermediate certificates.
    :param keyfile: the PEM private key, unencrypted.
    :param reactor: the reactor to listen with; the global one when None.
    :param startup_log: the level of the startup log line, None for none.
    :param compress: compress responses with gzip or deflate when the client
        accepts it (True), never (False), or with the given L{Compression}.
    :param response_timeout: seconds a pipeline may take before the
        request is answered with 503; None for no limit.
    :param drain_timeout: seconds that C{stop()} waits for connections to
        close before it aborts them.
    :param http_options: limits and timeouts of the connections; the
        defaults of L{HTTPOptions} when None.
    :param max_body_size: the largest request body accepted, in bytes; a
        larger one is answered with 413.  None means no limit.
    :param access_log: where to write a combined log format line per
        request: a file path, C{"-"} for standard output, or None for none.
    :raises ValueError: for bad scheme, certificate or endpoint options.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    tls = tls_options(scheme, certfile, keyfile)
    endpoint = make_endpoint(reactor, port=port, ip=ip, listen=listen, tls=tls)
    site = make_site(
        plug,
        opts,
        reactor=reactor,
        compress=compress,
        response_timeout=response_timeout,
        http_options=http_options,
        max_body_size=max_body_size,
        access_log=access_log,
    )
    plug_name = plug if isinstance(plug, str) else site.plug_resource._plug.name

    async def listen_and_log() -> Server:
        listening = await endpoint.listen(site)
        _log_startup(startup_log, plug_name, listening, endpoint_scheme(endpoint))
        return Server(site, [listening], drain_timeout=drain_timeout)

    return ensureDeferred(listen_and_log())


def _stop_listening(ports: Sequence[IListeningPort]) -> Deferred[object]:
    stopping = [port.stopListening() for port in ports]
    for port in ports:
        address = format_address(port.getHost())
        log.info("stopped listening at {address}", address=address)
    return DeferredList([d for d in stopping if d is not None])


def _stop_and_drain(
    site: DesperadosSite,
    stopped_listening: Deferred[object],
    timeout: float,
    *,
    wait_for_websockets: bool = False,
) -> Deferred[None]:
    async def drain() -> None:
        await stopped_listening
        await site.drain(timeout, wait_for_websockets=wait_for_websockets)

    return ensureDeferred(drain())


@implementer(IListeningPort)
class Server:
    """
    A running server, as returned by L{start_link}: its Site and its ports.

    :ivar site: the L{DesperadosSite} serving the pipeline; also
        C{factory}, the name that Twisted's listening ports give it.
    :ivar ports: the listening ports.
    :ivar drain_timeout: the default timeout of L{stop}, in seconds.
    """

    def __init__(
        self,
        site: DesperadosSite,
        ports: Sequence[IListeningPort],
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self.site = site
        self.factory = site
        self.ports = list(ports)
        self.drain_timeout = drain_timeout

    def getHost(self) -> Any:
        """
        Return the address of the first listening port.
        """
        return self.ports[0].getHost()

    def startListening(self) -> None:
        """
        Do nothing: L{start_link} has already started listening.
        """

    def stopListening(self) -> Deferred[object]:
        """
        Stop accepting connections, leaving the open ones alone.
        """
        ports, self.ports = self.ports, []
        return _stop_listening(ports)

    def stop(self, drain_timeout: float | None = None) -> Deferred[None]:
        """
        Stop listening, then drain the open connections (see L{DesperadosSite.drain}).

        :param drain_timeout: seconds to wait before aborting the connections
            still open; the Server's C{drain_timeout} when None.
        :returns: a Deferred that fires once every connection is closed.
        """
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        return _stop_and_drain(self.site, self.stopListening(), timeout)


class DesperadosService(Service):
    """
    The twistd service: one Site listening on one or more endpoints.

    Stopping the service (twistd does so on SIGTERM and SIGINT) stops
    listening and drains the open connections; the Deferred that
    C{stopService} returns holds the reactor's shutdown until they are
    closed, or until C{drain_timeout} has passed.

    :param site: the Site to serve.
    :param endpoints: where to listen.
    :param plug_name: the pipeline's name for the startup line.
    :param startup_log: the level of the startup line, None for none.
    :param drain_timeout: seconds to wait for connections to close.
    :param reactor: stopped when an endpoint cannot listen, so that twistd
        exits instead of running without a port; None for no such stop.
    :param abort_on_signal: while the service drains, make SIGTERM and SIGINT
        abort the connections still open instead of waiting for the drain
        timeout (twistd sets it; a program that embeds the service may have
        its own use for those signals).
    :ivar wait_for_websockets: when set, stopping the service lets open
        WebSockets run until they close on their own or C{drain_timeout}
        ends (see L{DesperadosSite.drain}).  A worker process of
        C{--workers} sets it when it is replaced.
    """

    def __init__(
        self,
        site: DesperadosSite,
        endpoints: Sequence[IStreamServerEndpoint],
        *,
        plug_name: str,
        startup_log: LogLevel | None = LogLevel.info,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        reactor: Any = None,
        abort_on_signal: bool = False,
    ) -> None:
        self.reactor = reactor
        self.abort_on_signal = abort_on_signal
        self.site = site
        self.endpoints = list(endpoints)
        self.plug_name = plug_name
        self.startup_log = startup_log
        self.drain_timeout = drain_timeout
        self.wait_for_websockets = False
        self.ports: list[IListeningPort] = []
        self._listening: Deferred[object] | None = None

    def startService(self) -> None:
        super().startService()
        self.site.end_drain()
        self._listening = DeferredList(
            [self._listen(endpoint) for endpoint in self.endpoints],
            fireOnOneErrback=True,
            consumeErrors=True,
        )

    def _listen(self, endpoint: IStreamServerEndpoint) -> Deferred[None]:
        def listening(port: IListeningPort) -> None:
            self.ports.append(port)
            _log_startup(self.startup_log, self.plug_name, port, endpoint_scheme(endpoint))

        def failed(failure: Any) -> None:
            log.error(
                "could not listen on {endpoint}: {error}",
                endpoint=endpoint,
                error=failure.getErrorMessage(),
            )
            if self.reactor is not None:
                # twistd starts services before the reactor runs.
                self.reactor.callWhenRunning(self.reactor.stop)

        return endpoint.listen(self.site).addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.abort_on_signal:
            self._abort_on_next_signal()
        ports, self.ports = self.ports, []
        return _stop_and_drain(
            self.site,
            _stop_listening(ports),
            self.drain_timeout,
            wait_for_websockets=self.wait_for_websockets,
        )

    def _abort_on_next_signal(self) -> None:
        # The reactor's own handlers would call reactor.stop() again, which
        # raises ReactorNotRunning while the reactor shuts down.
        if threading.current_thread() is not threading.main_thread():
            return
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor

        def abort(signum: int, frame: object) -> None:
            log.info(
                "received {signal} while draining",
                signal=signal.Signals(signum).name,
            )
            reactor.callFromThread(self.site.abort_drain)

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, abort)
