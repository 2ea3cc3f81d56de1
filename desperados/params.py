"""
Query parameters: decoding a query string into a mapping that keeps repeats.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import parse_qsl

from desperados.errors import BadRequestError


class QueryParams(Mapping[str, str]):
    """
    Decoded query parameters, in the order they came.

    As a mapping, C{params[name]} is the last value given for C{name}, as in
    Plug and Starlette; L{get_all} returns every value, and L{multi_items}
    every pair.

    :param items: C{(name, value)} pairs, already decoded.
    """

    __slots__ = ("_items", "_last")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items = list(items or ())
        self._last = dict(self._items)

    def __getitem__(self, name: str) -> str:
        return self._last[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._last)

    def __len__(self) -> int:
        return len(self._last)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, QueryParams):
            return self._items == other._items
        return super().__eq__(other)

    def __repr__(self) -> str:
        return f"QueryParams({self._items!r})"

    def get_all(self, name: str) -> list[str]:
        """
        Return every value given for C{name}, in order; empty when absent.
        """
        return [value for key, value in self._items if key == name]

    def multi_items(self) -> list[tuple[str, str]]:
        """
        Return every C{(name, value)} pair, repeated names included, in order.
        """
        return list(self._items)


def parse_query(query_string: str, *, max_params: int = 1000) -> QueryParams:
    """
    Decode an C{application/x-www-form-urlencoded} query string.

    Percent escapes are decoded as UTF-8 and C{+} becomes a space.  A name
    without C{=} gets the empty value, and empty pairs (C{a=1&&b=2}) are skipped.

    :param query_string: the query, without the leading C{?}.
    :param max_params: the maximum number of pairs, a guard against requests
        that make the server build huge mappings.
    :raises BadRequestError: with status 400 when a percent escape does not
        decode to UTF-8 or there are more than C{max_params} pairs.
    """
    try:
        items = parse_qsl(
            query_string,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=max_params,
        )
    except UnicodeDecodeError:
        msg = "invalid query string: a percent escape is not valid UTF-8"
        raise BadRequestError(msg) from None
    except ValueError:
        msg = f"invalid query string: more than {max_params} parameters"
        raise BadRequestError(msg) from None
    return QueryParams(items)
