"""
Streamed responses on a twisted.web request: chunks with backpressure, file
ranges, informational (1xx) heads.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, Request
from twisted.web.http_headers import Headers
from zope.interface import implementer

from desperados._logging import observer as log_observer
from desperados.body import BodyChunk
from desperados.compression import Compressor
from desperados.errors import ClientDisconnectedError

_HTTP11 = b"HTTP/1.1"
_EXTRA_REASONS = {103: b"Early Hints"}

log = Logger(namespace="desperados.streaming", observer=log_observer)


@implementer(IPushProducer)
class ResponseStream:
    """
    The body of a response sent in parts, with the connection's backpressure.

    Registered as the request's push producer, it learns when the
    transport's buffer is full (HTTP/1.1) or the stream's flow-control
    window is closed (HTTP/2); L{write} then returns a Deferred that fires
    once the connection can take more.

    :param request: the request whose head was set.
    :param compressor: compresses each part, or None to send them as they are.
    """

    def __init__(self, request: Request, compressor: Compressor | None = None) -> None:
        self.request = request
        self.compressor = compressor
        self._paused = False
        self._waiters: list[Deferred[None]] = []
        # send_chunked sends the head at once, before any part.
        request.write(b"")
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(self._lost)

    def write(self, data: bytes) -> Deferred[None]:
        """
        Send C{data}; return a Deferred that fires when more can be sent.

        :raises ClientDisconnectedError: if the client closed the connection.
        """
        request = self.request
        if request._disconnected or request.finished:
            msg = "cannot send a chunk: the client closed the connection"
            raise ClientDisconnectedError(msg)
        compressor = self.compressor
        if compressor is not None and data:
            # A sync flush per part: the client can decompress each part as
            # it arrives, which is what a streamed response is for.
            data = compressor.compress(data) + compressor.flush()
        request.write(data)
        if not self._paused:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def finish(self) -> None:
        """
        End the response, unless the client already went away.
        """
        request = self.request
        if request.producer is self:
            request.unregisterProducer()
        if request._disconnected or request.finished:
            return
        if self.compressor is not None:
            request.write(self.compressor.finish())
        request.finish()

    # IPushProducer, called by the channel

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def stopProducing(self) -> None:
        self._lost(Failure(ClientDisconnectedError("the client closed the connection")))

    def _lost(self, reason: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        error = ClientDisconnectedError("cannot send a chunk: the client closed the connection")
        for waiter in waiters:
            waiter.errback(Failure(error))


@implementer(IPullProducer)
class _FileRangeProducer:
    """
    Writes a range of a file to a request, one block each time it is asked.

    Like twisted.web's C{SingleRangeStaticProducer}, except that a file that
    ends early (it shrank after its size was read) aborts the response: the
    upstream producer keeps asking for the missing bytes for ever.
    """

    block_size = 64 * 1024

    def __init__(self, request: Request, file: IO[bytes], offset: int, length: int) -> None:
        self.request: Request | None = request
        self.file = file
        self.offset = offset
        self.remaining = length

    def start(self) -> None:
        self.file.seek(self.offset)
        assert self.request is not None
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self.request
        if request is None:
            return
        data = self.file.read(min(self.block_size, self.remaining))
        if not data:
            log.error(
                "{path} ended {remaining} bytes before the range being sent",
                path=getattr(self.file, "name", "?"),
                remaining=self.remaining,
            )
            request.unregisterProducer()
            self.stopProducing()
            request.loseConnection()
            return
        self.remaining -= len(data)
        # The write may call resumeProducing again before returning.
        request.write(data)
        if self.request is not None and self.remaining == 0:
            request.unregisterProducer()
            request.finish()
            self.stopProducing()

    def stopProducing(self) -> None:
        self.file.close()
        self.request = None


def send_file_range(request: Request, file: IO[bytes], offset: int, length: int) -> None:
    """
    Stream C{length} bytes of C{file} from C{offset}, then finish C{request}.

    The head must be set on C{request} already; C{file} is closed at the end
    or when the client goes away.
    """
    if length == 0 or request.method == b"HEAD":
        file.close()
        request.write(b"")
        request.finish()
        return
    _FileRangeProducer(request, file, offset, length).start()


def send_informational(request: Request, status: int, headers: list[tuple[str, str]]) -> None:
    """
    Write a 1xx head on C{request}'s connection, before the final response.

    Over HTTP/1.1 it is a status line and headers; over HTTP/2 a HEADERS
    frame without END_STREAM.  Both channels take it through their
    C{writeHeaders}, as the final head does.
    """
    if request.startedWriting or request.finished or request._disconnected:
        return
    wire_headers = Headers()
    for name, value in headers:
        wire_headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    # twisted.web's RESPONSES table has no 103 (RFC 8297).
    reason = RESPONSES.get(status) or _EXTRA_REASONS.get(status, b"")
    request.channel.writeHeaders(_HTTP11, b"%d" % status, reason, wire_headers)


def read_buffered_body(request: Any, length: int) -> Deferred[BodyChunk]:
    """
    Read up to C{length} bytes of a body twisted.web already buffered.
    """
    content = request.content
    if content is None:
        return succeed(BodyChunk(b"", False))
    data = content.read(length)
    more = bool(content.read(1))
    if more:
        content.seek(-1, 1)
    return succeed(BodyChunk(data, more))
