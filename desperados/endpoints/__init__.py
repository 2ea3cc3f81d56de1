"""
Built-in endpoints: plugs that end a pipeline.
"""

from desperados.endpoints.http import HTTP
from desperados.endpoints.websocket import Echo, Websocket

__all__ = ["HTTP", "Echo", "Websocket"]
