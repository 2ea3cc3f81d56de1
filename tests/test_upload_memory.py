"""
A 100 MB upload streamed through read_body to a twistd child process, whose
memory must stay flat, over HTTP/1.1 and over HTTP/2.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from http2_support import connect_h2
from support import connect
from twisted.web.client import FileBodyProducer
from twistd_process import TwistdProcess

UPLOAD_BYTES = 100 * 1024 * 1024


class _Filler:
    """
    A file of C{size} bytes of filler, read without being held in memory.
    """

    def __init__(self, size: int) -> None:
        self.remaining = size

    def read(self, length: int) -> bytes:
        length = min(length, self.remaining)
        self.remaining -= length
        return b"u" * length

    def close(self) -> None:
        pass


def _peak_rss_kib(pid: int) -> int:
    # VmHWM is the peak resident set size of the process so far (proc(5)).
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for process {pid}")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_100_mb_upload_keeps_memory_flat():
    process = await TwistdProcess.start(
        "--port=0",
        "--ip=127.0.0.1",
        "--plug=apps.count_upload",
        "--max-body-size=none",
    )
    try:
        pid = process.transport.pid
        client = await connect(process.port())
        # A first small upload loads every module the upload path needs.
        client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc")
        warm = await client.read_response()
        peak_before = _peak_rss_kib(pid)

        client.send(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
            % UPLOAD_BYTES
        )
        # The producer waits while the socket buffer is full, so the
        # test process never keeps the whole body in memory either.
        sender = FileBodyProducer(_Filler(UPLOAD_BYTES), readSize=65536)
        client.transport.registerProducer(sender, True)
        await sender.startProducing(client.transport)
        client.transport.unregisterProducer()
        response = await client.read_response()
        peak_after = _peak_rss_kib(pid)
        client.transport.loseConnection()
    finally:
        process.kill()
        await process.ended

    print(
        f"\nserver peak RSS {peak_before} KiB before and {peak_after} KiB after "
        f"a {UPLOAD_BYTES // (1024 * 1024)} MiB upload"
    )
    assert warm.body == b"3"
    assert response.status == 200
    assert response.body == str(UPLOAD_BYTES).encode()
    assert peak_after - peak_before < 50 * 1024


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_100_mb_http2_upload_keeps_memory_flat():
    process = await TwistdProcess.start(
        "--port=0",
        "--ip=127.0.0.1",
        "--plug=apps.count_upload",
        "--max-body-size=none",
    )
    try:
        pid = process.transport.pid
        client = await connect_h2(process.port())
        warm = await client.response(client.request("/", method="POST", body=b"abc"))
        peak_before = _peak_rss_kib(pid)

        # The stream's flow-control window is the backpressure: send_body
        # waits for WINDOW_UPDATE, which the server sends as the plug reads.
        stream_id = client.start_request("/")
        block = b"u" * (1024 * 1024)
        for _ in range(UPLOAD_BYTES // len(block)):
            await client.send_body(stream_id, block, end_stream=False)
        client.conn.end_stream(stream_id)
        client.flush()
        response = await client.response(stream_id)
        peak_after = _peak_rss_kib(pid)
        client.transport.loseConnection()
    finally:
        process.kill()
        await process.ended

    print(
        f"\nserver peak RSS {peak_before} KiB before and {peak_after} KiB after "
        f"a {UPLOAD_BYTES // (1024 * 1024)} MiB upload over HTTP/2"
    )
    assert warm.body == b"3"
    assert response.status == 200
    assert response.body == str(UPLOAD_BYTES).encode()
    assert peak_after - peak_before < 50 * 1024
