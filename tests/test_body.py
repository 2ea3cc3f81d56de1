"""
RequestBody in memory: reads, backpressure, limits, timeouts.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from desperados.body import HIGH_WATER, BodyChunk, RequestBody
from desperados.errors import AlreadySentError, BodyTooLargeError, RequestTimeoutError


def _body(expected_length=None, max_size=None):
    calls = []
    body = RequestBody(
        expected_length=expected_length,
        max_size=max_size,
        pause=lambda: calls.append("pause"),
        resume=lambda: calls.append("resume"),
    )
    return body, calls


def _result(deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_read_returns_queued_bytes_up_to_length():
    body, _ = _body(expected_length=10)
    body.feed(b"abcdef")

    first = _result(body.read(4, None, Clock()))
    second = _result(body.read(4, None, Clock()))

    assert first == BodyChunk(b"abcd", True)
    assert second == BodyChunk(b"ef", True)


def test_read_waits_then_ends():
    body, _ = _body(expected_length=3)
    pending = body.read(100, None, Clock())
    body.feed(b"abc")
    body.finish()

    assert _result(pending) == BodyChunk(b"abc", True)
    assert _result(body.read(100, None, Clock())) == BodyChunk(b"", False)


def test_feed_past_high_water_pauses_and_read_resumes():
    body, calls = _body()

    body.feed(b"x" * (HIGH_WATER + 1))
    paused = list(calls)
    _result(body.read(HIGH_WATER * 2, None, Clock()))

    assert paused == ["pause"]
    assert calls == ["pause", "resume"]


def test_body_past_max_size_fails_read():
    body, _ = _body(max_size=5)
    pending = body.read(100, None, Clock())
    body.feed(b"abc")
    _result(pending)
    pending = body.read(100, None, Clock())
    body.feed(b"def")

    failure = _result(pending)
    assert isinstance(failure.value, BodyTooLargeError)
    assert failure.value.status == 413


def test_read_times_out_with_408():
    clock = Clock()
    body, _ = _body(expected_length=3)
    pending = body.read(100, 2.0, clock)

    clock.advance(2.0)

    failure = _result(pending)
    assert isinstance(failure.value, RequestTimeoutError)
    assert failure.value.status == 408


def test_read_after_discard_fails():
    body, _ = _body(expected_length=10)
    body.feed(b"abc")
    body.discard()

    failure = _result(body.read(100, None, Clock()))
    assert isinstance(failure.value, AlreadySentError)


def test_second_waiting_read_raises():
    body, _ = _body(expected_length=3)
    body.read(100, None, Clock())

    with pytest.raises(ValueError, match="still waiting"):
        body.read(100, None, Clock())


@pytest.mark.parametrize("length", [0, -1, 1.5])
def test_read_rejects_bad_length(length):
    body, _ = _body()

    with pytest.raises(ValueError, match="read length"):
        body.read(length, None, Clock())
