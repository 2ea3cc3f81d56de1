"""
The twistd plugin: discovery, options, and a real `twistd desperados` process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from http2_support import connect_h2
from support import connect, start_twistd, stop_process, upgrade_request
from twisted.application.service import IServiceMaker
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from desperados.server import DesperadosService

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEXT = 0x1


def _service_maker():
    makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "desperados"]
    assert len(makers) == 1
    return makers[0]


def _options(*arguments):
    options = _service_maker().options()
    options.parseOptions(list(arguments))
    return options


def test_plugin_is_discovered():
    maker = _service_maker()

    assert maker.description
    assert maker.options is not None


def test_defaults_listen_on_8082_all_interfaces():
    reactor = MemoryReactor()
    options = _options()

    service = _service_maker().makeService(options, reactor=reactor)
    service.startService()

    assert isinstance(service, DesperadosService)
    assert options["port"] == 8082
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(8082, "")]


def test_ip_and_port_options():
    reactor = MemoryReactor()

    service = _service_maker().makeService(_options("--port", "9000", "--ip", "::1"), reactor=reactor)
    service.startService()

    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(9000, "::1")]


def test_listen_is_repeatable_and_replaces_port():
    reactor = MemoryReactor()
    options = _options("--listen", "tcp:9001:interface=127.0.0.1", "--listen", "unix:/tmp/d.sock")

    service = _service_maker().makeService(options, reactor=reactor)
    service.startService()

    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (9001, "127.0.0.1")
    ]
    assert [address for address, *_ in reactor.unixServers] == ["/tmp/d.sock"]


@pytest.mark.parametrize(
    "arguments",
    [["--log-level", "loud"], ["--startup-log", "sometimes"], ["--port", "eighty"]],
)
def test_bad_option_values_are_usage_errors(arguments):
    with pytest.raises(usage.UsageError):
        _options(*arguments)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_http_and_websocket():
    process, address = start_twistd("--port", "0", "--ip", "127.0.0.1")
    try:
        port = int(address.rsplit(":", 1)[1])
        client = await connect(port)
        client.send(b"GET /test HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = await client.read_response()
        client.send(upgrade_request("/test"))
        upgraded = await client.read_response()
        client.send_frame(TEXT, b"ping\n")
        frame = await client.read_frame()
        client.transport.loseConnection()
    finally:
        stop_process(process)

    assert address.startswith("127.0.0.1:")
    assert response.status == 404
    assert response.body == b"not found"
    assert upgraded.status == 101
    assert frame == (TEXT, b"pong\n")


@pytest_twisted.ensureDeferred
async def test_twistd_finds_plug_in_current_directory(tmp_path):
    (tmp_path / "myapp.py").write_text(
        textwrap.dedent(
            """
            def hello(conn, opts):
                return conn.send_resp(200, "hello\\n").halt()
            """
        )
    )
    process, address = start_twistd(
        "--port", "0", "--ip", "127.0.0.1", "--plug", "myapp.hello", cwd=str(tmp_path)
    )
    try:
        port = int(address.rsplit(":", 1)[1])
        client = await connect(port)
        client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = await client.read_response()
        client.transport.loseConnection()
    finally:
        stop_process(process)

    assert response.status == 200
    assert response.body == b"hello\n"


@pytest_twisted.ensureDeferred
async def test_twistd_listens_on_unix_socket(tmp_path):
    from twisted.internet import reactor

    from support import RawClient

    path = str(tmp_path / "desperados.sock")
    process, address = start_twistd("--listen", f"unix:{path}")
    try:
        client = await connectProtocol(UNIXClientEndpoint(reactor, path), RawClient())
        client.send(b"GET / HTTP/1.1\r\nHost: local\r\n\r\n")
        response = await client.read_response()
        client.transport.loseConnection()
    finally:
        stop_process(process)

    assert address == path
    assert response.status == 404


@pytest.mark.skipif(not socket.has_ipv6, reason="this machine has no IPv6")
@pytest_twisted.ensureDeferred
async def test_twistd_listens_on_ipv6_loopback():
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP6ClientEndpoint

    from support import RawClient

    process, address = start_twistd("--port", "0", "--ip", "::1")
    try:
        port = int(address.rsplit(":", 1)[1])
        client = await connectProtocol(TCP6ClientEndpoint(reactor, "::1", port), RawClient())
        client.send(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")
        response = await client.read_response()
        client.transport.loseConnection()
    finally:
        stop_process(process)

    assert address.startswith("[::1]:")
    assert response.status == 404


def _install_into_fresh_venv(tmp_path: Path, editable: bool) -> Path:
    """
    Install a copy of the project into a new venv that borrows our dependencies.
    """
    source = tmp_path / "source"
    shutil.copytree(
        PROJECT_ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "reports"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Twisted, Autobahn and the rest come from the venv running the tests,
    # so the install only builds and copies desperados itself.
    ours = [path for path in sys.path if path.endswith("site-packages")]
    (Path(site_packages) / "borrowed.pth").write_text("\n".join(ours) + "\n")

    command = [str(python), "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["-e", str(source)] if editable else [str(source)]
    subprocess.run(command, check=True, cwd=tmp_path)
    return python


_DISCOVERY_CHECK = textwrap.dedent(
    """
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    import desperados
    names = [maker.tapname for maker in getPlugins(IServiceMaker)]
    print(names.count("desperados"), desperados.__file__)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["plain", "editable"])
def test_plugin_found_after_install(tmp_path, editable):
    python = _install_into_fresh_venv(tmp_path, editable)

    result = subprocess.run(
        [str(python), "-c", _DISCOVERY_CHECK],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    count, module_file = result.stdout.split()

    assert count == "1"
    expected_home = tmp_path / "source" if editable else tmp_path / "venv"
    assert Path(module_file).is_relative_to(expected_home)


def test_scheme_https_wraps_every_listener_in_tls(tls_files):
    reactor = MemoryReactor()
    options = _options(
        "--scheme", "https",
        "--certfile", tls_files.certfile,
        "--keyfile", tls_files.keyfile,
        "--listen", "tcp:9443:interface=127.0.0.1",
        "--listen", "unix:/tmp/d-tls.sock",
    )  # fmt: skip

    service = _service_maker().makeService(options, reactor=reactor)
    service.startService()

    factories = [factory for _, factory, *_ in reactor.tcpServers + reactor.unixServers]
    assert len(factories) == 2
    for factory in factories:
        assert isinstance(factory, TLSMemoryBIOFactory)
        assert factory.wrappedFactory is service.site


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--scheme", "https"], "needs both --certfile and --keyfile"),
        (["--scheme", "https", "--certfile", "CERT"], "needs both --certfile and --keyfile"),
        (["--certfile", "CERT", "--keyfile", "KEY"], "need --scheme https"),
        (["--scheme", "ftp"], "--scheme must be http or https"),
        (["--scheme", "https", "--certfile", "CERT", "--keyfile", "CERT"], "unencrypted PEM"),
        (["--scheme", "https", "--certfile", "KEY", "--keyfile", "KEY"], "cannot load"),
        (["--scheme", "https", "--certfile", "CERT", "--keyfile", "missing.pem"], "cannot load"),
        (
            ["--scheme", "https", "--certfile", "CERT", "--keyfile", "KEY", "--listen", "ssl:8443"],
            "brings its own certificate",
        ),
    ],
)
def test_bad_tls_options_are_usage_errors(tls_files, arguments, message):
    files = {"CERT": tls_files.certfile, "KEY": tls_files.keyfile}
    arguments = [files.get(argument, argument) for argument in arguments]

    with pytest.raises(usage.UsageError, match=message):
        _options(*arguments)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_https_with_http2(tls_files):
    process, address = start_twistd(
        "--port", "0",
        "--ip", "127.0.0.1",
        "--scheme", "https",
        "--certfile", tls_files.certfile,
        "--keyfile", tls_files.keyfile,
    )  # fmt: skip
    try:
        port = int(address.rsplit(":", 1)[1])
        client = await connect_h2(port, tls_files)
        response = await client.response(client.request("/test"))
        negotiated = client.transport.negotiatedProtocol
        client.transport.loseConnection()
    finally:
        stop_process(process)

    assert negotiated == b"h2"
    assert response.status == 404
    assert response.body == b"not found"
