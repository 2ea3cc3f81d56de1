"""
Router, cookies, compression and bodiless responses over HTTP/2.

Each test runs over cleartext with prior knowledge and over TLS with ALPN.
"""

from __future__ import annotations

import gzip

import pytest
import pytest_twisted
from http2_support import connect_h2

from desperados import Builder, Router, endpoints
from desperados.router import get, post

TEXT = ("All work and no play makes Jack a dull boy.\n" * 40).encode()


@pytest.fixture(params=["cleartext", "tls"])
def transport(request, tls_files):
    """
    Run the test over cleartext prior knowledge, then over TLS with ALPN.
    """
    return tls_files if request.param == "tls" else None


def _server_options(tls):
    if tls is None:
        return {}
    return {"scheme": "https", "certfile": tls.certfile, "keyfile": tls.keyfile}


def _show(conn, opts):
    conn.fetch_cookies()
    conn.put_resp_cookie("seen", conn.req_cookies.get("id", "none"))
    conn.put_resp_cookie("theme", "dark", same_site="lax")
    conn.put_resp_content_type("text/plain")
    return conn.send_resp(200, f"item {conn.path_params['id']}\n".encode() + TEXT)


def _no_content(conn, opts):
    return conn.send_resp(204, "ignored")


App = Builder(
    [
        Router(
            [
                get("/items/:id", _show),
                post("/items/:id/empty", _no_content),
            ]
        ),
        endpoints.HTTP,
    ]
)


@pytest_twisted.ensureDeferred
async def test_route_cookies_and_gzip(serve, transport):
    port = await serve(App, **_server_options(transport))
    client = await connect_h2(port, transport)

    stream = client.request(
        "/items/7", headers=[("accept-encoding", "gzip"), ("cookie", "id=ada")]
    )
    response = await client.response(stream)
    client.transport.loseConnection()

    assert response.status == 200
    assert response.header(b"content-encoding") == b"gzip"
    assert response.header(b"vary") == b"accept-encoding"
    assert response.header(b"content-length") == b"%d" % len(response.body)
    assert gzip.decompress(response.body) == b"item 7\n" + TEXT
    cookies = [value for name, value in response.headers if name == b"set-cookie"]
    assert cookies == [
        b"seen=ada; Path=/; HttpOnly",
        b"theme=dark; Path=/; HttpOnly; SameSite=Lax",
    ]


@pytest_twisted.ensureDeferred
async def test_head_405_404_and_204(serve, transport):
    port = await serve(App, **_server_options(transport))
    client = await connect_h2(port, transport)

    streams = [
        client.request(
            "/items/7", method="HEAD", headers=[("accept-encoding", "gzip")]
        ),
        client.request("/items/7", method="DELETE"),
        client.request("/nowhere"),
        client.request("/items/7/empty", method="POST", body=b""),
    ]
    head, not_allowed, not_found, no_content = [
        await client.response(stream) for stream in streams
    ]
    client.transport.loseConnection()

    assert head.status == 200
    assert head.header(b"content-encoding") == b"gzip"
    assert int(head.header(b"content-length")) < len(TEXT)
    assert head.body == b""
    assert not_allowed.status == 405
    assert not_allowed.header(b"allow") == b"GET, HEAD"
    assert not_found.status == 404
    assert not_found.body == b"not found"
    assert no_content.status == 204
    assert no_content.header(b"content-length") is None
    assert no_content.body == b""
