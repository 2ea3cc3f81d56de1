"""
Which requests ask for a WebSocket, and whether such a request may have one.

Both functions are pure: they read a Conn's request fields and decide.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

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

    Follows RFC 6455 section 4.2.1 and RFC 9110 section 7.8.  It also
    rejects the Host, Origin and Sec-WebSocket-Protocol values that Autobahn
    would reject after the hand-off, so those get this server's 400 too.

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
    if len(conn.get_req_header("host")) != 1:
        raise BadRequestError("a WebSocket upgrade needs exactly one Host header")

    if not _header_has_token(conn, "connection", "upgrade"):
        raise BadRequestError("the Connection header must contain 'upgrade'")
    if not _header_has_token(conn, "upgrade", "websocket"):
        raise BadRequestError("the Upgrade header must contain 'websocket'")

    _check_version(conn)
    keys = conn.get_req_header("sec-websocket-key")
    if len(keys) != 1 or not _is_valid_key(keys[0]):
        raise BadRequestError(
            "the Sec-WebSocket-Key header must be 16 bytes encoded in base64"
        )
    subprotocols = [
        token
        for value in conn.get_req_header("sec-websocket-protocol")
        for token in _tokens(value, lower=False)
    ]
    if len(set(subprotocols)) != len(subprotocols):
        raise BadRequestError(
            "the Sec-WebSocket-Protocol header must not list a subprotocol twice"
        )

    _check_origin(conn, options)


def _check_version(conn: Conn) -> None:
    versions = [value.strip() for value in conn.get_req_header("sec-websocket-version")]
    if not versions:
        raise BadRequestError("the Sec-WebSocket-Version header is missing")
    if versions != [WEBSOCKET_VERSION]:
        # RFC 6455 section 4.4: name the versions this server speaks.
        raise UpgradeRequiredError(
            "unsupported Sec-WebSocket-Version, this server speaks version 13",
            headers=(("sec-websocket-version", WEBSOCKET_VERSION),),
        )


def _check_origin(conn: Conn, options: WebSocketOptions) -> None:
    origins = conn.get_req_header("origin")
    if not origins:
        # Only browsers send Origin; the check guards against their pages.
        return
    if len(origins) != 1:
        raise BadRequestError("a WebSocket upgrade may have only one Origin header")
    origin = origins[0].strip()
    if not _is_valid_origin(origin):
        raise BadRequestError(
            "the Origin header must be 'null' or scheme://host[:port]"
        )
    if options.origins is not None:
        if origin.rstrip("/").lower() not in options.origins:
            raise ForbiddenError("the Origin header is not one of the allowed origins")


def _is_valid_origin(origin: str) -> bool:
    # What Autobahn accepts: "null", a file: URL, or a URL with a host and,
    # if one is given, a numeric port.
    if origin.lower() == "null":
        return True
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return False
    return parts.scheme.lower() == "file" or bool(parts.hostname)


def _tokens(value: str, *, lower: bool = True) -> list[str]:
    tokens = [token.strip() for token in value.split(",")]
    if lower:
        return [token.lower() for token in tokens]
    return tokens


def _header_has_token(conn: Conn, name: str, token: str) -> bool:
    return any(token in _tokens(value) for value in conn.get_req_header(name))


def _is_valid_key(key: str) -> bool:
    try:
        return len(b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
