"""
Plugs for tests that run desperados in child processes.
"""

from __future__ import annotations

import os
import time

from twisted.logger import Logger

from desperados import Builder, endpoints
from desperados.endpoints.websocket import Echo
from desperados.plugs import Metrics, Websocket
from desperados.websock import Push, Text


def report_pid(conn, opts):
    """
    Send the process id; C{/block} first blocks the reactor for 0.3 seconds.

    C{/client} sends the scheme and the client address instead.

    Blocking keeps a worker busy, so the next connection goes to another one.
    """
    if conn.path_info == ["block"]:
        time.sleep(0.3)
    if conn.path_info in (["pid"], ["block"]):
        return conn.send_resp(200, str(os.getpid())).halt()
    if conn.path_info == ["client"]:
        return conn.send_resp(200, f"{conn.scheme} {conn.remote_ip}").halt()
    return conn


class PidEcho(Echo):
    """
    The echo handler, which replies to the message C{pid} with the process id.

    It logs the reason of every C{terminate} at info level.
    """

    log = Logger()

    def handle_in(self, frame: tuple[bytes, str], state: int) -> Push:
        if frame == (b"pid", "text"):
            return Push(Text(str(os.getpid()).encode()), state)
        return super().handle_in(frame, state)

    def terminate(self, reason, state: int) -> None:
        self.log.info(
            "WebSocket handler terminated ({kind}, code {code})",
            kind=reason.kind,
            code=reason.code,
        )


class App(Builder):
    """
    The default pipeline with the process id at C{/pid} and from WebSockets.
    """

    plugs = [
        report_pid,
        Websocket,
        (endpoints.Websocket, {"handler": PidEcho()}),
        endpoints.HTTP,
    ]


class MetricsApp(Builder):
    """
    L{App} with the Metrics plug at C{/metrics}.
    """

    plugs = [(Metrics, {"path": "/metrics"}), report_pid, endpoints.HTTP]
