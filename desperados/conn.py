"""
The Conn: one request and its response, the value every plug receives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import IO, Protocol

from twisted.internet.defer import Deferred, succeed

from desperados.body import DEFAULT_READ_LENGTH, DEFAULT_READ_TIMEOUT, BodyChunk
from desperados.cookies import (
    ResponseCookie,
    expired_cookie,
    make_response_cookie,
    parse_cookie_headers,
)
from desperados.errors import AlreadySentError
from desperados.params import QueryParams, parse_query
from desperados.upgrade import check_websocket_upgrade
from desperados.websock import WebSocketOptions, WebSocketUpgrade

# Plug's default: the response may not be cached by shared caches and must be
# revalidated before reuse.
DEFAULT_RESP_HEADERS: tuple[tuple[str, str], ...] = (
    ("cache-control", "max-age=0, private, must-revalidate"),
)

UNSET = "unset"
SET = "set"
SENT = "sent"
CHUNKED = "chunked"
UPGRADED = "upgraded"


class ConnAdapter(Protocol):
    """
    What a Conn needs from the server that carries it.

    The HTTP bridge implements it on top of a C{twisted.web} request and
    L{desperados.testing} implements it in memory.
    """

    def send_resp(self, conn: Conn, body: bytes) -> None:
        """
        Write the status line, C{conn.resp_headers} and C{body}, then finish.
        """

    def read_body(
        self, conn: Conn, length: int, timeout: float | None
    ) -> Deferred[BodyChunk]:
        """
        Return a Deferred of the next request body bytes; see L{Conn.read_body}.
        """

    def send_chunked(self, conn: Conn) -> None:
        """
        Write the status line and C{conn.resp_headers}; the body follows in chunks.
        """

    def chunk(self, conn: Conn, data: bytes) -> Deferred[Conn]:
        """
        Write one part of a chunked body; see L{Conn.chunk}.
        """

    def send_file(self, conn: Conn, file: IO[bytes], offset: int, length: int) -> None:
        """
        Write the head, then C{length} bytes of C{file} from C{offset}, then
        finish, and close C{file}.
        """

    def inform(self, conn: Conn, status: int, headers: list[tuple[str, str]]) -> None:
        """
        Write an informational (1xx) response head before the final response.
        """


class Conn:
    """
    One HTTP request and the response being built for it.

    A Conn is updated in place: every helper changes this object and returns
    it, so a plug can end with C{return conn.send_resp(404, "not found")}.

    Request fields: C{method}, C{http_version}, C{scheme}, C{host}, C{port}, C{remote_ip},
    C{path_info} (the decoded path segments), C{script_name}, C{request_path},
    C{query_string}, C{req_headers} (lower-case names, in order, repeated
    headers kept), C{path_params} (filled by L{desperados.Router}), and
    C{query_params} and C{req_cookies}, which stay None until
    L{fetch_query_params} and L{fetch_cookies} decode them.  Response fields:
    C{status}, C{resp_headers}, C{resp_body}, C{resp_cookies} (written as
    Set-Cookie headers when the response is sent).
    Pipeline fields: C{assigns} (per-request data shared between plugs),
    C{halted}, and C{state}: C{"unset"}, C{"set"} (a response is stored but
    not sent), C{"sent"}, C{"chunked"} or C{"upgraded"}.
    """

    __slots__ = (
        "adapter",
        "assigns",
        "before_send",
        "halted",
        "host",
        "http_version",
        "method",
        "path_info",
        "path_params",
        "port",
        "private",
        "query_params",
        "query_string",
        "remote_ip",
        "req_cookies",
        "req_headers",
        "request_path",
        "resp_body",
        "resp_cookies",
        "resp_headers",
        "scheme",
        "script_name",
        "state",
        "status",
        "upgrade_request",
    )

    def __init__(
        self,
        *,
        adapter: ConnAdapter | None = None,
        method: str = "GET",
        http_version: str = "HTTP/1.1",
        scheme: str = "http",
        host: str = "localhost",
        port: int = 80,
        remote_ip: str = "127.0.0.1",
        request_path: str = "/",
        path_info: list[str] | None = None,
        query_string: str = "",
        req_headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.adapter = adapter
        self.method = method
        self.http_version = http_version
        self.scheme = scheme
        self.host = host
        self.port = port
        self.remote_ip = remote_ip
        self.request_path = request_path
        if path_info is None:
            path_info = [segment for segment in request_path.split("/") if segment]
        self.path_info = path_info
        self.script_name: list[str] = []
        self.query_string = query_string
        self.req_headers = list(req_headers)
        self.query_params: QueryParams | None = None
        self.path_params: dict[str, str | list[str]] = {}
        self.req_cookies: dict[str, str] | None = None

        self.status: int | None = None
        self.resp_headers: list[tuple[str, str]] = list(DEFAULT_RESP_HEADERS)
        self.resp_body: bytes | str | None = None
        self.resp_cookies: dict[str, ResponseCookie] = {}
        self.before_send: list[Callable[[Conn], Conn]] = []

        self.assigns: dict[str, object] = {}
        self.private: dict[str, object] = {}
        self.halted = False
        self.state = UNSET
        self.upgrade_request: WebSocketUpgrade | None = None

    def __repr__(self) -> str:
        fields = [
            f"  {name}={getattr(self, name)!r},"
            for name in (
                "method",
                "http_version",
                "scheme",
                "host",
                "port",
                "remote_ip",
                "script_name",
                "path_info",
                "request_path",
                "query_string",
                "query_params",
                "path_params",
                "req_headers",
                "req_cookies",
                "status",
                "resp_headers",
                "resp_cookies",
                "resp_body",
                "assigns",
                "halted",
                "state",
            )
        ]
        return "\n".join(["Conn(", *fields, ")"])

    # Request

    def get_req_header(self, name: str) -> list[str]:
        """
        Return every value of the request header C{name}, in order.

        :param name: the header name, matched case-insensitively.
        """
        name = name.lower()
        return [value for key, value in self.req_headers if key == name]

    def fetch_query_params(self, *, max_params: int = 1000) -> Conn:
        """
        Decode the query string into C{query_params}, once.

        Repeated names are kept: C{conn.query_params["a"]} is the last value
        and C{conn.query_params.get_all("a")} all of them.

        :param max_params: the maximum number of parameters accepted.
        :raises BadRequestError: with status 400 for a query that does not
            decode to UTF-8 or has more than C{max_params} parameters.
        """
        if self.query_params is None:
            self.query_params = parse_query(self.query_string, max_params=max_params)
        return self

    def fetch_cookies(self) -> Conn:
        """
        Parse the Cookie request headers into C{req_cookies}, once.

        See L{desperados.cookies.parse_cookie_headers} for the rules.
        """
        if self.req_cookies is None:
            self.req_cookies = parse_cookie_headers(self.get_req_header("cookie"))
        return self

    # Pipeline

    def assign(self, key: str, value: object) -> Conn:
        """
        Store C{value} under C{key} in C{assigns} for later plugs.
        """
        self.assigns[key] = value
        return self

    def halt(self) -> Conn:
        """
        Stop the pipeline after the current plug.
        """
        self.halted = True
        return self

    # Response

    def put_status(self, status: int) -> Conn:
        """
        Set the response status without sending anything.

        :raises AlreadySentError: if the response was already sent.
        """
        self._check_not_sent("set the status")
        self.status = _check_status(status)
        return self

    def put_resp_header(self, name: str, value: str) -> Conn:
        """
        Set the response header C{name} to C{value}, replacing earlier values.

        :raises AlreadySentError: if the response was already sent.
        :raises ValueError: if the name or value contains CR, LF or NUL, which
            would let the value start a header of its own.
        """
        self._check_not_sent("set a header")
        name = name.lower()
        _check_header(name, value)
        self.resp_headers = [
            (key, existing) for key, existing in self.resp_headers if key != name
        ]
        self.resp_headers.append((name, value))
        return self

    def delete_resp_header(self, name: str) -> Conn:
        """
        Remove every value of the response header C{name}.

        :raises AlreadySentError: if the response was already sent.
        """
        self._check_not_sent("delete a header")
        name = name.lower()
        self.resp_headers = [
            (key, value) for key, value in self.resp_headers if key != name
        ]
        return self

    def put_resp_content_type(
        self, content_type: str, charset: str | None = "utf-8"
    ) -> Conn:
        """
        Set the Content-Type response header, with a charset parameter.

        :param content_type: the media type, such as C{"text/html"}.
        :param charset: the charset parameter, or None to leave it out (for
            binary types such as C{image/png}).
        :raises AlreadySentError: if the response was already sent.
        """
        value = content_type
        if charset is not None:
            value = f"{content_type}; charset={charset}"
        return self.put_resp_header("content-type", value)

    def put_resp_cookie(
        self,
        name: str,
        value: str,
        *,
        path: str | None = "/",
        domain: str | None = None,
        max_age: int | None = None,
        expires: datetime | None = None,
        secure: bool = False,
        http_only: bool = True,
        same_site: str | None = None,
    ) -> Conn:
        """
        Set a cookie in the response, replacing one set earlier with that name.

        The cookie goes out as a Set-Cookie header when the response is sent.

        :param max_age: seconds until the cookie expires.
        :param expires: when the cookie expires, an aware datetime.
        :param same_site: C{"strict"}, C{"lax"} or C{"none"}.
        :raises AlreadySentError: if the response was already sent.
        :raises ValueError: for a name or value that RFC 6265 does not allow.
        """
        self._check_not_sent("set a cookie")
        self.resp_cookies[name] = make_response_cookie(
            name,
            value,
            path=path,
            domain=domain,
            max_age=max_age,
            expires=expires,
            secure=secure,
            http_only=http_only,
            same_site=same_site,
        )
        return self

    def delete_resp_cookie(
        self,
        name: str,
        *,
        path: str | None = "/",
        domain: str | None = None,
        secure: bool = False,
        http_only: bool = True,
        same_site: str | None = None,
    ) -> Conn:
        """
        Tell the client to delete the cookie C{name}.

        Sends the cookie with an empty value, C{Max-Age=0} and an expiry date
        in the past.  The path and domain must match the cookie's own.

        :raises AlreadySentError: if the response was already sent.
        """
        self._check_not_sent("delete a cookie")
        self.resp_cookies[name] = expired_cookie(
            name,
            path=path,
            domain=domain,
            secure=secure,
            http_only=http_only,
            same_site=same_site,
        )
        return self

    def register_before_send(self, callback: Callable[[Conn], Conn]) -> Conn:
        """
        Run C{callback(conn)} just before the response headers go out.

        Callbacks run in the reverse order of registration, as in Plug, and
        may still change the status, headers, cookies and body.  Each must
        return the Conn.  They run once, whichever helper sends the response,
        including when the HTTP bridge sends a response stored with L{resp}.

        :raises AlreadySentError: if the response was already sent.
        """
        self._check_not_sent("register a before-send callback")
        self.before_send.append(callback)
        return self

    def get_resp_header(self, name: str) -> list[str]:
        """
        Return every value of the response header C{name}, in order.
        """
        name = name.lower()
        return [value for key, value in self.resp_headers if key == name]

    def resp(self, status: int, body: bytes | str) -> Conn:
        """
        Store a response to be sent when the pipeline ends, without sending it.

        :raises AlreadySentError: if the response was already sent.
        """
        self._check_not_sent("set the response")
        self.status = _check_status(status)
        self.resp_body = body
        self.state = SET
        return self

    def send_resp(
        self, status: int | None = None, body: bytes | str | None = None
    ) -> Conn:
        """
        Send the response now, with its status line, headers and body.

        With no arguments, sends the response stored by L{resp}.  The Conn is
        not halted: call L{halt} to skip the plugs after this one.

        :raises AlreadySentError: if the response was already sent.
        :raises ValueError: if no status was set.
        """
        if status is not None or body is not None:
            self.resp(
                self.status if status is None else status,
                b"" if body is None else body,
            )
        self._check_not_sent("send a response")
        if self.status is None:
            msg = "send_resp() needs a status, and none was set"
            raise ValueError(msg)

        self.run_before_send()
        body_bytes = _encode_body(self.resp_body)
        self.state = SENT
        if self.adapter is not None:
            self.adapter.send_resp(self, body_bytes)
        return self

    # Request body

    def read_body(
        self,
        length: int = DEFAULT_READ_LENGTH,
        timeout: float | None = DEFAULT_READ_TIMEOUT,
    ) -> Deferred[BodyChunk]:
        """
        Read the next part of the request body, as it arrives.

        Returns a Deferred (awaitable in a coroutine plug) that fires with a
        L{BodyChunk} C{(data, more)} as soon as body bytes are available:
        at most C{length} of them, and C{more} False once the last byte was
        returned.  Keep calling while C{more} is True to stream a large
        upload; the server stops reading from the client while unread bytes
        pile up, so memory stays bounded.  The first call sends
        C{100 Continue} if the client asked for it.

        :param length: the maximum number of bytes returned by this call.
        :param timeout: seconds to wait for the next bytes; None waits for ever.
        :returns: a Deferred that fails with
            L{desperados.errors.BodyTooLargeError} (413) when the body is
            larger than the server's C{max_body_size},
            L{desperados.errors.RequestTimeoutError} (408) when nothing
            arrived within C{timeout}, or
            L{desperados.errors.ClientDisconnectedError} when the client went
            away, or L{AlreadySentError} when the response is complete and
            the rest of the body was skipped.  Left uncaught, the HTTP bridge answers the first two with
            their status and closes the connection.
        :raises ValueError: for a C{length} below 1, or while another
            C{read_body} is still waiting.
        """
        if self.adapter is None:
            return succeed(BodyChunk(b"", False))
        return self.adapter.read_body(self, length, timeout)

    # Streaming responses

    def send_chunked(self, status: int) -> Conn:
        """
        Send the status and headers now; send the body with L{chunk}.

        Over HTTP/1.1 the body goes out with chunked transfer coding (unless
        the plug set a Content-Length); over HTTP/2 as DATA frames.  The
        response ends when the pipeline returns.

        :raises AlreadySentError: if the response was already sent.
        """
        self._check_not_sent("send a chunked response")
        self.status = _check_status(status)
        self.run_before_send()
        self.state = CHUNKED
        if self.adapter is not None:
            self.adapter.send_chunked(self)
        return self

    def chunk(self, data: bytes | str) -> Deferred[Conn]:
        """
        Send C{data} as the next part of a response started by L{send_chunked}.

        Returns a Deferred that fires with this Conn when the connection can
        take more; a plug that awaits it before the next chunk never buffers
        more than the transport's buffer.  An empty C{data} sends nothing.

        :raises AlreadySentError: if the response was sent some other way.
        :raises ValueError: if L{send_chunked} was not called.
        :raises ClientDisconnectedError: if the client closed the connection.
        """
        if self.state != CHUNKED:
            msg = f"cannot send a chunk: expected a chunked response, the response is {self.state}"
            if self.state in (SENT, UPGRADED):
                raise AlreadySentError(msg)
            raise ValueError(msg)
        if self.adapter is None:
            return succeed(self)
        return self.adapter.chunk(self, _encode_body(data))

    def send_file(
        self, status: int, path: str | os.PathLike[str], offset: int = 0, length: int | None = None
    ) -> Conn:
        """
        Send C{length} bytes of the file at C{path} from C{offset}, streamed.

        The file is read a block at a time as the connection drains, never
        whole.  Content-Length is set to the number of bytes sent.

        :param length: the number of bytes to send; None sends up to the end.
        :raises AlreadySentError: if the response was already sent.
        :raises OSError: if the file cannot be opened.
        :raises ValueError: if C{offset} or C{length} fall outside the file.
        """
        self._check_not_sent("send a file")
        status = _check_status(status)
        file = open(path, "rb")  # noqa: SIM115 - the adapter closes it
        try:
            size = os.fstat(file.fileno()).st_size
            length = _check_range(offset, length, size)
            self.status = status
            self.put_resp_header("content-length", str(length))
            self.run_before_send()
        except BaseException:
            file.close()
            raise
        self.state = SENT
        if self.adapter is None:
            file.close()
            return self
        self.adapter.send_file(self, file, offset, length)
        return self

    def inform(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> Conn:
        """
        Send an informational (1xx) response, such as 103 Early Hints.

        Does nothing for an HTTP/1.0 request: RFC 9110 section 15.2 forbids
        sending 1xx responses to HTTP/1.0 clients.

        :param headers: C{(name, value)} pairs, such as
            C{[("link", "</style.css>; rel=preload; as=style")]}.
        :raises ValueError: for a status outside 100-199, or 101 (use
            L{upgrade}).
        :raises AlreadySentError: if the response was already sent.
        """
        if not isinstance(status, int) or not 100 <= status <= 199 or status == 101:
            msg = f"expected an informational status from 100 to 199 other than 101, got {status!r}"
            raise ValueError(msg)
        self._check_not_sent("send an informational response")
        pairs = [(name.lower(), value) for name, value in headers]
        for name, value in pairs:
            _check_header(name, value)
        if self.http_version == "HTTP/1.0":
            return self
        if self.adapter is not None:
            self.adapter.inform(self, status, pairs)
        return self

    def upgrade(self, handler: object, state: object = None, **options: object) -> Conn:
        """
        Ask for this connection to become a WebSocket driven by C{handler}.

        The request is checked first (RFC 6455 section 4.2.1: GET over
        HTTP/1.1, the Connection, Upgrade, Sec-WebSocket-Version and
        Sec-WebSocket-Key headers, and the Origin against C{origins}); the
        upgrade itself happens once the pipeline has finished.  The plug
        should also L{halt} the Conn.

        :param handler: an object providing L{desperados.IWebSock}.
        :param state: the handler's initial state, given to its C{init}.
        :param options: fields of L{desperados.websock.WebSocketOptions}.
        :raises TypeError: for an unknown option.
        :raises AlreadySentError: if a response was already sent.
        :raises DesperadosError: with status 400, 403 or 426 when the request
            is not a valid upgrade; the HTTP bridge answers with that status.
        """
        self._check_not_sent("upgrade")
        websocket_options = WebSocketOptions(**options)  # type: ignore[arg-type]
        check_websocket_upgrade(self, websocket_options)
        self.upgrade_request = WebSocketUpgrade(
            handler=handler, state=state, options=websocket_options
        )
        self.state = UPGRADED
        return self

    def run_before_send(self) -> None:
        """
        Run the before-send callbacks, then turn C{resp_cookies} into headers.

        Every helper that sends the response headers (L{send_resp} and the
        streaming ones) calls this once, before changing C{state}.

        :raises TypeError: when a callback returns something other than this
            Conn.
        :raises AlreadySentError: when a callback sent the response itself.
        """
        callbacks, self.before_send = self.before_send, []
        for callback in reversed(callbacks):
            result = callback(self)
            if result is not self:
                msg = (
                    f"before-send callback {callback!r} returned {result!r},"
                    " expected the Conn"
                )
                raise TypeError(msg)
        self._check_not_sent("send a response")

        for cookie in self.resp_cookies.values():
            self.resp_headers.append(("set-cookie", cookie.header_value()))

    def _check_not_sent(self, action: str) -> None:
        if self.state in (SENT, CHUNKED, UPGRADED):
            msg = f"cannot {action}: the response is already {self.state}"
            raise AlreadySentError(msg)


def _check_status(status: int) -> int:
    if not isinstance(status, int) or not 100 <= status <= 999:
        msg = f"expected an HTTP status between 100 and 999, got {status!r}"
        raise ValueError(msg)
    return status


def _check_header(name: str, value: str) -> None:
    for part in (name, value):
        if not isinstance(part, str):
            msg = f"expected str header names and values, got {part!r}"
            raise TypeError(msg)
        if "\r" in part or "\n" in part or "\0" in part:
            msg = f"header names and values must not contain CR, LF or NUL, got {part!r}"
            raise ValueError(msg)


def _check_range(offset: int, length: int | None, size: int) -> int:
    if not isinstance(offset, int) or not 0 <= offset <= size:
        msg = f"expected an offset from 0 to the file size {size}, got {offset!r}"
        raise ValueError(msg)
    if length is None:
        return size - offset
    if not isinstance(length, int) or length < 0 or offset + length > size:
        msg = (
            f"expected a length from 0 to {size - offset} (the file size {size} "
            f"minus the offset {offset}), got {length!r}"
        )
        raise ValueError(msg)
    return length


def _encode_body(body: bytes | str | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)
