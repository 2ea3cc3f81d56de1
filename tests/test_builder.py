"""
Builder: plug order, halting, Deferreds, coroutines, nesting and bad plugs.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from desperados import Builder, Conn, IPlug
from desperados.endpoints import HTTP
from desperados.endpoints import Websocket as WebsocketEndpoint
from desperados.plugs import Default, Inspect, Websocket


def _trace(name):
    def plug(conn, opts):
        conn.assigns.setdefault("trace", []).append((name, opts))
        return conn

    plug.__name__ = f"trace_{name}"
    return plug


def _halting(conn, opts):
    conn.assigns.setdefault("trace", []).append(("halt", opts))
    return conn.halt()


@implementer(IPlug)
class _Counter:
    inits = 0

    def init(self, opts):
        type(self).inits += 1
        return {"step": opts or 1}

    def call(self, conn, state):
        conn.assigns["count"] = conn.assigns.get("count", 0) + state["step"]
        return conn


def _run(plug, conn=None):
    conn = conn or Conn()
    state = plug.init(None)
    return plug.call(conn, state)


def test_plugs_run_in_order_with_options():
    pipeline = Builder([_trace("a"), (_trace("b"), {"x": 1}), _trace("c")])

    conn = _run(pipeline)

    assert conn.assigns["trace"] == [("a", None), ("b", {"x": 1}), ("c", None)]


def test_halted_conn_skips_later_plugs():
    pipeline = Builder([_trace("a"), _halting, _trace("never")])

    conn = _run(pipeline)

    assert conn.halted
    assert conn.assigns["trace"] == [("a", None), ("halt", None)]


def test_init_runs_once_per_pipeline():
    _Counter.inits = 0
    pipeline = Builder([(_Counter, 2)])
    state = pipeline.init(None)

    for _ in range(3):
        conn = pipeline.call(Conn(), state)

    assert _Counter.inits == 1
    assert conn.assigns["count"] == 2


def test_subclass_declares_plugs():
    class App(Builder):
        plugs = [_trace("first"), (_Counter, 5)]

    conn = _run(App())

    assert conn.assigns["trace"] == [("first", None)]
    assert conn.assigns["count"] == 5


def test_builders_nest():
    inner = Builder([_trace("inner"), _halting])
    outer = Builder([_trace("outer"), (inner, None), _trace("after")])

    conn = _run(outer)

    assert conn.assigns["trace"] == [("outer", None), ("inner", None), ("halt", None)]


def test_dotted_name_is_a_plug():
    conn = _run(Builder(["desperados.plugs.Websocket"]))

    assert "websocket" not in conn.assigns


def test_deferred_plug_is_waited_for():
    pending = Deferred()

    def waiting(conn, opts):
        return pending.addCallback(lambda _: conn.assign("waited", True))

    result = _run(Builder([waiting, _trace("after")]))
    assert isinstance(result, Deferred)
    seen = []
    result.addCallback(seen.append)

    assert seen == []
    pending.callback(None)
    assert seen[0].assigns["waited"] is True
    assert seen[0].assigns["trace"] == [("after", None)]


def test_coroutine_plug_is_waited_for():
    async def waiting(conn, opts):
        await succeed(None)
        return conn.assign("awaited", opts)

    result = _run(Builder([(waiting, "yes"), _trace("after")]))
    seen = []
    result.addCallback(seen.append)

    assert seen[0].assigns["awaited"] == "yes"
    assert seen[0].assigns["trace"] == [("after", None)]


def test_plug_returning_non_conn_raises_type_error():
    def broken(conn, opts):
        return "not a conn"

    with pytest.raises(TypeError, match="returned 'not a conn', expected a Conn"):
        _run(Builder([broken]))


def test_deferred_firing_non_conn_fails():
    def broken(conn, opts):
        return succeed(None)

    result = _run(Builder([broken]))
    failures = []
    result.addErrback(failures.append)

    assert failures[0].check(TypeError)
    assert "returned None, expected a Conn" in str(failures[0].value)


def test_non_plug_entry_fails_at_build():
    with pytest.raises(TypeError, match="expected a plug or a function"):
        Builder([42]).init(None)


def test_class_without_iplug_fails_at_build():
    class NotAPlug:
        pass

    with pytest.raises(TypeError, match="expected a class implementing IPlug"):
        Builder([NotAPlug]).init(None)


@pytest.mark.parametrize(
    "plug", [Builder(), Default(), Inspect(), Websocket(), WebsocketEndpoint(), HTTP()]
)
def test_builtin_plugs_provide_iplug(plug):
    assert verifyObject(IPlug, plug)


def test_endpoint_rejects_bad_options_at_build():
    with pytest.raises(TypeError):
        WebsocketEndpoint().init({"no_such_option": 1})
    with pytest.raises(ValueError, match="max_frame_size"):
        WebsocketEndpoint().init({"max_frame_size": 0})
