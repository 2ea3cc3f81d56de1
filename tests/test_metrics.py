"""
The Metrics plug: counts scraped over loopback and parsed as Prometheus text.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import close_payload, connect, upgrade_request
from zope.interface.verify import verifyObject

from desperados import Builder, IPlug, endpoints
from desperados.plugs import Metrics, Websocket

pytestmark = pytest.mark.usefixtures("both_http1_paths")

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


def _pipeline(path: str = "/_metrics") -> Builder:
    return Builder(
        [(Metrics, {"path": path}), Websocket, endpoints.Websocket, endpoints.HTTP]
    )


async def _scrape(port: int, path: str = "/_metrics") -> dict[tuple, float]:
    client = await connect(port)
    client.send(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )
    response = await client.read_response()
    await client.wait_closed()
    assert response.status == 200
    assert response.header("content-type").startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def _request(port: int, head: bytes) -> int:
    client = await connect(port)
    client.send(head)
    response = await client.read_response()
    await client.wait_closed()
    return response.status


def test_metrics_provides_iplug():
    assert verifyObject(IPlug, Metrics())


def test_metrics_rejects_bad_options():
    with pytest.raises(ValueError, match="starting with '/'"):
        Metrics().init({"path": "metrics"})
    with pytest.raises(TypeError, match="'colour'"):
        Metrics().init({"colour": "red"})


@pytest_twisted.ensureDeferred
async def test_metrics_counts_http_requests(serve):
    port = await serve(_pipeline())

    for _ in range(3):
        status = await _request(
            port, b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        assert status == 404
    status = await _request(
        port, b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert status == 404
    samples = await _scrape(port)

    requests = "desperados_http_requests_total"
    duration = "desperados_http_request_duration_seconds"
    assert samples[(requests, (("method", "GET"), ("status", "404")))] == 3
    assert samples[(requests, (("method", "other"), ("status", "404")))] == 1
    assert samples[(duration + "_count", (("method", "GET"),))] == 3
    assert samples[(duration + "_bucket", (("le", "+Inf"), ("method", "GET")))] == 3
    assert samples[(duration + "_sum", (("method", "GET"),))] > 0
    # Only the scraping connection is open while the response is built.
    assert samples[("desperados_http_connections", ())] == 1


@pytest_twisted.ensureDeferred
async def test_metrics_counts_rejected_requests(serve):
    port = await serve(_pipeline())

    status = await _request(port, b"\x01\x02 garbage\r\n\r\n")
    assert status == 400
    status = await _request(
        port, b"GET /a HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 20_000 + b"\r\n\r\n"
    )
    assert status == 431
    status = await _request(
        port, b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n\r\n"
    )
    assert status == 413
    samples = await _scrape(port)

    requests = "desperados_http_requests_total"
    assert samples[(requests, (("method", "other"), ("status", "400")))] == 1
    assert samples[(requests, (("method", "GET"), ("status", "431")))] == 1
    assert samples[(requests, (("method", "POST"), ("status", "413")))] == 1


@pytest_twisted.ensureDeferred
async def test_metrics_counts_websocket_traffic(serve):
    port = await serve(_pipeline())
    client = await connect(port)
    client.send(upgrade_request("/chat"))
    response = await client.read_response()
    assert response.status == 101

    client.send_frame(TEXT, b"hello")
    assert await client.read_frame() == (TEXT, b"hello")
    client.send_frame(BINARY, b"\x00\x01\x02")
    assert await client.read_frame() == (BINARY, b"\x00\x01\x02")
    during = await _scrape(port)
    client.send_frame(CLOSE, close_payload(1000))
    await client.read_frame()
    await client.wait_closed()
    after = await _scrape(port)

    messages = "desperados_websocket_messages_total"
    payload = "desperados_websocket_payload_bytes_total"
    assert during[("desperados_websocket_connections", ())] == 1
    assert during[("desperados_http_connections", ())] == 1
    assert during[(messages, (("direction", "in"), ("opcode", "text")))] == 1
    assert during[(messages, (("direction", "in"), ("opcode", "binary")))] == 1
    assert during[(messages, (("direction", "out"), ("opcode", "text")))] == 1
    assert during[(messages, (("direction", "out"), ("opcode", "binary")))] == 1
    assert during[(payload, (("direction", "in"),))] == 8
    assert during[(payload, (("direction", "out"),))] == 8
    upgrades = (
        "desperados_http_requests_total",
        (("method", "GET"), ("status", "101")),
    )
    assert during[upgrades] == 1
    assert after[("desperados_websocket_connections", ())] == 0


@pytest_twisted.ensureDeferred
async def test_metrics_counts_upgrade_rejections(serve):
    port = await serve(_pipeline())

    status = await _request(port, upgrade_request("/chat", version="8"))
    assert status == 426
    status = await _request(port, upgrade_request("/chat", method="POST"))
    assert status == 400
    samples = await _scrape(port)

    rejections = "desperados_websocket_upgrade_rejections_total"
    by_status = {
        labels[1][1]: value
        for (name, labels), value in samples.items()
        if name == rejections
    }
    assert by_status == {"426": 1, "400": 1}
    reasons = [
        dict(labels)["reason"]
        for (name, labels), _ in samples.items()
        if name == rejections
    ]
    assert "a WebSocket upgrade must use the GET method" in reasons
    assert samples[("desperados_websocket_connections", ())] == 0


@pytest_twisted.ensureDeferred
async def test_metrics_path_and_registry_are_options(serve):
    registry = CollectorRegistry()
    port = await serve(
        Builder([(Metrics, {"path": "/stats", "registry": registry}), endpoints.HTTP])
    )

    not_here = await _request(
        port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    samples = await _scrape(port, "/stats")

    assert not_here == 404
    assert (
        samples[
            ("desperados_http_requests_total", (("method", "GET"), ("status", "404")))
        ]
        == 1
    )
    assert (
        registry.get_sample_value(
            "desperados_http_requests_total", {"method": "GET", "status": "404"}
        )
        == 1
    )
