"""
The stand-ins for twisted.web's Request on the HTTP/1.1 fast path.

L{_WaitingRequest} is the request whose pipeline
L{desperados.http1_fast.FastPath} waits for, and L{_SentRequest} is the
record of a request that it served, as the access log and the bridge read it.
"""

from __future__ import annotations

from time import perf_counter, time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from desperados import telemetry
from desperados.access_log import RequestRecord
from desperados.errors import ClientDisconnectedError
from desperados.http1 import lists_close
from desperados.http1_fast_head import _HTTP11, _ParsedRequest
from desperados.request import reason_phrase

if TYPE_CHECKING:
    from desperados.http1_fast import FastPath, _FastAdapter


class _WaitingRequest:
    """
    A request whose pipeline L{FastPath} waits for, as the twisted.web
    request that L{PlugResource.complete} finishes.

    It provides what the bridge's C{_wait}, C{_finish}, C{_fail} and
    C{_send_error} use: an error response is written with one
    C{transport.write}, as twisted.web writes it.  Once the request is
    passed on to the channel, these go to the channel's request.

    :ivar head_length: the length of the request head, with its blank
        line, at the start of the adapter's bytes.
    """

    clientproto = _HTTP11
    startedWriting = False  # noqa: N815
    sentLength = 0  # noqa: N815
    _passed_on: Any = None

    def __init__(self, path: FastPath, adapter: _FastAdapter, head_length: int):
        self._path = path
        self.adapter = adapter
        self.head_length = head_length
        self.channel = path._channel
        self.finished = False
        self._disconnected = False
        self._finish_notifications: list[Deferred[None]] = []
        self.access_log_client: str | None = None
        self.code = 200
        self._body: list[bytes] = []
        # The headers twisted.web's Request has at this point: Connection
        # from checkPersistence, then Date from Request.process.
        self.responseHeaders = Headers()  # noqa: N815
        if not adapter._persistent:
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.responseHeaders.setRawHeaders(b"date", [_http_date()])

    def __getattribute__(self, name: str) -> Any:
        passed_on = object.__getattribute__(self, "_passed_on")
        if passed_on is not None and name not in _OWN_ATTRIBUTES:
            return getattr(passed_on, name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        passed_on = self._passed_on
        if passed_on is not None and name not in _OWN_ATTRIBUTES:
            setattr(passed_on, name, value)
            return
        object.__setattr__(self, name, value)

    def pass_on(self, request: Any) -> None:
        """
        Carry on as C{request}, the channel's request for the same head.
        """
        notifications, self._finish_notifications = self._finish_notifications, []
        self._passed_on = request
        for notification in notifications:
            request.notifyFinish().chainDeferred(notification)

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802
        finished: Deferred[None] = Deferred()
        if self.finished:
            finished.callback(None)
        elif self._disconnected:
            finished.errback(Failure(ClientDisconnectedError("client disconnected")))
        else:
            self._finish_notifications.append(finished)
        return finished

    def client_gone(self, reason: Failure) -> None:
        """
        Log the request as left by its client and fail its finish notifications.
        """
        if self.finished:
            return
        self._disconnected = True
        adapter = self.adapter
        path = self._path
        # As StreamingRequest.connectionLost: the access log gets the line
        # of a request that never finished.
        record = _SentRequest(adapter._request, path._client, self.code, 0, False)
        record.finished = record.startedWriting = False
        self._record_end(record, None)
        notifications, self._finish_notifications = self._finish_notifications, []
        for notification in notifications:
            notification.errback(reason)

    def _record_end(self, record: _SentRequest, status: int | None) -> None:
        """
        Log C{record} to the access log and emit C{http.request.stop}.

        :param status: the status sent, or None if the client left first.
        """
        record.access_log_client = self.access_log_client
        self.channel.site.log(record)
        adapter = self.adapter
        started = adapter.started
        if started is not None and telemetry.observers:
            telemetry.emit(
                "http.request.stop",
                method=adapter._request.method.decode("latin-1"),
                status=status,
                duration=perf_counter() - started,
            )

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:  # noqa: N802
        self.code = code

    def write(self, data: bytes) -> None:
        self._body.append(data)

    def finish(self) -> None:
        """
        Write the error response that the bridge built, then carry on.
        """
        if self.finished or self._disconnected:
            return
        self.finished = True
        body = b"".join(self._body)
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.code, reason_phrase(self.code))]
        persistent = self.adapter._persistent
        for name, values in self.responseHeaders.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
            if name.lower() == b"connection" and lists_close(values):
                persistent = False
        lines.append(b"\r\n")
        lines.append(body)
        path = self._path
        path._transport.write(b"".join(lines))

        adapter = self.adapter
        record = _SentRequest(
            adapter._request, path._client, self.code, len(body), persistent
        )
        adapter.record = record
        self._record_end(record, self.code)
        for notification in self._finish_notifications:
            notification.callback(None)
        self._finish_notifications = []
        path.finish_waiting(self, persistent)


# The attributes that a _WaitingRequest keeps once passed on to the
# channel.  It reads and sets every other one on the channel's request.
_OWN_ATTRIBUTES = frozenset(["_passed_on", "__dict__", "adapter", "head_length"])


class _SentRequest(RequestRecord):
    """
    The record of a request that L{FastPath} served, with the attributes of
    a finished twisted.web request that the access log and the bridge read.
    """

    _disconnected = False

    def __init__(
        self,
        request: _ParsedRequest,
        client: Any,
        code: int,
        sent_length: int,
        persistent: bool,
    ) -> None:
        super().__init__(
            request.method, request.uri, _HTTP11, None, client, code, sent_length
        )
        self.persistent = persistent
        self._fields = request.fields

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
        values = self._fields.get(name)
        return values[-1] if values else None

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802
        return succeed(None)


_date_second = -1
_date_value = b""


def _http_date() -> bytes:
    """
    Return the Date header value for now, formatted once per second.
    """
    global _date_second, _date_value
    now = time()
    second = int(now)
    if second != _date_second:
        _date_value = datetimeToString(now)
        _date_second = second
    return _date_value
