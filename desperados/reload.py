"""
Restarting the workers when a Python source file changes: C{--reload}.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from desperados._logging import observer as log_observer

log = Logger(namespace="desperados.reload", observer=log_observer)

DEFAULT_INTERVAL = 1.0


def source_paths(plug: str) -> list[Path]:
    """
    Return the files and folders to watch for C{--reload} with C{--plug plug}.

    They are the desperados package and the top-level package of the plug's
    module (or the module's own file when it is not in a package).  The plug's
    module is located without being imported, so the main process does not
    run application code.
    """
    import desperados

    paths = [Path(desperados.__file__).parent]
    top_level = plug.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top_level)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        if spec.submodule_search_locations:
            paths.extend(Path(location) for location in spec.submodule_search_locations)
        elif spec.origin and spec.origin.endswith(".py"):
            paths.append(Path(spec.origin))
    unique = []
    for path in paths:
        resolved = path.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def _python_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from path.rglob("*.py")


def _snapshot(paths: Iterable[Path]) -> dict[Path, int]:
    times = {}
    for path in _python_files(paths):
        try:
            times[path] = os.stat(path).st_mtime_ns
        except OSError:
            continue
    return times


class SourceWatcher(Service):
    """
    Call C{on_change(path)} when a C{.py} file under C{paths} changes.

    The files are polled every C{interval} seconds, which needs no platform
    support; a file that was added, removed or modified counts as changed.

    :param paths: files and folders to watch; folders are searched for
        C{*.py} files recursively.
    :param on_change: called with the first changed file found.
    """

    def __init__(
        self,
        paths: Iterable[Path],
        on_change: Callable[[Path], object],
        *,
        interval: float = DEFAULT_INTERVAL,
        reactor: Any = None,
    ) -> None:
        self.paths = list(paths)
        self.on_change = on_change
        self.interval = interval
        self.reactor = reactor
        self._times: dict[Path, int] = {}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._times = _snapshot(self.paths)
        log.info(
            "watching {count} Python files for changes in {paths}",
            count=len(self._times),
            paths=", ".join(str(path) for path in self.paths),
        )
        self._loop = LoopingCall(self._check)
        if self.reactor is not None:
            self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _check(self) -> None:
        times = _snapshot(self.paths)
        if times == self._times:
            return
        changed = sorted(
            path
            for path in times.keys() | self._times.keys()
            if times.get(path) != self._times.get(path)
        )
        self._times = times
        log.info(
            "reloading: {path} changed",
            path=str(changed[0]),
            changed=[str(path) for path in changed],
        )
        self.on_change(changed[0])
