"""
CPU cost of one HTTP request and one WebSocket echo, in process, no sockets.

    bench/.venv/bin/python bench/micro.py [--profile SERVER:CASE]

Each case feeds exact bytes to a server protocol on a
C{twisted.internet.testing.StringTransport} and times it with
C{time.process_time}, so the figure is the server's own CPU time per request
or message and moves much less than a loopback benchmark when other
processes share the machine.  Cases run for desperados and for the
hand-written twisted.web and Autobahn code in bench/servers/twisted_web.py.
C{--profile SERVER:CASE} (such as C{desperados:http-new}) prints a cProfile
of one case instead.  C{--run SERVER:CASE --count N} runs one case N times
after a short warm-up, for instruction counts: the difference between two
runs under C{valgrind --tool=callgrind} with different counts, divided by
the difference in counts, is the number of instructions per request or
message.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
import zlib
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

sys.path.insert(0, str(Path(__file__).resolve().parent / "servers"))

import twisted_web  # noqa: E402

from desperados.server import make_site  # noqa: E402

REQUEST = (
    b"GET /some/path?x=1 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8082\r\n"
    b"User-Agent: micro\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)
UPGRADE = (
    b"GET /bench HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8082\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)
MASK = b"\x11\x22\x33\x44"


def masked_text_frame(payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    elif length < 65536:
        head = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return head + MASK + masked


# The Deferreds that the async servers below wait on, fired by async_case.
PENDING: list[Deferred] = []


async def async_404(conn, opts):
    """
    Send 404 after waiting once on a Deferred, as on a callLater(0).
    """
    waiting = Deferred()
    PENDING.append(waiting)
    await waiting
    return conn.send_resp(404, "not found").halt()


async def mixed_404(conn, opts):
    """
    Send 404, after waiting once on a Deferred for the path /slow only.
    """
    if conn.request_path == "/slow":
        waiting = Deferred()
        PENDING.append(waiting)
        await waiting
    return conn.send_resp(404, "not found").halt()


class AsyncNotFound(Resource):
    """
    The twisted.web floor of async_404: 404 once a Deferred fires.
    """

    isLeaf = True

    def render(self, request):
        def finish(_):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"not found")
            request.finish()

        waiting = Deferred()
        waiting.addCallback(finish)
        PENDING.append(waiting)
        return NOT_DONE_YET


def compressed_text_frame(payload: bytes) -> bytes:
    """
    Return a masked text frame with C{payload} compressed by permessage-deflate.

    Each frame is compressed on its own.  A client may always leave out
    context takeover (RFC 7692 section 7.1.1.2), so the same frame can be
    sent again and again on one connection.
    """
    compressor = zlib.compressobj(wbits=-15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    frame = masked_text_frame(data[:-4])  # without the 00 00 ff ff tail
    return bytes([frame[0] | 0x40]) + frame[1:]


def sites() -> dict[str, object]:
    channel_only = make_site(async_404)
    channel_only.http1_fast_path = False
    channel_mixed = make_site(mixed_404)
    channel_mixed.http1_fast_path = False
    return {
        "desperados": make_site(),
        "twisted": twisted_web.QuietSite(twisted_web.NotFound()),
        "autobahn": twisted_web.QuietSite(twisted_web.NotFoundOrWebSocket()),
        "desperados-async": make_site(async_404),
        "channel-async": channel_only,
        "twisted-async": twisted_web.QuietSite(AsyncNotFound()),
        "desperados-mixed": make_site(mixed_404),
        "channel-mixed": channel_mixed,
    }


def connect(site: object) -> tuple[object, StringTransport]:
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8082),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
    )
    protocol = site.buildProtocol(transport.getPeer())
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def http_case(site: object, count: int) -> float:
    """
    Seconds of CPU per keep-alive request answered with 404.
    """
    protocol, transport = connect(site)
    start = time.process_time()
    for index in range(count):
        protocol.dataReceived(REQUEST)
        if index % 64 == 0:
            if not transport.value().startswith(b"HTTP/1.1 404"):
                raise RuntimeError(f"expected a 404 response, got {transport.value()[:200]!r}")
            transport.clear()
    elapsed = time.process_time() - start
    transport.loseConnection()
    return elapsed / count


def new_connection_case(site: object, count: int) -> float:
    """
    Seconds of CPU per connection that sends one request with
    C{connection: close}, gets 404 and is closed: setup, request, teardown.
    """
    request = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    start = time.process_time()
    for index in range(count):
        protocol, transport = connect(site)
        protocol.dataReceived(request)
        answer = transport.value()
        if index % 64 == 0 and not answer.startswith(b"HTTP/1.1 404"):
            raise RuntimeError(f"expected a 404 response, got {answer[:200]!r}")
        protocol.connectionLost(Failure(ConnectionDone()))
    return (time.process_time() - start) / count


def async_case(site: object, count: int, every: int = 1) -> float:
    """
    Seconds of CPU per keep-alive request that gets a 404, where every
    C{every}th request goes to the path /slow.  The servers wait once on a
    Deferred, which this loop fires after the request, for all requests
    (async_404, AsyncNotFound) or for /slow (mixed_404).
    """
    slow = REQUEST.replace(b"/some/path?x=1", b"/slow")
    protocol, transport = connect(site)
    start = time.process_time()
    for index in range(count):
        protocol.dataReceived(slow if index % every == 0 else REQUEST)
        for waiting in PENDING:
            waiting.callback(None)
        PENDING.clear()
        if index % 64 == 0:
            if not transport.value().startswith(b"HTTP/1.1 404"):
                raise RuntimeError(f"expected a 404 response, got {transport.value()[:200]!r}")
            transport.clear()
            # A running reactor drops the cancelled response timeouts from
            # its queue of timed calls; this loop runs none otherwise.
            reactor.runUntilCurrent()
    elapsed = time.process_time() - start
    transport.loseConnection()
    return elapsed / count


def websocket_case(site: object, size: int, count: int, deflate: bool = False) -> float:
    """
    Seconds of CPU per echoed text message of C{size} bytes, compressed with
    permessage-deflate both ways when C{deflate} is true.
    """
    protocol, transport = connect(site)
    upgrade = UPGRADE
    if deflate:
        offer = b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        upgrade = UPGRADE.replace(b"\r\n\r\n", offer)
    protocol.dataReceived(upgrade)
    if not transport.value().startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade failed: {transport.value()[:300]!r}")
    if deflate and b"permessage-deflate" not in transport.value():
        answer = transport.value()[:300]
        raise RuntimeError(f"permessage-deflate not accepted: {answer!r}")
    transport.clear()
    websocket = transport.protocol
    payload = b"x" * size
    frame = compressed_text_frame(payload) if deflate else masked_text_frame(payload)
    expected = len(frame) - 4  # the echo is not masked
    start = time.process_time()
    for index in range(count):
        websocket.dataReceived(frame)
        if index % 64 == 0 and not deflate:
            if len(transport.value()) != expected:
                raise RuntimeError(f"unexpected echo: {transport.value()[:100]!r}")
        if index % 64 == 0 and deflate and transport.value()[:1] != b"\xc1":
            echo = transport.value()[:100]
            raise RuntimeError(f"expected a compressed text frame, got {echo!r}")
        transport.clear()
    return (time.process_time() - start) / count


CASES = {
    "http": (("desperados", "twisted", "autobahn"), lambda site, n: http_case(site, n), 4000),
    "http-new": (("desperados", "twisted"), lambda site, n: new_connection_case(site, n), 2000),
    "http-async": (
        ("desperados-async", "channel-async", "twisted-async"),
        lambda site, n: async_case(site, n),
        3000,
    ),
    "http-mixed": (
        ("desperados-mixed", "channel-mixed"),
        lambda site, n: async_case(site, n, every=4),
        4000,
    ),
    "ws16": (("desperados", "autobahn"), lambda site, n: websocket_case(site, 16, n), 8000),
    "ws16k": (("desperados", "autobahn"), lambda site, n: websocket_case(site, 16384, n), 3000),
    "ws16k-deflate": (("desperados", "autobahn"), lambda site, n: websocket_case(site, 16384, n, deflate=True), 3000),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="cProfile one case, such as desperados:ws16")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per case; the median is shown")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--run", help="time one case once, such as desperados:ws16")
    parser.add_argument("--count", type=int, default=1000, help="number of requests or messages that --run times")
    args = parser.parse_args()
    all_sites = sites()

    if args.run:
        name, _, case = args.run.partition(":")
        _, run, _ = CASES[case]
        run(all_sites[name], 200)
        seconds = run(all_sites[name], args.count)
        print(f"{args.run}: {seconds * 1e6:.1f} microseconds of CPU each")
        return 0

    if args.profile:
        name, _, case = args.profile.partition(":")
        _, run, count = CASES[case]
        run(all_sites[name], count // 4)
        profile = cProfile.Profile()
        profile.runcall(run, all_sites[name], count)
        pstats.Stats(profile).sort_stats("tottime").print_stats(35)
        return 0

    if not args.json:
        print(f"pid {os.getpid()}, {args.rounds} rounds, median microseconds of CPU")
    found = {}
    for case, (names, run, count) in CASES.items():
        figures = {}
        for name in names:
            run(all_sites[name], count // 4)  # warm up
        rounds = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                rounds[name].append(run(all_sites[name], count) * 1e6)
        for name in names:
            figures[name] = statistics.median(rounds[name])
            found[f"{name} {case}"] = figures[name]
        if args.json:
            continue
        first = names[0]
        if case in ("http-async", "http-mixed"):
            base_name = names[-1]
        else:
            base_name = "twisted" if case.startswith("http") else "autobahn"
        base = figures[base_name]
        text = ", ".join(f"{name} {value:.1f}" for name, value in figures.items())
        print(f"{case:6} {text}; {first}/{base_name} {figures[first] / base:.2f}")
    if args.json:
        print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
