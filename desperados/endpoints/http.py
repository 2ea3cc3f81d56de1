"""
The endpoint that ends a pipeline with 404.
"""

from __future__ import annotations

from zope.interface import implementer

from desperados.conn import Conn
from desperados.interfaces import IPlug


@implementer(IPlug)
class HTTP:
    """
    Answer C{404} with the body C{not found} and halt.
    """

    def init(self, opts: object) -> None:
        return None

    def call(self, conn: Conn, state: None) -> Conn:
        conn.put_resp_header("content-type", "text/plain; charset=utf-8")
        return conn.send_resp(404, b"not found").halt()
