"""
Which requests ask for a WebSocket, and whether such a request may have one.

Both functions are pure: they read a Conn's request fields and decide.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from typing import TYPE_CHECKING

from desperados.errors import BadRequestError, ForbiddenError, UpgradeRequiredError
from desperados.websock import WebSocketOptions

if TYPE_CHECKING:
    from desperados.conn import Conn

WEBSOCKET_VERSION = "13"


def is_websocket_upgrade(conn: Conn) -> bool:
    """
    Tell whether the request asks for a WebSocket at all.

    True when it carries C{Upgrade: websocket} (the token compared
    case-insensitively, as RFC 6455 section 4.2.1 requires),
    C{Sec-WebSocket-Version} and C{Sec-WebSocket-Key}.  An HTTP/1.0 request
    never asks: RFC 9110 section 7.8 says a server must ignore its Upgrade
    header.  Whether the request is a valid upgrade is for
    L{check_websocket_upgrade}.
    """
    if conn.http_version != "HTTP/1.1":
        return False
    has_version = has_key = has_upgrade = False
    for name, value in conn.req_headers:
        if name == "sec-websocket-version":
            has_version = True
        elif name == "sec-websocket-key":
            has_key = True
        elif name == "upgrade" and "websocket" in _tokens(value):
            has_upgrade = True
    return has_upgrade and has_version and has_key


def check_websocket_upgrade(conn: Conn, options: WebSocketOptions) -> None:
    """
    Check that the request is a valid WebSocket opening handshake.

    Follows RFC 6455 section 4.2.1 and RFC 9110 section 7.8.

    :raises BadRequestError: 400, naming the method, protocol version or
        header that is wrong.
    :raises UpgradeRequiredError: 426 with C{Sec-WebSocket-Version: 13} when
        the client asks for another WebSocket version.
    :raises ForbiddenError: 403 when C{Origin} is not in C{options.origins}.
    """
    if conn.method != "GET":
        raise BadRequestError("a WebSocket upgrade must use the GET method")
    if conn.http_version != "HTTP/1.1":
        raise BadRequestError("a WebSocket upgrade needs HTTP/1.1")

    if not _header_has_token(conn, "connection", "upgrade"):
        raise BadRequestError("the Connection header must contain 'upgrade'")
    if not _header_has_token(conn, "upgrade", "websocket"):
        raise BadRequestError("the Upgrade header must contain 'websocket'")

    versions = conn.get_req_header("sec-websocket-version")
    if [value.strip() for value in versions] != [WEBSOCKET_VERSION]:
        raise UpgradeRequiredError(
            "unsupported Sec-WebSocket-Version, this server speaks version 13",
            headers=(("sec-websocket-version", WEBSOCKET_VERSION),),
        )

    keys = conn.get_req_header("sec-websocket-key")
    if len(keys) != 1 or not _is_valid_key(keys[0]):
        raise BadRequestError(
            "the Sec-WebSocket-Key header must be 16 bytes encoded in base64"
        )

    if options.origins is not None:
        origins = conn.get_req_header("origin")
        if len(origins) != 1 or origins[0] not in options.origins:
            raise ForbiddenError("this Origin may not open a WebSocket here")


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",")]


def _header_has_token(conn: Conn, name: str, token: str) -> bool:
    return any(token in _tokens(value) for value in conn.get_req_header(name))


def _is_valid_key(key: str) -> bool:
    try:
        return len(b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
