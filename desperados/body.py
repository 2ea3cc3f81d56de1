"""
The request body as it arrives: the queue that C{Conn.read_body} reads from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure

from desperados.errors import (
    AlreadySentError,
    BodyTooLargeError,
    DesperadosError,
    RequestTimeoutError,
)

DEFAULT_READ_LENGTH = 8_000_000
"""Default maximum number of bytes one C{read_body} call returns, as in Plug."""

DEFAULT_READ_TIMEOUT = 15.0
"""Default seconds C{read_body} waits for the next bytes, as in Plug."""

HIGH_WATER = 256 * 1024
"""Buffered bytes past which the connection stops reading the body."""


class BodyChunk(NamedTuple):
    """
    One result of C{Conn.read_body}: the bytes read and whether more follow.

    Unpack it as C{data, more = await conn.read_body()}.
    """

    data: bytes
    more: bool


class RequestBody:
    """
    A queue of request body chunks between the connection and C{read_body}.

    The connection calls L{feed}, L{finish} and L{fail}; a plug reads with
    L{read}.  When more than L{HIGH_WATER} bytes wait unread, C{pause} stops
    the connection from reading and C{resume} restarts it once a read has
    taken them, so a slow reader keeps at most about that much in memory.

    :param expected_length: the Content-Length, or None for a chunked body.
    :param max_size: the largest body accepted, None for no limit.
    :param pause: stops the connection from reading.
    :param resume: restarts it.
    """

    def __init__(
        self,
        *,
        expected_length: int | None,
        max_size: int | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self.expected_length = expected_length
        self.max_size = max_size
        self.received = 0
        self.complete = expected_length == 0
        self.error: DesperadosError | None = None
        self.discarded = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._waiter: Deferred[BodyChunk] | None = None
        self._waiter_length = 0
        self._timeout_call: Any = None

    @property
    def too_large(self) -> bool:
        """
        Whether the announced or received length is past C{max_size}.
        """
        if self.max_size is None:
            return False
        announced = self.expected_length or 0
        return max(announced, self.received) > self.max_size

    @property
    def remaining(self) -> int | None:
        """
        The bytes still to arrive, or None when the length is not known.
        """
        if self.complete:
            return 0
        if self.expected_length is None:
            return None
        return self.expected_length - self.received

    # Called by the connection

    def feed(self, data: bytes) -> None:
        """
        Queue C{data}; fail the body with 413 once it grows past C{max_size}.
        """
        if self.complete or self.error is not None:
            return
        self.received += len(data)
        if self.too_large:
            self.fail(BodyTooLargeError(_too_large_message(self.max_size)))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        if self._buffered > HIGH_WATER:
            # Pause again even when paused already: twisted.web's channel
            # resumes the transport when its own write buffer drains.
            self._paused = True
            self._pause()

    def expect_chunk(self, size: int) -> None:
        """
        Fail the body with 413 now if a chunk of C{size} bytes, announced by
        its chunk-size line, would take it past C{max_size}.
        """
        if self.max_size is None or self.complete or self.error is not None:
            return
        if self.received + size > self.max_size:
            msg = (
                f"a chunk of {size} bytes would make the request body larger "
                f"than the maximum of {self.max_size} bytes"
            )
            self.fail(BodyTooLargeError(msg))

    def finish(self) -> None:
        """
        Mark the body complete: the last chunk has been fed.
        """
        if self.error is not None:
            return
        self.complete = True
        self._wake()

    def fail(self, error: DesperadosError) -> None:
        """
        Fail the pending and later reads with C{error} and stop reading.
        """
        if self.complete or self.error is not None:
            return
        self.error = error
        self._chunks.clear()
        self._buffered = 0
        if not self._paused:
            self._paused = True
            self._pause()
        waiter, self._waiter = self._waiter, None
        self._cancel_timeout()
        if waiter is not None:
            waiter.errback(Failure(error))

    def discard(self) -> None:
        """
        Drop the unread chunks and read the rest without keeping it.

        Called when the response is complete: nobody will read the body now,
        but the connection must still get past it to the next request.
        """
        self._chunks.clear()
        self._buffered = 0
        self.discarded = True
        if self._paused and self.error is None:
            self._paused = False
            self._resume()

    # Called by a plug, through the Conn

    def read(
        self, length: int, timeout: float | None, clock: Any
    ) -> Deferred[BodyChunk]:
        """
        Return a Deferred of the next bytes, at most C{length} of them.

        It fires as soon as any bytes are queued, with C{more} False once the
        body is complete and every byte was returned.

        :param length: the maximum number of bytes returned.
        :param timeout: seconds to wait for bytes, None to wait for ever.
        :param clock: an C{IReactorTime} for the timeout.
        :raises ValueError: for a C{length} below 1 or while another read waits.
        """
        if not isinstance(length, int) or length < 1:
            msg = f"expected a read length of at least 1, got {length!r}"
            raise ValueError(msg)
        if self._waiter is not None:
            msg = "read_body() called while an earlier read_body() is still waiting"
            raise ValueError(msg)
        if self.error is not None:
            return fail(self.error)
        if self.discarded:
            msg = "cannot read the request body: the response is complete, so the rest was skipped"
            return fail(AlreadySentError(msg))
        if self._chunks or self.complete:
            return succeed(self._take(length))

        self._waiter = Deferred(self._cancel_read)
        self._waiter_length = length
        if timeout is not None:
            self._timeout_call = clock.callLater(timeout, self._time_out, timeout)
        return self._waiter

    def _take(self, length: int) -> BodyChunk:
        parts = []
        taken = 0
        while self._chunks and taken < length:
            chunk = self._chunks.popleft()
            if taken + len(chunk) > length:
                split = length - taken
                self._chunks.appendleft(chunk[split:])
                chunk = chunk[:split]
            parts.append(chunk)
            taken += len(chunk)
        self._buffered -= taken
        if self._paused and self._buffered <= HIGH_WATER // 2:
            self._paused = False
            self._resume()
        more = bool(self._chunks) or not self.complete
        return BodyChunk(b"".join(parts), more)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        self._cancel_timeout()
        waiter.callback(self._take(self._waiter_length))

    def _time_out(self, timeout: float) -> None:
        self._timeout_call = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            msg = f"no request body bytes arrived within {timeout} seconds"
            waiter.errback(Failure(RequestTimeoutError(msg)))

    def _cancel_read(self, waiter: Deferred[BodyChunk]) -> None:
        if waiter is self._waiter:
            self._waiter = None
            self._cancel_timeout()
        waiter.errback(Failure(CancelledError()))

    def _cancel_timeout(self) -> None:
        call, self._timeout_call = self._timeout_call, None
        if call is not None and call.active():
            call.cancel()


def _too_large_message(max_size: int | None) -> str:
    return f"request body larger than the maximum of {max_size} bytes"
