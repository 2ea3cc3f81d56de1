"""
Builder: a pipeline of plugs, itself a plug.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.reflect import namedAny, qual
from zope.interface import implementer

from desperados.conn import Conn
from desperados.interfaces import IPlug

PlugSpec = Any
"""
One entry of a pipeline: a plug class or instance, a function
C{f(conn, opts) -> conn}, a dotted name of either, or a C{(plug, opts)} pair.
"""


class _CompiledPlug:
    __slots__ = ("call", "name", "state")

    def __init__(self, name: str, call: Callable[[Conn, object], object], state: object):
        self.name = name
        self.call = call
        self.state = state


@implementer(IPlug)
class Builder:
    """
    Run plugs in order, stopping at the first one that halts the Conn.

    Declare a pipeline as a subclass with a C{plugs} list::

        class App(Builder):
            plugs = [
                Inspect,
                (Websocket, {}),
                endpoints.HTTP,
            ]

    or pass the list directly: C{Builder([Inspect, endpoints.HTTP])}.  Each
    entry is a plug class (instantiated without arguments), a plug instance,
    a function C{f(conn, opts) -> conn}, a dotted name of one of those, or a
    C{(plug, opts)} pair; a plug written without options gets C{None}.

    A Builder is a plug itself, so pipelines nest.  C{init} initializes every
    plug once; C{call} returns the Conn directly when every plug did, and a
    Deferred of it as soon as one plug returned a Deferred or a coroutine.
    """

    plugs: ClassVar[Sequence[PlugSpec]] = ()

    def __init__(self, plugs: Sequence[PlugSpec] | None = None) -> None:
        if plugs is not None:
            self.plugs = list(plugs)  # type: ignore[misc]

    def __repr__(self) -> str:
        return qual(type(self))

    def init(self, opts: object = None) -> tuple[_CompiledPlug, ...]:
        """
        Initialize every plug of the pipeline, in order.

        :param opts: unused; a pipeline's plugs carry their own options.
        :returns: the initialized pipeline, the state for C{call}.
        :raises TypeError: for an entry that is not a plug.
        """
        return tuple(compile_plug(spec) for spec in self.plugs)

    def call(self, conn: Conn, state: tuple[_CompiledPlug, ...]) -> Conn | Deferred[Conn]:
        """
        Run the pipeline on C{conn}.

        :raises TypeError: when a plug returns something other than a Conn.
        """
        return _run(state, 0, conn)


def compile_plug(spec: PlugSpec) -> _CompiledPlug:
    """
    Turn one pipeline entry into a plug with its initialized state.

    :raises TypeError: if C{spec} is neither a plug nor a function.
    """
    plug, opts = spec if isinstance(spec, tuple) else (spec, None)
    if isinstance(plug, str):
        plug = namedAny(plug)

    if isinstance(plug, type):
        if not IPlug.implementedBy(plug):
            msg = f"expected a class implementing IPlug, got {qual(plug)}"
            raise TypeError(msg)
        plug = plug()

    if IPlug.providedBy(plug):
        return _CompiledPlug(_plug_name(plug), plug.call, plug.init(opts))
    if callable(plug):
        return _CompiledPlug(_plug_name(plug), plug, opts)

    msg = f"expected a plug or a function f(conn, opts), got {plug!r}"
    raise TypeError(msg)


def _plug_name(plug: object) -> str:
    if inspect.isfunction(plug) or inspect.ismethod(plug):
        return qual(plug)  # type: ignore[arg-type]
    return qual(type(plug))


def _run(plugs: tuple[_CompiledPlug, ...], start: int, conn: Conn) -> Conn | Deferred[Conn]:
    for index in range(start, len(plugs)):
        if conn.halted:
            return conn

        plug = plugs[index]
        result = plug.call(conn, plug.state)

        if type(result) is Conn or isinstance(result, Conn):
            conn = result
        elif isinstance(result, Deferred) or inspect.isawaitable(result):
            return _continue(plugs, index, plug.name, result)
        else:
            raise TypeError(_not_a_conn(plug.name, result))
    return conn


def _continue(
    plugs: tuple[_CompiledPlug, ...], index: int, name: str, pending: object
) -> Deferred[Conn]:
    """
    Resume the pipeline after plug number C{index} once C{pending} fires.
    """
    if not isinstance(pending, Deferred):
        pending = ensureDeferred(_await(pending))

    def check(result: object) -> Conn | Deferred[Conn]:
        if not isinstance(result, Conn):
            raise TypeError(_not_a_conn(name, result))
        return _run(plugs, index + 1, result)

    return pending.addCallback(check)


async def _await(awaitable: Any) -> object:
    return await awaitable


def _not_a_conn(name: str, result: object) -> str:
    return f"plug {name} returned {result!r}, expected a Conn"
