"""
The ProxyHeaders plug, in memory and behind the PROXY protocol.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from support import connect, upgrade_request
from twisted.internet import reactor
from zope.interface import implementer
from zope.interface.verify import verifyObject

from desperados import Conn, IPlug, IWebSock, Ok, Push, Text
from desperados.plugs import ProxyHeaders
from twisted.plugins.desperados_plugin import Options, service_maker

pytestmark = pytest.mark.usefixtures("both_http1_paths")


def _conn(remote_ip: str = "10.0.0.1", headers: list[tuple[str, str]] = ()) -> Conn:
    return Conn(remote_ip=remote_ip, host="backend", port=8082, req_headers=headers)


def _run(conn: Conn, trusted: list[str] = ("10.0.0.0/8",), **opts: object) -> Conn:
    plug = ProxyHeaders()
    return plug.call(conn, plug.init({"trusted": list(trusted), **opts}))


def test_proxy_headers_provides_iplug():
    assert verifyObject(IPlug, ProxyHeaders())


def test_x_forwarded_from_trusted_peer():
    conn = _run(
        _conn(
            headers=[
                ("x-forwarded-for", "203.0.113.9, 10.0.0.7"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "example.org"),
            ]
        )
    )

    assert conn.remote_ip == "203.0.113.9"
    assert conn.scheme == "https"
    assert conn.host == "example.org"
    assert conn.port == 443
    assert conn.private["desperados.proxy_peer"] == "10.0.0.1"


def test_x_forwarded_from_untrusted_peer_is_ignored():
    conn = _run(
        _conn(
            remote_ip="192.0.2.1",
            headers=[
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
            ],
        )
    )

    assert conn.remote_ip == "192.0.2.1"
    assert conn.scheme == "http"
    assert conn.host == "backend"
    assert "desperados.proxy_peer" not in conn.private


def test_spoofed_left_entries_are_skipped():
    """A client's own X-Forwarded-For entry sits left of the first untrusted hop."""
    conn = _run(_conn(headers=[("x-forwarded-for", "1.1.1.1, 198.51.100.4, 10.0.0.3")]))

    assert conn.remote_ip == "198.51.100.4"


def test_all_hops_trusted_gives_leftmost():
    conn = _run(_conn(headers=[("x-forwarded-for", "10.0.0.5, 10.0.0.3")]))

    assert conn.remote_ip == "10.0.0.5"


def test_forwarded_header():
    conn = _run(
        _conn(
            headers=[
                (
                    "forwarded",
                    'for="[2001:db8:cafe::17]:4711";proto=https;'
                    'host="example.org:8443", '
                    "for=10.0.0.2;proto=http;host=inner",
                )
            ]
        )
    )

    assert conn.remote_ip == "2001:db8:cafe::17"
    assert conn.scheme == "https"
    assert conn.host == "example.org"
    assert conn.port == 8443


def test_forwarded_preferred_over_x_forwarded():
    conn = _run(
        _conn(
            headers=[
                ("x-forwarded-for", "198.51.100.1"),
                ("forwarded", "for=198.51.100.2"),
            ]
        )
    )

    assert conn.remote_ip == "198.51.100.2"


def test_header_sets_are_an_option():
    conn = _run(
        _conn(
            headers=[
                ("x-forwarded-for", "198.51.100.1"),
                ("forwarded", "for=198.51.100.2"),
            ]
        ),
        headers=["x-forwarded"],
    )

    assert conn.remote_ip == "198.51.100.1"


@pytest.mark.parametrize(
    "value",
    [
        "for=198.51.100.2;for=198.51.100.3",
        "for=198.51.100.2 proto=https",
        'for="198.51.100.2',
        "for",
        "=198.51.100.2",
    ],
)
def test_malformed_forwarded_is_ignored(value):
    conn = _run(_conn(headers=[("forwarded", value)]))

    assert conn.remote_ip == "10.0.0.1"


def test_obfuscated_forwarded_node_keeps_peer_address():
    conn = _run(_conn(headers=[("forwarded", "for=_hidden;proto=https")]))

    assert conn.remote_ip == "10.0.0.1"
    assert conn.scheme == "https"


def test_unknown_proto_is_ignored():
    conn = _run(
        _conn(
            headers=[
                ("x-forwarded-for", "198.51.100.1"),
                ("x-forwarded-proto", "gopher"),
            ]
        )
    )

    assert conn.scheme == "http"
    assert conn.port == 8082


def test_ipv4_mapped_peer_is_trusted():
    conn = _run(
        _conn(
            remote_ip="::ffff:10.0.0.1", headers=[("x-forwarded-for", "198.51.100.1")]
        )
    )

    assert conn.remote_ip == "198.51.100.1"


def test_unix_peer_trusted_only_when_listed():
    headers = [("x-forwarded-for", "198.51.100.1")]

    untrusted = _run(_conn(remote_ip="", headers=headers))
    trusted = _run(_conn(remote_ip="", headers=headers), trusted=["unix"])

    assert untrusted.remote_ip == ""
    assert trusted.remote_ip == "198.51.100.1"


@pytest.mark.parametrize(
    ("opts", "error", "match"),
    [
        ({}, TypeError, "trusted proxy addresses"),
        ({"trusted": "10.0.0.1"}, TypeError, "trusted proxy addresses"),
        ({"trusted": ["10.0.0.300"]}, ValueError, "'10.0.0.300'"),
        ({"trusted": [], "headers": ["via"]}, ValueError, "'via'"),
        ({"trusted": [], "proxies": []}, TypeError, "'proxies'"),
    ],
)
def test_bad_options_fail_at_init(opts, error, match):
    with pytest.raises(error, match=match):
        ProxyHeaders().init(opts)


# The PROXY protocol, through Twisted's haproxy: endpoint.


@implementer(IWebSock)
class ReportAddress:
    """
    A WebSocket handler that sends the client's address, then echoes.
    """

    def init(self, state):
        return Push(Text(state), state)

    def handle_in(self, frame, state):
        return Push(Text(frame[0]), state)

    def handle_info(self, message, state):
        return Ok(state)

    def terminate(self, reason, state):
        pass


def report_client(conn, opts):
    """
    Send the client fields of the Conn as JSON.

    HTTP requests get them as the response, upgrades as the first message.
    """
    seen = json.dumps(
        {"remote_ip": conn.remote_ip, "scheme": conn.scheme, "host": conn.host}
    )
    if conn.get_req_header("upgrade"):
        return conn.upgrade(ReportAddress(), seen).halt()
    conn.put_resp_header("content-type", "application/json")
    return conn.send_resp(200, seen).halt()


@pytest_twisted.ensureDeferred
async def test_haproxy_endpoint_gives_proxied_address():
    options = Options()
    options.parseOptions(
        [
            "--listen",
            "haproxy:tcp:0:interface=127.0.0.1",
            "--plug",
            "test_proxy_headers.report_client",
        ]
    )
    service = service_maker.makeService(options, reactor=reactor)
    service.startService()
    await service._listening
    port = service.ports[0].getHost().port
    try:
        client = await connect(port)
        client.send(
            b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 8082\r\n"
            b"GET / HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n"
        )
        response = await client.read_response()
        await client.wait_closed()

        websocket = await connect(port)
        websocket.send(
            b"PROXY TCP4 198.51.100.8 127.0.0.1 40001 8082\r\n" + upgrade_request("/")
        )
        upgraded = await websocket.read_response()
        first = await websocket.read_frame()
        websocket.transport.loseConnection()
    finally:
        await service.stopService()

    assert response.status == 200
    assert json.loads(response.body)["remote_ip"] == "198.51.100.7"
    assert upgraded.status == 101
    assert json.loads(first[1])["remote_ip"] == "198.51.100.8"
