"""
Response compression: Accept-Encoding negotiation, when to compress, and the wire.
"""

from __future__ import annotations

import gzip
import zlib

import pytest
import pytest_twisted
from http2_support import connect_h2
from support import connect
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor

from desperados import Compression, testing
from desperados.compression import (
    Compressor,
    choose_coding,
    compression_option,
    is_compressible,
)

TEXT = ("All work and no play makes Jack a dull boy.\n" * 40).encode()


@pytest.mark.parametrize(
    ("accept_encoding", "expected"),
    [
        ([], None),
        ([""], None),
        (["gzip"], "gzip"),
        (["deflate"], "deflate"),
        (["gzip, deflate"], "gzip"),
        (["deflate, gzip"], "gzip"),
        (["deflate;q=1, gzip;q=0.5"], "deflate"),
        (["GZip"], "gzip"),
        (["DEFLATE;Q=0.3"], "deflate"),
        (["x-gzip"], "gzip"),
        (["*"], "gzip"),
        (["*;q=0"], None),
        (["gzip;q=0, *"], "deflate"),
        (["gzip;q=0, deflate;q=0"], None),
        (["gzip;q=0"], None),
        (["br"], None),
        (["identity"], None),
        (["br, zstd, *;q=0.1"], "gzip"),
        (["deflate, *;q=0.1"], "deflate"),
        (["gzip;q=abc, deflate;q=0.2"], "deflate"),
        (["gzip;q=2"], None),
        (["gzip;q=-1"], None),
        (["gzip ; q=0.5 , deflate ; q=0.5"], "gzip"),
        (["br, gzip;q=0.8", "deflate;q=0.9"], "deflate"),
        (["gzip;level=1"], "gzip"),
    ],
)
def test_choose_coding(accept_encoding, expected):
    assert choose_coding(accept_encoding) == expected


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [], True),
        (404, [("content-type", "text/html; charset=utf-8")], True),
        (200, [("content-type", "image/svg+xml")], True),
        (200, [("content-type", "application/json")], True),
        (101, [], False),
        (204, [], False),
        (206, [], False),
        (304, [], False),
        (200, [("content-encoding", "br")], False),
        (200, [("cache-control", "public, No-Transform")], False),
        (200, [("cache-control", "no-store")], True),
        (200, [("content-type", "image/png")], False),
        (200, [("content-type", "Video/MP4")], False),
        (200, [("content-type", "audio/ogg")], False),
        (200, [("content-type", "application/zip")], False),
        (200, [("content-type", "application/gzip")], False),
        (200, [("content-type", "font/woff2")], False),
    ],
)
def test_is_compressible(status, headers, expected):
    assert is_compressible(status, headers) is expected


def test_compressor_flush_makes_data_readable():
    compressor = Compressor("gzip")
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)

    first = compressor.compress(b"first chunk ") + compressor.flush()
    readable = reader.decompress(first)
    second = compressor.compress(b"second chunk") + compressor.finish()
    rest = reader.decompress(second) + reader.flush()

    assert readable == b"first chunk "
    assert rest == b"second chunk"
    assert reader.eof


def test_compressor_deflate_is_zlib_format():
    compressor = Compressor("deflate", level=1)

    data = compressor.compress(TEXT) + compressor.finish()

    assert zlib.decompress(data) == TEXT


def test_compression_option_values():
    custom = Compression(min_size=10, level=9)

    assert compression_option(True) == Compression()
    assert compression_option(False) is None
    assert compression_option(custom) is custom
    with pytest.raises(TypeError, match="True, False or a Compression"):
        compression_option("yes")
    with pytest.raises(ValueError, match="level"):
        Compression(level=0)
    with pytest.raises(ValueError, match="min_size"):
        Compression(min_size=-1)


# Whole responses, in memory.


def _send(status=200, body=TEXT, headers=(), accept="gzip", method="GET", **kwargs):
    def plug(conn, opts):
        for name, value in headers:
            conn.put_resp_header(name, value)
        return conn.send_resp(status, body)

    request_headers = {"accept-encoding": accept} if accept is not None else {}
    conn = testing.conn(method, "/", headers=request_headers, **kwargs)
    return testing.sent(testing.call_sync(plug, conn))


class TestWholeResponse:
    def test_gzip(self):
        response = _send(headers=[("content-type", "text/plain")])

        assert response.header("content-encoding") == "gzip"
        assert response.header("vary") == "accept-encoding"
        assert response.header("content-length") == str(len(response.body))
        assert len(response.body) < len(TEXT)
        assert gzip.decompress(response.body) == TEXT

    def test_deflate(self):
        response = _send(accept="deflate")

        assert response.header("content-encoding") == "deflate"
        assert zlib.decompress(response.body) == TEXT

    def test_not_accepted_still_varies(self):
        response = _send(accept=None)

        assert response.header("content-encoding") is None
        assert response.header("vary") == "accept-encoding"
        assert response.body == TEXT

    def test_existing_vary_extended_once(self):
        cookie = _send(headers=[("vary", "Cookie")])
        already = _send(headers=[("vary", "Accept-Encoding, Cookie")])

        assert cookie.headers_named("vary") == ["Cookie", "accept-encoding"]
        assert already.headers_named("vary") == ["Accept-Encoding, Cookie"]

    def test_small_body_untouched(self):
        response = _send(body=b"x" * 859)

        assert response.header("content-encoding") is None
        assert response.header("vary") is None
        assert response.body == b"x" * 859

    def test_min_size_and_level_options(self):
        response = _send(body=b"tiny", compress=Compression(min_size=1, level=1))

        assert response.header("content-encoding") == "gzip"
        assert gzip.decompress(response.body) == b"tiny"

    def test_off_by_option(self):
        response = _send(compress=False)

        assert response.header("content-encoding") is None
        assert response.header("vary") is None
        assert response.body == TEXT

    @pytest.mark.parametrize(
        "header",
        [
            ("content-encoding", "br"),
            ("cache-control", "no-transform"),
            ("content-type", "image/jpeg"),
            ("content-type", "application/x-gzip"),
        ],
    )
    def test_excluded_by_header(self, header):
        response = _send(headers=[header])

        assert response.header("vary") is None
        assert response.body == TEXT
        assert response.headers_named(header[0]) == [header[1]]

    @pytest.mark.parametrize("status", [204, 304])
    def test_bodiless_status_untouched(self, status):
        response = _send(status=status)

        assert response.header("content-encoding") is None
        assert response.header("vary") is None
        assert response.body == b""

    def test_strong_etag_weakened(self):
        strong = _send(headers=[("etag", '"v1"')])
        weak = _send(headers=[("etag", 'W/"v1"')])

        assert strong.header("etag") == 'W/"v1"'
        assert weak.header("etag") == 'W/"v1"'

    def test_plug_content_length_replaced(self):
        response = _send(headers=[("content-length", str(len(TEXT)))])

        assert response.headers_named("content-length") == [str(len(response.body))]

    def test_head_has_compressed_length(self):
        get = _send()
        head = _send(method="HEAD")

        assert head.headers == get.headers
        assert head.body == b""


# Over real loopback sockets.


def _big_text(conn, opts):
    conn.put_resp_content_type("text/plain")
    return conn.send_resp(200, TEXT).halt()


async def _get(port, accept_encoding=None, path="/"):
    client = await connect(port)
    extra = f"Accept-Encoding: {accept_encoding}\r\n" if accept_encoding else ""
    client.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    response = await client.read_response()
    client.transport.loseConnection()
    return response


@pytest_twisted.ensureDeferred
async def test_gzip_over_socket(serve):
    port = await serve(_big_text)

    response = await _get(port, "deflate;q=0.5, gzip")

    assert response.status == 200
    assert response.header("content-encoding") == "gzip"
    assert response.header("vary") == "accept-encoding"
    assert response.header("content-length") == str(len(response.body))
    assert gzip.decompress(response.body) == TEXT


@pytest_twisted.ensureDeferred
async def test_deflate_over_socket(serve):
    port = await serve(_big_text)

    response = await _get(port, "gzip;q=0, deflate")

    assert response.header("content-encoding") == "deflate"
    assert zlib.decompress(response.body) == TEXT


@pytest_twisted.ensureDeferred
async def test_identity_over_socket(serve):
    port = await serve(_big_text)

    plain = await _get(port)
    refused = await _get(port, "*;q=0")

    for response in (plain, refused):
        assert response.header("content-encoding") is None
        assert response.header("vary") == "accept-encoding"
        assert response.body == TEXT


@pytest_twisted.ensureDeferred
async def test_default_404_stays_uncompressed(serve):
    port = await serve()

    response = await _get(port, "gzip, deflate")

    assert response.status == 404
    assert response.header("content-encoding") is None
    assert response.body == b"not found"
    assert response.header("content-length") == "9"


@pytest_twisted.ensureDeferred
async def test_compress_false_over_socket(serve):
    port = await serve(_big_text, compress=False)

    response = await _get(port, "gzip")

    assert response.header("content-encoding") is None
    assert response.header("vary") is None
    assert response.body == TEXT


def test_twistd_no_compress_option():
    from twisted.plugins.desperados_plugin import Options, service_maker

    default_options, off_options = Options(), Options()
    default_options.parseOptions([])
    off_options.parseOptions(["--no-compress"])

    default = service_maker.makeService(default_options, reactor=MemoryReactor())
    off = service_maker.makeService(off_options, reactor=MemoryReactor())

    assert default.site.plug_resource.compression == Compression()
    assert off.site.plug_resource.compression is None


# Chunked responses, compressed as they stream.

PART_ONE = b"the first part, sent before the plug waits\n" * 30
PART_TWO = b"the second part, sent after the test let it go on\n" * 30


def _two_parts(release):
    """
    Build a plug that streams PART_ONE, waits for C{release}, then PART_TWO.
    """

    async def plug(conn, opts):
        conn.put_resp_content_type("text/plain")
        conn.send_chunked(200)
        await conn.chunk(PART_ONE)
        await release
        await conn.chunk(PART_TWO)
        return conn.halt()

    return plug


@pytest_twisted.ensureDeferred
async def test_chunked_gzip_streams_over_socket(serve):
    release = Deferred()
    port = await serve(_two_parts(release))
    client = await connect(port)
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)

    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n")
    head = await client.read_response(head_only=True)
    first = reader.decompress(await client.read_chunk())
    release.callback(None)
    rest = b""
    while chunk := await client.read_chunk():
        rest += chunk
    second = reader.decompress(rest)
    client.transport.loseConnection()

    assert head.header("content-encoding") == "gzip"
    assert head.header("vary") == "accept-encoding"
    assert head.header("transfer-encoding") == "chunked"
    assert head.header("content-length") is None
    assert first == PART_ONE
    assert second == PART_TWO
    assert reader.eof


@pytest.mark.parametrize("secure", [False, True])
@pytest_twisted.ensureDeferred
async def test_chunked_deflate_streams_over_http2(serve, tls_files, secure):
    release = Deferred()
    tls = tls_files if secure else None
    options = {}
    if secure:
        options = {"scheme": "https", "certfile": tls.certfile, "keyfile": tls.keyfile}
    port = await serve(_two_parts(release), **options)
    client = await connect_h2(port, tls)

    stream = client.request("/", headers=[("accept-encoding", "deflate")])
    response = client.responses[stream]
    # wait_for gives up, failing the test, if the first part never becomes
    # readable, as happens when the server does not flush after each part.
    await client.wait_for(
        lambda: zlib.decompressobj().decompress(response.body) == PART_ONE
    )
    first_ready = zlib.decompressobj().decompress(response.body)
    release.callback(None)
    await client.response(stream)
    client.transport.loseConnection()

    assert response.header(b"content-encoding") == b"deflate"
    assert response.header(b"content-length") is None
    assert first_ready == PART_ONE
    assert zlib.decompress(response.body) == PART_ONE + PART_TWO
