"""
TLS over real loopback sockets: ALPN, HTTPS on HTTP/1.1 and HTTP/2, wss.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from http2_support import connect_h2, connect_raw_tls
from support import close_payload, expected_accept, upgrade_request, websocket_key
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.ssl import CertificateOptions

from desperados import start_link
from desperados.server import endpoint_scheme, make_endpoint, tls_options

TEXT, CLOSE = 0x1, 0x8


def _describe(conn, opts):
    """
    Respond with the request fields that depend on the transport.
    """
    body = f"{conn.scheme} {conn.http_version} {conn.method} {conn.request_path}"
    return conn.send_resp(200, body).halt()


@pytest_twisted.ensureDeferred
async def test_https_alpn_h2_runs_pipeline(serve, tls_files):
    port = await serve(
        _describe, scheme="https", certfile=tls_files.certfile, keyfile=tls_files.keyfile
    )
    client = await connect_h2(port, tls_files)

    stream_id = client.request("/over/tls?x=1")
    response = await client.response(stream_id)
    client.transport.loseConnection()

    assert client.transport.negotiatedProtocol == b"h2"
    assert response.status == 200
    assert response.body == b"https HTTP/2 GET /over/tls"


@pytest_twisted.ensureDeferred
async def test_https_alpn_http11_runs_pipeline(serve, tls_files):
    port = await serve(
        _describe, scheme="https", certfile=tls_files.certfile, keyfile=tls_files.keyfile
    )

    for alpn in ([b"http/1.1"], None):
        client = await connect_raw_tls(port, tls_files, alpn)
        client.send(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = await client.read_response()
        negotiated = client.transport.negotiatedProtocol
        client.transport.loseConnection()

        assert negotiated == (alpn[0] if alpn else None)
        assert response.status == 200, alpn
        assert response.body == b"https HTTP/1.1 GET /plain", alpn


@pytest_twisted.ensureDeferred
async def test_wss_echoes_through_handoff(serve, tls_files):
    port = await serve(scheme="https", certfile=tls_files.certfile, keyfile=tls_files.keyfile)

    # WebSocket clients offer http/1.1 through ALPN, or nothing.
    for alpn in ([b"http/1.1"], None):
        key = websocket_key()
        client = await connect_raw_tls(port, tls_files, alpn)
        client.send(upgrade_request("/chat", key=key))
        response = await client.read_response()
        client.send_frame(TEXT, b"over tls")
        echoed = await client.read_frame()
        client.send_frame(TEXT, b"ping\n")
        pong = await client.read_frame()
        client.send_frame(CLOSE, close_payload(1000))
        closing = await client.read_frame()
        await client.wait_closed()

        assert response.status == 101, alpn
        assert response.header("sec-websocket-accept") == expected_accept(key), alpn
        assert echoed == (TEXT, b"over tls"), alpn
        assert pong == (TEXT, b"pong\n"), alpn
        assert closing == (CLOSE, close_payload(1000)), alpn


# Twisted 26.10's ssl: parser hands pyOpenSSL X509 and PKey objects to
# OpenSSL, which pyOpenSSL 26 deprecates.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL .* objects:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_ssl_listen_description_offers_h2(tls_files, logs):
    description = (
        f"ssl:0:interface=127.0.0.1:privateKey={tls_files.keyfile}:certKey={tls_files.certfile}"
    )
    listening = await start_link(_describe, listen=description, reactor=reactor)
    try:
        port = listening.getHost().port
        client = await connect_h2(port, tls_files)
        response = await client.response(client.request("/ssl"))
        negotiated = client.transport.negotiatedProtocol
        client.transport.loseConnection()
    finally:
        await listening.stopListening()

    assert negotiated == b"h2"
    assert response.body == b"https HTTP/2 GET /ssl"
    (startup,) = logs.with_format("Running {plug}")
    assert startup["scheme"] == "https"


@pytest_twisted.ensureDeferred
async def test_startup_line_says_https(tls_files, logs):
    listening = await start_link(
        port=0,
        ip="127.0.0.1",
        scheme="https",
        certfile=tls_files.certfile,
        keyfile=tls_files.keyfile,
        reactor=reactor,
    )
    port = listening.getHost().port
    await listening.stopListening()

    (startup,) = logs.with_format("Running {plug}")
    assert startup["scheme"] == "https"
    assert startup["address"] == f"127.0.0.1:{port}"


def test_tls_options_checks_scheme_and_files(tls_files):
    assert tls_options("http", None, None) is None
    assert isinstance(
        tls_options("https", tls_files.certfile, tls_files.keyfile), CertificateOptions
    )
    with pytest.raises(ValueError, match="needs both certfile and keyfile"):
        tls_options("https", tls_files.certfile, None)
    with pytest.raises(ValueError, match="need scheme 'https'"):
        tls_options("http", tls_files.certfile, tls_files.keyfile)
    with pytest.raises(ValueError, match="expected scheme 'http' or 'https'"):
        tls_options("wss", tls_files.certfile, tls_files.keyfile)


def test_certificate_and_key_must_match(tls_files, tmp_path):
    from http2_support import make_tls_files

    other = make_tls_files(tmp_path)

    with pytest.raises(ValueError, match="does not match the certificate"):
        tls_options("https", tls_files.certfile, other.keyfile)
    with pytest.raises(ValueError, match="unencrypted PEM private key"):
        tls_options("https", tls_files.certfile, tls_files.certfile)


def test_endpoint_scheme_follows_tls(tls_files):
    tls = tls_options("https", tls_files.certfile, tls_files.keyfile)
    ssl_description = f"ssl:0:privateKey={tls_files.keyfile}:certKey={tls_files.certfile}"

    assert endpoint_scheme(make_endpoint(reactor, port=0)) == "http"
    assert endpoint_scheme(make_endpoint(reactor, port=0, tls=tls)) == "https"
    assert endpoint_scheme(make_endpoint(reactor, listen="tcp:0", tls=tls)) == "https"
    assert endpoint_scheme(serverFromString(reactor, ssl_description)) == "https"
    with pytest.raises(ValueError, match="already serves TLS"):
        make_endpoint(reactor, listen=ssl_description, tls=tls)


@pytest_twisted.ensureDeferred
async def test_h2_without_preface_gets_goaway(serve, tls_files, logs):
    port = await serve(
        _describe, scheme="https", certfile=tls_files.certfile, keyfile=tls_files.keyfile
    )
    client = await connect_raw_tls(port, tls_files, [b"h2"])

    # ALPN chose h2, so an HTTP/1.1 request is an invalid preface (RFC 9113
    # section 3.4), a connection error of type PROTOCOL_ERROR.
    client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await client.wait_closed()

    goaway_type = b"\x07"
    frames = _frame_types(client.buffer)
    assert frames[-1] == goaway_type
    assert client.buffer.endswith(b"\x00\x00\x00\x01")  # PROTOCOL_ERROR
    (event,) = logs.with_format("HTTP/2 connection error")
    assert event["error_code"] == "PROTOCOL_ERROR"


def _frame_types(data: bytes) -> list[bytes]:
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3:4])
        data = data[9 + length :]
    return types
