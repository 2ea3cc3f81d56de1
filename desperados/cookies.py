"""
Cookies: parsing the Cookie request header and writing Set-Cookie headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

# RFC 6265 section 4.1.1: a cookie name is an HTTP token, and a cookie value
# is a run of cookie-octets (no controls, whitespace, DQUOTE, comma,
# semicolon or backslash), optionally inside double quotes.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_VALUE = re.compile(r'"?[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"?')
# Domain and Path attribute values must not end the attribute early.
_ATTRIBUTE_VALUE = re.compile(r"[\x20-\x3a\x3c-\x7e]*")

_SAME_SITE = ("strict", "lax", "none")

# The date sent by delete_resp_cookie: any past date makes a browser drop
# the cookie, and the Unix epoch is the one every framework uses.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ResponseCookie:
    """
    A cookie to set in the response, with its Set-Cookie attributes.

    Build it with L{desperados.Conn.put_resp_cookie}, which checks every field.
    """

    name: str
    value: str
    path: str | None = "/"
    domain: str | None = None
    max_age: int | None = None
    expires: datetime | None = None
    secure: bool = False
    http_only: bool = True
    same_site: str | None = None

    def header_value(self) -> str:
        """
        Format the cookie as the value of one Set-Cookie header.
        """
        parts = [f"{self.name}={self.value}"]
        if self.path is not None:
            parts.append(f"Path={self.path}")
        if self.domain is not None:
            parts.append(f"Domain={self.domain}")
        if self.max_age is not None:
            parts.append(f"Max-Age={self.max_age}")
        if self.expires is not None:
            parts.append(f"Expires={format_datetime(self.expires, usegmt=True)}")
        if self.secure:
            parts.append("Secure")
        if self.http_only:
            parts.append("HttpOnly")
        if self.same_site is not None:
            parts.append(f"SameSite={self.same_site.capitalize()}")
        return "; ".join(parts)


def parse_cookie_headers(values: Iterable[str]) -> dict[str, str]:
    """
    Parse Cookie request header values into a name-to-value mapping.

    Pairs without C{=} or with an invalid name are skipped rather than
    rejecting the whole header, as browsers send whatever scripts stored.
    When a name repeats, the first value is kept: RFC 6265 section 5.4 has
    browsers list the cookie with the longest path first.  Surrounding double
    quotes are removed; the value is not percent-decoded.

    :param values: every value of the Cookie header, in order.
    """
    cookies: dict[str, str] = {}
    for header in values:
        for pair in header.split(";"):
            name, equals, value = pair.partition("=")
            name = name.strip()
            if not equals or not _TOKEN.fullmatch(name):
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name, value)
    return cookies


def make_response_cookie(
    name: str,
    value: str,
    *,
    path: str | None = "/",
    domain: str | None = None,
    max_age: int | None = None,
    expires: datetime | None = None,
    secure: bool = False,
    http_only: bool = True,
    same_site: str | None = None,
) -> ResponseCookie:
    """
    Check the fields of a response cookie and build it.

    :raises ValueError: for a name that is not a token, a value with
        characters RFC 6265 does not allow (encode it first, for example with
        C{urllib.parse.quote}), an attribute that would end early, a naive
        C{expires}, or a C{same_site} other than strict, lax or none.
    :raises TypeError: for a C{max_age} that is not an int.
    """
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        msg = f"expected a cookie name made of token characters, got {name!r}"
        raise ValueError(msg)
    if not isinstance(value, str) or not _COOKIE_VALUE.fullmatch(value):
        msg = (
            "expected a cookie value without controls, spaces, quotes, commas,"
            f" semicolons or backslashes (encode it first), got {value!r}"
        )
        raise ValueError(msg)
    for attribute, text in (("path", path), ("domain", domain)):
        if text is not None and not _ATTRIBUTE_VALUE.fullmatch(text):
            msg = f"expected a cookie {attribute} without controls or ';', got {text!r}"
            raise ValueError(msg)
    if max_age is not None and (
        isinstance(max_age, bool) or not isinstance(max_age, int)
    ):
        msg = f"expected max_age in seconds as an int, got {max_age!r}"
        raise TypeError(msg)
    if expires is not None and expires.utcoffset() is None:
        msg = f"expected an aware datetime for expires, got {expires!r}"
        raise ValueError(msg)
    if same_site is not None and same_site.lower() not in _SAME_SITE:
        msg = f"expected same_site to be strict, lax or none, got {same_site!r}"
        raise ValueError(msg)
    if expires is not None:
        expires = expires.astimezone(timezone.utc)

    return ResponseCookie(
        name=name,
        value=value,
        path=path,
        domain=domain,
        max_age=max_age,
        expires=expires,
        secure=secure,
        http_only=http_only,
        same_site=None if same_site is None else same_site.lower(),
    )


def expired_cookie(
    name: str,
    *,
    path: str | None = "/",
    domain: str | None = None,
    secure: bool = False,
    http_only: bool = True,
    same_site: str | None = None,
) -> ResponseCookie:
    """
    Build the cookie that makes a browser delete the cookie C{name}.

    The path and domain must match the ones the cookie was set with.
    """
    return make_response_cookie(
        name,
        "",
        path=path,
        domain=domain,
        max_age=0,
        expires=_EPOCH,
        secure=secure,
        http_only=http_only,
        same_site=same_site,
    )
