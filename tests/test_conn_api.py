"""
Conn helpers for query parameters, content types, before-send callbacks,
cookies and bodiless responses, run in memory with desperados.testing.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from support import connect

from desperados import testing
from desperados.errors import AlreadySentError, BadRequestError


def _run(plug, method="GET", path="/", **kwargs):
    return testing.call_sync(plug, testing.conn(method, path, **kwargs))


class TestQueryParams:
    def test_unfetched_until_asked(self):
        conn = testing.conn("GET", "/?a=1")

        assert conn.query_params is None
        assert conn.fetch_query_params().query_params == {"a": "1"}

    def test_repeated_keys_kept(self):
        params = testing.conn("GET", "/?a=1&b=2&a=3").fetch_query_params().query_params

        assert params["a"] == "3"
        assert params.get_all("a") == ["1", "3"]
        assert params.get_all("missing") == []
        assert params.multi_items() == [("a", "1"), ("b", "2"), ("a", "3")]
        assert len(params) == 2

    def test_percent_and_plus_decoded(self):
        query = "name=J%C3%BCrgen+M&path=%2Fetc%2F&empty=&flag&&x%3Dy=1"
        params = testing.conn("GET", "/?" + query).fetch_query_params().query_params

        assert params["name"] == "Jürgen M"
        assert params["path"] == "/etc/"
        assert params["empty"] == ""
        assert params["flag"] == ""
        assert params["x=y"] == "1"

    def test_invalid_utf8_is_400(self):
        conn = testing.conn("GET", "/?name=%FF")

        with pytest.raises(BadRequestError, match="not valid UTF-8") as raised:
            conn.fetch_query_params()
        assert raised.value.status == 400

    def test_too_many_params_is_400(self):
        conn = testing.conn("GET", "/?" + "&".join(f"k{i}=v" for i in range(11)))

        with pytest.raises(BadRequestError, match="more than 10 parameters"):
            conn.fetch_query_params(max_params=10)

    def test_fetched_once(self):
        conn = testing.conn("GET", "/?a=1").fetch_query_params()
        first = conn.query_params
        conn.query_string = "a=2"

        assert conn.fetch_query_params().query_params is first


class TestContentType:
    def test_charset_added(self):
        conn = testing.conn().put_resp_content_type("text/html")

        assert conn.get_resp_header("content-type") == ["text/html; charset=utf-8"]

    def test_other_charset_and_none(self):
        latin = testing.conn().put_resp_content_type("text/plain", "iso-8859-1")
        binary = testing.conn().put_resp_content_type("image/png", None)

        assert latin.get_resp_header("content-type") == [
            "text/plain; charset=iso-8859-1"
        ]
        assert binary.get_resp_header("content-type") == ["image/png"]


class TestDeleteRespHeader:
    def test_removes_every_value(self):
        conn = testing.conn()
        conn.resp_headers.append(("x-a", "1"))
        conn.resp_headers.append(("x-a", "2"))

        conn.delete_resp_header("X-A")

        assert conn.get_resp_header("x-a") == []

    def test_default_header_can_go(self):
        conn = _run(
            lambda conn, opts: conn.delete_resp_header("cache-control").resp(200, "")
        )

        assert testing.sent(conn).header("cache-control") is None


class TestBeforeSend:
    def test_runs_in_reverse_order_before_headers(self):
        order = []

        def remember(name):
            def callback(conn):
                order.append(name)
                return conn.put_resp_header("x-last-callback", name)

            return callback

        def plug(conn, opts):
            conn.register_before_send(remember("first"))
            conn.register_before_send(remember("second"))
            return conn.send_resp(200, "ok")

        conn = _run(plug)

        assert order == ["second", "first"]
        assert testing.sent(conn).header("x-last-callback") == "first"

    def test_runs_for_stored_response(self):
        def plug(conn, opts):
            conn.register_before_send(lambda conn: conn.put_status(202))
            return conn.resp(200, "stored")

        conn = _run(plug)

        assert testing.sent(conn).status == 202

    def test_can_change_body(self):
        def plug(conn, opts):
            conn.register_before_send(lambda conn: conn.resp(conn.status, "changed"))
            return conn.send_resp(200, "original")

        assert testing.sent(_run(plug)).body == b"changed"

    def test_runs_once(self):
        calls = []

        def plug(conn, opts):
            conn.register_before_send(lambda conn: calls.append(1) or conn)
            return conn.send_resp(200, "")

        _run(plug)

        assert calls == [1]

    def test_must_return_the_conn(self):
        def plug(conn, opts):
            conn.register_before_send(lambda conn: None)
            return conn.send_resp(200, "")

        with pytest.raises(TypeError, match="returned None, expected the Conn"):
            _run(plug)

    def test_cannot_register_after_send(self):
        conn = testing.conn().send_resp(200, "")

        with pytest.raises(AlreadySentError, match="register a before-send callback"):
            conn.register_before_send(lambda conn: conn)


class TestCookies:
    def test_fetch_cookies(self):
        conn = testing.conn(
            headers=[("cookie", 'a=1; b="two"'), ("cookie", "c=3; a=9")]
        )

        assert conn.req_cookies is None
        assert conn.fetch_cookies().req_cookies == {"a": "1", "b": "two", "c": "3"}

    def test_fetch_cookies_skips_bad_pairs(self):
        conn = testing.conn(
            headers={"cookie": "good=1; novalue; bad name=2; =3; ok=a=b"}
        )

        assert conn.fetch_cookies().req_cookies == {"good": "1", "ok": "a=b"}

    def test_put_resp_cookie_defaults(self):
        conn = _run(
            lambda conn, opts: conn.put_resp_cookie("session", "abc").resp(200, "")
        )

        assert testing.sent(conn).headers_named("set-cookie") == [
            "session=abc; Path=/; HttpOnly"
        ]

    def test_put_resp_cookie_attributes(self):
        expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))

        def plug(conn, opts):
            conn.put_resp_cookie(
                "id",
                "42",
                path="/app",
                domain="example.com",
                max_age=3600,
                expires=expires,
                secure=True,
                http_only=False,
                same_site="strict",
            )
            return conn.resp(200, "")

        assert testing.sent(_run(plug)).header("set-cookie") == (
            "id=42; Path=/app; Domain=example.com; Max-Age=3600;"
            " Expires=Wed, 02 Jan 2030 01:04:05 GMT; Secure; SameSite=Strict"
        )

    def test_same_name_replaces_and_others_add(self):
        def plug(conn, opts):
            conn.put_resp_cookie("a", "1").put_resp_cookie("b", "2")
            conn.put_resp_cookie("a", "3")
            return conn.resp(200, "")

        assert testing.sent(_run(plug)).headers_named("set-cookie") == [
            "a=3; Path=/; HttpOnly",
            "b=2; Path=/; HttpOnly",
        ]

    def test_delete_resp_cookie(self):
        conn = _run(lambda conn, opts: conn.delete_resp_cookie("session").resp(200, ""))

        assert testing.sent(conn).header("set-cookie") == (
            "session=; Path=/; Max-Age=0;"
            " Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly"
        )

    def test_cookie_set_by_before_send_is_sent(self):
        def plug(conn, opts):
            conn.register_before_send(lambda conn: conn.put_resp_cookie("late", "1"))
            return conn.send_resp(200, "")

        assert (
            testing.sent(_run(plug)).header("set-cookie") == "late=1; Path=/; HttpOnly"
        )

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("bad name", "v"),
            ("", "v"),
            ("semi;colon", "v"),
            ("ok", "has space"),
            ("ok", "semi;colon"),
            ("ok", "comma,"),
            ("ok", "new\r\nline"),
            ("ok", "back\\slash"),
        ],
    )
    def test_put_resp_cookie_rejects_invalid(self, name, value):
        with pytest.raises(ValueError, match="cookie"):
            testing.conn().put_resp_cookie(name, value)

    def test_put_resp_cookie_rejects_bad_attributes(self):
        conn = testing.conn()

        with pytest.raises(ValueError, match="same_site"):
            conn.put_resp_cookie("a", "1", same_site="sometimes")
        with pytest.raises(ValueError, match="cookie path"):
            conn.put_resp_cookie("a", "1", path="/; Domain=evil.example")
        with pytest.raises(ValueError, match="aware datetime"):
            conn.put_resp_cookie("a", "1", expires=datetime(2030, 1, 1))
        with pytest.raises(TypeError, match="max_age"):
            conn.put_resp_cookie("a", "1", max_age="10")


class TestBodilessResponses:
    @pytest.mark.parametrize("status", [204, 304])
    def test_no_body_no_length(self, status):
        def plug(conn, opts):
            conn.put_resp_header("content-length", "5")
            return conn.send_resp(status, "body!")

        response = testing.sent(_run(plug))

        assert response.status == status
        assert response.body == b""
        assert response.header("content-length") is None

    def test_head_matches_get_headers(self):
        def plug(conn, opts):
            return conn.put_resp_content_type("text/plain").send_resp(200, "x" * 50)

        get = testing.sent(_run(plug, "GET"))
        head = testing.sent(_run(plug, "HEAD"))

        assert head.headers == get.headers
        assert head.header("content-length") == "50"
        assert head.body == b""


class TestAlreadySent:
    @pytest.mark.parametrize(
        ("change", "action"),
        [
            (lambda conn: conn.put_resp_header("x-a", "1"), "set a header"),
            (lambda conn: conn.delete_resp_header("x-a"), "delete a header"),
            (lambda conn: conn.put_resp_content_type("text/html"), "set a header"),
            (lambda conn: conn.put_resp_cookie("a", "1"), "set a cookie"),
            (lambda conn: conn.delete_resp_cookie("a"), "delete a cookie"),
            (lambda conn: conn.put_status(201), "set the status"),
            (lambda conn: conn.resp(201, ""), "set the response"),
            (lambda conn: conn.send_resp(201, ""), "set the response"),
            (lambda conn: conn.send_resp(), "send a response"),
        ],
    )
    def test_change_after_send_raises(self, change, action):
        conn = testing.conn().send_resp(200, "done")

        with pytest.raises(AlreadySentError, match=f"cannot {action}: .* already sent"):
            change(conn)
        assert len(conn.adapter.responses) == 1


# Over real loopback sockets.


def _echo_request(conn, opts):
    conn.fetch_query_params().fetch_cookies()
    conn.put_resp_cookie("seen", str(len(conn.req_cookies)), same_site="lax")
    conn.register_before_send(lambda conn: conn.put_resp_header("x-before-send", "ran"))
    conn.put_resp_content_type("text/plain")
    conn.delete_resp_header("cache-control")
    lines = [f"{name}={value}" for name, value in conn.query_params.multi_items()]
    lines += [
        f"cookie {name}={value}" for name, value in sorted(conn.req_cookies.items())
    ]
    return conn.resp(200, "\n".join(lines))


@pytest_twisted.ensureDeferred
async def test_query_cookies_and_before_send_over_socket(serve):
    port = await serve(_echo_request)
    client = await connect(port)

    client.send(
        b"GET /x?tag=a&tag=b%20c&name=J%C3%BCrgen HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Cookie: session=abc; theme=dark\r\n\r\n"
    )
    response = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.body.decode() == (
        "tag=a\ntag=b c\nname=Jürgen\ncookie session=abc\ncookie theme=dark"
    )
    assert response.header("content-type") == "text/plain; charset=utf-8"
    assert response.header("x-before-send") == "ran"
    assert response.header("cache-control") is None
    assert response.headers_named("set-cookie") == [
        "seen=2; Path=/; HttpOnly; SameSite=Lax"
    ]


@pytest_twisted.ensureDeferred
async def test_invalid_query_is_400_over_socket(serve, logs):
    port = await serve(
        lambda conn, opts: conn.fetch_query_params().send_resp(200, "ok")
    )
    client = await connect(port)

    client.send(b"GET /?q=%C3%28 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await client.read_response()
    await client.wait_closed()

    assert response.status == 400
    assert response.body == b"invalid query string: a percent escape is not valid UTF-8"
    rejected = logs.with_format("rejected {method} {path}")
    assert [event["status"] for event in rejected] == [400]


def _status_from_path(conn, opts):
    status = int(conn.path_info[0])
    conn.put_resp_header("content-length", "4")
    return conn.send_resp(status, "body").halt()


@pytest_twisted.ensureDeferred
async def test_204_and_304_have_no_body_over_socket(serve):
    port = await serve(_status_from_path)
    client = await connect(port)

    responses = []
    for status in (204, 304):
        client.send(f"GET /{status} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        responses.append(await client.read_response())
    # A body on either would be read as the start of this response.
    client.send(b"GET /200 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    after = await client.read_response()
    client.transport.loseConnection()

    for response in responses:
        assert response.header("content-length") is None
        assert response.header("transfer-encoding") is None
    assert [response.status for response in responses] == [204, 304]
    assert after.status == 200
    assert after.body == b"body"


def _page(conn, opts):
    conn.put_resp_content_type("text/html")
    return conn.send_resp(200, "<p>" + "page " * 400 + "</p>").halt()


@pytest_twisted.ensureDeferred
async def test_head_gets_get_headers_over_socket(serve):
    port = await serve(_page)
    client = await connect(port)

    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n")
    get = await client.read_response()
    client.send(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n")
    head = await client.read_response(head_only=True)
    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    after = await client.read_response()
    client.transport.loseConnection()

    assert head.status == 200
    assert [pair for pair in head.headers if pair[0] != "date"] == [
        pair for pair in get.headers if pair[0] != "date"
    ]
    assert head.header("content-encoding") == "gzip"
    assert after.body.startswith(b"<p>page")


def _sends_twice(conn, opts):
    conn.send_resp(200, "first")
    return conn.put_resp_header("x-too-late", "1")


@pytest_twisted.ensureDeferred
async def test_change_after_send_logs_already_sent(serve, logs):
    port = await serve(_sends_twice)
    client = await connect(port)

    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = await client.read_response()
    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    second = await client.read_response()
    client.transport.loseConnection()

    assert response.status == 200
    assert response.body == b"first"
    assert response.header("x-too-late") is None
    assert second.body == b"first"
    failures = [event for event in logs.events if event.get("log_failure")]
    assert len(failures) == 2
    for event in failures:
        assert isinstance(event["log_failure"].value, AlreadySentError)
        assert str(event["log_failure"].value) == (
            "cannot set a header: the response is already sent"
        )
