"""
The plug that counts requests and WebSockets and serves them to Prometheus.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from desperados import telemetry
from desperados.conn import Conn
from desperados.interfaces import IPlug

# Request methods get their own label value; any other method counts as
# "other", so that a client cannot create label values at will.
_METHODS = frozenset(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
)


class _Collector:
    """
    The Prometheus metrics of one Metrics plug, updated from telemetry events.
    """

    def __init__(self, registry: Any, buckets: tuple[float, ...] | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # "livesum" adds up the gauges of the worker processes that are alive
        # when prometheus_client runs in multiprocess mode; one process
        # ignores it.
        self.requests = Counter(
            "desperados_http_requests",
            "HTTP requests answered, by method and status.",
            ["method", "status"],
            registry=registry,
        )
        histogram_options = {} if buckets is None else {"buckets": buckets}
        self.duration = Histogram(
            "desperados_http_request_duration_seconds",
            "Time from the request head to the end of the response.",
            ["method"],
            registry=registry,
            **histogram_options,
        )
        self.connections = Gauge(
            "desperados_http_connections",
            "Open HTTP connections, not counting those upgraded to WebSocket.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.websockets = Gauge(
            "desperados_websocket_connections",
            "Open WebSocket connections.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.messages = Counter(
            "desperados_websocket_messages",
            "WebSocket messages, by direction and opcode.",
            ["direction", "opcode"],
            registry=registry,
        )
        self.bytes = Counter(
            "desperados_websocket_payload_bytes",
            "WebSocket message payload bytes before compression, by direction.",
            ["direction"],
            registry=registry,
        )
        self.rejections = Counter(
            "desperados_websocket_upgrade_rejections",
            "WebSocket upgrade requests answered with an error, by status and reason.",
            ["status", "reason"],
            registry=registry,
        )

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        if event == "websocket.message.in" or event == "websocket.message.out":
            direction = "in" if event == "websocket.message.in" else "out"
            self.messages.labels(direction, fields["opcode"]).inc()
            self.bytes.labels(direction).inc(fields["size"])
        elif event == "http.request.stop":
            method = fields["method"]
            if method not in _METHODS:
                method = "other"
            status = fields["status"]
            self.requests.labels(
                method, "none" if status is None else str(status)
            ).inc()
            self.duration.labels(method).observe(fields["duration"])
        elif event == "http.request.reject":
            method = fields["method"]
            if method not in _METHODS:
                method = "other"
            self.requests.labels(method, str(fields["status"])).inc()
        elif event == "http.connection.open":
            self.connections.inc()
        elif event == "http.connection.close" or event == "http.connection.upgrade":
            self.connections.dec()
        elif event == "websocket.open":
            self.websockets.inc()
        elif event == "websocket.close":
            self.websockets.dec()
        elif event == "websocket.upgrade.reject":
            self.rejections.labels(str(fields["status"]), fields["reason"]).inc()


class _State:
    __slots__ = ("collector", "path", "registry")

    def __init__(self, path: str, registry: Any, collector: _Collector) -> None:
        self.path = path
        self.registry = registry
        self.collector = collector


@implementer(IPlug)
class Metrics:
    """
    Count requests and WebSockets, and serve the counts in Prometheus' format.

    Put it first in the pipeline.  It responds to C{GET} and C{HEAD} at C{path}
    with the text exposition format and passes every other request on.  The
    counts cover every connection of the process that a desperados Site
    accepted, from the moment the pipeline is built:

    - C{desperados_http_requests_total} by C{method} and C{status};
    - C{desperados_http_request_duration_seconds}, a histogram by C{method};
    - C{desperados_http_connections}, open HTTP connections;
    - C{desperados_websocket_connections}, open WebSockets;
    - C{desperados_websocket_messages_total} by C{direction} (C{in},
      C{out}) and C{opcode} (C{text}, C{binary});
    - C{desperados_websocket_payload_bytes_total} by C{direction};
    - C{desperados_websocket_upgrade_rejections_total} by C{status} and
      C{reason}.

    When the environment variable C{PROMETHEUS_MULTIPROC_DIR} is set, as the
    worker processes of C{twistd desperados --workers} have it, the answer
    adds up the counts of every process (prometheus_client's multiprocess
    mode).

    Options (a mapping, all optional): C{path} (C{"/metrics"} by default),
    C{registry} (a C{prometheus_client.CollectorRegistry} to add the metrics
    to, a new one by default) and C{buckets} (the duration histogram's bucket
    bounds in seconds).

    Needs the C{prometheus_client} package: C{pip install desperados[metrics]}.
    """

    def init(self, opts: Mapping[str, object] | None) -> _State:
        options = dict(opts or {})
        path = options.pop("path", "/metrics")
        registry = options.pop("registry", None)
        buckets = options.pop("buckets", None)
        if options:
            msg = (
                "expected only path, registry and buckets for Metrics, "
                f"got {sorted(options)!r}"
            )
            raise TypeError(msg)
        if not isinstance(path, str) or not path.startswith("/"):
            msg = f"expected a path starting with '/' for Metrics, got {path!r}"
            raise ValueError(msg)

        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            msg = (
                "the Metrics plug needs prometheus_client: "
                "pip install 'desperados[metrics]'"
            )
            raise ImportError(msg) from None
        if registry is None:
            registry = CollectorRegistry()
        collector = _Collector(registry, None if buckets is None else tuple(buckets))  # type: ignore[arg-type]
        exposed = registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            # In multiprocess mode the values live in files shared by all
            # workers; expose those, not this process' metric objects.
            exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(exposed)
        telemetry.add_observer(collector)
        return _State(path, exposed, collector)

    def call(self, conn: Conn, state: _State) -> Conn:
        if conn.request_path != state.path or conn.method not in ("GET", "HEAD"):
            return conn
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        conn.put_resp_header("content-type", CONTENT_TYPE_LATEST)
        return conn.send_resp(200, generate_latest(state.registry)).halt()
