"""The global order in each backend: migrations of existing databases, the
PostgreSQL position lock and notifications. (What every backend shares, read_all's
paging and filters, is in ``test_store_conformance.py``.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from test_store_conformance import read_in_pages

from trio_aggregates._stores._sqlite import open_sqlite_store
from trio_aggregates._stores._store import NewEvent


def ev(n: int) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


# -- SQLite -------------------------------------------------------------------


def make_sqlite_v2(path: Path) -> None:
    """A database as version 2 of the schema left it, with events in two streams."""
    from trio_aggregates._stores._sqlite import _MIGRATIONS

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN")
        for migration in _MIGRATIONS[:2]:
            for statement in migration:
                db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO streams (id, name) VALUES (1, 'b-1'), (2, 'a-1')")
        db.executemany(
            "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
            "VALUES (?, ?, 'Happened', ?, x'7b7d', 1.5)",
            [(1, 1, b"b1"), (1, 2, b"b2"), (1, 3, b"b3"), (2, 1, b"a1"), (2, 2, b"a2")],
        )
        db.execute("COMMIT")
    finally:
        db.close()


async def test_sqlite_version_2_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    make_sqlite_v2(path)
    with trio.fail_after(30):
        async with open_sqlite_store(path) as store:
            every = await store.read_all()
            assert [(e.position, e.stream, e.version, e.data) for e in every] == [
                (1, "b-1", 1, b"b1"),
                (2, "b-1", 2, b"b2"),
                (3, "b-1", 3, b"b3"),
                (4, "a-1", 1, b"a1"),
                (5, "a-1", 2, b"a2"),
            ]
            assert [e.position for e in await store.read("a-1")] == [4, 5]
            # The highest positions erased: the next event still gets a new one.
            await store.delete_stream("a-1", hard=True)
            assert await store.append("c-1", [ev(1)], expected_version=0) == 1
            (new,) = await store.read("c-1")
            assert new.position == 6
            assert await store.head_position() == 6
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)


async def test_sqlite_positions_are_never_given_twice_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with open_sqlite_store(path) as store:
        await store.append("a-1", [ev(1), ev(2)], expected_version=0)
        await store.delete_stream("a-1", hard=True)
    async with open_sqlite_store(path) as store:
        await store.append("b-1", [ev(3)], expected_version=0)
        (event,) = await store.read_all()
        assert event.position == 3


async def test_sqlite_read_all_reads_rows_another_program_wrote(tmp_path: Path) -> None:
    from trio_aggregates._core._exceptions import EventDecodeError

    path = tmp_path / "events.db"
    async with open_sqlite_store(path) as store:
        await store.append("a-1", [ev(1)], expected_version=0)
        with sqlite3.connect(path) as db:
            # The sqlite3 shell writes text where the store writes blobs.
            db.execute(
                "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
                "VALUES (1, 2, 'Typed', 'text data', '{}', '2024-01-02 03:04:05')"
            )
        every = await store.read_all()
        assert [(e.version, e.type, e.data, e.metadata) for e in every] == [
            (1, "Happened", b"event-1", b"{}"),
            (2, "Typed", b"text data", b"{}"),
        ]
        assert every[1].recorded_at == 1704164645.0
        with sqlite3.connect(path) as db:
            db.execute(
                "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
                "VALUES (1, 3, 'Bad', x'00', x'7b7d', 'not a time')"
            )
        with pytest.raises(EventDecodeError, match=r"a-1@3 .*recorded_at"):
            await store.read_all()


# -- PostgreSQL ---------------------------------------------------------------

pytestmark_pg = pytest.mark.postgres
TASKS, ROUNDS = 20, 60


def pg_connect(database: Any) -> Any:
    import psycopg

    return psycopg.connect(database.dsn, autocommit=True)


@pytestmark_pg
async def test_postgres_version_3_upgrades_in_place(postgres_database: Any) -> None:
    from trio_aggregates._stores._postgres import _MIGRATIONS, SCHEMA_VERSION, open_postgres_store

    # A database as version 3 left it, written through its append function.
    with pg_connect(postgres_database) as conn:
        conn.execute(
            "CREATE TABLE trio_aggregates_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, migration in enumerate(_MIGRATIONS[:3], 1):
            for statement in migration:
                conn.execute(statement)
            conn.execute("INSERT INTO trio_aggregates_schema (version) VALUES (%s)", (version,))
        for stream, data in [("b-1", [b"b1", b"b2"]), ("a-1", [b"a1"])]:
            conn.execute(
                "SELECT trio_aggregates_append(%s, NULL, %s, %s, %s)",
                (stream, ["Happened"] * len(data), data, [b"{}"] * len(data)),
            )
    with trio.fail_after(30):
        async with open_postgres_store(postgres_database.dsn) as store:
            every = await store.read_all()
            assert [(e.stream, e.version, e.data) for e in every] == [
                ("b-1", 1, b"b1"),
                ("b-1", 2, b"b2"),
                ("a-1", 1, b"a1"),
            ]
            assert [e.position for e in every] == [1, 2, 3]
            await store.append("a-1", [ev(2)], expected_version=1)
            assert [e.position for e in await store.read("a-1")] == [3, 4]
    with pg_connect(postgres_database) as conn:
        (version,) = conn.execute("SELECT max(version) FROM trio_aggregates_schema").fetchone()
        assert version == SCHEMA_VERSION == len(_MIGRATIONS) >= 4
        # Every function that inserts events takes the position lock now,
        # including the one only an older library calls.
        for name in (
            "trio_aggregates_append",
            "trio_aggregates_append_batch",
            "trio_aggregates_write_appends",
        ):
            (source,) = conn.execute(
                "SELECT prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE proname = %s AND nspname = %s",
                (name, postgres_database.schema),
            ).fetchone()
            assert "pg_advisory_xact_lock" in source, name


@pytestmark_pg
@pytest.mark.parametrize("command_id", [None, "c1"])
async def test_postgres_appends_wait_for_the_position_lock(
    postgres_database: Any, command_id: str | None
) -> None:
    # While another session holds the position lock, an append (either
    # function) cannot commit: positions go out one transaction at a time.
    from trio_aggregates._stores._postgres import _POSITION_LOCK_KEY, open_postgres_store

    with trio.fail_after(60):
        async with open_postgres_store(postgres_database.dsn) as store:
            await store.append("a-1", [ev(0)], expected_version=0)
            with pg_connect(postgres_database) as holder:
                holder.execute(
                    "SELECT pg_advisory_lock(%s, 'trio_aggregates_events'::regclass::oid::integer)",
                    (_POSITION_LOCK_KEY,),
                )
                done = trio.Event()

                async def append() -> None:
                    await store.append("a-1", [ev(1)], expected_version=1, command_id=command_id)
                    done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append)
                    await trio.sleep(0.5)
                    assert not done.is_set()
                    assert [e.version for e in await store.read_all()] == [1]
                    holder.execute("SELECT pg_advisory_unlock_all()")
                    await done.wait()
            assert [e.version for e in await store.read_all()] == [1, 2]


@pytestmark_pg
async def test_postgres_appends_notify_listeners(postgres_database: Any) -> None:
    from trio_aggregates._stores._postgres import _CHANNEL, open_postgres_store

    with trio.fail_after(30), pg_connect(postgres_database) as listener:
        listener.execute(f"LISTEN {_CHANNEL}")
        async with open_postgres_store(postgres_database.dsn) as store:
            assert "search_path" in store.conninfo
            await store.append("a-1", [ev(0)], expected_version=0)
            await store.append("a-1", [], expected_version=1)  # nothing appended: no notice
            await store.save_snapshot(__import__("trio_aggregates").Snapshot("a-1", 1, 1, "S", b""))
        notices = list(listener.notifies(timeout=1.0, stop_after=5))
        assert [n.channel for n in notices] == [_CHANNEL]


@pytestmark_pg
async def test_postgres_mixed_batches_with_two_processes_do_not_deadlock(
    postgres_database: Any,
) -> None:
    # Batches of appends and snapshots (several statements) from two stores
    # on the same streams: each batch locks its streams before it inserts.
    # (Without that, this test saw deadlocks in 3 runs out of 4, and appends
    # failing with "deadlock detected".)
    from trio_aggregates._stores._postgres import open_postgres_store
    from trio_aggregates._stores._store import Snapshot

    def deadlocks() -> int:
        # (This session's own server: the tests before this one are done.)
        with pg_connect(postgres_database) as conn:
            (count,) = conn.execute(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(count)

    before = deadlocks()
    async with (
        open_postgres_store(postgres_database.dsn) as one,
        open_postgres_store(postgres_database.dsn) as two,
    ):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for store in (one, two):
                    for n in range(TASKS):

                        async def work(store: Any = store, n: int = n) -> None:
                            for i in range(ROUNDS):
                                stream = f"s-{(n + i) % 4}"
                                if i % 2:
                                    await store.append(stream, [ev(i)], expected_version=None)
                                else:
                                    await store.save_snapshot(Snapshot(stream, i, 1, "S", b""))

                        nursery.start_soon(work)
        every = await one.read_all(limit=None)
        assert len(every) == 2 * TASKS * (ROUNDS // 2)
    # Statistics reach pg_stat_database within a second or so.
    await trio.sleep(1.5)
    assert deadlocks() == before


@pytestmark_pg
async def test_postgres_read_all_names_streams_and_skips_deleted_ones_in_long_pages(
    postgres_database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_all without a category filter reads the events alone and names
    their streams from the store's cache of stream ids: every page, long or
    short, names each event's stream right,
    also for streams another store object created, after the cache was
    emptied, and for a name soft-deleted and used again (a new stream id); the
    events of deleted streams are left out without shortening a page."""
    from trio_aggregates._stores import _postgres

    monkeypatch.setattr(_postgres, "_NAMES_KEPT", 7)  # the cache empties itself often
    with trio.fail_after(60):
        async with (
            open_postgres_store_for(postgres_database) as one,
            open_postgres_store_for(postgres_database) as two,
        ):
            expected: list[tuple[str, int]] = []
            for n in range(12):
                writer = one if n % 2 else two
                stream = f"acct-{n}"
                await writer.append(stream, [ev(v) for v in range(20)], expected_version=0)
                expected += [(stream, v) for v in range(1, 21)]
            # Read once through `one` (its cache fills), then delete streams
            # whose events sit in the middle of pages, and reuse a name.
            assert [(e.stream, e.version) for e in await one.read_all(limit=None)] == expected
            await two.delete_stream("acct-3")
            await two.delete_stream("acct-6", hard=True)
            await two.append("acct-3", [ev(99)], expected_version=0)  # a new stream
            await two.append("other-1", [ev(100)], expected_version=0)
            live = [x for x in expected if x[0] not in ("acct-3", "acct-6")]
            live += [("acct-3", 1), ("other-1", 1)]
            for store in (one, two):
                every = await store.read_all(limit=None)
                assert [(e.stream, e.version) for e in every] == live
                assert [e.data for e in every][-2:] == [b"event-99", b"event-100"]
                for page_size in (5, 33, 50):
                    assert await read_in_pages(store, page_size) == every
            # The same records as read (the same time, to the last bit) and as
            # the category-filtered query gives.
            assert [e for e in every if e.stream == "acct-5"] == await one.read("acct-5")
            assert await one.read_all(categories=["acct", "other"], limit=None) == every
            assert await one.read_all(event_types=["Happened"], limit=None) == every
            # Pages of up to _HERE_ROWS are read from the Trio thread, longer
            # ones (and limit=None) in a worker thread: the same records.
            assert await one.read_all(event_types=["Happened"], limit=1000) == every
            assert await two.read_all(limit=_postgres._HERE_ROWS + 1) == every
            assert await one.read_all(event_types=["Other"]) == []


def open_postgres_store_for(database: Any) -> Any:
    from trio_aggregates._stores._postgres import open_postgres_store

    return open_postgres_store(database.dsn)


@pytestmark_pg
async def test_postgres_read_all_plan_is_a_position_scan_whatever_is_deleted(
    postgres_database: Any,
) -> None:
    """A read_all page without a category filter (of 40,000 events) is planned
    as a scan of the position index that stops at the limit, with no stream
    deleted and with half of 100,000 streams deleted, on tables analyzed or
    not, as a custom plan and as the generic plan a prepared statement may
    switch to. Whether any stream is deleted is asked once per page (an
    InitPlan); the deleted streams are never merged with or hashed against
    the events (the anti-join this query replaced was planned, with 300,000
    streams deleted, as a merge of every event with every deleted stream and
    a sort: 25-40 ms a page instead of 2).

    With an event type filter on a table not yet analyzed, PostgreSQL
    guesses that few events match and may sort those it finds (as it did
    with the anti-join): only the absence of a merge or hash is held there.
    """
    from trio_aggregates._stores._postgres import _READ_ALL_LIVE, _numbered

    async with open_postgres_store_for(postgres_database) as store:
        for n in range(40):  # enough events that a sort of them would cost
            await store.append(f"acct-{n}", [ev(v) for v in range(1000)], expected_version=0)
        await store.delete_stream("acct-3")
    variants = [
        ("", ["1", "1000"]),
        (" AND e.type = ANY(%s::text[])", ["1", "'{Happened}'", "1000"]),
    ]

    def plans(conn: Any) -> list[tuple[bool, str]]:
        """(filtered by type, the plan) of each variant, custom and generic."""
        found = []
        for n, (event_filter, values) in enumerate(variants):
            sql = _READ_ALL_LIVE.format(event_filter=event_filter)
            custom = sql.replace("%s", "{}").format(*values)
            found.append((bool(n), explain(conn, f"EXPLAIN {custom}")))
            conn.execute(f"PREPARE read_all_{n} AS {_numbered(sql)}")
            conn.execute("SET plan_cache_mode = force_generic_plan")
            generic = f"EXPLAIN EXECUTE read_all_{n} ({', '.join(values)})"
            found.append((bool(n), explain(conn, generic)))
            conn.execute("RESET plan_cache_mode")
            conn.execute(f"DEALLOCATE read_all_{n}")
        return found

    def check(conn: Any) -> None:
        for typed, plan in plans(conn):
            assert plan.splitlines()[0].startswith("Limit"), plan
            assert "InitPlan" in plan, plan  # "is any stream deleted?", once
            assert "merge" not in plan.lower() and "hash" not in plan.lower(), plan
            if not typed:
                assert "Index Scan using trio_aggregates_events_position_key" in plan, plan
                assert 'Sort Key: e."position"' not in plan, plan

    with pg_connect(postgres_database) as conn:
        check(conn)  # one stream deleted, tables not analyzed
        conn.execute("UPDATE trio_aggregates_streams SET state = 0 WHERE state <> 0")
        check(conn)
        conn.execute("ANALYZE trio_aggregates_events")
        conn.execute("ANALYZE trio_aggregates_streams")
        check(conn)
        conn.execute(
            "INSERT INTO trio_aggregates_streams (name, state)"
            " SELECT 'gone-' || g, CASE WHEN g % 2 = 0 THEN 2 ELSE 0 END"
            " FROM generate_series(1, 100000) g"
        )
        check(conn)  # not analyzed since
        conn.execute("ANALYZE trio_aggregates_streams")
        check(conn)


def explain(conn: Any, statement: str) -> str:
    return "\n".join(row[0] for row in conn.execute(statement))
