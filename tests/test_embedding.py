"""
Embedding desperados in a Twisted program, and systemd socket activation.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from subprocesses import TWISTD, child_env, get, read_events, stop
from support import connect, upgrade_request
from twisted.application.service import MultiService
from twisted.application.strports import service as strports_service
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource
from twisted.web.server import Site

from desperados import Builder, PlugResource, endpoints, start_link
from desperados.plugs import Websocket
from desperados.server import DesperadosService, make_endpoint, make_site

TEXT = 0x1


class Data(Resource):
    """
    A resource of another part of the program: a fixed text.
    """

    isLeaf = True

    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type.encode("ascii")

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        return self.body


def report_path(conn, opts):
    """
    Send the mount point of the PlugResource and the rest of the path as JSON.
    """
    seen = {"script_name": conn.script_name, "path_info": conn.path_info}
    return conn.send_resp(200, json.dumps(seen)).halt()


App = Builder([Websocket, endpoints.Websocket, report_path])


async def _get(port: int, path: str) -> tuple[int, bytes]:
    client = await connect(port)
    client.send(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )
    response = await client.read_response()
    await client.wait_closed()
    return response.status, response.body


@pytest_twisted.ensureDeferred
async def test_plug_resource_mounted_in_existing_site():
    root = Resource()
    root.putChild(b"static", Data(b"static text", "text/plain"))
    root.putChild(b"app", PlugResource(App))
    listening = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    port = listening.getHost().port
    try:
        static = await _get(port, "/static")
        mounted = await _get(port, "/app/a/b")
        client = await connect(port)
        client.send(upgrade_request("/app/chat"))
        upgraded = await client.read_response()
        client.send_frame(TEXT, b"inside a Site")
        echo = await client.read_frame()
        client.transport.loseConnection()
    finally:
        await listening.stopListening()

    assert static == (200, b"static text")
    assert mounted[0] == 200
    assert json.loads(mounted[1]) == {"script_name": ["app"], "path_info": ["a", "b"]}
    assert upgraded.status == 101
    assert echo == (TEXT, b"inside a Site")


@pytest_twisted.ensureDeferred
async def test_service_in_existing_multiservice():
    parent = MultiService()
    other_root = Resource()
    other_root.putChild(b"", Data(b"other service", "text/plain"))
    other = strports_service("tcp:0:interface=127.0.0.1", Site(other_root))
    other.setServiceParent(parent)
    desperados = DesperadosService(
        make_site(App),
        [make_endpoint(reactor, listen="tcp:0:interface=127.0.0.1")],
        plug_name="App",
        startup_log=None,
    )
    desperados.setServiceParent(parent)

    parent.startService()
    port = desperados.ports[0].getHost().port
    status, body = await _get(port, "/x")
    await parent.stopService()

    assert status == 200
    assert json.loads(body)["path_info"] == ["x"]
    with pytest.raises(ConnectionRefusedError):
        await connect(port)


@pytest_twisted.ensureDeferred
async def test_start_link_then_stop():
    listening = await start_link(App, port=0, ip="127.0.0.1", startup_log=None)
    port = listening.getHost().port

    status, body = await _get(port, "/from/start_link")
    await listening.stopListening()

    assert status == 200
    assert json.loads(body)["path_info"] == ["from", "start_link"]
    with pytest.raises(ConnectionRefusedError):
        await connect(port)


@pytest_twisted.ensureDeferred
async def test_path_segments_decoded_once():
    listening = await start_link(App, port=0, ip="127.0.0.1", startup_log=None)
    port = listening.getHost().port

    status, body = await _get(port, "/a%2541/b%20c/%2e%2e")
    await listening.stopListening()

    assert status == 200
    assert json.loads(body)["path_info"] == ["a%41", "b c", ".."]


def test_systemd_socket_activation(tmp_path: Path):
    """
    twistd gets a listening socket as fd 3 with LISTEN_FDS and LISTEN_PID,
    as systemd passes it, and serves on it without binding a port itself.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    log = tmp_path / "log.json"
    # systemd passes the socket as fd 3 and names it in LISTEN_FDNAMES, which
    # Twisted requires.  LISTEN_PID is the service's own pid, known only in
    # the child, so a small Python launcher sets it and then execs twistd.
    launcher = (
        "import os, sys; "
        f"os.dup2({fd}, 3); os.close({fd}); "
        "os.environ.update("
        "LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web'); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    command = [
        sys.executable,
        "-c",
        launcher,
        TWISTD,
        "--nodaemon",
        "--pidfile=",
        "--logger=subprocesses.json_observer",
        "desperados",
        "--plug=embedded_app.App",
        "--listen=systemd:domain=INET:index=0",
    ]
    process = subprocess.Popen(
        command,
        pass_fds=[fd],
        env=child_env(TEST_LOG=str(log)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    listener.close()
    try:
        status, body = get(port, "/pid")
    finally:
        returncode = stop(process)

    assert status == 200
    assert int(body) == process.pid
    # twistd ends itself with the signal that stopped it, as a shell expects.
    assert returncode == -signal.SIGTERM
    startup = [
        e for e in read_events(log) if "Running {plug}" in (e.get("log_format") or "")
    ]
    assert len(startup) == 1
    assert startup[0]["address"] == f"127.0.0.1:{port}"
    stopped = [
        e
        for e in read_events(log)
        if "stopped listening" in (e.get("log_format") or "")
    ]
    assert len(stopped) == 1
