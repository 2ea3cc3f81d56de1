"""
Blocking helpers for tests that run desperados in child processes.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from support import close_payload, encode_frame, upgrade_request

TESTS = Path(__file__).parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def child_env(**extra: str) -> dict[str, str]:
    """
    Return the environment for a child process that can import the tests.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.update(extra)
    return env


def free_port() -> int:
    """
    Return a TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str = "/", timeout: float = 30) -> tuple[int, bytes]:
    """
    Send one GET over a new connection and return the status and body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class BlockingWebSocket:
    """
    A WebSocket client on a blocking socket to 127.0.0.1.

    :ivar status: the status code of the handshake response.
    """

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""
        self.socket.sendall(upgrade_request())
        head = self._read_until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def _read_until(self, separator: bytes) -> bytes:
        while separator not in self._buffer:
            self._receive()
        head, self._buffer = self._buffer.split(separator, 1)
        return head

    def _read_exactly(self, length: int) -> bytes:
        while len(self._buffer) < length:
            self._receive()
        data, self._buffer = self._buffer[:length], self._buffer[length:]
        return data

    def _receive(self) -> None:
        data = self.socket.recv(65536)
        if not data:
            raise ConnectionError(f"closed by the server after {self._buffer!r}")
        self._buffer += data

    def send_text(self, data: bytes) -> None:
        """
        Send one masked text frame.
        """
        self.socket.sendall(encode_frame(0x1, data))

    def send_close(self, code: int) -> None:
        """
        Send a Close frame with C{code}.
        """
        self.socket.sendall(encode_frame(0x8, close_payload(code)))

    def read_frame(self) -> tuple[int, bytes]:
        """
        Read one unmasked frame and return C{(opcode, payload)}.

        :raises ConnectionError: if the server closes the connection first.
        :raises TimeoutError: if nothing arrives within the socket's timeout.
        """
        header = self._read_exactly(2)
        opcode = header[0] & 0x0F
        length = header[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exactly(8))
        return opcode, self._read_exactly(length)

    def ask(self, text: bytes) -> bytes:
        """
        Send a text message and return the payload of the next frame.
        """
        self.send_text(text)
        return self.read_frame()[1]

    def wait_closed(self) -> None:
        """
        Read until the server closes the connection.

        Autobahn's server aborts TCP once it has the reply to its own Close
        frame, so a reset counts as closed too.
        """
        try:
            while self.socket.recv(65536):
                pass
        except ConnectionResetError:
            pass

    def close(self) -> None:
        """
        Close the socket.
        """
        self.socket.close()


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    """
    Wait until something accepts connections on C{port}.

    :raises RuntimeError: if the process exits first or the time runs out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} seconds")


def read_events(path: Path) -> list[dict]:
    """
    Read the log events that L{json_observer} wrote, one JSON object a line.
    """
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        line = line.strip("\x1e").strip()
        if line:
            events.append(json.loads(line))
    return events


def wait_for_event(
    path: Path, fragment: str, count: int = 1, timeout: float = 30
) -> list[dict]:
    """
    Wait until C{count} events whose log_format contains C{fragment} were logged.

    :raises RuntimeError: if the time runs out.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e for e in read_events(path) if fragment in (e.get("log_format") or "")
        ]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} events with {fragment!r} in {path}")
        time.sleep(0.05)


def stop(process: subprocess.Popen, timeout: float = 30) -> int:
    """
    Send SIGTERM to C{process} and wait for it; SIGKILL it if it hangs.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def json_observer():
    """
    Return a log observer writing JSON events to the file named by C{TEST_LOG}.

    Pass it to twistd as C{--logger subprocesses.json_observer}.
    """
    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(open(os.environ["TEST_LOG"], "a"))
