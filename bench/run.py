#!/usr/bin/env python3
"""
Benchmark desperados against its own floors and the servers users pick instead.

    python3 bench/run.py            # full run: 3 repetitions, writes BENCHMARKS.md
    python3 bench/run.py --quick    # one short repetition, for development

The script installs what it needs (bench/.venv with the Python servers,
Debian's wrk, nginx and h2load, the ``ws`` npm package), starts every server
itself on 127.0.0.1 pinned to CPU 0, runs the load generators pinned to CPU 1,
and stops every process it started, by PID, when it ends or is interrupted.
Only the standard library is used here, so any Python 3.10+ runs it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import queue
import re
import shlex
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SERVERS = BENCH / "servers"
SERVER_CPU = "0"
CLIENT_CPU = "1"
MARK_BEGIN = "<!-- bench/run.py writes from here -->"
MARK_END = "<!-- bench/run.py writes up to here -->"
DEBIAN_TOOLS = {"wrk": "wrk", "nginx": "nginx-light", "h2load": "nghttp2-client"}
PYTHON_MODULES = (
    "daphne", "uvicorn", "httptools", "uvloop", "aiohttp", "hypercorn", "pytest_benchmark"
)
VERSIONS = (
    "Twisted",
    "autobahn",
    "h2",
    "daphne",
    "uvicorn",
    "httptools",
    "uvloop",
    "websockets",
    "aiohttp",
    "hypercorn",
)


# Processes

_started: list[subprocess.Popen] = []


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(argv: list[str], cpu: str, **kwargs) -> subprocess.Popen:
    """
    Start C{argv} pinned to C{cpu} in its own process group and remember it.
    """
    process = subprocess.Popen(
        ["taskset", "-c", cpu, *argv],
        start_new_session=True,
        preexec_fn=_raise_fd_limit,
        **kwargs,
    )
    _started.append(process)
    return process


def stop(process: subprocess.Popen) -> None:
    """
    Stop a process started by L{spawn}, and its children, by its group id.
    """
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    if process in _started:
        _started.remove(process)


def stop_all() -> None:
    for process in list(_started):
        stop(process)


def _on_signal(signum: int, frame: object) -> None:
    stop_all()
    sys.exit(128 + signum)


def tree_pids(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry))
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children.get(current, []))
    return pids


def cpu_seconds(pid: int) -> float:
    """
    CPU time used so far by C{pid} and its children still running.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for each in tree_pids(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def rss_kib(pid: int) -> int:
    total = 0
    for each in tree_pids(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match:
            total += int(match.group(1))
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port}:\n{log.read_text()}")


def run(argv: list[str], **kwargs) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs).stdout


# Setup


@dataclass
class Setup:
    venv: Path
    work: Path
    cert: Path = field(init=False)
    key: Path = field(init=False)

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def ensure_tools(setup: Setup) -> None:
    """
    Install whatever is missing: Debian tools, node's ws, the bench venv.
    """
    missing = [pkg for tool, pkg in DEBIAN_TOOLS.items() if not shutil.which(tool)]
    if not shutil.which("node") or not shutil.which("npm"):
        missing += ["nodejs", "npm"]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"missing Debian packages {missing}: install them, or run as root")
        print(f"installing {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)

    if not (BENCH / "node_modules" / "ws" / "package.json").exists():
        print("installing the ws npm package", flush=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=BENCH, check=True)

    if not Path(setup.python).exists():
        print(f"creating {setup.venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(setup.venv)], check=True)
    check = (
        f"import {', '.join(PYTHON_MODULES)}, desperados, pathlib; "
        f"assert pathlib.Path(desperados.__file__).is_relative_to({str(ROOT)!r})"
    )
    if subprocess.run([setup.python, "-c", check], capture_output=True).returncode:
        print(f"installing desperados and the other servers into {setup.venv}", flush=True)
        pip = [setup.python, "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", str(ROOT), "-r", str(BENCH / "requirements.txt")], check=True)

    setup.cert, setup.key = setup.work / "cert.pem", setup.work / "key.pem"
    run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-keyout", str(setup.key), "-out", str(setup.cert),
        ]
    )  # fmt: skip


def versions(setup: Setup) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json, sys; "
        f"names = {list(VERSIONS)!r}; "
        "print(json.dumps({'Python': sys.version.split()[0], "
        "**{n: m.version(n) for n in names}}))"
    )
    found = json.loads(run([setup.python, "-c", script]))
    found["desperados"] = run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]).strip()
    found["nginx"] = subprocess.run(
        ["nginx", "-v"], capture_output=True, text=True
    ).stderr.strip().rpartition("/")[2]
    found["wrk"] = _wrk_version()
    found["h2load"] = run(["h2load", "--version"]).split()[-1]
    found["node"] = run(["node", "--version"]).strip()
    found["ws (npm)"] = json.loads((BENCH / "node_modules/ws/package.json").read_text())["version"]
    return found


def _wrk_version() -> str:
    output = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (output.stdout + output.stderr).split()[1]


def machine() -> dict[str, str]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {
        "cpu": f"{model}, {os.cpu_count()} CPUs",
        "kernel": platform.release(),
    }


def other_load() -> dict[str, object]:
    """
    The load average and the busiest processes that this run did not start.
    """
    ours = {os.getpid()}
    for process in _started:
        ours.update(tree_pids(process.pid))
    output = run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu", "--no-headers"])
    busy = []
    for line in output.splitlines():
        pid, pcpu, args = line.split(None, 2)
        if int(pid) not in ours and float(pcpu) >= 5.0:
            name = _program_name(args)
            if name != "ps":
                busy.append(f"{name} ({pcpu}%)")
    return {
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "busy": busy[:8],
    }


def _program_name(args: str) -> str:
    """
    Name a process by its program, looking past the Python interpreter.
    """
    words = [Path(word).name for word in args.split()[:4]]
    for index, word in enumerate(words):
        if word == "-m" and index + 1 < len(words):
            return words[index + 1]
        if word == "-c":
            return "python -c"
        if not word.startswith("python") and not word.startswith("-"):
            return word
    return words[0] if words else "?"


# Servers


@dataclass
class Server:
    """
    One server under test: how to start it and which scenarios it takes part in.
    """

    name: str
    label: str
    kinds: tuple[str, ...]
    argv: object  # callable (setup, port, tls) -> list[str]
    cwd: Path = SERVERS


def _desperados(setup: Setup, port: int, tls: bool) -> list[str]:
    argv = [setup.bin("twistd"), "--nodaemon", "--pidfile=", "desperados"]
    if tls:
        listen = f"ssl:{port}:interface=127.0.0.1:privateKey={setup.key}:certKey={setup.cert}"
        return [*argv, "--listen", listen]
    return [*argv, "--ip", "127.0.0.1", "--port", str(port)]


def _nginx(setup: Setup, port: int, tls: bool) -> list[str]:
    prefix = setup.work / "nginx"
    prefix.mkdir(exist_ok=True)
    config = (SERVERS / "nginx.conf").read_text()
    for name, value in {
        "PREFIX": prefix,
        "HTTP_PORT": port,
        "TLS_PORT": free_port(),
        "CERT": setup.cert,
        "KEY": setup.key,
    }.items():
        config = config.replace(name, str(value))
    if tls:
        config = config.replace(f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{free_port()};")
        config = re.sub(r"listen 127.0.0.1:\d+ ssl", f"listen 127.0.0.1:{port} ssl", config)
    (prefix / "nginx.conf").write_text(config)
    return ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]


ALL_SERVERS = [
    Server("desperados", "desperados (twistd, default pipeline)", ("http", "ws", "memory", "h2"), _desperados),
    Server(
        "twisted",
        "plain twisted.web (leaf Resource, 404)",
        ("http",),
        lambda s, port, tls: [s.python, "twisted_web.py", "plain", str(port)],
    ),
    Server(
        "autobahn",
        "twisted.web + Autobahn WebSocketResource, hand-written",
        ("http", "ws", "memory"),
        lambda s, port, tls: [s.python, "twisted_web.py", "autobahn", str(port)],
    ),
    Server(
        "daphne",
        "Daphne",
        ("http", "ws", "memory"),
        lambda s, port, tls: [s.bin("daphne"), "-v", "0", "-b", "127.0.0.1", "-p", str(port), "asgi_app:app"],
    ),
    Server(
        "uvicorn",
        "uvicorn (httptools, uvloop, websockets)",
        ("http", "ws", "memory"),
        lambda s, port, tls: [
            s.bin("uvicorn"), "asgi_app:app", "--host", "127.0.0.1", "--port", str(port),
            "--http", "httptools", "--loop", "uvloop", "--ws", "websockets",
            "--lifespan", "off", "--no-access-log", "--log-level", "warning",
        ],
    ),
    Server(
        "aiohttp",
        "aiohttp",
        ("http", "ws", "memory"),
        lambda s, port, tls: [s.python, "aiohttp_app.py", str(port)],
    ),
    Server("nginx", "nginx (`return 404`)", ("http", "h2"), _nginx),
    Server(
        "hypercorn",
        "hypercorn",
        ("h2",),
        lambda s, port, tls: [
            s.bin("hypercorn"), "--bind", f"127.0.0.1:{port}", "--certfile", str(s.cert),
            "--keyfile", str(s.key), "--log-level", "warning", "asgi_app:app",
        ],
    ),
]  # fmt: skip


class Running:
    """
    A started server: its process, port and log file.
    """

    def __init__(self, server: Server, setup: Setup, tls: bool = False) -> None:
        self.server = server
        self.port = free_port()
        self.log = setup.work / f"{server.name}{'-tls' if tls else ''}.log"
        self.argv = server.argv(setup, self.port, tls)
        with self.log.open("w") as log:
            self.process = spawn(self.argv, SERVER_CPU, cwd=server.cwd, stdout=log, stderr=log)
        wait_for_port(self.port, self.process, self.log)
        time.sleep(0.3)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.server.name} died:\n{self.log.read_text()}")

    def settle(self) -> None:
        """
        Wait until the server is idle (below 5% CPU over 0.5 s), at most 10 s.
        """
        for _ in range(20):
            before = cpu_seconds(self.pid)
            time.sleep(0.5)
            if cpu_seconds(self.pid) - before < 0.025:
                return

    def stop(self) -> None:
        stop(self.process)


# Load generators

WRK_CELLS = {
    "ka50": ("keep-alive, 50 conns", ["-c50"]),
    "ka1": ("keep-alive, 1 conn", ["-c1"]),
    "new50": ("new connection per request, 50 conns", ["-c50", "-H", "Connection: close"]),
}
WS_CELLS = {
    f"{mode}-{size}-{conns}": (mode, size, conns)
    for conns in (50, 1)
    for mode in ("pingpong", "burst")
    for size in (16, 16384)
}
# Offered by the client with its defaults; servers that decline it echo
# uncompressed, and the page says which.
DEFLATE_CELLS = {"deflate-16384-50": ("pingpong", 16384, 50)}
H2_CELLS = {
    "h2-50x10": ("50 conns x 10 streams", ["-c50", "-m10"]),
    "h2-1x1": ("1 conn x 1 stream", ["-c1", "-m1"]),
}


def _finish_client(process: subprocess.Popen) -> tuple[float, int]:
    """
    Reap a load generator: its CPU seconds and exit status (via wait4).
    """
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process in _started:
        _started.remove(process)
    return usage.ru_utime + usage.ru_stime, process.returncode


def wrk(server: Running, extra: list[str], seconds: float, warmup: float) -> dict:
    url = f"http://127.0.0.1:{server.port}/"
    if warmup:
        warm = spawn(["wrk", "-t1", "-c50", f"-d{max(1, round(warmup))}s", url], CLIENT_CPU, stdout=subprocess.DEVNULL)
        _finish_client(warm)
    argv = ["wrk", "-t1", *extra, f"-d{max(1, round(seconds))}s", url]
    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    process = spawn(argv, CLIENT_CPU, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    client_cpu, status = _finish_client(process)
    wall = time.monotonic() - t0
    server_cpu = (cpu_seconds(server.pid) - cpu0) / wall
    if status:
        raise RuntimeError(f"wrk failed ({status}):\n{output}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    error_count = sum(int(n) for n in errors.groups()) if errors else 0
    return {
        "rate": rate,
        "requests": total,
        "errors": error_count,
        "client_cpu": client_cpu / wall,
        "server_cpu": server_cpu,
        "command": shlex.join([*argv[:-1], "URL"]),
    }


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _expect(lines: queue.Queue, wanted: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"load client said nothing like {wanted!r} in {timeout}s") from None
        if line is None:
            raise RuntimeError(f"load client ended before saying {wanted!r}")
        if line.startswith(wanted) or line.startswith('{"error"'):
            return line


def ws_load(
    server: Running, mode: str, size: int, conns: int, seconds: float, warmup: float, deflate: bool = False
) -> dict:
    url = f"ws://127.0.0.1:{server.port}/bench"
    argv = ["node", str(BENCH / "wsload.js"), url, mode, str(conns), str(size), str(warmup), str(seconds)]
    if deflate:
        argv.append("deflate")
    process = spawn(argv, CLIENT_CPU, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    done = False
    try:
        line = _expect(lines, "measure start", 60 + warmup)
        if line.startswith('{"error"'):
            raise RuntimeError(f"{server.server.name}: {line}")
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        _expect(lines, "measure end", seconds + 30)
        server_cpu = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        result = json.loads(_expect(lines, "{", 30))
        done = True
    finally:
        if not done:
            stop(process)
    _finish_client(process)
    if "error" in result:
        raise RuntimeError(f"{server.server.name}: {result['error']}")
    return {
        "rate": result["rate"],
        "client_cpu": result["client_cpu"],
        "server_cpu": server_cpu,
        "deflate": result.get("deflate", False),
        "command": shlex.join(["node", "bench/wsload.js", "URL", *argv[3:]]),
    }


def idle_memory(server: Running, conns: int) -> dict:
    """
    Server RSS added per idle WebSocket with C{conns} connections open.
    """
    ws_load(server, "pingpong", 16, 50, 1, 0.5)  # warm the code paths
    server.settle()
    before = rss_kib(server.pid)
    url = f"ws://127.0.0.1:{server.port}/bench"
    argv = ["node", str(BENCH / "wsload.js"), url, "idle", str(conns), "16"]
    process = spawn(argv, CLIENT_CPU, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    done = False
    try:
        line = _expect(lines, "open", 300)
        if line.startswith('{"error"'):
            raise RuntimeError(f"{server.server.name}: {line}")
        server.settle()
        after = rss_kib(server.pid)
        process.stdin.close()
        done = True
    finally:
        if not done:
            stop(process)
    _finish_client(process)
    server.settle()
    return {
        "rate": (after - before) / conns,
        "before_kib": before,
        "after_kib": after,
        "command": shlex.join(["node", "bench/wsload.js", "URL", *argv[3:]]),
    }


def h2load(server: Running, extra: list[str], seconds: float, warmup: float) -> dict:
    url = f"https://127.0.0.1:{server.port}/"
    argv = ["h2load", "-t1", *extra, f"-D{max(1, round(seconds))}"]
    if warmup:
        argv.append(f"--warm-up-time={max(1, round(warmup))}")
    argv.append(url)
    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    process = spawn(argv, CLIENT_CPU, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    client_cpu, status = _finish_client(process)
    wall = time.monotonic() - t0
    protocol = re.search(r"Application protocol: (\S+)", output)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored", output)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    if status or not protocol or protocol.group(1) != "h2" or not rate or not done or int(done.group(1)) == 0:
        raise RuntimeError(f"h2load against {server.server.name} failed ({status}):\n{output[-1500:]}")
    return {
        "rate": float(rate.group(1)),
        "errors": int(done.group(3)),
        "client_cpu": client_cpu / wall,
        "server_cpu": (cpu_seconds(server.pid) - cpu0) / wall,
        "command": shlex.join([*argv[:-1], "URL"]),
    }


# The run


@dataclass
class Plan:
    reps: int
    seconds: float
    warmup: float
    memory_conns: int
    servers: list[Server]
    kinds: set[str]


def measure(plan: Plan, setup: Setup, results: dict, failures: dict) -> None:
    """
    Run every cell C{plan.reps} times, the servers interleaved in each round.
    """
    for rep in range(plan.reps):
        # Rotate the order so no server always runs right after the same one.
        shift = rep % len(plan.servers)
        order = plan.servers[shift:] + plan.servers[:shift]
        if "micro" in plan.kinds:
            _record_micro(setup, results, failures)
        for server in order:
            if plan.kinds & {"http", "ws", "memory"} & set(server.kinds):
                _measure_plain(plan, setup, server, results, failures)
            if "h2" in plan.kinds and "h2" in server.kinds:
                _measure_h2(plan, setup, server, results, failures)
        print(f"round {rep + 1}/{plan.reps} done; load average {other_load()['loadavg']}", flush=True)


def _record(results: dict, failures: dict, server: Server, cell: str, job) -> None:
    try:
        result = job()
    except Exception as error:  # one broken cell must not end the run
        failures.setdefault((server.name, cell), str(error)[:2000])
        print(f"  {server.name} {cell}: FAILED {str(error)[:300]}", flush=True)
        return
    results.setdefault((server.name, cell), []).append(result)
    print(
        f"  {server.name:10} {cell:22} {result['rate']:10.1f}"
        f"  server cpu {result.get('server_cpu', 0):4.0%}  client cpu {result.get('client_cpu', 0):4.0%}",
        flush=True,
    )


MICRO_CASES = {
    "http": ("HTTP 404, keep-alive", "twisted"),
    "http-new": ("HTTP 404, new connection per request", "twisted"),
    "ws16": ("WebSocket echo, 16 B text", "autobahn"),
    "ws16k": ("WebSocket echo, 16 KiB text", "autobahn"),
}


def _record_micro(setup: Setup, results: dict, failures: dict) -> None:
    """
    Run bench/micro.py once: CPU time per request and per echo, in process.
    """
    argv = [setup.python, str(BENCH / "micro.py"), "--json", "--rounds", "3"]
    try:
        output = run(["taskset", "-c", SERVER_CPU, *argv], cwd=ROOT)
        found = json.loads(output.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError) as error:
        failures.setdefault(("micro", "run"), str(getattr(error, "stderr", "") or error)[:2000])
        print(f"  micro: FAILED {str(error)[:300]}", flush=True)
        return
    for key, microseconds in found.items():
        name, case = key.split()
        results.setdefault((f"micro-{name}", case), []).append({"rate": microseconds})
    print("  micro: " + ", ".join(f"{key} {value:.1f} us" for key, value in found.items()), flush=True)


def _micro_table(results: dict) -> list[str]:
    rows = []
    for case, (label, floor) in MICRO_CASES.items():
        ours = _median(results, "micro-desperados", case)
        theirs = _median(results, f"micro-{floor}", case)
        if ours is None or theirs is None:
            continue
        speed = statistics.median(
            b["rate"] / a["rate"]
            for a, b in zip(results[("micro-desperados", case)], results[(f"micro-{floor}", case)])
        )
        rows.append(f"| {label} | {ours:.1f} µs | {floor} | {theirs:.1f} µs | {speed:.2f}x |")
    if not rows:
        return []
    return [
        "",
        "### CPU time per request or message, in process",
        "",
        "`bench/micro.py` feeds exact bytes to each server's protocol on an in-memory"
        " transport and times `time.process_time`: the server's own CPU cost, without"
        " sockets or the load generator, which moves far less than the loopback figures"
        " when other work shares the machine. Speed is the floor's time divided by"
        " desperados' (above 1.00x, desperados needs less CPU).",
        "",
        "| case | desperados | floor | floor's time | speed |",
        "| --- | ---: | --- | ---: | ---: |",
        *rows,
    ]


def _measure_plain(plan: Plan, setup: Setup, server: Server, results: dict, failures: dict) -> None:
    try:
        running = Running(server, setup)
    except RuntimeError as error:
        failures.setdefault((server.name, "start"), str(error)[:2000])
        print(f"  {server.name}: could not start: {str(error)[:300]}", flush=True)
        return
    results.setdefault(("argv", server.name), [" ".join(running.argv)])
    try:
        if "memory" in plan.kinds and "memory" in server.kinds:
            _record(results, failures, server, "memory", lambda: idle_memory(running, plan.memory_conns))
        if "http" in plan.kinds and "http" in server.kinds:
            for cell, (_, extra) in WRK_CELLS.items():
                _record(results, failures, server, cell, lambda: wrk(running, extra, plan.seconds, plan.warmup))
                running.check_alive()
        if "ws" in plan.kinds and "ws" in server.kinds:
            for cell, (mode, size, conns) in WS_CELLS.items():
                _record(
                    results, failures, server, cell,
                    lambda: ws_load(running, mode, size, conns, plan.seconds, plan.warmup),
                )  # fmt: skip
                running.check_alive()
            for cell, (mode, size, conns) in DEFLATE_CELLS.items():
                _record(
                    results, failures, server, cell,
                    lambda: ws_load(running, mode, size, conns, plan.seconds, plan.warmup, True),
                )  # fmt: skip
                running.check_alive()
    finally:
        running.stop()


def _measure_h2(plan: Plan, setup: Setup, server: Server, results: dict, failures: dict) -> None:
    try:
        running = Running(server, setup, tls=True)
    except RuntimeError as error:
        failures.setdefault((server.name, "h2 start"), str(error)[:2000])
        print(f"  {server.name} (TLS): could not start: {str(error)[:300]}", flush=True)
        return
    results.setdefault(("argv-tls", server.name), [" ".join(running.argv)])
    try:
        for cell, (_, extra) in H2_CELLS.items():
            _record(results, failures, server, cell, lambda: h2load(running, extra, plan.seconds, plan.warmup))
    finally:
        running.stop()


# The page


def _median(results: dict, server: str, cell: str) -> float | None:
    runs = results.get((server, cell))
    return statistics.median(r["rate"] for r in runs) if runs else None


def _ratio(results: dict, server: str, baseline: str, cell: str) -> float | None:
    """
    The median of the per-round ratios, so each ratio compares one round.
    """
    runs, base = results.get((server, cell)), results.get((baseline, cell))
    if not runs or not base:
        return None
    return statistics.median(a["rate"] / b["rate"] for a, b in zip(runs, base) if b["rate"])


def _spread(results: dict, server: str, cell: str) -> str:
    runs = results.get((server, cell)) or []
    if len(runs) < 2:
        return ""
    rates = [r["rate"] for r in runs]
    middle = statistics.median(rates)
    return f"±{(max(rates) - min(rates)) / 2 / middle:.0%}" if middle else ""


def _cell_text(results, failures, server, cell, baseline, unit="k") -> str:
    value = _median(results, server, cell)
    if value is None:
        return "failed" if (server, cell) in failures else "-"
    text = f"{value / 1000:.1f}k" if unit == "k" else f"{value:.1f} KiB"
    ratio = _ratio(results, server, baseline, cell) if baseline else None
    if ratio is not None and server != baseline:
        text += f" ({ratio:.2f}x)"
    elif server == baseline:
        text += " (1.00x)"
    return text


def _table(results, failures, servers, cells, baseline, unit="k") -> list[str]:
    names = [name for name, _ in cells]
    lines = ["| server | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for server in servers:
        row = [_cell_text(results, failures, server.name, key, baseline, unit) for _, key in cells]
        if all(cell == "-" for cell in row):
            continue
        lines.append(f"| {server.label} | " + " | ".join(row) + " |")
    return lines


def _per_cpu_ratio(results: dict, server: str, baseline: str, cell: str) -> float | None:
    runs, base = results.get((server, cell)), results.get((baseline, cell))
    if not runs or not base:
        return None
    ratios = [
        (a["rate"] / a["server_cpu"]) / (b["rate"] / b["server_cpu"])
        for a, b in zip(runs, base)
        if a.get("server_cpu") and b.get("server_cpu")
    ]
    return statistics.median(ratios) if ratios else None


def _floors(plan: Plan, results: dict) -> list[str]:
    """
    desperados against the hand-written Twisted and Autobahn code, cell by cell.
    """
    cells = [(key, label, "twisted") for key, (label, _) in WRK_CELLS.items()]
    cells += [
        (key, f"WebSocket {mode} {size} B, {conns} conn(s)", "autobahn")
        for key, (mode, size, conns) in WS_CELLS.items()
    ]
    cells += [
        (key, f"WebSocket {mode} {size} B, {conns} conn(s), permessage-deflate", "autobahn")
        for key, (mode, size, conns) in DEFLATE_CELLS.items()
    ]
    cells += [("memory", "idle WebSocket memory (lower is better)", "autobahn")]
    rows = []
    for key, label, baseline in cells:
        ratio = _ratio(results, "desperados", baseline, key)
        if ratio is None:
            continue
        per_cpu = _per_cpu_ratio(results, "desperados", baseline, key)
        rows.append(
            f"| {label} | {baseline} | {ratio:.2f}x {_spread(results, 'desperados', key)}"
            f" | {'-' if per_cpu is None else f'{per_cpu:.2f}x'} |"
        )
    if not rows:
        return []
    return [
        "",
        "### desperados against its floors",
        "",
        "Ratio of desperados to the hand-written code in the same round (above 1.00x"
        " is faster), and the same ratio per CPU-second that the server used, which"
        " holds better when other work shares the server's CPU.",
        "",
        "| cell | floor | ratio | per server CPU-second |",
        "| --- | --- | ---: | ---: |",
        *rows,
    ]


def render(plan: Plan, info: dict, results: dict, failures: dict) -> str:
    servers = plan.servers
    out = [
        MARK_BEGIN,
        "",
        f"## Last run: {info['started']}",
        "",
        f"Mode: {info['mode']}, {plan.reps} interleaved round(s), {plan.seconds:g} s per cell after"
        f" {plan.warmup:g} s of warm-up; figures are medians of the rounds, ratios are medians"
        " of the per-round ratios, ± is half the range between rounds.",
        f"Machine: {info['machine']['cpu']}, Linux {info['machine']['kernel']}; servers pinned"
        f" to CPU {SERVER_CPU}, load generators to CPU {CLIENT_CPU}.",
        f"Load average at start {info['load_start']['loadavg']}, at end {info['load_end']['loadavg']};"
        " busy processes this run did not start, at start: "
        + (", ".join(info["load_start"]["busy"]) or "none")
        + "; at end: "
        + (", ".join(info["load_end"]["busy"]) or "none")
        + ".",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in info["versions"].items()) + ".",
        "",
        "### HTTP/1.1, requests per second (ratio to plain twisted.web)",
        "",
    ]
    if "http" in plan.kinds:
        cells = [(label, key) for key, (label, _) in WRK_CELLS.items()]
        out += _table(results, failures, [s for s in servers if "http" in s.kinds], cells, "twisted")
    else:
        out.append("Not measured in this run.")

    for conns in (50, 1):
        out += [
            "",
            f"### WebSocket echo, messages per second, {conns} connection{'s' if conns > 1 else ''}"
            " (ratio to hand-written Autobahn)",
            "",
        ]
        if "ws" in plan.kinds:
            cells = [
                (f"{'ping-pong' if mode == 'pingpong' else 'burst (32 in flight)'} {'16 B' if size == 16 else '16 KiB'}", key)
                for key, (mode, size, c) in WS_CELLS.items()
                if c == conns
            ]
            out += _table(results, failures, [s for s in servers if "ws" in s.kinds], cells, "autobahn")
        else:
            out.append("Not measured in this run.")

    out += ["", "### WebSocket echo with permessage-deflate offered (ratio to hand-written Autobahn)", ""]
    if "ws" in plan.kinds:
        cells = [
            (f"ping-pong 16 KiB, {conns} conns", key) for key, (_, _, conns) in DEFLATE_CELLS.items()
        ]
        ws_servers = [s for s in servers if "ws" in s.kinds]
        out += _table(results, failures, ws_servers, cells, "autobahn")
        declined = sorted(
            s.label for s in ws_servers for key in DEFLATE_CELLS
            if any(not r.get("deflate") for r in results.get((s.name, key), []))
        )  # fmt: skip
        out += [
            "",
            "The client sends English-like text and offers permessage-deflate with"
            " its defaults. "
            + ("Declined it and echoed uncompressed: " + ", ".join(declined) + "." if declined else "Every server accepted it."),
        ]
    else:
        out.append("Not measured in this run.")

    out += [
        "",
        f"### Server memory per idle WebSocket, {plan.memory_conns} open (ratio to hand-written Autobahn)",
        "",
    ]
    if "memory" in plan.kinds:
        out += _table(
            results, failures, [s for s in servers if "memory" in s.kinds],
            [("RSS per connection", "memory")], "autobahn", unit="KiB",
        )  # fmt: skip
    else:
        out.append("Not measured in this run.")

    out += ["", "### HTTP/2 over TLS (h2load), requests per second (ratio to hypercorn)", ""]
    if "h2" in plan.kinds:
        cells = [(label, key) for key, (label, _) in H2_CELLS.items()]
        out += _table(results, failures, [s for s in servers if "h2" in s.kinds], cells, "hypercorn")
    else:
        out.append("Not measured in this run.")

    out += _floors(plan, results)
    out += _micro_table(results)
    out += ["", "### Is the load generator the bottleneck?", ""]
    out += [
        "CPU share of one core over the timed window, highest client share and lowest"
        " server share over every cell and round. A server below about 90% while its"
        " client is near 100% was limited by the client.",
        "",
        "| server | highest client CPU | lowest server CPU | cells |",
        "| --- | ---: | ---: | ---: |",
    ]
    for server in servers:
        runs = [r for (name, cell), rs in results.items() if name == server.name and cell != "memory" for r in rs if isinstance(r, dict) and "client_cpu" in r]
        if runs:
            out.append(
                f"| {server.label} | {max(r['client_cpu'] for r in runs):.0%}"
                f" | {min(r['server_cpu'] for r in runs):.0%} | {len(runs)} |"
            )

    if failures:
        out += ["", "### Failures", ""]
        for (server, cell), error in sorted(failures.items()):
            first = error.strip().splitlines()[0] if error.strip() else "?"
            out.append(f"- {server}, {cell}: {first[:300]}")

    out += ["", "### Commands", "", "Servers (PORT is a free port picked per start):", ""]
    for server in servers:
        for key in ("argv", "argv-tls"):
            argv = results.get((key, server.name))
            if argv:
                text = re.sub(r"\b\d{4,5}\b", "PORT", argv[0].replace(str(ROOT) + "/", ""))
                text = re.sub(r"/tmp/\S+?/", "WORK/", text)
                out.append(f"- {server.name}{' (TLS)' if key == 'argv-tls' else ''}: `taskset -c {SERVER_CPU} {text}`")
    out += ["", "Load generators (URL is the server's, any path):", ""]
    seen = set()
    for (name, cell), runs in sorted(results.items()):
        if name.startswith("argv") or not runs or "command" not in runs[0]:
            continue
        command = runs[0]["command"]
        if cell not in seen:
            seen.add(cell)
            out.append(f"- {cell}: `taskset -c {CLIENT_CPU} {command}`")
    out += ["", MARK_END, ""]
    return "\n".join(out)


INTRO = """# Benchmarks

`python3 bench/run.py` starts every server on 127.0.0.1 and measures them side
by side; `python3 bench/run.py --quick` does one short round for development.
The script explains its options with `--help`. Everything below the marker is
rewritten by each run; the notes above it are kept.

"""


def write_page(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else INTRO
    if MARK_BEGIN in text and MARK_END in text:
        head, _, rest = text.partition(MARK_BEGIN)
        _, _, tail = rest.partition(MARK_END)
        text = head + body.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 1 s cells, 1,000 idle WebSockets")
    parser.add_argument("--reps", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, help="timed seconds per cell (default 3, quick 1)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 1)")
    parser.add_argument("--memory-conns", type=int, help="idle WebSockets held open (default 5000, quick 1000)")
    parser.add_argument("--servers", help="comma-separated subset of: " + ", ".join(s.name for s in ALL_SERVERS))
    parser.add_argument("--only", help="comma-separated subset of: http, ws, memory, h2, micro")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="the page to write")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--venv", type=Path, default=BENCH / ".venv", help="the venv with the Python servers")
    args = parser.parse_args(argv)

    kinds = set((args.only or "http,ws,memory,h2,micro").split(","))
    names = (args.servers or ",".join(s.name for s in ALL_SERVERS)).split(",")
    unknown = [n for n in names if n not in {s.name for s in ALL_SERVERS}] + sorted(kinds - {"http", "ws", "memory", "h2", "micro"})
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")
    plan = Plan(
        reps=args.reps or (1 if args.quick else 3),
        seconds=args.seconds or (1 if args.quick else 3),
        warmup=args.warmup if args.warmup is not None else 1,
        memory_conns=args.memory_conns or (1000 if args.quick else 5000),
        servers=[s for s in ALL_SERVERS if s.name in names],
        kinds=kinds,
    )

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with tempfile.TemporaryDirectory(prefix="desperados-bench-") as work:
        setup = Setup(venv=args.venv, work=Path(work))
        ensure_tools(setup)
        info = {
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "quick" if args.quick else "full",
            "machine": machine(),
            "versions": versions(setup),
            "load_start": other_load(),
        }
        results: dict = {}
        failures: dict = {}
        try:
            measure(plan, setup, results, failures)
        finally:
            stop_all()
        info["load_end"] = other_load()

    write_page(args.output, render(plan, info, results, failures))
    if args.json:
        flat = {f"{k[0]} {k[1]}": v for k, v in results.items()}
        args.json.write_text(json.dumps({"info": info, "results": flat, "failures": {f"{k[0]} {k[1]}": v for k, v in failures.items()}}, indent=1))
    print(f"wrote {args.output}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
