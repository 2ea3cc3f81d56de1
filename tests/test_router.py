"""
Router: patterns, methods, 405, fall-through, forward, and routes to WebSockets.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from support import close_payload, connect, upgrade_request
from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from desperados import Builder, IPlug, Router, endpoints, testing
from desperados.endpoints import HTTP, Echo
from desperados.plugs import Websocket
from desperados.router import (
    Route,
    delete,
    forward,
    get,
    head,
    match,
    patch,
    post,
    put,
    route,
)

TEXT, CLOSE = 0x1, 0x8


def _reply(text):
    """
    Build a plug that sends 200 with C{text} and the route's parameters.
    """

    def plug(conn, opts):
        params = ",".join(
            f"{key}={value}" for key, value in sorted(conn.path_params.items())
        )
        body = f"{text} {params} script={conn.script_name} path={conn.path_info}"
        return conn.send_resp(200, body)

    plug.__name__ = f"reply_{text}"
    return plug


def _upgrade_to_echo(conn, opts):
    return conn.upgrade(Echo())


class Users(Router):
    routes = [
        get("/", _reply("list")),
        post("/", _reply("create")),
        get("/:id", _reply("show")),
        route(["PUT", "PATCH"], "/:id", _reply("update")),
    ]


class App(Router):
    routes = [
        get("/", _reply("index")),
        get("/hello/:name", _reply("hello")),
        get("/files/*path", _reply("file")),
        put("/things/:id", _reply("put")),
        patch("/things/:id", _reply("patch")),
        delete("/things/:id", _reply("delete")),
        head("/only-head", _reply("head")),
        match("/any", _reply("any")),
        forward("/users", Users),
        forward("/orgs/:org/users", Users),
        get("/ws", _upgrade_to_echo),
        get(
            "/ws-pipeline",
            Builder([Websocket, (endpoints.Websocket, {"handler": Echo()})]),
        ),
    ]


def _get(path, method="GET", plug=App, **kwargs):
    return testing.call_sync(plug, testing.conn(method, path, **kwargs))


def _body(conn):
    return testing.sent(conn).body.decode()


def test_router_provides_iplug():
    assert verifyObject(IPlug, Router())


class TestMatching:
    def test_root_and_literal(self):
        assert _body(_get("/")).startswith("index ")

    def test_parameter_segment(self):
        conn = _get("/hello/J%C3%BCrgen")

        assert conn.path_params == {"name": "Jürgen"}
        assert _body(conn).startswith("hello name=Jürgen")

    def test_glob_takes_rest(self):
        deep = _get("/files/a/b/c.txt")
        empty = _get("/files")

        assert deep.path_params == {"path": ["a", "b", "c.txt"]}
        assert empty.path_params == {"path": []}

    def test_trailing_slash_and_empty_segments_ignored(self):
        assert _get("/hello//ada/").path_params == {"name": "ada"}

    def test_extra_segment_does_not_match(self):
        conn = _get("/hello/ada/more")

        assert conn.state == "unset"
        assert not conn.halted

    @pytest.mark.parametrize(
        ("method", "text"), [("PUT", "put"), ("PATCH", "patch"), ("DELETE", "delete")]
    )
    def test_method_helpers(self, method, text):
        assert _body(_get("/things/1", method)).startswith(text)

    def test_get_route_takes_head(self):
        conn = _get("/hello/ada", "HEAD")

        assert testing.sent(conn).status == 200
        assert testing.sent(conn).body == b""

    def test_head_route_does_not_take_get(self):
        assert testing.sent(_get("/only-head", "HEAD")).status == 200
        assert testing.sent(_get("/only-head", "GET")).status == 405

    def test_match_takes_any_method(self):
        for method in ("GET", "POST", "BREW"):
            assert _body(_get("/any", method)).startswith("any")

    def test_first_matching_route_wins(self):
        router = Router([get("/a/:x", _reply("param")), get("/a/b", _reply("literal"))])

        assert _body(_get("/a/b", plug=router)).startswith("param")

    def test_matched_route_halts(self):
        assert _get("/").halted


class TestNoMatch:
    def test_unknown_path_falls_through(self):
        conn = testing.call_sync(Builder([App, HTTP]), testing.conn("GET", "/nope"))

        assert testing.sent(conn).status == 404
        assert testing.sent(conn).body == b"not found"

    def test_catch_all_route(self):
        router = Router([get("/", _reply("index")), match("/*rest", _reply("catch"))])

        conn = _get("/some/where", plug=router)

        assert _body(conn).startswith("catch rest=['some', 'where']")

    def test_wrong_method_is_405_with_allow(self):
        conn = _get("/things/1", "POST")
        response = testing.sent(conn)

        assert conn.halted
        assert response.status == 405
        assert response.header("allow") == "DELETE, PATCH, PUT"
        assert response.body == b"method not allowed"

    def test_405_allow_lists_head_for_get(self):
        response = testing.sent(_get("/hello/ada", "POST"))

        assert response.header("allow") == "GET, HEAD"

    def test_route_that_does_not_answer_falls_through(self):
        router = Router([get("/", lambda conn, opts: conn.assign("seen", True))])

        conn = testing.call_sync(Builder([router, HTTP]), testing.conn("GET", "/"))

        assert conn.assigns == {"seen": True}
        assert testing.sent(conn).status == 404


class TestForward:
    def test_adjusts_script_name_and_path_info(self):
        conn = _get("/users/42")

        assert _body(conn) == "show id=42 script=['users'] path=['42']"
        assert conn.script_name == []
        assert conn.path_info == ["users", "42"]

    def test_prefix_alone_reaches_root(self):
        assert _body(_get("/users")).startswith("list ")
        assert _body(_get("/users", "POST")).startswith("create ")

    def test_params_in_prefix_are_merged(self):
        conn = _get("/orgs/acme/users/7", "PATCH")

        assert conn.path_params == {"org": "acme", "id": "7"}
        assert (
            _body(conn)
            == "update id=7,org=acme script=['orgs', 'acme', 'users'] path=['7']"
        )

    def test_inner_405(self):
        response = testing.sent(_get("/users/7", "DELETE"))

        assert response.status == 405
        assert response.header("allow") == "GET, HEAD, PATCH, PUT"

    def test_inner_miss_falls_through_with_path_restored(self):
        conn = testing.call_sync(
            Builder([App, HTTP]), testing.conn("GET", "/users/7/x")
        )

        assert testing.sent(conn).status == 404
        assert conn.path_info == ["users", "7", "x"]
        assert conn.script_name == []

    @pytest_twisted.ensureDeferred
    async def test_waits_for_deferred_then_restores(self):
        def later(conn, opts):
            return deferLater(
                reactor, 0, lambda: conn.send_resp(200, str(conn.path_info))
            )

        router = Router([forward("/api", Router([get("/v1/:x", later)]))])

        conn = await testing.call(router, testing.conn("GET", "/api/v1/thing"))

        assert testing.sent(conn).body == b"['v1', 'thing']"
        assert conn.path_info == ["api", "v1", "thing"]
        assert conn.halted


class TestInit:
    @pytest.mark.parametrize(
        ("pattern", "message"),
        [
            ("users", "starting with '/'"),
            ("/users/:", "parameter name after ':'"),
            ("/users/:1x", "parameter name after ':'"),
            ("/a/*rest/b", "glob must be the last segment"),
            ("/:id/:id", "appears twice"),
        ],
    )
    def test_bad_pattern_fails_at_init(self, pattern, message):
        with pytest.raises(ValueError, match=message):
            Router([get(pattern, _reply("x"))]).init(None)

    def test_forward_prefix_cannot_glob(self):
        with pytest.raises(ValueError, match="cannot end with a glob"):
            Router([forward("/api/*rest", App)]).init(None)

    def test_entry_must_be_route(self):
        with pytest.raises(TypeError, match="expected a Route"):
            Router([("/users", _reply("x"))]).init(None)

    def test_route_plug_must_be_plug(self):
        with pytest.raises(TypeError, match="expected a plug"):
            Router([get("/", 42)]).init(None)

    def test_route_takes_one_method_name(self):
        assert route("post", "/x", App) == Route(frozenset({"POST"}), "/x", App)

    def test_route_is_plain_value(self):
        assert get("/x", App) == Route(frozenset({"GET", "HEAD"}), "/x", App)


# Over real loopback sockets.


@pytest_twisted.ensureDeferred
async def test_router_over_socket(serve):
    port = await serve(Builder([App, HTTP]))
    client = await connect(port)

    requests = [
        b"GET /hello/ada HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"DELETE /hello/ada HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /orgs/acme/users/7 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ]
    responses = []
    for request in requests:
        client.send(request)
        responses.append(await client.read_response())
    client.transport.loseConnection()

    hello, not_allowed, not_found, forwarded = responses
    assert hello.status == 200
    assert hello.body == b"hello name=ada script=[] path=['hello', 'ada']"
    assert not_allowed.status == 405
    assert not_allowed.header("allow") == "GET, HEAD"
    assert not_allowed.body == b"method not allowed"
    assert not_found.status == 404
    assert not_found.body == b"not found"
    assert forwarded.body == (
        b"show id=7,org=acme script=['orgs', 'acme', 'users'] path=['7']"
    )


@pytest_twisted.ensureDeferred
async def test_router_mounted_below_prefix(serve):
    """
    A PlugResource mounted at /mount gives the Router the path below it.
    """
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from desperados import PlugResource

    root = Resource()
    root.putChild(b"mount", PlugResource(Builder([App, HTTP])))
    listening = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        client = await connect(listening.getHost().port)
        client.send(b"GET /mount/hello/bo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = await client.read_response()
        client.transport.loseConnection()
    finally:
        await listening.stopListening()

    assert response.body == b"hello name=bo script=['mount'] path=['hello', 'bo']"


@pytest.mark.parametrize("path", ["/ws", "/ws-pipeline"])
@pytest_twisted.ensureDeferred
async def test_websocket_route_upgrades(serve, path):
    port = await serve(Builder([App, HTTP]))

    client = await connect(port)
    client.send(upgrade_request(path))
    upgraded = await client.read_response()
    client.send_frame(TEXT, b"through the router")
    echoed = await client.read_frame()
    client.send_frame(CLOSE, close_payload(1000))
    await client.read_frame()
    await client.wait_closed()

    assert upgraded.status == 101
    assert echoed == (TEXT, b"through the router")


@pytest_twisted.ensureDeferred
async def test_websocket_route_rejects_plain_get(serve):
    port = await serve(Builder([App, HTTP]))
    client = await connect(port)

    client.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    rejected = await client.read_response()
    await client.wait_closed()
    other = await connect(port)
    other.send(upgrade_request("/elsewhere"))
    not_routed = await other.read_response()
    other.transport.loseConnection()

    assert rejected.status == 400
    assert rejected.body == b"the Connection header must contain 'upgrade'"
    assert not_routed.status == 404
