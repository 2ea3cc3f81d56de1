"""
Load: thousands of concurrent WebSockets and HTTP keep-alive traffic on one server.

Run with C{pytest -m load -s}; the server is C{twistd desperados} in a child
process, so that it and this client can each use a core of their own.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time

import pytest
import pytest_twisted
from support import RawClient, close_payload, connect, upgrade_request
from twistd_process import TwistdProcess
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, DeferredSemaphore, ensureDeferred
from twisted.logger import LogLevel

pytestmark = pytest.mark.load

TEXT, CLOSE = 0x1, 0x8

WEBSOCKETS = int(os.environ.get("LOAD_WEBSOCKETS", "5000"))
ACTIVE_WEBSOCKETS = WEBSOCKETS // 10
MESSAGES_PER_WEBSOCKET = 20
HTTP_CONNECTIONS = 50
REQUESTS_PER_CONNECTION = 200
CONNECTS_AT_ONCE = 200
DRAIN_TIMEOUT = 60

# Each connection needs a descriptor in the server and one in this client.
NEEDED_DESCRIPTORS = WEBSOCKETS + HTTP_CONNECTIONS + 200


def _raise_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED_DESCRIPTORS:
        try:
            # Root may raise the hard limit too; the twistd child inherits it.
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (NEEDED_DESCRIPTORS, NEEDED_DESCRIPTORS)
            )
        except (ValueError, OSError):
            pytest.skip(
                f"needs an open-file limit of {NEEDED_DESCRIPTORS}, got {hard}; "
                "raise the hard limit (ulimit -Hn) and run again"
            )
        return
    if soft != resource.RLIM_INFINITY and soft < NEEDED_DESCRIPTORS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def _cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 of /proc/PID/stat: user and system time in clock ticks.
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _open_websocket(port: int) -> RawClient:
    client = await connect(port)
    client.send(upgrade_request("/load"))
    response = await client.read_response()
    if response.status != 101:
        raise AssertionError(f"expected 101, got {response.status}")
    return client


async def _echo_messages(client: RawClient, index: int) -> int:
    received = 0
    for number in range(MESSAGES_PER_WEBSOCKET):
        payload = f"message {number} on websocket {index} ".encode() * (1 + number % 8)
        client.send_frame(TEXT, payload)
        frame = await client.read_frame()
        if frame != (TEXT, payload):
            raise AssertionError(f"websocket {index}, message {number}: got {frame!r}")
        received += 1
    return received


async def _keep_alive_requests(port: int) -> int:
    client = await connect(port)
    answered = 0
    for number in range(REQUESTS_PER_CONNECTION):
        client.send(f"GET /page/{number} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        response = await client.read_response()
        if (response.status, response.body) != (404, b"not found"):
            raise AssertionError(f"request {number}: got {response!r}")
        answered += 1
    client.transport.loseConnection()
    return answered


async def _gather(deferreds) -> list:
    results = await DeferredList(
        list(deferreds), fireOnOneErrback=True, consumeErrors=True
    )
    return [value for _, value in results]


@pytest_twisted.ensureDeferred
async def test_thousands_of_websockets_with_traffic_and_drain():
    _raise_descriptor_limit()
    process = await TwistdProcess.start(
        "--listen=tcp:0:interface=127.0.0.1:backlog=1024",
        "--plug=apps.LoadApp",
        f"--drain-timeout={DRAIN_TIMEOUT}",
    )
    try:
        figures = await _run_load(process)
    finally:
        process.kill()

    print("\nload figures: " + json.dumps(figures))
    report = os.environ.get("LOAD_REPORT")
    if report:
        with open(report, "w") as output:
            json.dump(figures, output, indent=2)

    problems = [
        event
        for event in process.events
        if LogLevel.levelWithName(event["log_level"]["name"]) >= LogLevel.warn
    ]
    assert problems == []
    assert figures["websockets_opened"] == WEBSOCKETS
    assert figures["messages_echoed"] == ACTIVE_WEBSOCKETS * MESSAGES_PER_WEBSOCKET
    assert figures["http_responses"] == HTTP_CONNECTIONS * REQUESTS_PER_CONNECTION
    assert figures["close_1001_received"] == WEBSOCKETS
    assert process.exit_signal == signal.SIGTERM
    [draining] = process.with_format("draining {http} HTTP")
    assert draining["websockets"] == WEBSOCKETS
    assert process.with_format("drained all connections")


async def _run_load(process: TwistdProcess) -> dict:
    port = process.port()
    pid = process.transport.pid
    started = time.monotonic()
    warm_up = await _open_websocket(port)
    warm_up.transport.loseConnection()
    await warm_up.wait_closed()
    rss_before = _rss_kib(pid)
    server_cpu = [_cpu_seconds(pid)]
    client_cpu = [_own_cpu_seconds()]

    limit = DeferredSemaphore(CONNECTS_AT_ONCE)
    websockets = await _gather(
        limit.run(lambda: ensureDeferred(_open_websocket(port)))
        for _ in range(WEBSOCKETS)
    )
    opened = time.monotonic()
    rss_idle = _rss_kib(pid)
    server_cpu.append(_cpu_seconds(pid))
    client_cpu.append(_own_cpu_seconds())

    active = websockets[:ACTIVE_WEBSOCKETS]
    traffic = [_echo(client, index) for index, client in enumerate(active)]
    traffic += [_requests(port) for _ in range(HTTP_CONNECTIONS)]
    counts = await _gather(traffic)
    trafficked = time.monotonic()
    rss_after_traffic = _rss_kib(pid)
    server_cpu.append(_cpu_seconds(pid))
    client_cpu.append(_own_cpu_seconds())

    process.signal("TERM")
    closes = await _gather(_answer_close(client) for client in websockets)
    await process.ended.addTimeout(DRAIN_TIMEOUT + 10, reactor)
    stopped = time.monotonic()

    echoed = sum(counts[:ACTIVE_WEBSOCKETS])
    responses = sum(counts[ACTIVE_WEBSOCKETS:])
    return {
        "websockets_opened": len(websockets),
        "messages_echoed": echoed,
        "http_responses": responses,
        "close_1001_received": sum(closes),
        "rss_before_kib": rss_before,
        "rss_idle_kib": rss_idle,
        "rss_after_traffic_kib": rss_after_traffic,
        "rss_per_websocket_kib": round((rss_idle - rss_before) / len(websockets), 2),
        "open_seconds": round(opened - started, 2),
        "traffic_seconds": round(trafficked - opened, 2),
        "drain_seconds": round(stopped - trafficked, 2),
        "server_cpu_open_seconds": round(server_cpu[1] - server_cpu[0], 2),
        "server_cpu_traffic_seconds": round(server_cpu[2] - server_cpu[1], 2),
        "client_cpu_open_seconds": round(client_cpu[1] - client_cpu[0], 2),
        "client_cpu_traffic_seconds": round(client_cpu[2] - client_cpu[1], 2),
    }


def _echo(client: RawClient, index: int):
    return ensureDeferred(_echo_messages(client, index))


def _requests(port: int):
    return ensureDeferred(_keep_alive_requests(port))


def _answer_close(client: RawClient):
    async def answer() -> int:
        frame = await client.read_frame()
        client.send_frame(CLOSE, close_payload(1001))
        await client.wait_closed()
        return 1 if frame[0] == CLOSE and frame[1][:2] == close_payload(1001) else 0

    return ensureDeferred(answer())
