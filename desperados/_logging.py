"""
The log observer that every desperados logger emits to, with its level filter.
"""

from __future__ import annotations

import txaio
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

observer = FilteringLogObserver(globalLogPublisher, [_level_filter])
"""
Pass as C{Logger(observer=observer)}: events below the level set with
L{set_log_level} are dropped before they reach the global publisher.
"""


def set_log_level(level: LogLevel | str) -> None:
    """
    Set the lowest level logged by desperados and by Autobahn.

    :param level: a L{LogLevel} or its name (C{"debug"}, C{"info"},
        C{"warn"}, C{"error"}, C{"critical"}).
    :raises ValueError: for an unknown level name.
    """
    if isinstance(level, str):
        try:
            level = LogLevel.levelWithName(level)
        except Exception:
            msg = f"expected one of debug, info, warn, error, critical, got {level!r}"
            raise ValueError(msg) from None
    _level_filter.setLogLevelForNamespace("", level)
    _level_filter.defaultLogLevel = level
    txaio.set_global_log_level(level.name)
