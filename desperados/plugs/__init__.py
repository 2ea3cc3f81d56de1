"""
Built-in plugs and the default pipeline.
"""

from desperados.plugs.default import Default
from desperados.plugs.inspect import Inspect
from desperados.plugs.metrics import Metrics
from desperados.plugs.proxy_headers import ProxyHeaders
from desperados.plugs.websocket import Websocket

__all__ = ["Default", "Inspect", "Metrics", "ProxyHeaders", "Websocket"]
