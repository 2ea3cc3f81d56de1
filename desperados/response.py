"""
The status, headers and body that go on the wire for a Conn's response.

Both the HTTP bridge and L{desperados.testing} write responses through
L{wire_response}, so a test gets the headers and body a client would.
"""

from __future__ import annotations

from desperados.compression import Compression, Headers, compress_response
from desperados.conn import Conn

_LENGTH_HEADERS = ("content-length", "transfer-encoding")


def has_body(status: int) -> bool:
    """
    Say whether a response with C{status} carries a body (RFC 9110 section 6.4.1).
    """
    return status >= 200 and status not in (204, 304)


def wire_response(
    conn: Conn, body: bytes, compression: Compression | None
) -> tuple[Headers, bytes]:
    """
    Build the headers and body to send for a response sent whole.

    A 1xx, 204 or 304 response loses its body and any Content-Length or
    Transfer-Encoding header.  Other responses are compressed when
    L{desperados.compression.compress_response} says so, and get a
    Content-Length unless the plug set one.  A response to HEAD keeps the
    headers a GET would get, Content-Length included, and loses the body.

    :param conn: the Conn being sent, with its status set.
    :param body: the encoded body from the plug.
    :param compression: the server's compression options, None for off.
    """
    status = conn.status
    assert status is not None
    headers = conn.resp_headers
    if not has_body(status):
        headers = [
            (name, value) for name, value in headers if name not in _LENGTH_HEADERS
        ]
        return headers, b""

    # Checked here first so that the common small response skips the
    # Accept-Encoding lookup; compress_response checks the size again.
    if compression is not None and len(body) >= compression.min_size:
        headers, body = compress_response(
            status, headers, body, conn.get_req_header("accept-encoding"), compression
        )
    for name, _ in headers:
        if name == "content-length":
            break
    else:
        headers = [*headers, ("content-length", str(len(body)))]
    if conn.method == "HEAD":
        body = b""
    return headers, body
