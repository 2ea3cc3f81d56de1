"""
The plug that takes the client's address, scheme and host from a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

from twisted.logger import Logger
from zope.interface import implementer

from desperados._logging import observer as log_observer
from desperados.conn import Conn
from desperados.interfaces import IPlug

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 7230 section 3.2.6: token and quoted-string, the two forms of a value
# in the Forwarded header (RFC 7239 section 4).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*")
_SEPARATOR = re.compile(r"[ \t]*([;,]|\Z)")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HEADER_SETS = ("forwarded", "x-forwarded")


class _Hop:
    """
    The client, scheme and host that one proxy recorded for the request it received.
    """

    __slots__ = ("client", "host", "proto")

    def __init__(self, client: str | None, proto: str | None, host: str | None):
        self.client = client
        self.proto = proto
        self.host = host


class _Options:
    __slots__ = ("headers", "networks", "unix")

    def __init__(
        self, networks: tuple[_Network, ...], unix: bool, headers: tuple[str, ...]
    ):
        self.networks = networks
        self.unix = unix
        self.headers = headers


@implementer(IPlug)
class ProxyHeaders:
    """
    Rewrite C{remote_ip}, C{scheme}, C{host} and C{port} from proxy headers.

    Put it first in the pipeline when desperados runs behind a reverse proxy
    such as nginx or HAProxy.  The headers are read only when the connection
    comes from a trusted proxy.  From any other peer they are ignored,
    because a client can send them too.

    The client address is found by walking the list of addresses from the
    right (the hop nearest to this server) to the left: the first address
    that is not a trusted proxy is the client's.  The scheme and host come
    from the same hop, when it gives them.  The original peer address is kept
    in C{conn.private["desperados.proxy_peer"]}.

    Options (a mapping):

    - C{trusted}: the proxies' addresses, as IP addresses or CIDR networks
      (C{"127.0.0.1"}, C{"10.0.0.0/8"}, C{"::1"}), plus C{"unix"} to trust
      peers on a UNIX socket.  Required.
    - C{headers}: which headers to read, in order of preference:
      C{"forwarded"} (RFC 7239 C{Forwarded}) and C{"x-forwarded"}
      (C{X-Forwarded-For}, C{X-Forwarded-Proto}, C{X-Forwarded-Host}).
      Both, in that order, by default; the first one present is used.
    """

    log = Logger(observer=log_observer)

    def init(self, opts: Mapping[str, object] | None) -> _Options:
        options = dict(opts or {})
        trusted = options.pop("trusted", None)
        headers = options.pop("headers", _HEADER_SETS)
        if options:
            msg = (
                "expected only trusted and headers for ProxyHeaders, "
                f"got {sorted(options)!r}"
            )
            raise TypeError(msg)
        if isinstance(trusted, str) or not isinstance(trusted, Iterable):
            msg = f"expected a list of trusted proxy addresses, got {trusted!r}"
            raise TypeError(msg)
        if isinstance(headers, str) or not isinstance(headers, Iterable):
            msg = f"expected a list of header sets for ProxyHeaders, got {headers!r}"
            raise TypeError(msg)

        networks = []
        unix = False
        for entry in trusted:
            if entry == "unix":
                unix = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except (TypeError, ValueError):
                msg = (
                    "expected an IP address or CIDR network as trusted proxy, "
                    f"got {entry!r}"
                )
                raise ValueError(msg) from None
        header_sets = tuple(headers)
        for name in header_sets:
            if name not in _HEADER_SETS:
                msg = f"expected 'forwarded' or 'x-forwarded' in headers, got {name!r}"
                raise ValueError(msg)
        return _Options(tuple(networks), unix, header_sets)

    def call(self, conn: Conn, state: _Options) -> Conn:
        if not _is_trusted(conn.remote_ip, state):
            return conn
        for name in state.headers:
            hops = (
                _forwarded_hops(conn)
                if name == "forwarded"
                else _x_forwarded_hops(conn)
            )
            if hops:
                _apply(conn, _client_hop(hops, state), state)
                break
        return conn


def _is_trusted(address: str | None, state: _Options) -> bool:
    if not address:
        # twisted.web gives no host for a UNIX socket peer.
        return state.unix
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in state.networks)


def _client_hop(hops: list[_Hop], state: _Options) -> _Hop:
    for hop in reversed(hops):
        if hop.client is None or not _is_trusted(hop.client, state):
            return hop
    return hops[0]


def _apply(conn: Conn, hop: _Hop, state: _Options) -> None:
    conn.private["desperados.proxy_peer"] = conn.remote_ip
    if hop.client is not None:
        conn.remote_ip = hop.client
    if hop.proto is not None:
        proto = hop.proto.lower()
        if proto in _DEFAULT_PORTS:
            conn.scheme = proto
            conn.port = _DEFAULT_PORTS[proto]
    if hop.host is not None:
        host, port = _split_host(hop.host)
        if host:
            conn.host = host
            if port is not None:
                conn.port = port
    ProxyHeaders.log.debug(
        "request from {peer} forwarded for {remote_ip} ({scheme}://{host}:{port})",
        peer=conn.private["desperados.proxy_peer"],
        remote_ip=conn.remote_ip,
        scheme=conn.scheme,
        host=conn.host,
        port=conn.port,
    )


def _forwarded_hops(conn: Conn) -> list[_Hop]:
    """
    Parse every C{Forwarded} header line into hops, left to right.

    A header that breaks the RFC 7239 syntax is ignored as a whole: the
    client may have written part of it, so no part of it can be trusted.
    """
    values = conn.get_req_header("forwarded")
    if not values:
        return []
    hops = []
    for value in values:
        parsed = _parse_forwarded(value)
        if parsed is None:
            ProxyHeaders.log.debug(
                "ignoring a malformed Forwarded header: {value!r}", value=value
            )
            return []
        hops.extend(parsed)
    return hops


def _parse_forwarded(value: str) -> list[_Hop] | None:
    hops = []
    pairs: dict[str, str] = {}
    position = 0
    while True:
        pair = _PAIR.match(value, position)
        if pair is not None:
            name = pair.group(1).lower()
            text = pair.group(2)
            if text.startswith('"'):
                text = re.sub(r"\\(.)", r"\1", text[1:-1])
            if name in pairs:
                return None
            pairs[name] = text
            position = pair.end()
        separator = _SEPARATOR.match(value, position)
        if separator is None:
            return None
        position = separator.end()
        if separator.group(1) in (",", ""):
            if pairs:
                hops.append(_hop_from_pairs(pairs))
            pairs = {}
        if separator.group(1) == "":
            return hops


def _hop_from_pairs(pairs: dict[str, str]) -> _Hop:
    client = pairs.get("for")
    return _Hop(
        None if client is None else _node_address(client),
        pairs.get("proto"),
        pairs.get("host"),
    )


def _node_address(node: str) -> str | None:
    """
    Return the IP address of an RFC 7239 node, or None for an obfuscated one.

    Nodes look like C{192.0.2.43}, C{192.0.2.43:47011}, C{[2001:db8::17]},
    C{[2001:db8::17]:4711}, C{unknown} or C{_hidden}.
    """
    if node.startswith("["):
        address, _, _ = node[1:].partition("]")
    elif node.count(":") == 1:
        address, _, _ = node.partition(":")
    else:
        address = node
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def _x_forwarded_hops(conn: Conn) -> list[_Hop]:
    clients = _comma_list(conn.get_req_header("x-forwarded-for"))
    if not clients:
        return []
    protos = _comma_list(conn.get_req_header("x-forwarded-proto"))
    hosts = _comma_list(conn.get_req_header("x-forwarded-host"))
    hops = [_Hop(_node_address(client), None, None) for client in clients]
    # Proxies that append to X-Forwarded-Proto and -Host give one value per
    # hop; most set a single value, which belongs to the nearest hop's client.
    for values, field in ((protos, "proto"), (hosts, "host")):
        if len(values) == len(hops):
            for hop, value in zip(hops, values, strict=True):
                setattr(hop, field, value)
        elif values:
            for hop in hops:
                setattr(hop, field, values[-1])
    return hops


def _comma_list(values: list[str]) -> list[str]:
    return [
        item.strip() for value in values for item in value.split(",") if item.strip()
    ]


def _split_host(host: str) -> tuple[str, int | None]:
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        address, _, port_text = host.partition(":")
    if port_text.isdigit():
        return address, int(port_text)
    return address, None
