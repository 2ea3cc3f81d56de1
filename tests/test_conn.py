"""
Conn: request fields, response helpers, states and the readable dump.
"""

from __future__ import annotations

import pytest

from desperados import Conn
from desperados.errors import AlreadySentError


class _RecordingAdapter:
    def __init__(self):
        self.sent = []

    def send_resp(self, conn, body):
        self.sent.append((conn.status, list(conn.resp_headers), body))


def _conn(**fields):
    return Conn(adapter=_RecordingAdapter(), **fields)


def test_path_info_from_request_path():
    conn = Conn(request_path="/users//42/")

    assert conn.path_info == ["users", "42"]


def test_get_req_header_keeps_repeated_values():
    conn = Conn(req_headers=[("accept", "a"), ("host", "h"), ("accept", "b")])

    assert conn.get_req_header("Accept") == ["a", "b"]
    assert conn.get_req_header("missing") == []


def test_default_cache_control_header():
    conn = Conn()

    assert conn.get_resp_header("cache-control") == ["max-age=0, private, must-revalidate"]


def test_put_resp_header_replaces_and_lowercases():
    conn = Conn().put_resp_header("X-Thing", "1").put_resp_header("x-thing", "2")

    assert conn.get_resp_header("x-thing") == ["2"]


def test_put_resp_header_rejects_line_breaks():
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        Conn().put_resp_header("x-bad", "a\r\nset-cookie: evil")


def test_send_resp_sends_once_and_marks_sent():
    conn = _conn()

    conn.send_resp(201, "created")

    assert conn.state == "sent"
    assert conn.adapter.sent == [
        (201, [("cache-control", "max-age=0, private, must-revalidate")], b"created")
    ]
    assert not conn.halted


def test_resp_sets_without_sending():
    conn = _conn().resp(200, b"later")

    assert conn.state == "set"
    assert conn.adapter.sent == []
    conn.send_resp()
    assert conn.adapter.sent[0][2] == b"later"


def test_changes_after_send_raise():
    conn = _conn().send_resp(200, "done")

    with pytest.raises(AlreadySentError, match="already sent"):
        conn.put_resp_header("x-late", "1")
    with pytest.raises(AlreadySentError):
        conn.put_status(500)
    with pytest.raises(AlreadySentError):
        conn.send_resp(200, "again")
    assert len(conn.adapter.sent) == 1


def test_send_resp_without_status_raises():
    with pytest.raises(ValueError, match="needs a status"):
        _conn().send_resp()


def test_put_status_rejects_non_status():
    with pytest.raises(ValueError, match="between 100 and 999"):
        Conn().put_status(42)


def test_assign_and_halt_return_conn():
    conn = Conn()

    assert conn.assign("user", "ana").halt() is conn
    assert conn.assigns == {"user": "ana"}
    assert conn.halted


def test_repr_puts_each_field_on_its_own_line():
    conn = Conn(method="POST", request_path="/a/b", query_string="x=1")

    lines = repr(conn).splitlines()

    assert lines[0] == "Conn("
    assert lines[-1] == ")"
    assert "  method='POST'," in lines
    assert "  path_info=['a', 'b']," in lines
    assert "  query_string='x=1'," in lines
    assert any(line.startswith("  assigns=") for line in lines)
