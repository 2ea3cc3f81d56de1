"""
twistd desperados --workers: processes sharing one port, restarts, SIGHUP.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from subprocesses import (
    TWISTD,
    BlockingWebSocket,
    child_env,
    free_port,
    get,
    read_events,
    stop,
    wait_for_event,
)

from support import close_payload

# Starting Python with Twisted and Autobahn takes seconds on a busy machine.
START_TIMEOUT = 60
CLOSE = 0x8

pytestmark = pytest.mark.slow


def _start(tmp_path: Path, *options: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log = tmp_path / "log.json"
    process = subprocess.Popen(
        [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logger=subprocesses.json_observer",
            "desperados",
            "--plug=embedded_app.App",
            "--ip=127.0.0.1",
            f"--port={port}",
            *options,
        ],
        env=child_env(TEST_LOG=str(log)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    return process, port, log


def _worker_pids(log: Path) -> dict[int, list[int]]:
    """
    Return the pids the main process started, by worker index, oldest first.
    """
    pids: dict[int, list[int]] = {}
    for event in read_events(log):
        if event.get("log_format") == "started worker {index} as pid {pid}":
            pids.setdefault(event["index"], []).append(event["pid"])
    return pids


def _pid_of_a_request(port: int) -> int:
    status, body = get(port, "/pid")
    assert status == 200
    return int(body)


def _pid_while_another_worker_blocks(port: int) -> tuple[int, int]:
    """
    Send C{/block} and, while that worker sleeps, C{/pid}; return both pids.
    """
    blocked: list[int] = []
    thread = threading.Thread(
        target=lambda: blocked.append(int(get(port, "/block")[1]))
    )
    thread.start()
    # Give the first request time to reach a worker; it blocks there 0.3 s.
    time.sleep(0.1)
    other = _pid_of_a_request(port)
    thread.join()
    return blocked[0], other


@pytest.fixture
def workers(tmp_path: Path):
    processes = []

    def start(*options: str) -> tuple[subprocess.Popen, int, Path]:
        started = _start(tmp_path, *options)
        processes.append(started[0])
        return started

    yield start
    for process in processes:
        stop(process)


def test_workers_share_port_and_survive_kill(workers):
    process, port, log = workers("--workers=2")
    wait_for_event(log, "worker {index} serving", count=2, timeout=START_TIMEOUT)
    first_pids = _worker_pids(log)

    seen = set()
    for _ in range(10):
        seen.update(_pid_while_another_worker_blocks(port))
        if len(seen) == 2:
            break
    killed = first_pids[0][0]
    os.kill(killed, signal.SIGKILL)
    exits = wait_for_event(log, "exited unexpectedly")
    served_meanwhile = {_pid_of_a_request(port) for _ in range(10)}
    wait_for_event(log, "worker {index} serving", count=3, timeout=START_TIMEOUT)
    pids = _worker_pids(log)
    returncode = stop(process)

    assert seen == {first_pids[0][0], first_pids[1][0]}
    assert exits[0]["pid"] == killed
    assert exits[0]["index"] == 0
    assert exits[0]["status"] == "signal SIGKILL"
    assert exits[0]["delay"] == pytest.approx(0.1)
    assert killed not in served_meanwhile
    assert len(pids[0]) == 2
    assert pids[1] == first_pids[1]
    stopped = [
        e
        for e in read_events(log)
        if "stopping {count} workers" in e.get("log_format", "")
    ]
    assert stopped[0]["count"] == 2
    assert returncode == -signal.SIGTERM


def test_sighup_replaces_workers_without_failed_request(workers):
    process, port, log = workers("--workers=2")
    wait_for_event(log, "worker {index} serving", count=2, timeout=START_TIMEOUT)
    old_pids = {pids[0] for pids in _worker_pids(log).values()}

    results: list[object] = []
    done = threading.Event()

    def keep_sending() -> None:
        while not done.is_set():
            try:
                results.append(_pid_of_a_request(port))
            except Exception as error:  # noqa: BLE001 - every failure counts
                results.append(error)

    client = threading.Thread(target=keep_sending)
    client.start()
    try:
        os.kill(process.pid, signal.SIGHUP)
        wait_for_event(log, "all workers replaced", timeout=START_TIMEOUT)
        wait_for_event(
            log, "worker {index} (pid {pid}) stopped", count=2, timeout=START_TIMEOUT
        )
        after_replacement = len(results)
        while len(results) < after_replacement + 20 and client.is_alive():
            time.sleep(0.05)
    finally:
        done.set()
        client.join()
    new_pids = {pids[-1] for pids in _worker_pids(log).values()}
    stop(process)

    failures = [result for result in results if not isinstance(result, int)]
    assert failures == []
    assert len(results) > 20
    assert new_pids.isdisjoint(old_pids)
    assert set(results[after_replacement:]) <= new_pids
    stopped = {
        e["pid"]
        for e in read_events(log)
        if "(pid {pid}) stopped" in e.get("log_format", "")
    }
    assert old_pids <= stopped


def _wait_until_replaced(log: Path, old_pid: int) -> None:
    for count in (1, 2):
        replaced = wait_for_event(
            log, "replaced worker {index}", count=count, timeout=START_TIMEOUT
        )
        if any(event["old_pid"] == old_pid for event in replaced):
            return


def _wait_until_old_workers_stop_accepting(log: Path) -> None:
    # The last old worker gets SIGUSR1 when "all workers replaced" is logged,
    # and may accept one more connection before it handles the signal.
    wait_for_event(log, "all workers replaced", timeout=START_TIMEOUT)
    wait_for_event(
        log, "stopped accepting connections", count=2, timeout=START_TIMEOUT
    )


def _events_of(log: Path, fragment: str, pid: int) -> list[dict]:
    return [
        event
        for event in read_events(log)
        if fragment in event.get("log_format", "") and event.get("worker_pid") == pid
    ]


def test_sighup_lets_open_websocket_finish(workers):
    process, port, log = workers("--workers=2", "--drain-timeout=10")
    wait_for_event(log, "worker {index} serving", count=2, timeout=START_TIMEOUT)
    old_pids = {pids[0] for pids in _worker_pids(log).values()}

    # The socket timeout bounds every read, and is longer than the drain.
    websocket = BlockingWebSocket(port, timeout=START_TIMEOUT)
    try:
        old_pid = int(websocket.ask(b"pid"))
        os.kill(process.pid, signal.SIGHUP)
        _wait_until_replaced(log, old_pid)
        echo_after_replacement = websocket.ask(b"still open")
        _wait_until_old_workers_stop_accepting(log)
        new_pids = {pids[-1] for pids in _worker_pids(log).values()}
        fresh = BlockingWebSocket(port, timeout=START_TIMEOUT)
        fresh_pid = int(fresh.ask(b"pid"))
        fresh.close()
        close_frame = websocket.read_frame()
        websocket.send_close(1001)
        websocket.wait_closed()
    finally:
        websocket.close()
    wait_for_event(
        log, "worker {index} (pid {pid}) stopped", count=2, timeout=START_TIMEOUT
    )
    stop(process)

    assert websocket.status == 101
    assert old_pid in old_pids
    assert echo_after_replacement == b"still open"
    assert fresh_pid in new_pids
    assert fresh_pid not in old_pids
    assert close_frame == (CLOSE, close_payload(1001, b"server shutdown"))
    [draining] = _events_of(log, "letting {websockets} WebSocket", old_pid)
    assert draining["websockets"] == 1
    [timed_out] = _events_of(log, "drain timed out", old_pid)
    assert timed_out["websockets"] == 1
    [terminated] = _events_of(log, "WebSocket handler terminated", old_pid)
    assert terminated["kind"] == "shutdown"
    assert terminated["code"] == 1001


def test_sigterm_closes_websockets_at_once(workers):
    # The drain timeout is far longer than the socket timeout of the reads
    # below, so only a Close frame sent when the drain starts arrives in time.
    process, port, log = workers("--workers=2", "--drain-timeout=600")
    wait_for_event(log, "worker {index} serving", count=2, timeout=START_TIMEOUT)

    replaced = BlockingWebSocket(port, timeout=START_TIMEOUT)
    serving = None
    try:
        replaced_pid = int(replaced.ask(b"pid"))
        os.kill(process.pid, signal.SIGHUP)
        _wait_until_old_workers_stop_accepting(log)
        serving = BlockingWebSocket(port, timeout=START_TIMEOUT)
        serving_pid = int(serving.ask(b"pid"))
        echo = replaced.ask(b"still open")

        process.send_signal(signal.SIGTERM)
        close_frames = []
        for websocket in (replaced, serving):
            close_frames.append(websocket.read_frame())
            websocket.send_close(1001)
            websocket.wait_closed()
        returncode = process.wait(timeout=START_TIMEOUT)
    finally:
        replaced.close()
        if serving is not None:
            serving.close()
        stop(process)

    assert replaced_pid != serving_pid
    assert echo == b"still open"
    assert close_frames == [(CLOSE, close_payload(1001, b"server shutdown"))] * 2
    for pid in (replaced_pid, serving_pid):
        [terminated] = _events_of(log, "WebSocket handler terminated", pid)
        assert terminated["kind"] == "shutdown"
        assert _events_of(log, "drain timed out", pid) == []
    assert returncode == -signal.SIGTERM


def test_workers_option_is_checked():
    from twisted.python.usage import UsageError

    from twisted.plugins.desperados_plugin import Options

    for value in ("0", "-1", "many"):
        with pytest.raises(UsageError, match="--workers"):
            Options().parseOptions([f"--workers={value}"])
    with pytest.raises(UsageError, match="UNIX socket"):
        Options().parseOptions(["--workers=2", "--listen=unix:/tmp/x.sock"])
    auto = Options()
    auto.parseOptions(["--workers=auto"])
    assert auto["worker-count"] == len(os.sched_getaffinity(0))


def test_metrics_add_up_over_workers(workers):
    from prometheus_client.parser import text_string_to_metric_families

    process, port, log = workers("--workers=2", "--plug=embedded_app.MetricsApp")
    wait_for_event(log, "worker {index} serving", count=2, timeout=START_TIMEOUT)

    seen = set()
    for _ in range(5):
        seen.update(_pid_while_another_worker_blocks(port))
    status, body = get(port, "/metrics")
    stop(process)

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert status == 200
    assert len(seen) == 2
    assert (
        samples[
            ("desperados_http_requests_total", (("method", "GET"), ("status", "200")))
        ]
        == 10
    )


def test_crashing_worker_restarts_with_growing_delay(workers):
    process, port, log = workers("--workers=2", "--plug=embedded_app.does_not_exist")
    deadline = time.monotonic() + 2 * START_TIMEOUT
    first_worker: list[dict] = []
    while len(first_worker) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        first_worker = [
            event
            for event in read_events(log)
            if "exited unexpectedly" in event.get("log_format", "")
            and event["index"] == 0
        ]
    stop(process)

    assert [event["delay"] for event in first_worker[:2]] == pytest.approx([0.1, 0.2])
    assert first_worker[0]["status"] == "exit code 1"


def test_workers_serve_tls_behind_proxy_protocol(workers, tls_files):
    listen_port = free_port()
    process, _, log = workers(
        "--workers=2",
        f"--listen=haproxy:tcp:{listen_port}:interface=127.0.0.1",
        "--scheme=https",
        f"--certfile={tls_files.certfile}",
        f"--keyfile={tls_files.keyfile}",
    )
    wait_for_event(log, "worker {index} serving", count=2, timeout=START_TIMEOUT)

    context = ssl.create_default_context(cadata=tls_files.certificate_pem.decode())
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", listen_port), timeout=30) as raw:
        raw.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 443\r\n")
        with context.wrap_socket(raw) as secure:
            secure.sendall(
                b"GET /client HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            response = b""
            while chunk := secure.recv(65536):
                response += chunk
    stop(process)

    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b"\r\n\r\nhttps 198.51.100.9")
