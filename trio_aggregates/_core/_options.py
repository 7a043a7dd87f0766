"""The stores' tuning knobs: checking them as arguments and reading them from a URL.

Every knob of a durable store can be given two ways: as a keyword argument of
its opener (:func:`open_sqlite_store`, :func:`open_postgres_store`) or as a
query parameter of a store URL (:func:`open_store`). Both ways check the value
here, and a bad one raises :class:`InvalidArgument` naming the knob.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from urllib.parse import unquote

from ._exceptions import InvalidArgument

__all__: list[str] = []


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; else :class:`InvalidArgument`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}, not {value}")
    return value


def check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    """``value`` as a float if it is a finite number of seconds ``> 0`` (``>= 0`` with
    ``allow_zero``); else :class:`InvalidArgument`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(f"{name} must be a finite number of seconds {bound}, not {value!r}")
    return seconds


def parse_count(name: str, text: str, *, minimum: int = 1) -> int:
    """A URL parameter's text as a count (see :func:`check_count`)."""
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise InvalidArgument(
            f"the store URL parameter {name} must be a whole number, not {text!r}"
        ) from None
    try:
        return check_count(name, value, minimum=minimum)
    except InvalidArgument as exc:
        raise InvalidArgument(f"the store URL parameter {exc}") from None


def parse_seconds(name: str, text: str, *, allow_zero: bool) -> float:
    """A URL parameter's text as seconds (see :func:`check_seconds`)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise InvalidArgument(
            f"the store URL parameter {name} must be a number of seconds, not {text!r}"
        ) from None
    try:
        return check_seconds(name, value, allow_zero=allow_zero)
    except InvalidArgument as exc:
        raise InvalidArgument(f"the store URL parameter {exc}") from None


def parse_query(query: str) -> dict[str, str]:
    """A URL's query string as ``{name: value}``, percent-decoded.

    Decoded as libpq decodes a ``postgresql://`` URL's query: ``&``-separated
    ``name=value`` pairs, percent-escapes decoded (``+`` stays a ``+``).

    Raises:
        InvalidArgument: a pair has no ``=`` or no name, or a name is given twice.
    """
    params: dict[str, str] = {}
    if not query:
        return params
    for pair in query.split("&"):
        name, sep, value = pair.partition("=")
        name = unquote(name)
        if not sep or not name:
            raise InvalidArgument(
                f"the store URL's query must be name=value pairs joined by '&', not {pair!r}"
            )
        if name in params:
            raise InvalidArgument(f"the store URL gives the parameter {name!r} twice")
        params[name] = unquote(value)
    return params


def unknown_parameter(name: str, store: str, known: Iterable[str]) -> InvalidArgument:
    """The error for a URL parameter ``name`` that the ``store`` URL does not take."""
    listed = ", ".join(sorted(known))
    return InvalidArgument(
        f"unknown parameter {name!r} in the {store} store URL; known parameters: {listed}"
    )
