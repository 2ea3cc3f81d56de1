"""
Events that the HTTP and WebSocket bridges emit for observers such as metrics.

An observer is any object with an C{observe(event, fields)} method, added with
L{add_observer}.  Observers are held by weak reference, so a pipeline that is
thrown away stops observing without being told to.  When nobody observes, the
bridges skip building events, so the hooks cost one truth test each.

Events and their fields:

- C{http.connection.open}, C{http.connection.close}: a connection accepted by
  a desperados Site opened or closed; C{http.connection.upgrade}: one of them
  became a WebSocket and stops counting as an HTTP connection.
- C{http.request.stop}: a response was finished or the client went away;
  C{method}, C{status} (C{None} when nothing was sent) and C{duration} in
  seconds.  An upgraded request stops with status 101.
- C{http.request.reject}: a malformed or too large request was rejected
  before the pipeline ran; C{method} (C{None} when the request line was not
  parsed) and C{status}.  It has no C{duration}.
- C{websocket.upgrade.reject}: an upgrade request was answered with an error;
  C{status} and C{reason}.
- C{websocket.open}, C{websocket.close}: a WebSocket handler started or ended.
- C{websocket.message.in}, C{websocket.message.out}: a whole text or binary
  message; C{opcode} (C{"text"} or C{"binary"}) and C{size}, the payload
  length in bytes before compression.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from twisted.logger import Logger

from desperados._logging import observer as log_observer

log = Logger(namespace="desperados.telemetry", observer=log_observer)


class Observer(Protocol):
    """
    What L{add_observer} accepts.
    """

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """
        Handle one event; it must not raise, and must not block.
        """


observers: weakref.WeakSet[Observer] = weakref.WeakSet()
"""
The current observers; the bridges test it before emitting.
"""


def add_observer(observer: Observer) -> None:
    """
    Send every later event to C{observer.observe}.

    The observer is held by weak reference: keep a reference to it for as long
    as it should observe.
    """
    observers.add(observer)


def remove_observer(observer: Observer) -> None:
    """
    Stop sending events to C{observer}; nothing happens if it was not added.
    """
    observers.discard(observer)


def emit(event: str, **fields: Any) -> None:
    """
    Send C{event} with C{fields} to every observer.

    An observer that raises is logged and the others still get the event.
    """
    for observer in list(observers):
        try:
            observer.observe(event, fields)
        except Exception:
            log.failure(
                "telemetry observer {observer!r} raised on {event}",
                observer=observer,
                event=event,
            )
