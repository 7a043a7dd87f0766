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
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

from ._exceptions import InvalidArgument
from ._store import EventStore, InMemoryEventStore

__all__ = ["open_store"]

_SCHEMES = ("memory://", "sqlite:///", "postgresql://", "postgres://")


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[EventStore]:
    """Open the event store ``url`` names (see the module docstring); close it on exit.

    Usage::

        async with open_store("sqlite:///events.db") as store:
            ...

    Raises:
        ValueError: the URL's scheme is none of ``memory``, ``sqlite``,
            ``postgresql``/``postgres``, or it is malformed.
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

        rest = url[len("sqlite://") :]
        if rest in ("", "/"):
            path = ":memory:"
        elif rest.startswith("/"):
            path = unquote(rest[1:].split("?", 1)[0])
        else:
            raise InvalidArgument(
                f"an SQLite URL is 'sqlite:///relative/path.db' or "
                f"'sqlite:////absolute/path.db', not {url!r}"
            )
        if not path:
            raise InvalidArgument(f"the SQLite URL {url!r} names no file")
        async with open_sqlite_store(path) as sqlite_store:
            yield sqlite_store
    elif scheme in ("postgresql", "postgres"):
        from ._postgres import open_postgres_store

        async with open_postgres_store(url) as postgres_store:
            yield postgres_store
    else:
        raise InvalidArgument(
            f"unknown event store URL {url!r}: expected one of {', '.join(_SCHEMES)}"
        )
