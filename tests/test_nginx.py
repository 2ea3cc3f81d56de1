"""
desperados behind a real nginx on loopback: HTTP and WebSocket through it.

The client connects to nginx from 127.0.0.2 and nginx connects to desperados
from 127.0.0.3, the only trusted proxy, so the address the pipeline reports
shows whether ProxyHeaders took the client's address from the headers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from support import RawClient, upgrade_request
from test_proxy_headers import report_client
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from desperados import Builder
from desperados.plugs import ProxyHeaders

CLIENT_ADDRESS = "127.0.0.2"
PROXY_ADDRESS = "127.0.0.3"
TEXT = 0x1

NGINX_CONF = r"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream desperados {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        proxy_http_version 1.1;
        proxy_bind {proxy_address};
        proxy_read_timeout 10s;
        # A location with proxy_set_header directives inherits none from the
        # server block, so each location lists all of its own.
        location /forwarded/ {{
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $http_connection;
            proxy_set_header Forwarded "for=$remote_addr;proto=https;host=\"$http_host\"";
            proxy_pass http://desperados;
        }}
        location / {{
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $http_connection;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_pass http://desperados;
        }}
    }}
}}
"""


def _nginx_binary() -> str:
    found = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if found is None:
        reason = "nginx is not installed (scripts/install-test-deps installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(port: int, process: subprocess.Popen) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(
                f"nginx exited with {process.returncode}: {process.stderr.read()}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"nginx is not listening on port {port} after 5 seconds")


@pytest.fixture
def nginx(tmp_path: Path):
    """
    Start nginx in front of a backend port; yield C{(start, ...)}.

    The test calls C{start(backend_port)} and gets nginx's port.
    """
    binary = _nginx_binary()
    processes = []

    def start(backend: int) -> int:
        port = _free_port()
        config = tmp_path / "nginx.conf"
        config.write_text(
            NGINX_CONF.format(
                prefix=tmp_path, backend=backend, port=port, proxy_address=PROXY_ADDRESS
            )
        )
        process = subprocess.Popen(
            [
                binary,
                "-p",
                str(tmp_path),
                "-e",
                "stderr",
                "-c",
                str(config),
                "-g",
                "daemon off;",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        _wait_until_listening(port, process)
        return port

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)
        process.stderr.close()


async def _connect_as_client(port: int) -> RawClient:
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, bindAddress=(CLIENT_ADDRESS, 0)
    )
    return await connectProtocol(endpoint, RawClient())


def _pipeline() -> Builder:
    return Builder([(ProxyHeaders, {"trusted": [PROXY_ADDRESS]}), report_client])


@pytest_twisted.ensureDeferred
async def test_http_through_nginx_sees_client_address(serve, nginx):
    port = nginx(await serve(_pipeline()))

    client = await _connect_as_client(port)
    client.send(b"GET /page HTTP/1.1\r\nHost: example.org:8080\r\n\r\n")
    response = await client.read_response()
    client.send(b"GET /forwarded/page HTTP/1.1\r\nHost: example.org:8080\r\n\r\n")
    forwarded = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert json.loads(response.body) == {
        "remote_ip": CLIENT_ADDRESS,
        "scheme": "http",
        "host": "example.org",
    }
    assert forwarded.status == 200
    assert json.loads(forwarded.body) == {
        "remote_ip": CLIENT_ADDRESS,
        "scheme": "https",
        "host": "example.org",
    }


@pytest_twisted.ensureDeferred
async def test_untrusted_backend_peer_keeps_proxy_address(serve, nginx):
    """Without the proxy in the trusted list, remote_ip stays the address of nginx."""
    port = nginx(
        await serve(
            Builder([(ProxyHeaders, {"trusted": ["10.0.0.0/8"]}), report_client])
        )
    )

    client = await _connect_as_client(port)
    client.send(b"GET /page HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n")
    response = await client.read_response()
    client.transport.loseConnection()

    assert json.loads(response.body)["remote_ip"] == PROXY_ADDRESS


@pytest_twisted.ensureDeferred
async def test_websocket_echo_through_nginx(serve, nginx):
    port = nginx(await serve(_pipeline()))

    client = await _connect_as_client(port)
    client.send(upgrade_request("/chat"))
    response = await client.read_response()
    opcode, first = await client.read_frame()
    client.send_frame(TEXT, b"through the proxy")
    echo = await client.read_frame()
    client.transport.loseConnection()

    assert response.status == 101
    assert opcode == TEXT
    assert json.loads(first)["remote_ip"] == CLIENT_ADDRESS
    assert echo == (TEXT, b"through the proxy")
