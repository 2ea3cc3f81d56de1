"""
The pipeline that C{twistd desperados} runs unless told otherwise.
"""

from __future__ import annotations

from desperados import endpoints
from desperados.builder import Builder
from desperados.plugs.websocket import Websocket


class Default(Builder):
    """
    Echo WebSockets on every path and answer every other request with 404.
    """

    plugs = [
        Websocket,
        endpoints.Websocket,
        endpoints.HTTP,
    ]
