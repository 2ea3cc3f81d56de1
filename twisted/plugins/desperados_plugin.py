"""
The twistd plugin: C{twistd desperados}.

Kept light on imports so that C{twistd --help} stays fast; desperados itself
is imported only when the service is made.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

_LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


class Options(usage.Options):
    """
    Command-line options of C{twistd desperados}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve HTTP and WebSocket through a plug pipeline.  By default every "
        "path echoes WebSocket messages and answers other requests with 404."
    )

    optFlags = [
        [
            "reload",
            None,
            "Restart the workers when a Python file of desperados or of the --plug "
            "package changes; for development.",
        ],
        ["no-compress", None, "Never compress responses (gzip and deflate are on)."],
    ]

    optParameters = [
        ["port", "p", 8082, "TCP port to listen on; 0 picks a free one.", int],
        ["ip", None, None, "Address to bind (default: all IPv4 interfaces; :: for IPv6)."],
        ["plug", None, "desperados.plugs.Default", "Dotted name of the plug or pipeline to run."],
        [
            "scheme",
            None,
            "http",
            "http, or https to serve TLS with --certfile and --keyfile on --port "
            "and on every --listen endpoint (HTTP/2 through ALPN).",
        ],
        ["certfile", None, None, "PEM file with the server certificate, then its chain."],
        ["keyfile", None, None, "PEM file with the unencrypted private key."],
        [
            "startup-log",
            None,
            "info",
            "Log level of the startup line, or 'false' to leave it out.",
        ],
        ["log-level", None, "info", "Lowest level logged: " + ", ".join(_LOG_LEVELS) + "."],
        [
            "workers",
            None,
            "1",
            "Number of worker processes sharing the listening sockets, or 'auto' "
            "for one per CPU; SIGHUP replaces them one at a time.",
        ],
        [
            "drain-timeout",
            None,
            15.0,
            "Seconds to let requests in flight finish and WebSockets close on "
            "SIGTERM or SIGINT before the remaining connections are aborted. "
            "A worker replaced on SIGHUP lets its WebSockets run this long, "
            "then closes them with 1001.",
            float,
        ],
        [
            "response-timeout",
            None,
            "60",
            "Seconds a pipeline may take to start its response, and then "
            "between two writes of a streamed body, before it gets 503 or its "
            "connection is closed; 'none' for no limit.",
        ],
        # HTTP/1.1 limits and timeouts; the defaults are those of HTTPOptions.
        [
            "max-request-line-length",
            None,
            "10000",
            "Longest request line accepted, in bytes; longer ones get 414.",
        ],
        [
            "max-header-length",
            None,
            "10000",
            "Longest header field line accepted, in bytes; longer ones get 431.",
        ],
        [
            "max-header-count",
            None,
            "50",
            "Maximum header fields per request; more get 431.",
        ],
        [
            "max-head-size",
            None,
            "65536",
            "Largest request head (request line and header fields), in bytes; "
            "larger ones get 431.",
        ],
        [
            "max-requests",
            None,
            "none",
            "Requests served on one connection before it is closed, or 'none'.",
        ],
        [
            "max-connections",
            None,
            "16384",
            "Open connections per process, WebSockets included; new ones beyond "
            "it get 503. Or 'none'. Keep it below the file descriptor limit.",
        ],
        [
            "keepalive-timeout",
            None,
            "60",
            "Seconds a connection may wait for its next request before it is "
            "closed, or 'none'.",
        ],
        [
            "header-timeout",
            None,
            "60",
            "Seconds from the first byte of a request until its head is "
            "complete, else 408; or 'none'.",
        ],
        [
            "body-timeout",
            None,
            "60",
            "Seconds without a byte of the request body before 408, or 'none'.",
        ],
        [
            "linger-timeout",
            None,
            "2",
            "Seconds a connection keeps reading after its closing response "
            "(an error, connection: close, HTTP/1.0) is sent, before it is "
            "aborted.",
        ],
        [
            "tls-handshake-timeout",
            None,
            "10",
            "Seconds from the TCP connection until the TLS handshake is "
            "complete, else the connection is aborted; or 'none'.",
        ],
        [
            "access-log",
            None,
            None,
            "File to append a combined log format line per request to, or '-' "
            "for standard output; no access log by default.",
        ],
        [
            "max-body-size",
            None,
            "8000000",
            "Largest request body accepted, in bytes; larger ones get 413. "
            "'none' for no limit.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["argv"] = []

    def parseOptions(self, options: Any = None) -> None:
        # Worker processes get the same options and parse them again.
        self["argv"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint description to listen on, such as
        tcp:8082:interface=127.0.0.1, unix:/run/desperados.sock or
        ssl:8443:privateKey=key.pem:certKey=cert.pem; repeatable, and used
        instead of --port and --ip.
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        # twistd does not put the current directory on sys.path, unlike
        # "python -m", uvicorn, gunicorn and Daphne, so "--plug myapp.App"
        # would not find the myapp.py that it is run next to.  Worker
        # processes inherit the directory and parse the same options.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        if self["log-level"] not in _LOG_LEVELS:
            msg = f"--log-level must be one of {', '.join(_LOG_LEVELS)}, got {self['log-level']!r}"
            raise usage.UsageError(msg)
        if self["drain-timeout"] < 0:
            msg = (
                "--drain-timeout must be 0 or more seconds, "
                f"got {self['drain-timeout']!r}"
            )
            raise usage.UsageError(msg)
        self["response-timeout"] = _parse_timeout(
            "--response-timeout", self["response-timeout"]
        )
        self["max-body-size"] = _parse_size("--max-body-size", self["max-body-size"])
        _check_access_log(self["access-log"])
        startup = self["startup-log"]
        if startup != "false" and startup not in _LOG_LEVELS:
            msg = f"--startup-log must be 'false' or one of {', '.join(_LOG_LEVELS)}, got {startup!r}"
            raise usage.UsageError(msg)
        self["tls"] = self._tls_options()
        self["http-options"] = self._http_options()
        self._check_workers()

    def _check_workers(self) -> None:
        from desperados.workers import worker_count

        try:
            self["worker-count"] = worker_count(self["workers"])
        except ValueError as error:
            raise usage.UsageError(f"--workers: {error}") from None
        if self["worker-count"] == 1:
            return
        for description in self["listen"]:
            kind = description.partition(":")[0].strip().lower()
            if kind == "ssl":
                msg = f"--workers cannot share --listen {description}; use tcp: with --scheme https"
                raise usage.UsageError(msg)
            if kind == "unix":
                # Twisted removes a UNIX socket's file when a port adopted
                # from it stops listening, so one stopping worker would take
                # the socket away from the others.
                msg = f"--workers cannot share the UNIX socket of --listen {description}"
                raise usage.UsageError(msg)

    def _tls_options(self) -> Any:
        scheme = self["scheme"]
        if scheme not in ("http", "https"):
            msg = f"--scheme must be http or https, got {scheme!r}"
            raise usage.UsageError(msg)
        if scheme == "http":
            if self["certfile"] is not None or self["keyfile"] is not None:
                msg = "--certfile and --keyfile need --scheme https"
                raise usage.UsageError(msg)
            return None

        if not (self["certfile"] and self["keyfile"]):
            msg = "--scheme https needs both --certfile and --keyfile"
            raise usage.UsageError(msg)
        for description in self["listen"]:
            if description.partition(":")[0].strip().lower() == "ssl":
                msg = (
                    f"--listen {description} brings its own certificate; "
                    "with --scheme https, use a tcp: description"
                )
                raise usage.UsageError(msg)

        from desperados.tls import certificate_options

        try:
            return certificate_options(self["certfile"], self["keyfile"])
        except (OSError, ValueError) as error:
            msg = f"cannot load the TLS certificate: {error}"
            raise usage.UsageError(msg) from None


    def _http_options(self) -> Any:
        from desperados.http1_options import HTTPOptions

        # Option name, and whether 'none' is allowed.
        counts = [
            ("max-request-line-length", False),
            ("max-header-length", False),
            ("max-header-count", False),
            ("max-head-size", False),
            ("max-requests", True),
            ("max-connections", True),
        ]
        timeouts = [
            ("keepalive-timeout", True),
            ("header-timeout", True),
            ("body-timeout", True),
            ("linger-timeout", False),
            ("tls-handshake-timeout", True),
        ]
        values: dict[str, Any] = {}
        for option, none in counts:
            values[option.replace("-", "_")] = _parse_count(
                f"--{option}", self[option], none=none
            )
        for option, none in timeouts:
            values[option.replace("-", "_")] = _parse_timeout(
                f"--{option}", self[option], none=none
            )
        return HTTPOptions(**values)


def _parse_count(option: str, text: str, *, none: bool = False) -> int | None:
    if none and str(text).lower() == "none":
        return None
    count = int(text) if str(text).isdigit() else 0
    if count <= 0:
        expected = "a positive integer or 'none'" if none else "a positive integer"
        msg = f"{option} must be {expected}, got {text!r}"
        raise usage.UsageError(msg)
    return count


def _parse_timeout(
    option: str, text: str | float | None, *, none: bool = True
) -> float | None:
    if none and (text is None or str(text).lower() == "none"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        expected = "a positive number of seconds" + (" or 'none'" if none else "")
        msg = f"{option} must be {expected}, got {text!r}"
        raise usage.UsageError(msg)
    return seconds


def _check_access_log(path: str | None) -> None:
    if path is None or path == "-":
        return
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        msg = f"--access-log: cannot open {path!r} for appending: {error.strerror}"
        raise usage.UsageError(msg) from None


def _parse_size(option: str, text: str | int | None) -> int | None:
    if text is None or isinstance(text, int):
        return text
    if text.lower() == "none":
        return None
    if not text.isdigit():
        msg = f"{option} must be a number of bytes or 'none', got {text!r}"
        raise usage.UsageError(msg)
    return int(text)


@implementer(IServiceMaker, IPlugin)
class DesperadosServiceMaker:
    """
    Make the desperados service from command-line options.
    """

    tapname = "desperados"
    description = "HTTP and WebSocket server built from plug pipelines."
    options = Options

    def makeService(self, options: Options, reactor: Any = None) -> Any:
        from twisted.logger import LogLevel

        from desperados._logging import set_log_level
        from desperados.server import DesperadosService, make_endpoint, make_site

        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor

        set_log_level(options["log-level"])
        startup = options["startup-log"]
        startup_level = None if startup == "false" else LogLevel.levelWithName(startup)

        if options.get("worker-count", 1) > 1 or options.get("reload"):
            return _make_worker_pool(options, reactor, startup_level)

        tls = options["tls"]
        site = make_site(
            options["plug"],
            reactor=reactor,
            compress=not options["no-compress"],
            response_timeout=options["response-timeout"],
            http_options=options["http-options"],
            max_body_size=options["max-body-size"],
            access_log=options["access-log"],
        )
        if options["listen"]:
            endpoints = [
                make_endpoint(reactor, listen=text, tls=tls) for text in options["listen"]
            ]
        else:
            endpoints = [
                make_endpoint(reactor, port=options["port"], ip=options["ip"], tls=tls)
            ]
        return DesperadosService(
            site,
            endpoints,
            plug_name=options["plug"],
            startup_log=startup_level,
            drain_timeout=options["drain-timeout"],
            reactor=reactor,
            abort_on_signal=True,
        )


def _make_worker_pool(options: Options, reactor: Any, startup_level: Any) -> Any:
    from desperados.server import make_endpoint
    from desperados.workers import WorkerPool

    # The main process listens without TLS or PROXY protocol handling; the
    # workers add both on the sockets they inherit.
    descriptions = options["listen"]
    if descriptions:
        endpoints = [make_endpoint(reactor, listen=text) for text in descriptions]
        haproxy = [text.strip().lower().startswith("haproxy:") for text in descriptions]
    else:
        endpoints = [make_endpoint(reactor, port=options["port"], ip=options["ip"])]
        haproxy = [False]
    pool = WorkerPool(
        endpoints,
        options["argv"],
        options["worker-count"],
        wrap_haproxy=haproxy,
        plug_name=options["plug"],
        startup_log=startup_level,
        # A worker drains for up to --drain-timeout after it stops accepting;
        # the margin covers its accept grace and its exit.
        stop_timeout=options["drain-timeout"] + 10.0,
        reactor=reactor,
    )
    if not options.get("reload"):
        return pool

    from twisted.application.service import MultiService

    from desperados.reload import SourceWatcher, source_paths

    # The watcher starts after the pool, so the first workers are not
    # replaced by a change seen while they start.
    parent = MultiService()
    pool.setServiceParent(parent)
    watcher = SourceWatcher(
        source_paths(options["plug"]),
        lambda path: pool.replace_all(f"{path} changed"),
        reactor=reactor,
    )
    watcher.setServiceParent(parent)
    return parent


service_maker = DesperadosServiceMaker()
