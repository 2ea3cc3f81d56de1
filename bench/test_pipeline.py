"""
Microbenchmarks of the pipeline itself: a Conn, a plug call, the default 404.

Not part of the test suite (pytest collects only tests/).  Run them with
pytest-benchmark, which bench/run.py installs into bench/.venv:

    bench/.venv/bin/pytest bench/test_pipeline.py --benchmark-autosave
    bench/.venv/bin/pytest bench/test_pipeline.py --benchmark-compare

The second command compares with the last saved run, so a change that makes
a plug call or a Conn slower shows up as a larger figure.
"""

from __future__ import annotations

import pytest

from desperados import Builder, testing
from desperados.builder import compile_plug
from desperados.conn import Conn

HEADERS = [
    ("host", "127.0.0.1:8082"),
    ("user-agent", "bench"),
    ("accept", "*/*"),
]


def passing(conn: Conn, opts: object) -> Conn:
    return conn


def build_conn() -> Conn:
    return Conn(
        method="GET",
        host="127.0.0.1",
        port=8082,
        request_path="/some/path",
        path_info=["some", "path"],
        query_string="x=1",
        req_headers=HEADERS,
    )


def run_pipeline(plug: object) -> Conn:
    conn = build_conn()
    return plug.call(conn, plug.state)


def test_conn_build(benchmark):
    conn = benchmark(build_conn)

    assert conn.path_info == ["some", "path"]


@pytest.mark.parametrize("plugs", [0, 1, 10])
def test_pipeline_of_passing_plugs(benchmark, plugs):
    """
    The cost per plug call is the difference between these, divided by plugs.
    """
    plug = compile_plug(Builder([passing] * plugs))

    conn = benchmark(run_pipeline, plug)

    assert conn.state == "unset"


def test_default_pipeline_404(benchmark):
    """
    The default pipeline on an in-memory Conn, response writing included.
    """
    plug = compile_plug("desperados.plugs.Default")

    def answer() -> Conn:
        conn = testing.conn("GET", "/some/path?x=1", headers=HEADERS)
        return plug.call(conn, plug.state)

    conn = benchmark(answer)

    assert testing.sent(conn).status == 404
