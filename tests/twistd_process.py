"""
A C{twistd desperados} child process driven from the reactor, and its log events.
"""

from __future__ import annotations

import json
import signal

from apps import twistd_command
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


class TwistdProcess(ProcessProtocol):
    """
    A child C{twistd desperados} that writes its log events as JSON to stdout.

    :ivar events: the log events parsed so far, as dictionaries.
    :ivar ended: fires with the exit code once the process has ended.
    """

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.stderr = b""
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self._partial = b""
        self._waiting: list[tuple[str, Deferred[dict]]] = []

    @classmethod
    async def start(
        cls, *options: str, env: dict[str, str] | None = None
    ) -> TwistdProcess:
        """
        Start twistd with the plugin C{options} and wait for its startup line.
        """
        process = cls()
        command, environment = twistd_command(*options)
        environment.update(env or {})
        reactor.spawnProcess(process, command[0], command, env=environment)
        await process.wait_for("Running {plug}")
        return process

    def port(self) -> int:
        """
        Return the TCP port from the startup line.
        """
        [started] = self.with_format("Running {plug}")
        return int(started["address"].rsplit(":", 1)[1])

    def with_format(self, fragment: str) -> list[dict]:
        """
        Return the events whose log_format contains C{fragment}.
        """
        return [
            event
            for event in self.events
            if fragment in (event.get("log_format") or "")
        ]

    def wait_for(self, fragment: str) -> Deferred[dict]:
        """
        Fire with the first event whose log_format contains C{fragment}.
        """
        found = self.with_format(fragment)
        if found:
            return Deferred.fromCoroutine(_value(found[0]))
        waiting: Deferred[dict] = Deferred()
        self._waiting.append((fragment, waiting))
        return waiting

    def signal(self, name: str = "TERM") -> None:
        """
        Send the signal C{SIG<name>} to the process.
        """
        self.transport.signalProcess(name)

    def kill(self) -> None:
        """
        Kill the process if it is still running.
        """
        if self.exit_code is None and not self.ended.called:
            self.transport.signalProcess(signal.SIGKILL)

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.strip(b"\x1e \r")
            if line:
                self._add(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        for fragment, waiting in self._waiting:
            msg = f"twistd ended before logging {fragment!r}: {self.stderr[-2000:]!r}"
            waiting.errback(RuntimeError(msg))
        self._waiting = []
        self.ended.callback(self.exit_code)

    def _add(self, event: dict) -> None:
        self.events.append(event)
        format_ = event.get("log_format") or ""
        still_waiting = []
        for fragment, waiting in self._waiting:
            if fragment in format_:
                waiting.callback(event)
            else:
                still_waiting.append((fragment, waiting))
        self._waiting = still_waiting


async def _value(value: dict) -> dict:
    return value
