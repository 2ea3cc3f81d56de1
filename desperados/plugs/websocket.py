"""
The plug that notices WebSocket upgrade requests.
"""

from __future__ import annotations

from zope.interface import implementer

from desperados.conn import Conn
from desperados.interfaces import IPlug
from desperados.upgrade import is_websocket_upgrade


@implementer(IPlug)
class Websocket:
    """
    Assign C{websocket = True} when the request asks for a WebSocket.

    A request asks when it carries C{Upgrade: websocket},
    C{Sec-WebSocket-Version} and C{Sec-WebSocket-Key} over HTTP/1.1.  This
    plug only detects; L{desperados.endpoints.Websocket} checks the request
    and upgrades it.
    """

    def init(self, opts: object) -> None:
        return None

    def call(self, conn: Conn, state: None) -> Conn:
        if is_websocket_upgrade(conn):
            conn.assigns["websocket"] = True
        return conn
