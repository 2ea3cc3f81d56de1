"""
Response compression: gzip or deflate, negotiated from Accept-Encoding.

The HTTP bridge calls L{compress_response} for a response sent whole, and a
streaming response uses L{start_compression} and the L{Compressor} it
returns to compress each chunk as it goes out.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

Headers = list[tuple[str, str]]

# zlib's wbits: 16 + 15 selects a gzip wrapper (RFC 1952); 15 alone gives
# the zlib wrapper (RFC 1950) that HTTP's "deflate" coding means
# (RFC 9110 section 8.4.1.2), not a raw deflate stream.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

# Preferred first when the client gives both the same q-value.
_CODINGS = ("gzip", "deflate")

# RFC 9110 section 8.4.1.3: x-gzip is the same coding as gzip.
_ALIASES = {"x-gzip": "gzip"}

# Media types that are compressed already, where gzip only costs CPU.
_COMPRESSED_TYPE_PREFIXES = ("image/", "video/", "audio/", "font/woff")
_UNCOMPRESSED_IMAGE_TYPES = frozenset({"image/svg+xml", "image/bmp", "image/x-icon"})
_COMPRESSED_TYPES = frozenset(
    {
        "application/gzip",
        "application/x-gzip",
        "application/zip",
        "application/x-bzip2",
        "application/x-xz",
        "application/x-7z-compressed",
        "application/x-rar-compressed",
        "application/vnd.rar",
        "application/zstd",
    }
)

_NO_BODY_STATUSES = (204, 304)


@dataclass(frozen=True)
class Compression:
    """
    Options of response compression.

    :ivar min_size: bodies shorter than this many bytes are sent as they are.
        The default is an estimate: below about a kilobyte, gzip's 18-byte
        wrapper and the CPU time cost about as much as they save.
    :ivar level: the zlib level, 1 (fastest) to 9 (smallest).
    """

    min_size: int = 860
    level: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.min_size, int) or self.min_size < 0:
            msg = f"expected min_size to be an int of 0 or more, got {self.min_size!r}"
            raise ValueError(msg)
        if not isinstance(self.level, int) or not 1 <= self.level <= 9:
            msg = f"expected level to be an int from 1 to 9, got {self.level!r}"
            raise ValueError(msg)


def compression_option(compress: bool | Compression) -> Compression | None:
    """
    Turn the C{compress} option of the server into options, or None for off.

    :raises TypeError: for anything but a bool or a L{Compression}.
    """
    if isinstance(compress, Compression):
        return compress
    if compress is True:
        return Compression()
    if compress is False:
        return None
    msg = f"expected compress to be True, False or a Compression, got {compress!r}"
    raise TypeError(msg)


class Compressor:
    """
    An incremental gzip or deflate compressor for a streamed response body.

    :param coding: C{"gzip"} or C{"deflate"}.
    :param level: the zlib level.
    """

    __slots__ = ("_zlib", "coding")

    def __init__(self, coding: str, level: int = 6) -> None:
        self.coding = coding
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, _WBITS[coding])

    def compress(self, chunk: bytes) -> bytes:
        """
        Feed C{chunk} and return the compressed bytes ready so far.

        zlib keeps some input back to compress it better; call L{flush} to
        get everything fed so far out to the client.
        """
        return self._zlib.compress(chunk)

    def flush(self) -> bytes:
        """
        Return the rest of the data fed so far, leaving the stream open.

        A sync flush: the client can decompress everything sent, at the cost
        of a few bytes per call.
        """
        return self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        """
        Return the end of the compressed stream; feed nothing after this.
        """
        return self._zlib.flush(zlib.Z_FINISH)


def choose_coding(accept_encoding: Sequence[str]) -> str | None:
    """
    Choose gzip or deflate from the Accept-Encoding header values, or None.

    Follows RFC 9110 section 12.5.3: codings are case-insensitive, C{*}
    stands for every coding not listed, C{q=0} rules a coding out, and a
    coding neither listed nor covered by C{*} is not acceptable.  The highest
    q-value wins, gzip on a tie.  A malformed q-value counts as C{q=0}.

    :param accept_encoding: every value of the Accept-Encoding header.
    """
    weights: dict[str, float] = {}
    for header in accept_encoding:
        for element in header.split(","):
            coding, _, parameters = element.partition(";")
            coding = coding.strip().lower()
            if not coding:
                continue
            coding = _ALIASES.get(coding, coding)
            weights[coding] = _q_value(parameters)

    best, best_q = None, 0.0
    for coding in _CODINGS:
        q = weights.get(coding, weights.get("*", 0.0))
        if q > best_q:
            best, best_q = coding, q
    return best


def _q_value(parameters: str) -> float:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def is_compressible(status: int, headers: Headers) -> bool:
    """
    Say whether a response may be compressed, whatever the client accepts.

    It may not for a status without a body (1xx, 204, 304), a partial 206,
    a response with a Content-Encoding already, C{Cache-Control:
    no-transform} (RFC 9111 section 5.2.2.6), or a media type that is
    compressed already (images, video, audio, archives).
    """
    if status < 200 or status in _NO_BODY_STATUSES or status == 206:
        return False
    for name, value in headers:
        if name == "content-encoding":
            return False
        if name == "cache-control" and _lists_token(value, "no-transform"):
            return False
        if name == "content-type" and _is_compressed_type(value):
            return False
    return True


def _lists_token(value: str, token: str) -> bool:
    return any(
        item.split("=", 1)[0].strip().lower() == token for item in value.split(",")
    )


def _is_compressed_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in _UNCOMPRESSED_IMAGE_TYPES:
        return False
    return media_type in _COMPRESSED_TYPES or media_type.startswith(
        _COMPRESSED_TYPE_PREFIXES
    )


def start_compression(
    status: int,
    headers: Headers,
    accept_encoding: Sequence[str],
    options: Compression | None,
) -> tuple[Headers, Compressor | None]:
    """
    Decide on compression for a response whose length is not known yet.

    :param headers: the response headers, lower-case names; not changed.
    :param accept_encoding: every value of the request's Accept-Encoding.
    :param options: the server's options, or None when compression is off.
    :returns: the headers to send (with Vary, Content-Encoding, a weakened
        ETag and no Content-Length when compressing) and the compressor,
        or None when the body goes out as it is.
    """
    if options is None or not is_compressible(status, headers):
        return headers, None
    headers = _add_vary(headers)
    coding = choose_coding(accept_encoding)
    if coding is None:
        return headers, None
    return _encoded_headers(headers, coding), Compressor(coding, options.level)


def compress_response(
    status: int,
    headers: Headers,
    body: bytes,
    accept_encoding: Sequence[str],
    options: Compression | None,
) -> tuple[Headers, bytes]:
    """
    Compress a whole response body when the client accepts it and it pays.

    Bodies shorter than C{options.min_size} are left as they are and get no
    Vary header, since they would never be compressed.

    :returns: the headers to send and the body, compressed or not.  The
        caller sets Content-Length from the returned body.
    """
    if options is None or len(body) < options.min_size:
        return headers, body
    headers, compressor = start_compression(status, headers, accept_encoding, options)
    if compressor is None:
        return headers, body
    return headers, compressor.compress(body) + compressor.finish()


def _add_vary(headers: Headers) -> Headers:
    # RFC 9110 section 12.5.5: the response depends on Accept-Encoding
    # whether or not this client got it compressed, so caches must know.
    for name, value in headers:
        if name == "vary" and (
            _lists_token(value, "accept-encoding") or value.strip() == "*"
        ):
            return headers
    return [*headers, ("vary", "accept-encoding")]


def _encoded_headers(headers: Headers, coding: str) -> Headers:
    encoded: Headers = []
    for name, value in headers:
        if name == "content-length":
            continue
        if name == "etag" and not value.startswith("W/"):
            # The compressed bytes differ from the identity ones, so a strong
            # validator no longer holds; nginx weakens it the same way.
            value = "W/" + value
        encoded.append((name, value))
    encoded.append(("content-encoding", coding))
    return encoded
