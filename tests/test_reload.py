"""
twistd desperados --reload: a changed source file restarts the worker.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from subprocesses import (
    TWISTD,
    child_env,
    free_port,
    get,
    read_events,
    stop,
    wait_for_event,
)

from desperados.reload import source_paths

START_TIMEOUT = 60

APP = """
def version(conn, opts):
    return conn.send_resp(200, "{version}").halt()
"""


def _write_app(path: Path, version: int, mtime: float) -> None:
    path.write_text(APP.format(version=version))
    # Set the time explicitly: two writes within the file system's time
    # resolution would otherwise look like one.
    os.utime(path, (mtime, mtime))


@pytest.mark.slow
def test_changed_plug_module_restarts_worker(tmp_path: Path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    module = app_dir / "reload_app.py"
    _write_app(module, 1, time.time() - 100)
    port = free_port()
    log = tmp_path / "log.json"
    env = child_env(TEST_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([str(app_dir), env["PYTHONPATH"]])
    process = subprocess.Popen(
        [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logger=subprocesses.json_observer",
            "desperados",
            "--plug=reload_app.version",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--reload",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_event(log, "worker {index} serving", timeout=START_TIMEOUT)
        wait_for_event(log, "watching {count} Python files")
        before = get(port, "/")
        _write_app(module, 2, time.time())
        reloads = wait_for_event(log, "reloading: {path} changed")
        wait_for_event(log, "all workers replaced", timeout=START_TIMEOUT)
        after = get(port, "/")
    finally:
        stop(process)

    assert before == (200, b"1")
    assert reloads[0]["path"] == str(module.resolve())
    assert after == (200, b"2")
    starts = [
        e
        for e in read_events(log)
        if e.get("log_format") == "started worker {index} as pid {pid}"
    ]
    assert len(starts) == 2


def test_reload_is_off_by_default():
    from twisted.internet.testing import MemoryReactor

    from desperados.server import DesperadosService
    from twisted.plugins.desperados_plugin import Options, service_maker

    options = Options()
    options.parseOptions([])
    service = service_maker.makeService(options, reactor=MemoryReactor())

    assert not options["reload"]
    assert isinstance(service, DesperadosService)


def test_source_paths_cover_desperados_and_plug_package():
    import desperados

    paths = source_paths("desperados.plugs.Default")
    top_level_module = source_paths("subprocesses.json_observer")

    assert paths == [Path(desperados.__file__).parent.resolve()]
    assert top_level_module[1] == (Path(__file__).parent / "subprocesses.py").resolve()
