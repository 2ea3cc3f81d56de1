"""
Clients and helpers for tests that talk to a real server over loopback.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Response:
    """
    One parsed HTTP/1.1 response.
    """

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """
        Return the first value of the header C{name}, or None.
        """
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        """
        Return every value of the header C{name}, in order.
        """
        return [value for key, value in self.headers if key == name.lower()]


class RawClient(Protocol):
    """
    A TCP client that sends exact bytes and parses the responses it gets.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.closed = False
        self._waiting: Deferred[None] | None = None
        self._on_close: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        self._wake()
        self._on_close.callback(None)

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def send(self, data: bytes) -> None:
        """
        Write C{data} to the server as is.
        """
        self.transport.write(data)

    async def wait_for_data(self) -> None:
        """
        Wait until more bytes arrive or the connection closes.
        """
        if self.closed:
            return
        self._waiting = Deferred()
        await self._waiting

    async def read_response(self, head_only: bool = False) -> Response:
        """
        Read one response: its head, and its body by Content-Length or chunks.

        :param head_only: do not read a body (for HEAD requests).
        :raises ConnectionError: if the connection closed first.
        """
        while b"\r\n\r\n" not in self.buffer:
            if self.closed:
                raise ConnectionError(f"closed before a response head: {self.buffer!r}")
            await self.wait_for_data()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, status, reason = (status_line.split(" ", 2) + [""])[:3]
        headers = []
        for line in header_lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        response = Response(version, int(status), reason, headers, b"")

        if head_only or response.status in (101, 204, 304) or 100 <= response.status < 200:
            return response
        if response.header("transfer-encoding") == "chunked":
            response.body = await self._read_chunked()
        elif response.header("content-length") is not None:
            response.body = await self._read_exactly(int(response.header("content-length")))
        else:
            while not self.closed:
                await self.wait_for_data()
            response.body, self.buffer = self.buffer, b""
        return response

    async def _read_exactly(self, length: int) -> bytes:
        while len(self.buffer) < length:
            if self.closed:
                raise ConnectionError("closed in the middle of a body")
            await self.wait_for_data()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return data

    async def _read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if self.closed:
                raise ConnectionError("closed in the middle of a chunk")
            await self.wait_for_data()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def _read_chunked(self) -> bytes:
        body = b""
        while chunk := await self.read_chunk():
            body += chunk
        return body

    async def read_chunk(self) -> bytes:
        """
        Read the next chunk of a body, after C{read_response(head_only=True)}.

        :returns: the chunk's data, or C{b""} for the last chunk (its
            trailer section is read too).
        """
        size = int((await self._read_line()).split(b";")[0], 16)
        if size == 0:
            while await self._read_line():
                pass
            return b""
        data = await self._read_exactly(size)
        await self._read_line()
        return data

    async def wait_closed(self) -> None:
        """
        Wait until the server closes the connection.
        """
        if not self.closed:
            await self._on_close

    # WebSocket frames, for tests that need exact bytes on the wire.

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        """
        Send one masked WebSocket frame, as a client must (RFC 6455 section 5.3).
        """
        self.send(encode_frame(opcode, payload, fin=fin, rsv=rsv))

    async def read_frame(self) -> tuple[int, bytes]:
        """
        Read one unmasked frame from the server and return C{(opcode, payload)}.
        """
        header = await self._read_exactly(2)
        opcode = header[0] & 0x0F
        length = header[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._read_exactly(8))
        return opcode, await self._read_exactly(length)


async def read_frame_with_rsv(client: RawClient) -> tuple[int, int, bytes]:
    """
    Read one unmasked frame and return C{(rsv bits, opcode, payload)}.
    """
    header = await client._read_exactly(2)
    length = header[1] & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await client._read_exactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await client._read_exactly(8))
    payload = await client._read_exactly(length)
    return (header[0] >> 4) & 0b111, header[0] & 0x0F, payload


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """
    Encode a masked client frame.
    """
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return head + mask + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """
    Encode the payload of a Close frame.
    """
    return struct.pack("!H", code) + reason


def websocket_key() -> str:
    """
    Return a fresh random Sec-WebSocket-Key.
    """
    return base64.b64encode(os.urandom(16)).decode("ascii")


def expected_accept(key: str) -> str:
    """
    Compute the Sec-WebSocket-Accept for C{key} (RFC 6455 section 4.2.2).
    """
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode()


def upgrade_request(
    path: str = "/test",
    *,
    key: str | None = None,
    extra: str = "",
    upgrade: str = "websocket",
    connection: str = "Upgrade",
    version: str = "13",
    method: str = "GET",
) -> bytes:
    """
    Build the bytes of a WebSocket opening handshake.
    """
    key = key or websocket_key()
    return (
        f"{method} {path} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Upgrade: {upgrade}\r\n"
        f"Connection: {connection}\r\n"
        f"Sec-WebSocket-Version: {version}\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")


async def connect(port: int) -> RawClient:
    """
    Open a raw TCP connection to 127.0.0.1:C{port}.
    """
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())


async def open_websocket(port: int, path: str = "/test", extra: str = "") -> tuple[RawClient, Response]:
    """
    Connect and complete a WebSocket handshake; return the client and the 101.
    """
    client = await connect(port)
    client.send(upgrade_request(path, extra=extra))
    response = await client.read_response()
    return client, response


@dataclass
class LogCapture:
    """
    The log events emitted while a test ran.
    """

    events: list[dict] = field(default_factory=list)

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def with_format(self, fragment: str) -> list[dict]:
        """
        Return the events whose log_format contains C{fragment}.
        """
        return [event for event in self.events if fragment in (event.get("log_format") or "")]


def start_twistd(
    *arguments: str, timeout: float = 20.0, cwd: str | None = None
) -> tuple[subprocess.Popen, str]:
    """
    Start C{twistd -n desperados ARGUMENTS} in C{cwd} and wait for its startup line.

    :returns: the process and the address from the startup line, such as
        C{127.0.0.1:40123}.
    :raises RuntimeError: if the line does not appear within C{timeout}.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    process = subprocess.Popen(
        [twistd, "--nodaemon", "--pidfile=", "desperados", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    deadline = time.monotonic() + timeout
    output = b""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    # Read the pipe with os.read: a buffered readline() could pull the
    # startup line into Python's buffer, where select() no longer sees it.
    while time.monotonic() < deadline:
        ready, _, _ = select.select([descriptor], [], [], 0.1)
        if ready:
            data = os.read(descriptor, 65536)
            output += data
            match = re.search(rb"Running \S+ with desperados \S+ at (\S+) \(https?\)", output)
            if match:
                return process, match.group(1).decode()
            if not data and process.poll() is not None:
                break
    process.kill()
    process.wait()
    raise RuntimeError(f"twistd desperados did not start: {output.decode(errors='replace')}")


def stop_process(process: subprocess.Popen) -> int:
    """
    Stop a process started by a test with SIGTERM and return its exit status.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode
