"""
Several worker processes serving one set of listening sockets.

The main process listens once, never accepts, and hands the listening sockets
to N worker processes (C{python -m desperados.worker}), which all accept on
them.  It restarts a worker that dies, with a growing delay, stops all of
them on SIGTERM, and replaces them one at a time on SIGHUP, so that some
process is always accepting.  A replaced worker gets SIGUSR1 and lets its
open WebSockets finish.  A stop sends SIGTERM, which closes them with 1001
at once (see L{desperados.worker}).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from desperados._logging import observer as log_observer

log = Logger(namespace="desperados.workers", observer=log_observer)

# The first restart of a worker that died waits this long.  Each further
# death in a row doubles the delay, up to the maximum, so that a pipeline that
# fails at import does not make the main process spin.
FIRST_RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 30.0
# A worker that served this long before it died starts over at the first delay.
STABLE_AFTER = 10.0

DEFAULT_STOP_TIMEOUT = 30.0

# The worker's file descriptors: its log events come on 1 and its ready line
# on 3; the listening sockets follow from 4.
_CONTROL_FD = 3
_FIRST_LISTEN_FD = 4


def worker_count(value: str) -> int:
    """
    Parse the C{--workers} value: a positive number, or C{auto} for one per CPU.

    :raises ValueError: for anything else.
    """
    if value == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        msg = f"expected a positive number of workers or 'auto', got {value!r}"
        raise ValueError(msg)
    return count


class _NoConnections(Factory):
    """
    The factory of the main process' ports, which never accept a connection.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class _Worker(ProcessProtocol):
    """
    One worker process, seen from the main process.

    :ivar ready: fires once the worker has adopted the sockets and accepts.
    :ivar ended: fires with the worker's exit status once it has exited.
    """

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.started_at = pool.reactor.seconds()
        self.ready_at: float | None = None
        self.is_ready = False
        self.retiring = False
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[str] = Deferred()
        self._log_buffer = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._forward_log_events(data)
        elif childFD == _CONTROL_FD and b"ready" in data and not self.is_ready:
            self.is_ready = True
            self.ready_at = self.pool.reactor.seconds()
            self.ready.callback(None)

    def _forward_log_events(self, data: bytes) -> None:
        # The worker writes its log events as JSON, one per line (see
        # desperados.worker).  They go on to this process' observers with
        # the worker's index and pid added.
        lines = (self._log_buffer + data).split(b"\n")
        self._log_buffer = lines.pop()
        for line in lines:
            text = line.strip(b"\x1e \r").decode("utf-8", "replace")
            if not text:
                continue
            try:
                event = eventFromJSON(text)
            except ValueError:
                event = {
                    "log_format": "{line}",
                    "line": text,
                    "log_level": LogLevel.info,
                    "log_namespace": "desperados.worker",
                }
            event["worker"] = self.index
            event["worker_pid"] = self.pid
            globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        status = _describe_exit(reason)
        if not self.is_ready:
            self.ready.errback(
                RuntimeError(f"worker exited before it was ready: {status}")
            )
            self.ready.addErrback(lambda failure: None)
        self.ended.callback(status)
        self.pool._worker_ended(self, reason, status)

    def signal(self, name: str) -> None:
        """
        Send C{SIG<name>} to the worker unless it has already exited.
        """
        # signalProcess() translates only a few names, not USR1.
        try:
            self.transport.signalProcess(getattr(signal, f"SIG{name}"))
        except ProcessExitedAlready:
            pass


class WorkerPool(Service):
    """
    The main process of C{twistd desperados --workers N}.

    :param endpoints: where to listen; the main process listens on each once
        and passes the sockets to the workers.
    :param argv: the command-line options of C{twistd desperados}, given to
        each worker as they are.
    :param count: how many workers to run.
    :param wrap_haproxy: one flag per endpoint, true when the workers must
        read a PROXY protocol header on that socket.
    :param plug_name: the pipeline's name for the startup line.
    :param startup_log: the level of the startup line, None for none.
    :param stop_timeout: seconds a worker gets to drain and exit after
        SIGTERM before it is killed.
    :param reactor: the reactor; the global one when None.
    """

    def __init__(
        self,
        endpoints: Sequence[IStreamServerEndpoint],
        argv: Sequence[str],
        count: int,
        *,
        wrap_haproxy: Sequence[bool] = (),
        plug_name: str,
        startup_log: LogLevel | None = LogLevel.info,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.endpoints = list(endpoints)
        self.argv = list(argv)
        self.count = count
        self.wrap_haproxy = list(wrap_haproxy) or [False] * len(self.endpoints)
        self.plug_name = plug_name
        self.startup_log = startup_log
        self.stop_timeout = stop_timeout
        self.ports: list[IListeningPort] = []
        self.workers: dict[int, _Worker] = {}
        self._live: set[_Worker] = set()
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._replacing: Deferred[None] | None = None
        self._replace_again: str | None = None
        self._metrics_dir: str | None = None
        self._previous_sighup: Any = None
        self.started: Deferred[None] = Deferred()

    # Starting

    def startService(self) -> None:
        super().startService()
        self.started = Deferred.fromCoroutine(self._start())
        self.started.addErrback(self._start_failed)

    async def _start(self) -> None:
        from desperados.server import _log_startup, endpoint_scheme

        for endpoint in self.endpoints:
            port = await endpoint.listen(_NoConnections())
            # The main process keeps the socket open but never accepts on it.
            port.stopReading()
            self.ports.append(port)
            _log_startup(
                self.startup_log, self.plug_name, port, endpoint_scheme(endpoint)
            )
        self._prepare_metrics_dir()
        self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        for index in range(self.count):
            self._spawn(index)

    def _start_failed(self, failure: Failure) -> None:
        log.failure("could not start the workers", failure)
        if self.reactor.running:
            self.reactor.stop()

    def _prepare_metrics_dir(self) -> None:
        # prometheus_client's multiprocess mode: every worker writes its
        # counts to files in this directory and a scrape adds them up.
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self._metrics_dir = tempfile.mkdtemp(prefix="desperados-metrics-")

    def _spawn(self, index: int) -> _Worker:
        worker = _Worker(self, index)
        command = [sys.executable, "-m", "desperados.worker", "--index", str(index)]
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: 2, _CONTROL_FD: "r"}
        sockets = zip(self.ports, self.wrap_haproxy, strict=True)
        for offset, (port, haproxy) in enumerate(sockets):
            fd = _FIRST_LISTEN_FD + offset
            child_fds[fd] = port.fileno()
            family = port.socket.family.name.removeprefix("AF_")
            command += ["--listen-fd", f"{fd}:{family}{':haproxy' if haproxy else ''}"]
        command += ["--", *self.argv]
        env = dict(os.environ)
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        self.reactor.spawnProcess(
            worker, sys.executable, command, env=env, childFDs=child_fds
        )
        self.workers[index] = worker
        self._live.add(worker)
        log.info("started worker {index} as pid {pid}", index=index, pid=worker.pid)
        return worker

    # Worker deaths

    def _worker_ended(self, worker: _Worker, reason: Failure, status: str) -> None:
        self._live.discard(worker)
        _mark_process_dead(worker.pid, self._metrics_dir)
        if worker.retiring or not self.running:
            log.info(
                "worker {index} (pid {pid}) stopped: {status}",
                index=worker.index,
                pid=worker.pid,
                status=status,
            )
            return
        if self.workers.get(worker.index) is not worker:
            return

        now = self.reactor.seconds()
        lived = now - worker.started_at
        # A worker that never became ready failed however long its start took,
        # which on a busy machine can be longer than STABLE_AFTER.
        stable = worker.ready_at is not None and now - worker.ready_at >= STABLE_AFTER
        failures = 0 if stable else self._failures.get(worker.index, 0)
        delay = min(FIRST_RESTART_DELAY * 2**failures, MAX_RESTART_DELAY)
        self._failures[worker.index] = failures + 1
        log.error(
            "worker {index} (pid {pid}) exited unexpectedly ({status}) "
            "after {lived:.1f} seconds; starting a new one in {delay:.1f} seconds",
            index=worker.index,
            pid=worker.pid,
            status=status,
            lived=lived,
            delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(
            delay, self._restart, worker.index
        )

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self.running:
            self._spawn(index)

    # Replacing

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.replace_all, "SIGHUP")

    def replace_all(self, reason: str) -> Deferred[None]:
        """
        Replace every worker with a new process, one at a time.

        Each new worker is started and must be ready before the old one gets
        SIGUSR1 and drains, so the sockets always have a worker accepting.
        The old worker finishes its requests in flight and lets its open
        WebSockets run for up to the drain timeout before it closes them
        with 1001.
        If a new worker exits before it is ready, the old one keeps serving
        and the replacement stops there.

        :param reason: why, for the log (C{"SIGHUP"}, a changed file).
        :returns: a Deferred that fires once the replacement has ended.
        """
        if self._replacing is not None:
            # One replacement at a time; run one more once this one is done,
            # so that the latest change is served.
            self._replace_again = reason
            return self._replacing
        self._replacing = Deferred.fromCoroutine(self._replace_all(reason))

        def done(result: object) -> object:
            self._replacing = None
            if self._replace_again is not None and self.running:
                again, self._replace_again = self._replace_again, None
                self.replace_all(again)
            return result

        return self._replacing.addBoth(done)

    async def _replace_all(self, reason: str) -> None:
        log.info(
            "replacing {count} workers one at a time ({reason})",
            count=len(self.workers),
            reason=reason,
        )
        for index in sorted(self.workers):
            if not self.running:
                return
            old = self.workers[index]
            new = self._spawn(index)
            try:
                await new.ready
            except RuntimeError:
                log.error(
                    "new worker {index} exited before it was ready; the old one "
                    "(pid {pid}) keeps serving and the replacement stops here",
                    index=index,
                    pid=old.pid,
                )
                self.workers[index] = old
                return
            self._failures.pop(index, None)
            old.retiring = True
            old.signal("USR1")
            log.info(
                "replaced worker {index}: pid {old_pid} drains, pid {new_pid} serves",
                index=index,
                old_pid=old.pid,
                new_pid=new.pid,
            )
        log.info("all workers replaced")

    # Stopping

    def stopService(self) -> Deferred[object]:
        super().stopService()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()

        # Retiring workers from a replacement are still draining.  SIGTERM
        # makes them close their WebSockets now, and this waits for them too.
        workers = list(self._live)
        log.info("stopping {count} workers", count=len(workers))
        endings = []
        for worker in workers:
            worker.retiring = True
            worker.signal("TERM")
            endings.append(worker.ended)
        killer = self.reactor.callLater(self.stop_timeout, self._kill, workers)

        def all_ended(result: object) -> Deferred[object]:
            if killer.active():
                killer.cancel()
            return self._close_ports()

        return DeferredList(endings).addCallback(all_ended)

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn(
                    "worker {index} (pid {pid}) did not stop within {timeout} "
                    "seconds after SIGTERM; killing it",
                    index=worker.index,
                    pid=worker.pid,
                    timeout=self.stop_timeout,
                )
                worker.signal("KILL")

    def _close_ports(self) -> Deferred[object]:
        from desperados.server import format_address

        ports, self.ports = self.ports, []
        stopping = [port.stopListening() for port in ports]
        for port in ports:
            log.info(
                "stopped listening at {address}", address=format_address(port.getHost())
            )
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None
        return DeferredList([d or succeed(None) for d in stopping])


def _describe_exit(reason: Failure) -> str:
    if reason.check(ProcessDone):
        return "exit code 0"
    value = reason.value
    if getattr(value, "signal", None) is not None:
        return f"signal {signal.Signals(value.signal).name}"
    return f"exit code {getattr(value, 'exitCode', None)}"


def _mark_process_dead(pid: int | None, path: str | None) -> None:
    if pid is None:
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    directory = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        multiprocess.mark_process_dead(pid, directory)
