"""
The request head parser of the HTTP/1.1 fast path.

L{_parse_head} accepts only the heads that L{desperados.http1_fast.FastPath}
serves, and returns None for every other head, which the channel then parses.
"""

from __future__ import annotations

from twisted.web.server import unquote

from desperados.http1 import (
    _FIELD_LINE_BYTES,
    _REQUEST_LINE_BYTES,
    _TOKEN,
    _check_head,
)
from desperados.http1_options import HTTPOptions

# Header fields after which the channel has to serve the request: a body
# (unless Content-Length is 0), 100-continue, and protocol switches
# (WebSocket, h2c).
_HANDED_OVER_FIELDS = frozenset(
    [b"content-length", b"transfer-encoding", b"expect", b"upgrade"]
)

_HTTP11 = b"HTTP/1.1"

# Field names that passed the token check, in lower case.  The count is
# capped, as in twisted.web's own name cache, so that a client sending
# ever new names cannot fill the memory.
_checked_names: dict[bytes, bytes] = {}
_MAX_CHECKED_NAMES = 1000


class _ParsedRequest:
    """
    The parts of a request head that L{_parse_head} accepted.

    :ivar fields: the header values by lower-case name, in the order the
        names first appear, as twisted.web's Headers keeps them.
    """

    __slots__ = ("fields", "method", "uri")

    def __init__(self, method: bytes, uri: bytes, fields: dict[bytes, list[bytes]]):
        self.method = method
        self.uri = uri
        self.fields = fields

    def path_info(self) -> list[bytes]:
        """
        Return the percent-decoded path segments, as twisted.web's C{postpath}.
        """
        segments = self.uri.partition(b"?")[0][1:].split(b"/")
        if b"%" not in self.uri:
            return segments
        return [unquote(segment) for segment in segments]


class _FieldView:
    """
    The C{getRawHeaders} of twisted.web's Headers over a L{_ParsedRequest}'s fields.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[bytes, list[bytes]]) -> None:
        self._fields = fields

    def getRawHeaders(self, name: bytes) -> list[bytes] | None:  # noqa: N802
        return self._fields.get(name)


def _parse_head(head: bytes, options: HTTPOptions) -> _ParsedRequest | None:
    """
    Parse a request head, without its final blank line, if this path serves it.

    Returns None for a head that this path leaves to the channel: one that
    is invalid, where the channel sends the error response, or one that is
    valid but needs the channel (see L{_HANDED_OVER_FIELDS}).  Every check
    is at least as strict as L{desperados.http1.DesperadosChannel}'s, so a
    head accepted here is one that the channel would dispatch.
    """
    if len(head) > options.max_head_size:
        return None
    request_line, *field_lines = head.split(b"\r\n")
    if len(request_line) > options.max_request_line_length or request_line.translate(
        None, _REQUEST_LINE_BYTES
    ):
        return None
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return None
    method, uri, version = parts
    if version != _HTTP11 or uri[:1] != b"/" or not _TOKEN.fullmatch(method):
        return None

    if len(field_lines) > options.max_header_count:
        return None
    max_length = options.max_header_length
    fields: dict[bytes, list[bytes]] = {}
    for line in field_lines:
        if len(line) > max_length or line.translate(None, _FIELD_LINE_BYTES):
            return None
        name, colon, value = line.partition(b":")
        checked = _checked_names.get(name)
        if checked is None:
            # The token check also rejects obs-fold (a leading space or tab)
            # and whitespace before the colon.
            if not colon or not _TOKEN.fullmatch(name):
                return None
            checked = name.lower()
            if len(_checked_names) < _MAX_CHECKED_NAMES:
                _checked_names[name] = checked
        elif not colon:
            return None
        name = checked
        value = value.strip(b" \t")
        if name in _HANDED_OVER_FIELDS and not (
            # One Content-Length of 0 is a request without a body.
            name == b"content-length" and value == b"0" and name not in fields
        ):
            return None
        values = fields.get(name)
        if values is None:
            fields[name] = [value]
        else:
            values.append(value)

    if b"host" not in fields or _check_head(_FieldView(fields), _HTTP11) is not None:
        return None
    return _ParsedRequest(method, uri, fields)
