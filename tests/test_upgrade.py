"""
Upgrade checks: the pure functions, Conn.upgrade, and the response a client
gets over loopback for each rejected handshake.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from support import connect, upgrade_request, websocket_key
from zope.interface.verify import verifyObject

from desperados import Builder, Conn, IPlug, IWebSock, endpoints
from desperados.conn import UPGRADED
from desperados.endpoints.websocket import Echo
from desperados.errors import (
    AlreadySentError,
    BadRequestError,
    ForbiddenError,
    UpgradeRequiredError,
)
from desperados.plugs import Websocket
from desperados.upgrade import check_websocket_upgrade, is_websocket_upgrade
from desperados.websock import WebSocketOptions


def handshake_headers(**changes: str | None) -> list[tuple[str, str]]:
    """
    Return valid handshake headers, with some replaced or (for None) removed.
    """
    headers = {
        "host": "example.com",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": websocket_key(),
    }
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return list(headers.items())


def handshake_conn(
    method: str = "GET", http_version: str = "HTTP/1.1", **changes: str | None
) -> Conn:
    return Conn(
        method=method,
        http_version=http_version,
        req_headers=handshake_headers(**changes),
    )


# The detection check


class TestIsWebsocketUpgrade:
    def test_valid_handshake_is_detected(self):
        assert is_websocket_upgrade(handshake_conn()) is True

    def test_upgrade_token_in_list_any_case(self):
        conn = handshake_conn(upgrade="h2c, WebSocket")

        assert is_websocket_upgrade(conn) is True

    @pytest.mark.parametrize(
        "missing", ["upgrade", "sec_websocket_version", "sec_websocket_key"]
    )
    def test_missing_header_is_not_an_upgrade(self, missing):
        assert is_websocket_upgrade(handshake_conn(**{missing: None})) is False

    def test_http_1_0_is_never_an_upgrade(self):
        """
        RFC 9110 section 7.8: a server ignores Upgrade in an HTTP/1.0 request.
        """
        assert is_websocket_upgrade(handshake_conn(http_version="HTTP/1.0")) is False

    def test_post_is_detected_so_it_can_be_rejected(self):
        assert is_websocket_upgrade(handshake_conn(method="POST")) is True


# The validity check


class TestCheckWebsocketUpgrade:
    def test_valid_handshake_passes(self):
        check_websocket_upgrade(handshake_conn(), WebSocketOptions())

    def test_connection_token_list_passes(self):
        conn = handshake_conn(connection="keep-alive, Upgrade")

        check_websocket_upgrade(conn, WebSocketOptions())

    @pytest.mark.parametrize(
        ("conn", "fragment"),
        [
            pytest.param(handshake_conn(method="POST"), "GET", id="post"),
            pytest.param(
                handshake_conn(http_version="HTTP/1.0"), "HTTP/1.1", id="http-1.0"
            ),
            pytest.param(handshake_conn(host=None), "Host", id="no-host"),
            pytest.param(
                handshake_conn(connection="keep-alive"),
                "Connection",
                id="no-upgrade-token",
            ),
            pytest.param(
                handshake_conn(connection=None), "Connection", id="no-connection"
            ),
            pytest.param(
                handshake_conn(upgrade="h2c"), "Upgrade", id="upgrade-not-websocket"
            ),
            pytest.param(
                handshake_conn(sec_websocket_version=None),
                "Sec-WebSocket-Version",
                id="no-version",
            ),
            pytest.param(
                handshake_conn(sec_websocket_key="c2hvcnQ="),
                "Sec-WebSocket-Key",
                id="short-key",
            ),
            pytest.param(
                handshake_conn(sec_websocket_key="not base64 at all!!!!!=="),
                "Sec-WebSocket-Key",
                id="key-not-base64",
            ),
            pytest.param(
                handshake_conn(sec_websocket_key=None), "Sec-WebSocket-Key", id="no-key"
            ),
            pytest.param(
                handshake_conn(sec_websocket_protocol="chat, chat"),
                "Sec-WebSocket-Protocol",
                id="repeated-subprotocol",
            ),
            pytest.param(
                handshake_conn(origin="not a url"), "Origin", id="invalid-origin"
            ),
        ],
    )
    def test_invalid_handshake_is_400_naming_the_problem(self, conn, fragment):
        with pytest.raises(BadRequestError) as raised:
            check_websocket_upgrade(conn, WebSocketOptions())

        assert raised.value.status == 400
        assert fragment in str(raised.value)

    @pytest.mark.parametrize("version", ["8", "14", "13, 8"])
    def test_other_version_is_426_naming_13(self, version):
        conn = handshake_conn(sec_websocket_version=version)

        with pytest.raises(UpgradeRequiredError) as raised:
            check_websocket_upgrade(conn, WebSocketOptions())

        assert raised.value.status == 426
        assert raised.value.headers == (("sec-websocket-version", "13"),)

    def test_origin_outside_allowed_list_is_403(self):
        conn = handshake_conn(origin="https://evil.example")
        options = WebSocketOptions(origins=["https://example.com"])

        with pytest.raises(ForbiddenError) as raised:
            check_websocket_upgrade(conn, options)

        assert raised.value.status == 403
        assert "Origin" in str(raised.value)

    def test_allowed_origin_matches_case_insensitively(self):
        conn = handshake_conn(origin="HTTPS://Example.com")
        options = WebSocketOptions(origins=["https://example.com/"])

        check_websocket_upgrade(conn, options)

    def test_missing_origin_is_allowed(self):
        options = WebSocketOptions(origins=["https://example.com"])

        check_websocket_upgrade(handshake_conn(), options)

    @pytest.mark.parametrize("origin", ["null", "http://localhost:8082", "file://"])
    def test_any_valid_origin_passes_without_list(self, origin):
        check_websocket_upgrade(handshake_conn(origin=origin), WebSocketOptions())


# Conn.upgrade


class TestConnUpgrade:
    def test_upgrade_stores_handler_state_and_options(self):
        handler = Echo()
        conn = handshake_conn()

        result = conn.upgrade(handler, 7, timeout=5, subprotocols=["chat"])

        assert result is conn
        assert conn.state == UPGRADED
        assert conn.upgrade_request.handler is handler
        assert conn.upgrade_request.state == 7
        assert conn.upgrade_request.options.timeout == 5
        assert conn.upgrade_request.options.subprotocols == ("chat",)

    def test_invalid_request_is_not_upgraded(self):
        conn = handshake_conn(sec_websocket_version="8")

        with pytest.raises(UpgradeRequiredError):
            conn.upgrade(Echo(), 0)

        assert conn.state != UPGRADED
        assert conn.upgrade_request is None

    def test_unknown_option_is_type_error(self):
        with pytest.raises(TypeError):
            handshake_conn().upgrade(Echo(), 0, max_frame=10)

    def test_upgrade_after_response_is_already_sent(self):
        conn = handshake_conn()
        conn.send_resp(200, "done")

        with pytest.raises(AlreadySentError):
            conn.upgrade(Echo(), 0)


def test_echo_provides_iwebsock():
    assert verifyObject(IWebSock, Echo())


@pytest.mark.parametrize("plug", [Websocket(), endpoints.Websocket()])
def test_websocket_plugs_provide_iplug(plug):
    assert verifyObject(IPlug, plug)


def test_endpoint_rejects_bad_options_when_built():
    with pytest.raises(ValueError, match="max_frame_size"):
        endpoints.Websocket().init({"max_frame_size": 0})


def test_endpoint_rejects_handler_without_iwebsock():
    with pytest.raises(TypeError, match="IWebSock"):
        endpoints.Websocket().init({"handler": object()})


# Over loopback


async def _send(port: int, request: bytes):
    client = await connect(port)
    client.send(request)
    response = await client.read_response()
    client.transport.loseConnection()
    return response


@pytest_twisted.ensureDeferred
async def test_connection_token_list_upgrades(serve):
    port = await serve()

    response = await _send(port, upgrade_request(connection="keep-alive, Upgrade"))

    assert response.status == 101
    assert response.header("upgrade").lower() == "websocket"


@pytest_twisted.ensureDeferred
async def test_wrong_version_gets_426(serve, logs):
    port = await serve()

    response = await _send(port, upgrade_request(version="8"))

    assert response.status == 426
    assert response.header("sec-websocket-version") == "13"
    assert b"Sec-WebSocket-Version" in response.body
    rejected = logs.with_format("rejected {method} {path}")
    assert [event["status"] for event in rejected] == [426]


@pytest.mark.parametrize(
    ("request_bytes", "fragment"),
    [
        pytest.param(
            upgrade_request(key="dG9vIHNob3J0"), b"Sec-WebSocket-Key", id="bad-key"
        ),
        pytest.param(
            upgrade_request(method="POST", extra="Content-Length: 0\r\n"),
            b"GET",
            id="post",
        ),
        pytest.param(
            upgrade_request(connection="keep-alive"), b"Connection", id="no-upgrade"
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_handshake_gets_400_naming_header(serve, request_bytes, fragment):
    port = await serve()

    response = await _send(port, request_bytes)

    assert response.status == 400
    assert fragment in response.body
    assert response.header("connection") == "close"
    assert response.header("content-type") == "text/plain; charset=utf-8"


@pytest_twisted.ensureDeferred
async def test_origin_not_allowed_gets_403(serve):
    pipeline = Builder(
        [Websocket, (endpoints.Websocket, {"origins": ["https://example.com"]})]
    )
    port = await serve(pipeline)

    refused = await _send(
        port, upgrade_request(extra="Origin: https://evil.example\r\n")
    )
    allowed = await _send(
        port, upgrade_request(extra="Origin: https://example.com\r\n")
    )

    assert refused.status == 403
    assert b"Origin" in refused.body
    assert allowed.status == 101


@pytest_twisted.ensureDeferred
async def test_http_1_0_upgrade_headers_are_ignored(serve):
    port = await serve()
    request = upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1)

    response = await _send(port, request)

    assert response.status == 404


@pytest.mark.parametrize(
    "character", [b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85"]
)
@pytest_twisted.ensureDeferred
async def test_line_break_character_in_header_gets_400(serve, logs, character):
    """
    A header value that str.splitlines() would split never reaches Autobahn.

    The HTTP/1.1 channel rejects the control characters; 0x85 is obs-text,
    valid in HTTP, and the WebSocket bridge rejects it.
    """
    port = await serve()
    extra = b"X-Smuggled: a" + character + b"Origin: https://evil.example\r\n"

    response = await _send(
        port, upgrade_request().replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n")
    )

    assert response.status == 400
    assert response.header("connection") == "close"
    assert response.header("content-length") == str(len(response.body))
    if character == b"\x85":
        assert b"X-Smuggled" in response.body
        rejected = logs.with_format("rejected {method} {path}")
    else:
        rejected = logs.with_format("rejected a request from {peer}")
    assert [event["status"] for event in rejected] == [400]
    autobahn_events = [
        event
        for event in logs.events
        if (event.get("log_namespace") or "").startswith("autobahn")
    ]
    assert autobahn_events == []
