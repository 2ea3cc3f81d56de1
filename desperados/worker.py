"""
The worker process of C{twistd desperados --workers N}: C{python -m desperados.worker}.

The main process (L{desperados.workers.WorkerPool}) starts it with the
listening sockets as inherited file descriptors and the options of
C{twistd desperados}.  It serves the same pipeline as a single process would
on those sockets.  It writes its log events to standard output as JSON for
the main process, and writes C{ready} to its control descriptor once it
accepts connections.

Signals from the main process:

 - C{SIGUSR1} (the worker is being replaced): stop accepting, finish the
   requests in flight, and let open WebSockets run until they close on
   their own or the drain timeout ends, then close the rest with 1001.
 - C{SIGTERM} (the server stops): stop accepting, finish the requests in
   flight, and close WebSockets with 1001 at once.  During a replacement it
   closes the WebSockets still running with 1001 now.  A second C{SIGTERM}
   aborts the connections still open.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

from desperados._logging import observer as log_observer

log = Logger(namespace="desperados.worker", observer=log_observer)

_CONTROL_FD = 3

# Seconds between closing this worker's copies of the listening sockets and
# stopping: a connection accepted just before may not have sent its request
# yet, and would be closed as idle without this wait.
ACCEPT_GRACE = 0.5


def adopted_endpoint(reactor: Any, spec: str, tls: Any) -> IStreamServerEndpoint:
    """
    Build the endpoint for one inherited socket, C{FD:FAMILY[:haproxy]}.

    :param tls: the TLS options to serve with, or None for cleartext.
    """
    fd_text, family, *flags = spec.split(":")
    endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
        reactor, int(fd_text), getattr(socket, f"AF_{family}")
    )
    # The PROXY header comes before any TLS record, so its wrapper must see
    # the bytes first: wrap it inside the TLS endpoint, which wraps the
    # factory it is given last.
    if "haproxy" in flags:
        from twisted.protocols.haproxy import proxyEndpoint

        endpoint = proxyEndpoint(endpoint)
    if tls is not None:
        from desperados.tls import TLSServerEndpoint

        endpoint = TLSServerEndpoint(endpoint, tls)
    return endpoint


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run one worker until SIGTERM or SIGUSR1, then drain and exit.
    """
    parser = argparse.ArgumentParser(prog="python -m desperados.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", action="append", default=[])
    parser.add_argument("options", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    plugin_argv = args.options[1:] if args.options[:1] == ["--"] else args.options

    from twisted.internet import reactor

    from twisted.plugins.desperados_plugin import Options, service_maker

    output = os.fdopen(1, "w", buffering=1, encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(output)], redirectStandardIO=False
    )

    options = Options()
    options.parseOptions(plugin_argv)
    # This process is one of the workers; it must not start workers itself.
    options["worker-count"] = 1
    options["reload"] = False
    service = service_maker.makeService(options, reactor=reactor)
    service.endpoints = [
        adopted_endpoint(reactor, spec, options.get("tls")) for spec in args.listen_fd
    ]
    service.startup_log = None
    # This worker handles SIGTERM itself in every phase (see on_sigterm), so
    # that SIGINT stays ignored while it drains.
    service.abort_on_signal = False

    # "serving", then "retiring" after SIGUSR1 or "stopping" after SIGTERM.
    phase = "serving"

    def stop_accepting_then_stop(reason: str) -> None:
        # The main process and the other workers keep the sockets open, so
        # connections still waiting to be accepted go to another worker.
        ports, service.ports = list(service.ports), []
        for port in ports:
            port.stopListening()
        log.info(
            "worker {index} stopped accepting connections ({reason})",
            index=args.index,
            reason=reason,
        )
        reactor.callLater(ACCEPT_GRACE, reactor.stop)

    def retire() -> None:
        nonlocal phase
        if phase != "serving":
            return
        phase = "retiring"
        service.wait_for_websockets = True
        stop_accepting_then_stop("replaced")

    def stop() -> None:
        nonlocal phase
        if phase == "serving":
            phase = "stopping"
            stop_accepting_then_stop("stopping")
        elif phase == "retiring":
            # The server stops during a replacement: WebSockets that were
            # allowed to finish are closed with 1001 now, as in any stop.
            phase = "stopping"
            service.wait_for_websockets = False
            service.site.close_websockets()
        else:
            log.info(
                "worker {index} received SIGTERM while draining", index=args.index
            )
            service.site.abort_drain()

    def on_sigterm(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    def on_sigusr1(signum: int, frame: Any) -> None:
        reactor.callFromThread(retire)

    def start() -> None:
        service.startService()
        # Replaces the handler that reactor.run() installed, which stops at once.
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGUSR1, on_sigusr1)
        # Ctrl-C in a terminal, and a hangup of the terminal, reach every
        # process of the group.  The main process reacts to SIGINT by
        # sending SIGTERM and to SIGHUP by replacing the workers, so a worker
        # waits for that instead of starting a second, competing stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log.info(
            "worker {index} serving {plug}", index=args.index, plug=options["plug"]
        )
        with os.fdopen(_CONTROL_FD, "wb") as control:
            control.write(b"ready\n")

    parent = os.getppid()

    def check_parent() -> None:
        # A main process killed with SIGKILL cannot stop its workers; they
        # notice that they were handed to another parent and stop themselves.
        if os.getppid() != parent and reactor.running:
            log.warn(
                "worker {index}: the main process is gone, stopping", index=args.index
            )
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.callWhenRunning(LoopingCall(check_parent).start, 1.0, now=False)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
