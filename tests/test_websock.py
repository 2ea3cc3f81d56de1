"""
The handler-side values: frames, results, options and handles, in memory.
"""

from __future__ import annotations

import pytest

from desperados.websock import (
    Binary,
    Ok,
    Ping,
    Pong,
    Push,
    Stop,
    Text,
    WebSocketHandle,
    WebSocketOptions,
    frames_of,
    is_sendable_close_code,
)


class TestStop:
    def test_defaults_to_normal_closure(self):
        stop = Stop("state")

        assert (stop.code, stop.reason) == (1000, "")

    @pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 1014, 3000, 4999])
    def test_sendable_codes_are_accepted(self, code):
        assert Stop(None, code).code == code

    @pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2000, 5000])
    def test_reserved_codes_are_rejected(self, code):
        with pytest.raises(ValueError, match=str(code)):
            Stop(None, code)

    def test_reason_over_123_bytes_is_rejected(self):
        Stop(None, 1000, "é" * 61)

        with pytest.raises(ValueError, match="123 bytes"):
            Stop(None, 1000, "é" * 62)


class TestControlFrames:
    @pytest.mark.parametrize("frame_type", [Ping, Pong])
    def test_payload_up_to_125_bytes(self, frame_type):
        assert frame_type(b"x" * 125).data == b"x" * 125

    @pytest.mark.parametrize("frame_type", [Ping, Pong])
    def test_longer_payload_is_rejected(self, frame_type):
        with pytest.raises(ValueError, match="at most 125 bytes"):
            frame_type(b"x" * 126)


def test_frames_of_one_frame_and_a_list():
    assert list(frames_of(Push(Text("a"), 0))) == [Text("a")]
    assert list(frames_of(Push([Text("a"), Binary(b"b")], 0))) == [
        Text("a"),
        Binary(b"b"),
    ]


def test_results_are_values():
    assert Ok(1) == Ok(1)
    assert Push(Text("a"), 1) == Push(Text("a"), 1)


def test_close_code_ranges():
    assert is_sendable_close_code(1000)
    assert is_sendable_close_code(3000)
    assert not is_sendable_close_code(1005)
    assert not is_sendable_close_code(2999)


class TestWebSocketOptions:
    def test_defaults_are_bounded(self):
        options = WebSocketOptions()

        assert options.timeout == 60.0
        assert options.compress is True
        assert options.max_frame_size == 16 * 1024 * 1024
        assert options.max_message_size == 16 * 1024 * 1024
        assert options.validate_utf8 is True
        assert options.origins is None
        assert options.subprotocols == ()

    @pytest.mark.parametrize(
        "changes",
        [
            {"max_frame_size": 0},
            {"max_message_size": -1},
            {"max_message_size": 1.5},
            {"timeout": 0},
            {"timeout": "60"},
            {"close_handshake_timeout": None},
            {"ping_interval": -1},
        ],
        ids=repr,
    )
    def test_invalid_values_are_rejected(self, changes):
        with pytest.raises(ValueError, match=next(iter(changes))):
            WebSocketOptions(**changes)

    def test_string_for_a_list_is_rejected(self):
        with pytest.raises(TypeError, match="list of strings"):
            WebSocketOptions(origins="https://example.com")

    def test_origins_are_normalized(self):
        options = WebSocketOptions(origins=["HTTPS://Example.com/"])

        assert options.origins == ("https://example.com",)

    def test_options_are_hashable(self):
        """
        The bridge keeps one Autobahn factory per distinct set of options.
        """
        first = WebSocketOptions(subprotocols=["chat"], origins=["https://a.example"])
        second = WebSocketOptions(
            subprotocols=("chat",), origins=("https://a.example",)
        )

        assert hash(first) == hash(second)
        assert first == second


class TestWebSocketHandle:
    def test_send_delivers_while_open(self):
        delivered = []
        handle = WebSocketHandle(delivered.append)

        assert handle.send("message") is True
        assert delivered == ["message"]
        assert handle.open is True

    def test_send_after_close_is_dropped(self):
        delivered = []
        handle = WebSocketHandle(delivered.append)
        handle._close()

        assert handle.send("message") is False
        assert delivered == []
        assert handle.open is False
