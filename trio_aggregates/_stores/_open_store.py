"""``open_store(url)``: open an event store chosen by a URL.

========================================  ==========================================
URL                                       store
========================================  ==========================================
``memory://``                             :class:`InMemoryEventStore`
``sqlite:///relative/path.db``            :class:`SQLiteEventStore` (relative path)
``sqlite:////absolute/path.db``           :class:`SQLiteEventStore` (absolute path)
``sqlite:///:memory:`` or ``sqlite://``   :class:`SQLiteEventStore` in memory
``postgresql://...``, ``postgres://...``  :class:`PostgresEventStore` (libpq URL)
========================================  ==========================================

The ``sqlite`` forms follow SQLAlchemy's: what follows ``sqlite:///`` is the
path, so an absolute path gives four slashes. Percent-escapes in the path are
decoded.

A URL carries the store's knobs as query parameters
(``sqlite:///events.db?busy_timeout=10&readers=8``,
``postgresql://app@db/app?pool_size=16&timeout=5&sslmode=require``):
``readers`` and ``busy_timeout`` for SQLite; ``pool_size``, ``min_size``,
``timeout`` and ``connect_timeout`` for PostgreSQL, whose URL also passes
every libpq parameter through. The one table of them all, with defaults and
meanings, is in ``docs/stores.rst`` ("Operating the stores"). An unknown
parameter, or a value that is not a number or out of range, raises
:class:`InvalidArgument` naming the parameter, before anything is opened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

from .._core._exceptions import InvalidArgument
from .._core._options import parse_count, parse_query, parse_seconds, unknown_parameter
from ._store import EventStore, InMemoryEventStore

__all__ = ["open_store"]

_SCHEMES = ("memory://", "sqlite:///", "postgresql://", "postgres://")

#: The SQLite store's URL parameters.
SQLITE_PARAMETERS = ("busy_timeout", "readers")
#: The PostgreSQL store's own URL parameters (besides libpq's).
POSTGRES_PARAMETERS = ("connect_timeout", "min_size", "pool_size", "timeout")


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[EventStore]:
    """Open the event store ``url`` names; close it on exit.

    The URL's scheme picks the store (``memory://``, ``sqlite:///path.db``,
    ``postgresql://...``); its query parameters set the store's knobs (see
    :ref:`store-urls`).

    Usage::

        async with open_store("sqlite:///events.db?busy_timeout=10") as store:
            ...

    Raises:
        InvalidArgument: the URL's scheme is none of ``memory``, ``sqlite``,
            ``postgresql``/``postgres``, or it is malformed, or it has a
            parameter the store does not know or a bad value for one (also a
            :class:`ValueError`).
        StoreError: the store could not be opened (see :func:`open_sqlite_store`
            and :func:`open_postgres_store`).

    Cancellation: as the chosen backend's ``open_*``; on exit the store is
    closed, also when the body raised or was cancelled.
    """
    if not isinstance(url, str):
        raise InvalidArgument(f"the store URL must be a str, not {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "memory":
        if url.lower() not in ("memory://", "memory:///"):
            raise InvalidArgument(f"a memory store URL is just 'memory://', not {url!r}")
        store = InMemoryEventStore()
        try:
            yield store
        finally:
            await store.aclose()
    elif scheme == "sqlite":
        from ._sqlite import open_sqlite_store

        path, options = _sqlite_target(url)
        async with open_sqlite_store(path, **options) as sqlite_store:
            yield sqlite_store
    elif scheme in ("postgresql", "postgres"):
        from ._postgres import open_postgres_store

        dsn, options = _postgres_target(url)
        async with open_postgres_store(dsn, **options) as postgres_store:
            yield postgres_store
    else:
        raise InvalidArgument(
            f"unknown event store URL {url!r}: expected one of {', '.join(_SCHEMES)}"
        )


def _sqlite_target(url: str) -> tuple[str, dict[str, Any]]:
    """The path and the ``open_sqlite_store`` options a ``sqlite://`` URL names."""
    rest, _, query = url[len("sqlite://") :].partition("?")
    if rest in ("", "/"):
        path = ":memory:"
    elif rest.startswith("/"):
        path = unquote(rest[1:])
    else:
        raise InvalidArgument(
            f"an SQLite URL is 'sqlite:///relative/path.db' or "
            f"'sqlite:////absolute/path.db', not {url!r}"
        )
    if not path:
        raise InvalidArgument(f"the SQLite URL {url!r} names no file")
    options: dict[str, Any] = {}
    for name, value in parse_query(query).items():
        if name == "readers":
            options["readers"] = parse_count(name, value)
        elif name == "busy_timeout":
            options["busy_timeout"] = parse_seconds(name, value, allow_zero=True)
        else:
            raise unknown_parameter(name, "SQLite", SQLITE_PARAMETERS)
    return path, options


def _postgres_target(url: str) -> tuple[str, dict[str, Any]]:
    """The libpq DSN and the ``open_postgres_store`` options a ``postgresql://`` URL names.

    The store's own parameters are taken out; libpq's are passed through.
    Never quotes the URL in an error: it may hold a password.
    """
    import psycopg
    import psycopg.pq

    base, _, query = url.partition("?")
    options: dict[str, Any] = {}
    libpq: dict[str, str] = {}
    libpq_names = {o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults()}
    for name, value in parse_query(query).items():
        if name == "pool_size":
            options["max_size"] = parse_count(name, value)
        elif name == "min_size":
            options["min_size"] = parse_count(name, value)
        elif name == "timeout":
            options["timeout"] = parse_seconds(name, value, allow_zero=False)
        elif name == "connect_timeout":
            options["connect_timeout"] = parse_seconds(name, value, allow_zero=False)
        elif name in libpq_names:
            libpq[name] = value
        else:
            raise unknown_parameter(name, "PostgreSQL", [*POSTGRES_PARAMETERS, *libpq_names])
    min_size, max_size = options.get("min_size", 1), options.get("max_size", 8)
    if min_size > max_size:
        raise InvalidArgument(
            f"the store URL parameter min_size ({min_size}) must not exceed "
            f"pool_size ({max_size}{'' if 'max_size' in options else ', the default'})"
        )
    try:
        dsn = psycopg.conninfo.make_conninfo(base, **libpq)
    except psycopg.Error as exc:
        raise InvalidArgument(f"malformed PostgreSQL URL: {exc}") from None
    return dsn, options
