"""
The plug that logs the Conn.
"""

from __future__ import annotations

from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from desperados._logging import observer as log_observer
from desperados.conn import Conn
from desperados.interfaces import IPlug


@implementer(IPlug)
class Inspect:
    """
    Log the Conn's readable dump, one field per line, and pass it on.

    :param opts: the log level name (C{"debug"}, C{"info"}, ...); C{"info"}
        when not given.
    """

    log = Logger(observer=log_observer)

    def init(self, opts: object) -> LogLevel:
        if opts is None:
            return LogLevel.info
        if not isinstance(opts, str):
            msg = f"expected a log level name for Inspect, got {opts!r}"
            raise TypeError(msg)
        return LogLevel.levelWithName(opts)

    def call(self, conn: Conn, state: LogLevel) -> Conn:
        self.log.emit(state, "{conn!r}", conn=conn)
        return conn
