"""
Pipelines and a log observer for tests that run C{twistd desperados} in a child process.

The child finds this module through C{PYTHONPATH}; see L{twistd_command}.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from twisted.internet.task import deferLater
from twisted.logger import Logger, jsonFileLogObserver

from desperados import Builder
from desperados.endpoints import HTTP, Websocket
from desperados.plugs import Websocket as DetectWebsocket

TESTS = Path(__file__).parent

log = Logger(namespace="tests.apps")


def json_observer():
    """
    Write every log event to standard output as JSON, for the test to parse.

    Given to twistd as C{--logger apps.json_observer}; it also raises
    the open-file limit of the child to its hard limit, for the load test.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return jsonFileLogObserver(sys.stdout)


def slow(conn, opts):
    """
    Answer C{/slow} after C{SLOW_SECONDS}, logging when the request arrives.
    """
    if conn.request_path != "/slow":
        return conn
    from twisted.internet import reactor

    log.info("slow request started")
    seconds = float(os.environ.get("SLOW_SECONDS", "1"))
    return deferLater(reactor, seconds, lambda: conn.send_resp(200, b"done").halt())


async def slow_stream(conn, opts):
    """
    Stream C{/stream}: one chunk at once, the last after C{SLOW_SECONDS}.
    """
    if conn.request_path != "/stream":
        return conn
    from twisted.internet import reactor

    log.info("slow stream started")
    seconds = float(os.environ.get("SLOW_SECONDS", "1"))
    conn.send_chunked(200)
    await conn.chunk(b"first part")
    await deferLater(reactor, seconds, lambda: None)
    await conn.chunk(b"last part")
    return conn.halt()


class SlowApp(Builder):
    """
    WebSocket echo on every path, C{/slow} answered late, C{/stream} streamed
    slowly, 404 for the rest.
    """

    plugs = [DetectWebsocket, Websocket, slow, slow_stream, HTTP]


def twistd_command(*options: str) -> tuple[list[str], dict[str, str]]:
    """
    Return the command line and environment of C{twistd desperados}.

    :param options: options of the desperados plugin.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(TESTS), env.get("PYTHONPATH")])
    )
    command = [
        str(Path(sys.executable).with_name("twistd")),
        "--nodaemon",
        "--pidfile=",
        "--logger=apps.json_observer",
        "desperados",
        *options,
    ]
    return command, env


class LoadApp(Builder):
    """
    The default pipeline with WebSocket timeouts sized for a load test.

    The idle timeout outlasts the test.  On SIGTERM the test client answers
    5,000 Close frames, which takes it longer than the default 5 s close
    handshake timeout on a busy machine.
    """

    plugs = [
        DetectWebsocket,
        (Websocket, {"timeout": 600.0, "close_handshake_timeout": 30.0}),
        HTTP,
    ]


async def count_upload(conn, opts):
    """
    Read the request body through read_body and answer with its size.

    Nothing is kept: the memory test measures what streaming costs.
    """
    size = 0
    more = True
    while more:
        data, more = await conn.read_body(length=1_000_000)
        size += len(data)
    return conn.send_resp(200, str(size)).halt()
