"""
Router: a plug that sends each request to the plug of the route it matches.

Declare the routes in order; the first route whose method and path match
gets the request::

    from desperados import Router
    from desperados.router import forward, get, match, post

    class App(Router):
        routes = [
            get("/", index),
            get("/users/:id", show_user),
            post("/users", (CreateUser, {"max_name": 80})),
            get("/files/*path", serve_file),
            forward("/api", ApiRouter),
        ]

A path pattern is a list of segments: a literal (C{users}), a parameter
(C{:id}, one segment) or, last, a glob (C{*path}, the remaining segments,
possibly none).  Parameters land in C{conn.path_params}, a glob as a list of
segments.  Patterns are matched against C{conn.path_info}, the decoded path
below the point where the pipeline is mounted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.reflect import qual
from zope.interface import implementer

from desperados._logging import observer as log_observer
from desperados.builder import Builder, PlugSpec, compile_plug
from desperados.conn import UNSET, Conn
from desperados.interfaces import IPlug

__all__ = [
    "Route",
    "Router",
    "delete",
    "forward",
    "get",
    "head",
    "match",
    "options",
    "patch",
    "post",
    "put",
    "route",
]

log = Logger(namespace="desperados.router", observer=log_observer)


@dataclass(frozen=True)
class Route:
    """
    One entry of a L{Router}: which requests it takes and the plug they go to.

    Build it with L{route}, L{match}, L{forward} or a method helper such as
    L{get}.

    :ivar methods: the methods taken, upper-case; None for every method.
    :ivar path: the path pattern, such as C{/users/:id}.
    :ivar plug: any entry a L{Builder} accepts, C{(plug, opts)} included.
    :ivar prefix: True for a L{forward}: the path is a prefix, and the
        matched segments move from C{path_info} to C{script_name}.
    """

    methods: frozenset[str] | None
    path: str
    plug: PlugSpec
    prefix: bool = False


def route(methods: str | Iterable[str] | None, path: str, plug: PlugSpec) -> Route:
    """
    Route requests with one of C{methods} whose path matches C{path} to C{plug}.

    A route that takes GET also takes HEAD.

    :param methods: a method name, several, or None for every method.
    """
    if methods is None:
        return Route(None, path, plug)
    if isinstance(methods, str):
        methods = [methods]
    names = frozenset(method.upper() for method in methods)
    if "GET" in names:
        names |= {"HEAD"}
    return Route(names, path, plug)


def match(path: str, plug: PlugSpec) -> Route:
    """
    Route requests with any method whose path matches C{path} to C{plug}.

    C{match("/*_", plug)} is a catch-all.
    """
    return route(None, path, plug)


def get(path: str, plug: PlugSpec) -> Route:
    """
    Route GET and HEAD requests for C{path} to C{plug}.
    """
    return route(("GET",), path, plug)


def post(path: str, plug: PlugSpec) -> Route:
    """
    Route POST requests for C{path} to C{plug}.
    """
    return route(("POST",), path, plug)


def put(path: str, plug: PlugSpec) -> Route:
    """
    Route PUT requests for C{path} to C{plug}.
    """
    return route(("PUT",), path, plug)


def patch(path: str, plug: PlugSpec) -> Route:
    """
    Route PATCH requests for C{path} to C{plug}.
    """
    return route(("PATCH",), path, plug)


def delete(path: str, plug: PlugSpec) -> Route:
    """
    Route DELETE requests for C{path} to C{plug}.
    """
    return route(("DELETE",), path, plug)


def options(path: str, plug: PlugSpec) -> Route:
    """
    Route OPTIONS requests for C{path} to C{plug}.
    """
    return route(("OPTIONS",), path, plug)


def head(path: str, plug: PlugSpec) -> Route:
    """
    Route HEAD requests for C{path} to C{plug}, ahead of a GET route.
    """
    return route(("HEAD",), path, plug)


def forward(prefix: str, plug: PlugSpec) -> Route:
    """
    Hand every request whose path starts with C{prefix} to another pipeline.

    The matched segments move from C{conn.path_info} to C{conn.script_name}
    while C{plug} runs, so it routes on the rest of the path, and are put
    back afterwards.  The prefix may hold parameters (C{/users/:id}) but no
    glob.
    """
    return Route(None, prefix, plug, prefix=True)


class _CompiledRoute:
    """
    A route with its pattern split into segments and its plug initialized.
    """

    __slots__ = ("glob", "methods", "plug", "prefix", "route", "segments")

    def __init__(self, route: Route) -> None:
        if not isinstance(route, Route):
            msg = f"expected a Route made by get, post, match or forward, got {route!r}"
            raise TypeError(msg)
        self.route = route
        self.methods = route.methods
        self.prefix = route.prefix
        self.segments, self.glob = _compile_pattern(
            route.path, allow_glob=not route.prefix
        )
        # A one-plug pipeline, so a route's plug may be anything a Builder
        # takes and may return a Deferred or a coroutine.
        self.plug: Any = compile_plug(Builder([route.plug]))

    def match_path(self, path_info: list[str]) -> dict[str, str | list[str]] | None:
        count = len(self.segments)
        if len(path_info) < count or (
            len(path_info) > count and self.glob is None and not self.prefix
        ):
            return None
        params: dict[str, str | list[str]] = {}
        for (literal, name), segment in zip(self.segments, path_info, strict=False):
            if name is None:
                if segment != literal:
                    return None
            else:
                params[name] = segment
        if self.glob is not None:
            params[self.glob] = path_info[count:]
        return params


def _compile_pattern(
    path: str, *, allow_glob: bool
) -> tuple[tuple[tuple[str, str | None], ...], str | None]:
    """
    Split a path pattern into C{(literal, parameter name)} pairs and a glob name.

    :raises ValueError: for a pattern that does not start with C{/}, a bad
        or repeated parameter name, or a glob that is not last.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        msg = f"expected a path pattern starting with '/', got {path!r}"
        raise ValueError(msg)
    parts = [part for part in path.split("/") if part]
    segments: list[tuple[str, str | None]] = []
    glob: str | None = None
    names: set[str] = set()
    for index, part in enumerate(parts):
        kind, name = part[0], part[1:]
        if kind not in ":*":
            segments.append((part, None))
            continue
        if not name.isidentifier():
            msg = f"expected a parameter name after {kind!r} in {path!r}, got {name!r}"
            raise ValueError(msg)
        if name in names:
            msg = f"parameter {name!r} appears twice in {path!r}"
            raise ValueError(msg)
        names.add(name)
        if kind == ":":
            segments.append(("", name))
        elif not allow_glob:
            msg = f"a forward prefix cannot end with a glob, got {path!r}"
            raise ValueError(msg)
        elif index != len(parts) - 1:
            msg = f"a glob must be the last segment of the pattern, got {path!r}"
            raise ValueError(msg)
        else:
            glob = name
    return tuple(segments), glob


@implementer(IPlug)
class Router:
    """
    Send each request to the plug of the first route that matches it.

    Declare the routes as a C{routes} list on a subclass, or pass them:
    C{Router([get("/", index)])}.  For each request, in order:

      - the first route whose path and method match gets the Conn, with
        C{conn.path_params} updated;
      - if some route matched the path but none took the method, the
        Router sends C{405 method not allowed} with an C{Allow} header
        listing the methods those routes take;
      - otherwise the Conn goes on unchanged to the next plug of the
        pipeline (a 404 endpoint, say); add C{match("/*_", plug)} last for
        a catch-all inside the Router.

    After a route's plug returns, the Router halts the Conn if the plug set,
    sent or upgraded the response, so the plugs after the Router are
    skipped; if it did none of that, the Conn goes on to them.
    """

    routes: ClassVar[Sequence[Route]] = ()

    def __init__(self, routes: Sequence[Route] | None = None) -> None:
        if routes is not None:
            self.routes = list(routes)  # type: ignore[misc]

    def __repr__(self) -> str:
        return qual(type(self))

    def init(self, opts: object = None) -> tuple[_CompiledRoute, ...]:
        """
        Compile every route's pattern and initialize its plug.

        :param opts: unused; each route carries its plug's options.
        :raises TypeError: for an entry that is not a L{Route} or a plug
            that is not a plug.
        :raises ValueError: for an invalid path pattern.
        """
        return tuple(_CompiledRoute(route) for route in self.routes)

    def call(
        self, conn: Conn, state: tuple[_CompiledRoute, ...]
    ) -> Conn | Deferred[Conn]:
        """
        Dispatch C{conn} to its route, send 405, or pass it on.
        """
        path_info = conn.path_info
        allowed: set[str] = set()
        for compiled in state:
            params = compiled.match_path(path_info)
            if params is None:
                continue
            if compiled.methods is None or conn.method in compiled.methods:
                return _dispatch(compiled, conn, params)
            allowed |= compiled.methods

        if allowed:
            return _method_not_allowed(conn, allowed)
        return conn


def _dispatch(
    compiled: _CompiledRoute, conn: Conn, params: dict[str, str | list[str]]
) -> Conn | Deferred[Conn]:
    conn.path_params = {**conn.path_params, **params}
    path_info, script_name = conn.path_info, conn.script_name
    if compiled.prefix:
        consumed = len(compiled.segments)
        conn.script_name = [*script_name, *path_info[:consumed]]
        conn.path_info = path_info[consumed:]

    def done(result: Conn) -> Conn:
        if compiled.prefix:
            result.path_info, result.script_name = path_info, script_name
        if result.state != UNSET:
            result.halt()
        return result

    plug = compiled.plug
    result = plug.call(conn, plug.state)
    if isinstance(result, Deferred):
        return result.addCallback(done)
    return done(result)  # type: ignore[arg-type]


def _method_not_allowed(conn: Conn, allowed: set[str]) -> Conn:
    # RFC 9110 section 15.5.6: a 405 lists the methods the resource takes.
    allow = ", ".join(sorted(allowed))
    log.debug(
        "{method} {path} matched a route but not its methods ({allow})",
        method=conn.method,
        path=conn.request_path,
        allow=allow,
    )
    conn.put_resp_header("allow", allow)
    conn.put_resp_content_type("text/plain")
    return conn.send_resp(405, b"method not allowed").halt()
