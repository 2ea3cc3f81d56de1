"""
Listening for connections: endpoints from options, the Site, the service.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger, LogLevel
from twisted.web.server import Site

from desperados import __version__, telemetry
from desperados._logging import observer as log_observer
from desperados.builder import PlugSpec
from desperados.resource import PlugResource

DEFAULT_PORT = 8082
DEFAULT_PLUG = "desperados.plugs.Default"

log = Logger(namespace="desperados.server", observer=log_observer)


class DesperadosSite(Site):
    """
    A twisted.web Site serving one L{PlugResource} on every path.

    twisted.web's Site writes an access-log line per request to the global
    log unless told otherwise; this one writes none.  It emits the
    C{http.connection} events of L{desperados.telemetry}.
    """

    emits_connection_events = True

    def __init__(self, resource: PlugResource, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.plug_resource = resource

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if telemetry.observers and protocol is not None:
            _observe_connection(protocol)
        return protocol

    def log(self, request: Any) -> None:
        pass


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


def make_site(plug: PlugSpec = DEFAULT_PLUG, opts: object = None, *, reactor: Any = None) -> DesperadosSite:
    """
    Build the Site that runs C{plug} for every request.

    :param plug: a plug, a pipeline, or a dotted name of either.
    :param opts: the options given to the plug's C{init}.
    """
    return DesperadosSite(PlugResource(plug, opts, reactor=reactor))


def make_endpoint(
    reactor: Any, *, port: int = DEFAULT_PORT, ip: str | None = None, listen: str | None = None
) -> IStreamServerEndpoint:
    """
    Build the server endpoint for C{listen}, or else for C{port} and C{ip}.

    :param listen: a Twisted endpoint description such as
        C{tcp:8082:interface=127.0.0.1} or C{unix:/run/desperados.sock}.
    :param port: the TCP port; 0 picks a free one.
    :param ip: the address to bind; all IPv4 interfaces when None.  An IPv6
        address such as C{::} or C{::1} listens on IPv6.
    """
    if listen is not None:
        return serverFromString(reactor, listen)
    if ip is not None and ":" in ip:
        return TCP6ServerEndpoint(reactor, port, interface=ip)
    return TCP4ServerEndpoint(reactor, port, interface=ip or "")


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
    reactor: Any = None,
    startup_log: LogLevel | None = LogLevel.info,
) -> Deferred[IListeningPort]:
    """
    Start serving C{plug} and fire with the listening port.

    Stop serving with the port's C{stopListening()}.

    :param plug: a plug, a pipeline, or a dotted name of either.
    :param opts: the options given to the plug's C{init}.
    :param port: the TCP port; 0 picks a free one, read it from
        C{port.getHost().port}.
    :param ip: the address to bind; all IPv4 interfaces when None.
    :param listen: a Twisted endpoint description, used instead of port and ip.
    :param reactor: the reactor to listen with; the global one when None.
    :param startup_log: the level of the startup log line, None for none.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    site = make_site(plug, opts, reactor=reactor)
    endpoint = make_endpoint(reactor, port=port, ip=ip, listen=listen)
    plug_name = plug if isinstance(plug, str) else site.plug_resource._plug.name

    async def listen_and_log() -> IListeningPort:
        listening = await endpoint.listen(site)
        _log_startup(startup_log, plug_name, listening, "http")
        return listening

    return ensureDeferred(listen_and_log())


class DesperadosService(Service):
    """
    The twistd service: one Site listening on one or more endpoints.

    :param site: the Site to serve.
    :param endpoints: where to listen.
    :param plug_name: the pipeline's name for the startup line.
    :param startup_log: the level of the startup line, None for none.
    """

    def __init__(
        self,
        site: DesperadosSite,
        endpoints: Sequence[IStreamServerEndpoint],
        *,
        plug_name: str,
        startup_log: LogLevel | None = LogLevel.info,
        scheme: str = "http",
    ) -> None:
        self.site = site
        self.endpoints = list(endpoints)
        self.plug_name = plug_name
        self.startup_log = startup_log
        self.scheme = scheme
        self.ports: list[IListeningPort] = []
        self._listening: Deferred[object] | None = None

    def startService(self) -> None:
        super().startService()
        self._listening = DeferredList(
            [self._listen(endpoint) for endpoint in self.endpoints],
            fireOnOneErrback=True,
            consumeErrors=True,
        )

    def _listen(self, endpoint: IStreamServerEndpoint) -> Deferred[None]:
        def listening(port: IListeningPort) -> None:
            self.ports.append(port)
            _log_startup(self.startup_log, self.plug_name, port, self.scheme)

        def failed(failure: Any) -> None:
            log.failure("could not listen on {endpoint}", failure, endpoint=endpoint)
            from twisted.internet import reactor

            if reactor.running:
                reactor.stop()

        return endpoint.listen(self.site).addCallbacks(listening, failed)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        ports, self.ports = self.ports, []
        stopping = [port.stopListening() for port in ports]
        for port in ports:
            log.info("stopped listening at {address}", address=format_address(port.getHost()))
        return DeferredList([d for d in stopping if d is not None])
