"""
desperados: an HTTP and WebSocket server for Twisted built from plug pipelines.
"""

__version__ = "0.1.0"

from desperados.builder import Builder  # noqa: E402
from desperados.compression import Compression  # noqa: E402
from desperados.conn import Conn  # noqa: E402
from desperados.errors import DesperadosError  # noqa: E402
from desperados.http1_options import HTTPOptions  # noqa: E402
from desperados.interfaces import IPlug, IWebSock, IWebSockControl  # noqa: E402
from desperados.resource import PlugResource  # noqa: E402
from desperados.router import Router  # noqa: E402
from desperados.server import start_link  # noqa: E402
from desperados.websock import (  # noqa: E402
    Binary,
    CloseReason,
    Ok,
    Ping,
    Pong,
    Push,
    Stop,
    Text,
    WebSocketHandle,
    current_handle,
)

__all__ = [
    "Binary",
    "Builder",
    "CloseReason",
    "Compression",
    "Conn",
    "DesperadosError",
    "HTTPOptions",
    "IPlug",
    "IWebSock",
    "IWebSockControl",
    "Ok",
    "Ping",
    "PlugResource",
    "Pong",
    "Push",
    "Router",
    "Stop",
    "Text",
    "WebSocketHandle",
    "__version__",
    "current_handle",
    "start_link",
]
