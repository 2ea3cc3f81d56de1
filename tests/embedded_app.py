"""
Plugs for tests that run desperados in child processes.
"""

from __future__ import annotations

import os
import time

from desperados import Builder, endpoints
from desperados.plugs import Metrics, Websocket


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


class App(Builder):
    """
    The default pipeline with the process id at C{/pid}.
    """

    plugs = [report_pid, Websocket, endpoints.Websocket, endpoints.HTTP]


class MetricsApp(Builder):
    """
    L{App} with the Metrics plug at C{/metrics}.
    """

    plugs = [(Metrics, {"path": "/metrics"}), report_pid, endpoints.HTTP]
