"""Configuring the stores: every knob by URL, and every bad argument an InvalidArgument."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
import trio

from trio_aggregates import InvalidArgument, StoreError, TrioAggregatesError, open_store
from trio_aggregates._stores._sqlite import SQLiteEventStore, open_sqlite_store
from trio_aggregates._stores._store import NewEvent

ROOT = Path(__file__).resolve().parent.parent


def ev(n: int | str) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


def sqlite_url(path: Path, query: str = "") -> str:
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


# -- SQLite by URL -----------------------------------------------------------


async def test_sqlite_url_carries_readers_and_busy_timeout(tmp_path: Path) -> None:
    async with open_store(sqlite_url(tmp_path / "a.db", "readers=2&busy_timeout=0.25")) as store:
        assert isinstance(store, SQLiteEventStore)
        assert len(store._readers) == 2
        for conn in (store._writer, *store._readers):
            assert conn.db.execute("PRAGMA busy_timeout").fetchone() == (250,)
        await store.append("s", [ev(1)], expected_version=0)
    # The defaults, without parameters.
    async with open_store(sqlite_url(tmp_path / "a.db")) as store:
        assert isinstance(store, SQLiteEventStore)
        assert len(store._readers) == 4
        assert store._writer.db.execute("PRAGMA busy_timeout").fetchone() == (5000,)
        assert await store.stream_version("s") == 1


async def test_sqlite_busy_timeout_by_url_is_the_one_waited(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    async with open_store(sqlite_url(path)):
        pass
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        async with open_store(sqlite_url(path, "busy_timeout=0.2")) as store:
            start = trio.current_time()
            with pytest.raises(StoreError, match="locked"):
                await store.append("s", [ev(1)], expected_version=0)
            assert trio.current_time() - start < 3
    finally:
        blocker.close()


async def test_sqlite_memory_url_takes_parameters() -> None:
    for url in ("sqlite://?busy_timeout=1", "sqlite:///:memory:?readers=3"):
        async with open_store(url) as store:
            assert isinstance(store, SQLiteEventStore)
            assert store.path == ":memory:"
            assert await store.append("s", [ev(1)], expected_version=0) == 1


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("pool_size=3", "pool_size"),
        ("readers=2&journal=wal", "journal"),
        ("Readers=2", "Readers"),
    ],
)
async def test_sqlite_url_unknown_parameter(tmp_path: Path, query: str, named: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        async with open_store(sqlite_url(tmp_path / "x.db", query)):
            pass  # pragma: no cover
    message = str(info.value)
    assert repr(named) in message
    assert "busy_timeout" in message and "readers" in message  # the known ones
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("readers=0", "readers"),
        ("readers=-1", "readers"),
        ("readers=two", "readers"),
        ("readers=2.5", "readers"),
        ("readers=", "readers"),
        ("busy_timeout=-1", "busy_timeout"),
        ("busy_timeout=soon", "busy_timeout"),
        ("busy_timeout=nan", "busy_timeout"),
        ("busy_timeout=inf", "busy_timeout"),
    ],
)
async def test_sqlite_url_bad_value(tmp_path: Path, query: str, named: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"\b{named}\b"):
        async with open_store(sqlite_url(tmp_path / "x.db", query)):
            pass  # pragma: no cover


@pytest.mark.parametrize("query", ["readers", "=2", "readers=2&readers=3", "readers=2&"])
async def test_malformed_url_query(tmp_path: Path, query: str) -> None:
    with pytest.raises(InvalidArgument):
        async with open_store(sqlite_url(tmp_path / "x.db", query)):
            pass  # pragma: no cover


async def test_memory_url_takes_no_parameters() -> None:
    with pytest.raises(InvalidArgument):
        async with open_store("memory://?timeout=1"):
            pass  # pragma: no cover


# -- PostgreSQL by URL ---------------------------------------------------------


def query(dsn: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


@pytest.mark.postgres
async def test_postgres_url_carries_pool_size_and_libpq_parameters(
    postgres_database: Any, postgres_dsn: str
) -> None:
    app = f"trio-agg-{postgres_database.schema}"
    url = f"{postgres_database.url}&pool_size=2&min_size=2&application_name={app}&sslmode=disable"
    async with open_store(url) as store:
        # Many reads at once: never more than pool_size connections.
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.read, f"s-{i}")
        rows = query(
            postgres_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", app
        )
        assert rows == [(2,)]
        # options=-csearch_path=... went through too: the tables are in the schema.
        await store.append("s", [ev(1)], expected_version=0)
    rows = query(
        postgres_dsn,
        "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'trio_%%'",
        postgres_database.schema,
    )
    assert rows[0][0] >= 3


@pytest.mark.postgres
async def test_postgres_url_timeout_bounds_a_blocked_write(postgres_database: Any) -> None:
    """A write waiting on a lock that another session holds gives up after ``timeout``.

    The server gives up first (its statement_timeout is nine tenths of the
    store's), so the statement is cancelled cleanly and nothing is written.
    """
    async with open_store(postgres_database.url + "&timeout=2") as store:
        await store.append("s", [ev(1)], expected_version=0)
        with psycopg.connect(postgres_database.dsn) as other:
            other.execute("LOCK TABLE trio_aggregates_events IN ACCESS EXCLUSIVE MODE")
            # Without a bound the append would wait for the lock forever (and a
            # thread that is not abandoned cannot be cancelled): let go in time.
            watchdog = threading.Timer(10, other.rollback)
            watchdog.start()
            try:
                start = trio.current_time()
                with pytest.raises(StoreError, match="statement timeout") as info:
                    await store.append("s", [ev(2)], expected_version=1)
                assert trio.current_time() - start < 5
                assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
            finally:
                watchdog.cancel()
                watchdog.join()
            other.rollback()
        with trio.fail_after(30):
            assert await store.append("s", [ev(2)], expected_version=1) == 2


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("pool_size=0", "pool_size"),
        ("pool_size=many", "pool_size"),
        ("min_size=0", "min_size"),
        ("min_size=3&pool_size=2", "min_size"),
        ("min_size=9", "min_size"),
        ("timeout=0", "timeout"),
        ("timeout=-1", "timeout"),
        ("timeout=later", "timeout"),
        ("timeout=inf", "timeout"),
        ("connect_timeout=0", "connect_timeout"),
        ("connect_timeout=x", "connect_timeout"),
    ],
)
async def test_postgres_url_bad_value(query: str, named: str) -> None:
    # Refused before any connection is tried (nothing listens on port 1).
    with pytest.raises(InvalidArgument, match=rf"\b{named}\b"):
        async with open_store(f"postgresql://nobody:hunter2pw@127.0.0.1:1/db?{query}"):
            pass  # pragma: no cover


@pytest.mark.parametrize("name", ["poolsize", "readers", "busy_timeout", "search_path"])
async def test_postgres_url_unknown_parameter(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        async with open_store(f"postgresql://nobody:hunter2pw@127.0.0.1:1/db?{name}=1"):
            pass  # pragma: no cover
    message = str(info.value)
    assert repr(name) in message
    for known in ("pool_size", "timeout", "sslmode", "application_name", "options"):
        assert known in message
    assert "hunter2pw" not in message  # the URL's password is never shown


# -- bad arguments to the openers ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"readers": 0}, "readers"),
        ({"readers": "4"}, "readers"),
        ({"readers": True}, "readers"),
        ({"readers": 1.5}, "readers"),
        ({"busy_timeout": -1}, "busy_timeout"),
        ({"busy_timeout": float("nan")}, "busy_timeout"),
        ({"busy_timeout": "5"}, "busy_timeout"),
    ],
)
async def test_sqlite_opener_bad_arguments(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"\b{named}\b") as info:
        async with open_sqlite_store(":memory:", **kwargs):
            pass  # pragma: no cover
    # Still what code catching the builtins expects.
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


async def test_sqlite_opener_bad_path() -> None:
    with pytest.raises(InvalidArgument, match="path"):
        async with open_sqlite_store(42):  # type: ignore[arg-type]
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"min_size": 3, "max_size": 2}, "min_size"),
        ({"min_size": 0}, "min_size"),
        ({"max_size": 0}, "max_size"),
        ({"max_size": "8"}, "max_size"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"connect_timeout": float("inf")}, "connect_timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"timeout": "30"}, "timeout"),
    ],
)
async def test_postgres_opener_bad_arguments(kwargs: dict[str, Any], named: str) -> None:
    pytest.importorskip("psycopg")
    from trio_aggregates._stores._postgres import open_postgres_store

    with pytest.raises(InvalidArgument, match=rf"\b{named}\b"):
        async with open_postgres_store("postgresql://nobody@127.0.0.1:1/db", **kwargs):
            pass  # pragma: no cover


@pytest.mark.parametrize("dsn", [42, None, "nonsense", "postgresql://x?nosuch=1"])
async def test_postgres_opener_bad_dsn(dsn: Any) -> None:
    from trio_aggregates._stores._postgres import open_postgres_store

    with pytest.raises(InvalidArgument):
        async with open_postgres_store(dsn):
            pass  # pragma: no cover


def test_reference_lists_invalid_argument_in_the_hierarchy() -> None:
    text = (ROOT / "docs" / "reference.rst").read_text(encoding="utf-8")
    tree = text.split(".. code-block:: text", 1)[1].split(".. autoexception::", 1)[0]
    assert re.search(r"InvalidArgument\s+\(also ValueError, TypeError\)", tree)
    assert ".. autoexception:: InvalidArgument" in text
    assert issubclass(InvalidArgument, TrioAggregatesError)


async def test_stream_names_must_be_str(tmp_path: Path) -> None:
    for url in ("memory://", sqlite_url(tmp_path / "names.db")):
        async with open_store(url) as store:
            with pytest.raises(InvalidArgument, match="stream names are str"):
                await store.append(42, [ev(1)], expected_version=0)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="stream names are str"):
                await store.read(b"s")  # type: ignore[arg-type]
            with pytest.raises(TypeError):  # what it was before, still
                await store.stream_version(None)  # type: ignore[arg-type]
