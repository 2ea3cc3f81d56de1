"""
The shortcuts desperados takes around Autobahn's per-frame work.

HandlerProtocol unmasks short frames in Python and checks a text frame that
is a whole message with one decode; these tests hold them to what Autobahn's
own masker and incremental validator do.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from autobahn.websocket.xormasker import create_xor_masker
from support import encode_frame, open_websocket

from desperados.websocket import _PYTHON_MASKER_LIMIT, _PythonMasker

TEXT = 0x1
BINARY = 0x2
CONTINUATION = 0x0
CLOSE = 0x8


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
