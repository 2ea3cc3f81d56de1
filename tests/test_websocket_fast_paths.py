"""
The shortcuts desperados takes around Autobahn's per-frame work.

HandlerProtocol unmasks short frames in Python, checks a text frame that is
a whole message with one decode, and reads and writes whole messages without
Autobahn's frame parser and sendMessage(); these tests hold them to what
Autobahn's own masker, incremental validator, parser and writer do.
"""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import pytest_twisted
from autobahn.websocket.xormasker import create_xor_masker
from support import encode_frame, open_websocket, read_frame_with_rsv
from twisted.internet import reactor

from desperados import Binary, Builder, Push, Text, endpoints, start_link
from desperados.plugs import Websocket
from desperados.websocket_protocol import HandlerProtocol
from desperados.websocket_frames import _PYTHON_MASKER_LIMIT, _PythonMasker

TEXT = 0x1
BINARY = 0x2
CONTINUATION = 0x0
CLOSE = 0x8
PING = 0x9
PONG = 0xA


@pytest.fixture(params=["desperados", "autobahn"])
def both_frame_paths(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> str:
    """
    Run a test with whole messages read and written by HandlerProtocol, then
    with every frame left to Autobahn's parser and sendMessage().
    """
    if request.param == "autobahn":
        monkeypatch.setattr(HandlerProtocol, "_between_messages", lambda self: False)
        monkeypatch.setattr(
            HandlerProtocol,
            "_send_message",
            lambda self, payload, is_binary: self.sendMessage(
                payload, isBinary=is_binary
            ),
        )
    return request.param


def echo_pipeline(**options: object) -> Builder:
    return Builder([Websocket, (endpoints.Websocket, options)])


class Reply(endpoints.Echo):
    """
    Reply to every message with one fixed frame.
    """

    def __init__(self, frame: Text | Binary) -> None:
        self.frame = frame

    def handle_in(self, frame: tuple[bytes, str], state: int) -> Push:
        return Push(self.frame, state)


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


@pytest.mark.parametrize("length", [1, 3, 4, 5, 16, 125, _PYTHON_MASKER_LIMIT - 1])
def test_python_masker_matches_autobahn_in_pieces(length):
    mask = os.urandom(4)
    payload = os.urandom(length)
    expected = create_xor_masker(mask, length).process(payload)

    masker = _PythonMasker(mask)
    pieces = []
    start = 0
    for size in (1, 2, 3, 5, 8, 13, length):
        pieces.append(masker.process(payload[start : start + size]))
        start += size
        if start >= length:
            break

    assert b"".join(pieces) == expected
    assert masker.pointer() == length


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "length", [0, 1, 125, 126, _PYTHON_MASKER_LIMIT - 1, _PYTHON_MASKER_LIMIT, 70000]
)
async def test_binary_frames_echo_at_every_length(serve, length):
    port = await serve()
    client, response = await open_websocket(port)
    payload = os.urandom(length)

    client.send(encode_frame(BINARY, payload))
    echo = await client.read_frame()
    client.transport.loseConnection()

    assert response.status == 101
    assert echo == (BINARY, payload)


@pytest_twisted.ensureDeferred
async def test_whole_text_message_with_multibyte_text_echoes(serve):
    port = await serve()
    client, _ = await open_websocket(port)
    text = "žluťoučký kůň 🐎 ".encode() * 500

    client.send(encode_frame(TEXT, text))
    echo = await client.read_frame()
    client.transport.loseConnection()

    assert echo == (TEXT, text)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"ok \xed\xa0\x80", b"cut \xf0\x9f\x90", b"x" * 2000 + b"\xc0\xaf"],
)
async def test_whole_text_message_with_invalid_utf8_closes_1007(serve, payload):
    port = await serve()
    client, _ = await open_websocket(port)

    client.send(encode_frame(TEXT, payload))
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert opcode == CLOSE
    assert close_code(close) == 1007


@pytest_twisted.ensureDeferred
async def test_fragmented_text_fails_at_first_invalid_fragment(serve):
    """
    The server closes with 1007 before the message's last fragment is sent.
    """
    port = await serve()
    client, _ = await open_websocket(port)

    client.send(encode_frame(TEXT, b"valid start ", fin=False))
    client.send(encode_frame(CONTINUATION, b"\xff never valid", fin=False))
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert opcode == CLOSE
    assert close_code(close) == 1007


@pytest_twisted.ensureDeferred
async def test_fragmented_text_split_code_point_echoes(serve):
    port = await serve()
    client, _ = await open_websocket(port)
    horse = "🐎".encode()

    client.send(encode_frame(TEXT, b"a" + horse[:2], fin=False))
    client.send(encode_frame(CONTINUATION, horse[2:] + b"b"))
    echo = await client.read_frame()
    client.transport.loseConnection()

    assert echo == (TEXT, b"a" + horse + b"b")


@pytest_twisted.ensureDeferred
async def test_mixed_frames_in_one_read_echo(serve, both_frame_paths):
    port = await serve()
    client, _ = await open_websocket(port)
    frames = [
        encode_frame(TEXT, b"one"),
        encode_frame(BINARY, b"\x00\xff" * 8),
        encode_frame(PING, b"ping payload"),
        encode_frame(TEXT, b""),
        encode_frame(TEXT, "žluť".encode() * 4000),
        encode_frame(BINARY, b"b" * 70000),
        encode_frame(TEXT, b"frag", fin=False),
        encode_frame(CONTINUATION, b"mented"),
        encode_frame(TEXT, b"last"),
    ]

    client.send(b"".join(frames))
    echoes = [await client.read_frame() for _ in range(8)]
    client.transport.loseConnection()

    assert echoes == [
        (TEXT, b"one"),
        (BINARY, b"\x00\xff" * 8),
        (PONG, b"ping payload"),
        (TEXT, b""),
        (TEXT, "žluť".encode() * 4000),
        (BINARY, b"b" * 70000),
        (TEXT, b"fragmented"),
        (TEXT, b"last"),
    ]


@pytest_twisted.ensureDeferred
async def test_frame_split_across_reads_echoes(serve, both_frame_paths):
    port = await serve()
    client, _ = await open_websocket(port)
    whole = encode_frame(TEXT, b"whole")
    split = encode_frame(BINARY, b"split" * 100)

    client.send(whole + split[:7])
    first = await client.read_frame()
    client.send(split[7:])
    second = await client.read_frame()
    client.transport.loseConnection()

    assert first == (TEXT, b"whole")
    assert second == (BINARY, b"split" * 100)


@pytest_twisted.ensureDeferred
async def test_oversized_frame_after_messages_closes_1009(serve, both_frame_paths):
    port = await serve(echo_pipeline(max_frame_size=100))
    client, _ = await open_websocket(port)

    client.send(
        encode_frame(BINARY, b"x" * 100)
        + encode_frame(TEXT, b"ok")
        + encode_frame(BINARY, b"x" * 101)
        + encode_frame(TEXT, b"never echoed")
    )
    first = await client.read_frame()
    second = await client.read_frame()
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert first == (BINARY, b"x" * 100)
    assert second == (TEXT, b"ok")
    assert opcode == CLOSE
    assert close_code(close) == 1009


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_1009(serve, both_frame_paths):
    port = await serve(echo_pipeline(max_message_size=1000, max_frame_size=2000))
    client, _ = await open_websocket(port)

    client.send(encode_frame(TEXT, b"ok") + encode_frame(TEXT, b"x" * 1001))
    echo = await client.read_frame()
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert echo == (TEXT, b"ok")
    assert opcode == CLOSE
    assert close_code(close) == 1009


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_after_messages_closes_1007(serve, both_frame_paths):
    port = await serve()
    client, _ = await open_websocket(port)

    client.send(
        encode_frame(TEXT, b"fine")
        + encode_frame(TEXT, b"bad \xff")
        + encode_frame(TEXT, b"never echoed")
    )
    echo = await client.read_frame()
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert echo == (TEXT, b"fine")
    assert opcode == CLOSE
    assert close_code(close) == 1007


@pytest_twisted.ensureDeferred
async def test_unmasked_frame_after_message_closes_1002(serve, both_frame_paths):
    port = await serve()
    client, _ = await open_websocket(port)
    unmasked = bytes([0x81, 0x02]) + b"no"

    client.send(encode_frame(TEXT, b"masked") + unmasked)
    echo = await client.read_frame()
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert echo == (TEXT, b"masked")
    assert opcode == CLOSE
    assert close_code(close) == 1002


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_passes_unvalidated(serve, both_frame_paths):
    port = await serve(echo_pipeline(validate_utf8=False))
    client, _ = await open_websocket(port)

    client.send(encode_frame(TEXT, b"bad \xff") + encode_frame(TEXT, b"next"))
    first = await client.read_frame()
    second = await client.read_frame()
    client.transport.loseConnection()

    assert first == (TEXT, b"bad \xff")
    assert second == (TEXT, b"next")


@pytest_twisted.ensureDeferred
async def test_traffic_statistics_count_every_message(both_frame_paths):
    listening = await start_link(
        echo_pipeline(), port=0, ip="127.0.0.1", reactor=reactor, startup_log=None
    )
    bridge = listening.factory.plug_resource.websockets
    try:
        client, _ = await open_websocket(listening.getHost().port)
        frames = [
            encode_frame(TEXT, b"short"),
            encode_frame(BINARY, b"b" * 300),
            encode_frame(TEXT, b"frag", fin=False),
            encode_frame(CONTINUATION, b"ment"),
        ]
        client.send(b"".join(frames))
        for _ in range(3):
            await client.read_frame()
        (protocol,) = bridge.connections
        # A copy, because the Close frame of the shutdown below counts too.
        stats = copy.copy(protocol.trafficStats)
        client.transport.loseConnection()
    finally:
        await bridge.shutdown()
        await listening.stopListening()

    payload_octets = 5 + 300 + 8
    assert stats.incomingWebSocketMessages == 3
    assert stats.incomingWebSocketFrames == 4
    assert stats.incomingOctetsAppLevel == payload_octets
    assert stats.incomingOctetsWebSocketLevel == payload_octets
    assert stats.incomingOctetsWireLevel == sum(len(frame) for frame in frames)
    assert stats.outgoingWebSocketMessages == 3
    assert stats.outgoingWebSocketFrames == 3
    assert stats.outgoingOctetsAppLevel == payload_octets
    assert stats.outgoingOctetsWebSocketLevel == payload_octets
    # Unmasked frames: 2-byte headers, and 4 bytes for the 300-byte length.
    assert stats.outgoingOctetsWireLevel == payload_octets + 2 + 4 + 2


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "reply",
    [Text(bytearray(b"not bytes")), Binary(b"x" * 1001)],
    ids=["bytearray", "over max_message_size"],
)
async def test_invalid_reply_closes_1011(serve, both_frame_paths, reply):
    port = await serve(echo_pipeline(handler=Reply(reply), max_message_size=1000))
    client, _ = await open_websocket(port)

    client.send(encode_frame(TEXT, b"hello"))
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert opcode == CLOSE
    assert close_code(close) == 1011


DEFLATE_OFFER = "Sec-WebSocket-Extensions: permessage-deflate\r\n"


def deflate(data: bytes) -> bytes:
    """
    Compress one message as permessage-deflate does (RFC 7692 section 7.2.1).
    """
    compressor = zlib.compressobj(wbits=-15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest_twisted.ensureDeferred
async def test_compressed_replies_keep_context(serve, both_frame_paths):
    """
    The server compresses each reply with the window of the ones before it
    (context takeover), so one decompressor inflates them all.
    """
    port = await serve()
    client, response = await open_websocket(port, extra=DEFLATE_OFFER)
    messages = [b"compress me " * 100, b"compress me " * 100, b"and me " * 50]

    client.send(b"".join(encode_frame(TEXT, deflate(m), rsv=0b100) for m in messages))
    replies = [await read_frame_with_rsv(client) for _ in messages]
    client.transport.loseConnection()

    decompressor = zlib.decompressobj(wbits=-15)
    inflated = [
        decompressor.decompress(payload + b"\x00\x00\xff\xff")
        for _, _, payload in replies
    ]
    assert response.header("sec-websocket-extensions") == "permessage-deflate"
    assert [(rsv, opcode) for rsv, opcode, _ in replies] == [(0b100, TEXT)] * 3
    assert inflated == messages
    assert len(replies[1][2]) < len(replies[0][2])


@pytest_twisted.ensureDeferred
async def test_reply_over_limit_compressed_closes_1011(serve, both_frame_paths):
    """
    995 random bytes are under max_message_size but compress to 1,001.
    """
    handler = Reply(Binary(os.urandom(995)))
    port = await serve(echo_pipeline(handler=handler, max_message_size=1000))
    client, _ = await open_websocket(port, extra=DEFLATE_OFFER)

    client.send(encode_frame(TEXT, b"hello"))
    opcode, close = await client.read_frame()
    client.transport.loseConnection()

    assert opcode == CLOSE
    assert close_code(close) == 1011
