"""The stores' edges: a hung server, data the store did not write, a full disk, read-only.

* A frozen PostgreSQL (SIGSTOP of every process of the server, the way a
  silent network partition looks): every operation fails within the store's
  ``timeout`` with StoreError, shutdown honours its grace period, and the
  same store works again once the server is resumed (SIGCONT, always, in a
  ``finally``). These tests freeze a private server of their own, never the
  session's.
* Rows written by another program (the ``sqlite3`` shell, psql): read as
  bytes when they can be, else EventDecodeError naming the stream and version
  for that aggregate alone.
* A database that refuses writes (disk full, read-only): StoreError for the
  writes, nothing partial, reads served, service back without reopening.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from _pgserver import PostgresServer
from conftest import PostgresDatabase, make_postgres_server

from trio_aggregates import (
    EventDecodeError,
    RegistryClosed,
    StoreError,
    TrioAggregatesError,
    UnknownEventType,
    open_aggregates,
    open_store,
)
from trio_aggregates._stores._postgres import open_postgres_store
from trio_aggregates._stores._sqlite import open_sqlite_store
from trio_aggregates._stores._store import NewEvent, Snapshot

sys.path.insert(0, str(Path(__file__).parent))
from _writer import Add, Open, Tally

#: The store's bound in the freeze tests: short, because the server is real.
BOUND = 1.0
#: What a test allows on top of the bound (thread hops, a loaded machine).
SLACK = 2.0
#: A frozen server is resumed after this long whatever happens, so that a
#: store without bounds makes its test fail rather than hang.
THAW_AFTER = 15.0


def ev(n: int | str) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


def added(amount: int) -> bytes:
    return json.dumps({"amount": amount, "part": 0, "parts": 1}).encode()


# -- freezing a server ---------------------------------------------------------


def server_pids(server: PostgresServer) -> list[int]:
    """The postmaster's pid (from ``postmaster.pid``), then its children's."""
    postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The fields after the command name (which may hold spaces): state, ppid, ...
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == postmaster:
            children.append(int(entry))
    return [postmaster, *children]


@contextlib.contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """Every process of ``server`` stopped (SIGSTOP) for the block; resumed after.

    The postmaster is stopped first, so that it forks no child while its
    children are listed. A watchdog resumes the server after ``THAW_AFTER``
    seconds whatever happens.
    """
    stopped: list[int] = []
    lock = threading.Lock()

    def thaw() -> None:
        with lock:
            for pid in reversed(stopped):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            stopped.clear()

    watchdog = threading.Timer(THAW_AFTER, thaw)
    try:
        postmaster, *_ = server_pids(server)
        os.kill(postmaster, signal.SIGSTOP)
        stopped.append(postmaster)
        for pid in server_pids(server)[1:]:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        watchdog.start()
        yield
    finally:
        watchdog.cancel()
        thaw()


@pytest.fixture(scope="module")
def private_server() -> Iterator[PostgresServer]:
    """A server of this module's own, free to freeze and to reconfigure."""
    server = make_postgres_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def private_database(private_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh database on the private server, for one test."""
    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(private_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PostgresDatabase(name, private_server.dsn_for(name), private_server.url_for(name))
    finally:
        with psycopg.connect(private_server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- 1. a hung server ------------------------------------------------------------


@pytest.mark.postgres
async def test_frozen_server_fails_operations_within_the_bound(
    private_server: PostgresServer, private_database: PostgresDatabase
) -> None:
    private_dsn = private_database.dsn
    async with open_postgres_store(private_dsn, timeout=BOUND, min_size=2) as store:
        await store.append("s", [ev(1)], expected_version=0)
        await store.save_snapshot(Snapshot("s", 1, 1, "S", b"one"))
        with frozen(private_server):
            start = trio.current_time()
            with pytest.raises(StoreError, match=rf"did not answer within {BOUND} s \(timeout\)"):
                await store.append("s", [ev(2)], expected_version=1)
            assert trio.current_time() - start < BOUND + SLACK

            start = trio.current_time()
            with pytest.raises(StoreError, match="timeout"):
                await store.read("s")
            with pytest.raises(StoreError, match="timeout"):
                await store.stream_version("s")
            with pytest.raises(StoreError, match="timeout"):
                await store.load_snapshot("s")
            # A page of read_all from the Trio thread, and one in a worker thread.
            with pytest.raises(StoreError, match="timeout"):
                await store.read_all(limit=10)
            with pytest.raises(StoreError, match="timeout"):
                await store.read_all(limit=None)
            assert trio.current_time() - start < 5 * (BOUND + SLACK)

            # Many at once: each gets its error, none hangs. (A write queued
            # behind a stalled batch waits for that batch's bound, then its own.)
            failures: list[BaseException] = []

            async def doomed(i: int) -> None:
                try:
                    await store.append(f"d-{i}", [ev(i)], expected_version=0)
                except StoreError as exc:
                    failures.append(exc)

            async def doomed_read() -> None:
                with contextlib.suppress(StoreError):
                    await store.read("nothing")

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = start + 2 * (BOUND + SLACK)
                for i in range(10):
                    nursery.start_soon(doomed, i)
                    nursery.start_soon(doomed_read)  # reads in parallel
            assert len(failures) == 10
            assert trio.current_time() - start < 2 * (BOUND + SLACK)
        # Resumed: the same store object works again. (The append that timed
        # out may or may not have been committed: the server may carry it out
        # when it resumes.)
        with trio.fail_after(30):
            assert await store.stream_version("s") in (1, 2)
            version = await store.stream_version("s")
            assert await store.append("s", [ev(3)], expected_version=version) == version + 1
            assert (await store.read("s"))[0].data == b"event-1"
            assert (await store.read_all(limit=10))[0].data == b"event-1"
            assert await store.load_snapshot("s") == Snapshot("s", 1, 1, "S", b"one")


@pytest.mark.postgres
async def test_opening_a_store_on_a_frozen_server_fails_within_the_bound(
    private_server: PostgresServer, private_database: PostgresDatabase
) -> None:
    with frozen(private_server):
        start = trio.current_time()
        with pytest.raises(StoreError, match=r"did not answer within 1.0 s \(timeout\)"):
            async with open_store(f"{private_database.url}?timeout={BOUND}"):
                pass  # pragma: no cover
        assert trio.current_time() - start < BOUND + SLACK
    with trio.fail_after(30):
        async with open_store(f"{private_database.url}?timeout={BOUND}") as store:
            assert await store.append("s", [ev(1)], expected_version=0) == 1


@pytest.mark.postgres
async def test_frozen_server_reads_do_not_hold_the_runtime(
    private_server: PostgresServer, private_database: PostgresDatabase
) -> None:
    private_dsn = private_database.dsn
    """While the server is frozen, the rest of the process (other tasks) runs on."""
    async with open_postgres_store(private_dsn, timeout=BOUND) as store:
        await store.append("s", [ev(1)], expected_version=0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.05)
                ticks += 1

        with frozen(private_server):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                with pytest.raises(StoreError):
                    await store.read("s")
                nursery.cancel_scope.cancel()
        assert ticks >= 5
        with trio.fail_after(30):
            assert [e.data for e in await store.read("s")] == [b"event-1"]


@pytest.mark.postgres
async def test_leaving_open_aggregates_while_frozen_honours_the_grace_period(
    private_server: PostgresServer, private_database: PostgresDatabase
) -> None:
    grace = 0.5
    url = f"{private_database.url}?timeout={BOUND}"
    outcomes: list[BaseException | int] = []

    async def command(tallies: Any) -> None:
        try:
            outcomes.append(await tallies.execute(1, Add(3)))
        except TrioAggregatesError as exc:
            outcomes.append(exc)

    with contextlib.ExitStack() as freeze:
        async with trio.open_nursery() as outside:
            async with open_aggregates(Tally, url, shutdown_timeout=grace) as tallies:
                await tallies.create(1, Open())
                freeze.enter_context(frozen(private_server))
                outside.start_soon(command, tallies)
                await trio.sleep(0.2)  # the command is in the store's hands
                start = trio.current_time()
                # Leave the block while the server is frozen.
            elapsed = trio.current_time() - start
    assert elapsed < BOUND + grace + SLACK
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], StoreError | RegistryClosed), outcomes


@pytest.mark.postgres
async def test_postgres_connections_carry_every_bound(
    postgres_database: PostgresDatabase, postgres_dsn: str
) -> None:
    def look(conn: Any) -> tuple[dict[str, str], str]:
        row = conn.execute("SHOW statement_timeout").fetchone()
        return conn.info.get_parameters(), row[0]

    async with open_postgres_store(postgres_database.dsn, timeout=6) as store:
        params, statement_timeout = await store._pool.run(look)
    assert statement_timeout == "5400ms"  # below the store's own bound
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "2"
    assert params["keepalives_interval"] == "1"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "6000"
    assert params["connect_timeout"] == "6"

    # What the DSN says itself wins.
    dsn = f"{postgres_database.dsn} keepalives_idle=7 application_name=mine connect_timeout=3"
    async with open_postgres_store(dsn, timeout=60) as store:
        params, statement_timeout = await store._pool.run(look)
    assert statement_timeout == "54s"
    assert params["keepalives_idle"] == "7"
    assert params["application_name"] == "mine"
    assert params["connect_timeout"] == "3"
    options = f"-csearch_path={postgres_database.schema} -cstatement_timeout=7s"
    dsn = f"{postgres_dsn} options='{options}'"
    async with open_postgres_store(dsn, timeout=60) as store:
        params, statement_timeout = await store._pool.run(look)
    assert statement_timeout == "7s"


# -- 4. data the store did not write ------------------------------------------------


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "shared.db"


def sqlite_insert(path: Path, stream: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert event rows ``(version, type, data, metadata, recorded_at)`` by hand,
    as another program would (values bound as given: TEXT stays TEXT)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        found = db.execute("SELECT id FROM streams WHERE name = ? AND state = 0", (stream,))
        row = found.fetchone()
        if row is None:
            stream_id = db.execute(
                "INSERT INTO streams (name, state) VALUES (?, 0)", (stream,)
            ).lastrowid
        else:
            stream_id = row[0]
        for version, type_, data, metadata, recorded_at in rows:
            db.execute(
                "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (stream_id, version, type_, data, metadata, recorded_at),
            )
        db.execute("COMMIT")
    finally:
        db.close()


async def test_sqlite_text_rows_written_by_another_program_are_read(sqlite_file: Path) -> None:
    url = f"sqlite:///{sqlite_file}"
    async with open_aggregates(Tally, url) as tallies:
        await tallies.create(1, Open())
    # What the sqlite3 shell writes: TEXT everywhere, a text timestamp.
    db = sqlite3.connect(sqlite_file, isolation_level=None)
    try:
        db.execute(
            "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at)"
            ' SELECT id, 2, \'tally.added\', \'{"amount": 5, "part": 0, "parts": 1}\','
            " '{\"by\": \"shell\"}', datetime('now') FROM streams WHERE name = 'Tally-1'"
        )
    finally:
        db.close()
    sqlite_insert(sqlite_file, "Tally-1", [(3, "tally.added", added(7).decode(), "{}", 1.5e9)])
    async with open_store(url) as store:
        events = await store.read("Tally-1")
        assert [e.version for e in events] == [1, 2, 3]
        assert events[1].data == b'{"amount": 5, "part": 0, "parts": 1}'
        assert events[1].metadata == b'{"by": "shell"}'
        assert isinstance(events[1].data, bytes) and isinstance(events[1].metadata, bytes)
        assert abs(events[1].recorded_at - time.time()) < 3600
        assert events[2].recorded_at == 1.5e9
    async with open_aggregates(Tally, url) as tallies:
        assert (await tallies.load(1)).total == 12
        history = await tallies.history(1)
        assert history[1].metadata == {"by": "shell"}
        assert await tallies.execute(1, Add(1)) == 6  # Add is stored as 3 events


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ((2, "tally.added", 42, b"{}", 1.0), "data"),
        ((2, "tally.added", 4.5, b"{}", 1.0), "data"),
        ((2, "tally.added", added(1), 7, 1.0), "metadata"),
        ((2, b"\xff\xfe", added(1), b"{}", 1.0), "type"),
        ((2, "tally.added", added(1), b"{}", "not a time"), "recorded_at"),
        ((2, "tally.added", added(1), b"{}", b"\x00"), "recorded_at"),
    ],
)
async def test_sqlite_undecodable_rows_fail_their_aggregate_alone(
    sqlite_file: Path, row: tuple[Any, ...], what: str
) -> None:
    url = f"sqlite:///{sqlite_file}"
    async with open_aggregates(Tally, url) as tallies:
        await tallies.create(1, Open())
        await tallies.create(2, Open())
    sqlite_insert(sqlite_file, "Tally-2", [row])
    async with open_store(url) as store:
        with pytest.raises(EventDecodeError, match=rf"Tally-2.*\b2\b.*{what}") as info:
            await store.read("Tally-2")
        assert isinstance(info.value, StoreError)
        assert [e.version for e in await store.read("Tally-1")] == [1]
    async with open_aggregates(Tally, url) as tallies:
        with pytest.raises(EventDecodeError, match="Tally-2"):
            await tallies.execute(2, Add(3))
        assert await tallies.execute(1, Add(3)) == 4
        assert 2 not in tallies.registry
        assert not tallies.registry.closed


async def test_sqlite_text_that_is_not_utf8_fails_its_aggregate_alone(sqlite_file: Path) -> None:
    url = f"sqlite:///{sqlite_file}"
    async with open_aggregates(Tally, url) as tallies:
        await tallies.create(1, Open())
        await tallies.create(2, Open())
    db = sqlite3.connect(sqlite_file, isolation_level=None)
    try:
        # TEXT holding bytes that are not UTF-8 (what a careless C program writes).
        db.execute(
            "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at)"
            " SELECT id, 2, CAST(x'ff00fe' AS TEXT), CAST(x'7b7d' AS TEXT), '{}', 0"
            " FROM streams WHERE name = 'Tally-2'"
        )
    finally:
        db.close()
    async with open_aggregates(Tally, url) as tallies:
        with pytest.raises(EventDecodeError, match=r"Tally-2.*\b2\b.*type"):
            await tallies.execute(2, Add(3))
        assert await tallies.execute(1, Add(3)) == 4


async def test_sqlite_version_that_is_not_a_number_fails_its_aggregate_alone(
    sqlite_file: Path,
) -> None:
    url = f"sqlite:///{sqlite_file}"
    async with open_aggregates(Tally, url) as tallies:
        await tallies.create(1, Open())
        await tallies.create(2, Open())
    sqlite_insert(sqlite_file, "Tally-2", [("two", "tally.added", added(1), b"{}", 0.0)])
    async with open_sqlite_store(sqlite_file) as store:
        with pytest.raises(EventDecodeError, match=r"Tally-2.*version.*'two'"):
            await store.stream_version("Tally-2")
        with pytest.raises(EventDecodeError, match=r"Tally-2.*version.*'two'"):
            await store.read("Tally-2")
        assert await store.stream_version("Tally-1") == 1
    async with open_aggregates(Tally, url) as tallies:
        with pytest.raises(EventDecodeError, match=r"Tally-2.*version"):
            await tallies.execute(2, Add(3))
        assert await tallies.execute(1, Add(3)) == 4


async def test_sqlite_foreign_command_rows(sqlite_file: Path) -> None:
    async with open_sqlite_store(sqlite_file) as store:
        await store.append("s", [ev(1)], expected_version=0, command_id="mine")
    db = sqlite3.connect(sqlite_file, isolation_level=None)
    try:
        db.execute(
            "INSERT INTO commands (stream_id, command_id, version)"
            " SELECT id, 'theirs', 'one' FROM streams WHERE name = 's'"
        )
    finally:
        db.close()
    async with open_sqlite_store(sqlite_file) as store:
        with pytest.raises(EventDecodeError, match=r"'theirs'.*version.*'one'"):
            await store.find_command("s", "theirs")
        with pytest.raises(EventDecodeError, match=r"'theirs'"):
            await store.append("s", [ev(2)], expected_version=1, command_id="theirs")
        assert await store.find_command("s", "mine") == 1
        assert await store.append("s", [ev(2)], expected_version=1, command_id="new") == 2


async def test_sqlite_foreign_snapshot_rows(sqlite_file: Path) -> None:
    async with open_sqlite_store(sqlite_file) as store:
        await store.append("text", [ev(1)], expected_version=0)
        await store.append("bad", [ev(1)], expected_version=0)
    db = sqlite3.connect(sqlite_file, isolation_level=None)
    try:
        db.execute(
            "INSERT INTO snapshots (stream_id, version, schema, type, data)"
            " SELECT id, 1, 1, 'State', '{\"total\": 1}' FROM streams WHERE name = 'text'"
        )
        db.execute(
            "INSERT INTO snapshots (stream_id, version, schema, type, data)"
            " SELECT id, 1, 'one', 'State', x'7b7d' FROM streams WHERE name = 'bad'"
        )
    finally:
        db.close()
    async with open_sqlite_store(sqlite_file) as store:
        assert await store.load_snapshot("text") == Snapshot("text", 1, 1, "State", b'{"total": 1}')
        with pytest.raises(EventDecodeError, match=r"snapshot of stream 'bad'.*schema"):
            await store.load_snapshot("bad")
        assert [e.data for e in await store.read("bad")] == [b"event-1"]


@pytest.mark.postgres
async def test_postgres_foreign_rows_fail_their_aggregate_alone(
    postgres_database: PostgresDatabase,
) -> None:
    url = postgres_database.url
    async with open_aggregates(Tally, url) as tallies:
        for key in range(1, 6):
            await tallies.create(key, Open())
    insert = (
        "INSERT INTO trio_aggregates_events (stream_id, version, type, data, metadata, recorded_at)"
        " SELECT id, 2, %s, %s, %s, %s::timestamptz FROM trio_aggregates_streams WHERE name = %s"
    )
    with psycopg.connect(postgres_database.dsn, autocommit=True) as conn:
        # Readable: JSON bytes written by another program, an odd timestamp.
        conn.execute(insert, ("tally.added", added(5), b'{"by": "psql"}', "infinity", "Tally-1"))
        conn.execute(insert, ("tally.added", b"{not json", b"{}", "now", "Tally-2"))
        conn.execute(insert, ("tally.added", b"\xff\xfe", b"{}", "now", "Tally-3"))
        conn.execute(insert, ("no.such.type", b"{}", b"{}", "now", "Tally-4"))
        conn.execute(insert, ("tally.added", added(1), b"\xff not json", "now", "Tally-5"))
    async with open_aggregates(Tally, url) as tallies:
        assert (await tallies.load(1)).total == 5
        with pytest.raises(EventDecodeError, match="Tally-2@2"):
            await tallies.execute(2, Add(3))
        with pytest.raises(EventDecodeError, match="Tally-3@2"):
            await tallies.execute(3, Add(3))
        with pytest.raises(UnknownEventType, match="Tally-4@2"):
            await tallies.execute(4, Add(3))
        # Bad metadata: the state loads (metadata is not part of it); history says where.
        assert await tallies.execute(5, Add(3)) == 5
        with pytest.raises(EventDecodeError, match="Tally-5@2"):
            await tallies.history(5)
        assert await tallies.execute(1, Add(3)) == 5
        assert not tallies.registry.closed


# -- 5. a database that refuses writes ------------------------------------------------


_DISK_FULL_TRIGGER = """
CREATE FUNCTION refuse_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
END
$$;
CREATE TRIGGER disk_full BEFORE INSERT ON trio_aggregates_events
    FOR EACH ROW EXECUTE FUNCTION refuse_insert();
"""


async def append_many(
    store: Any, streams: list[str], events: list[NewEvent] | None = None
) -> dict[str, BaseException | int]:
    """Append ``events`` (two small ones by default) to each stream at once (one batch)."""
    results: dict[str, BaseException | int] = {}
    batch = [ev(1), ev(2)] if events is None else events

    async def one(stream: str) -> None:
        try:
            results[stream] = await store.append(stream, batch, expected_version=None)
        except StoreError as exc:
            results[stream] = exc

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(one, stream)
    return results


@pytest.mark.postgres
async def test_postgres_disk_full_refuses_writes_and_recovers(
    postgres_database: PostgresDatabase,
) -> None:
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as store:
        await store.append("s", [ev(1)], expected_version=0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(_DISK_FULL_TRIGGER)
        with trio.fail_after(60):
            with pytest.raises(StoreError, match="No space left") as info:
                await store.append("s", [ev(2)], expected_version=1)
            assert isinstance(info.value.__cause__, psycopg.errors.DiskFull)
            # A batch: every append refused, none written in part.
            results = await append_many(store, [f"b-{i}" for i in range(20)] + ["s"])
            assert all(isinstance(r, StoreError) for r in results.values()), results
            # Reads are served meanwhile.
            assert [e.data for e in await store.read("s")] == [b"event-1"]
            assert await store.stream_version("s") == 1
            for i in range(20):
                assert await store.read(f"b-{i}") == []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER disk_full ON trio_aggregates_events")
        # Space is back: the same store writes again.
        with trio.fail_after(60):
            assert await store.append("s", [ev(2)], expected_version=1) == 2
            results = await append_many(store, [f"b-{i}" for i in range(20)])
            assert set(results.values()) == {2}


@pytest.mark.postgres
async def test_postgres_disk_full_through_open_aggregates(
    postgres_database: PostgresDatabase,
) -> None:
    url = postgres_database.url
    async with open_aggregates(Tally, url) as tallies:
        for key in range(5):
            await tallies.create(key, Open())
        with psycopg.connect(postgres_database.dsn, autocommit=True) as conn:
            conn.execute(_DISK_FULL_TRIGGER)
        errors: list[BaseException] = []

        async def add(key: int) -> None:
            try:
                await tallies.execute(key, Add(3))
            except StoreError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for key in range(5):
                nursery.start_soon(add, key)
        assert len(errors) == 5
        assert not tallies.registry.closed
        for key in range(5):
            assert (await tallies.load(key)).total == 0  # nothing partial
        with psycopg.connect(postgres_database.dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER disk_full ON trio_aggregates_events")
        for key in range(5):
            assert await tallies.execute(key, Add(3)) == 4


def set_read_only(server: PostgresServer, on: bool) -> None:
    """Turn ``default_transaction_read_only`` on or off for every session, and wait
    until a new session sees it."""
    value = "on" if on else "off"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            row = conn.execute("SHOW default_transaction_read_only").fetchone()
        if row is not None and row[0] == value:
            break
        assert time.monotonic() < deadline, "the server did not take the setting"
        time.sleep(0.05)
    time.sleep(0.2)  # the other sessions take it at their next command


@pytest.mark.postgres
async def test_postgres_read_only_refuses_writes_and_recovers(
    private_server: PostgresServer, private_database: PostgresDatabase
) -> None:
    private_dsn = private_database.dsn
    async with open_postgres_store(private_dsn, min_size=2) as store:
        await store.append("s", [ev(1)], expected_version=0)
        await trio.to_thread.run_sync(set_read_only, private_server, True)
        try:
            with trio.fail_after(60):
                with pytest.raises(StoreError, match="read-only") as info:
                    await store.append("s", [ev(2)], expected_version=1)
                assert isinstance(info.value.__cause__, psycopg.errors.ReadOnlySqlTransaction)
                results = await append_many(store, [f"b-{i}" for i in range(10)])
                assert all(isinstance(r, StoreError) for r in results.values()), results
                with pytest.raises(StoreError, match="read-only"):
                    await store.save_snapshot(Snapshot("s", 1, 1, "S", b""))
                assert [e.data for e in await store.read("s")] == [b"event-1"]
                assert await store.load_snapshot("s") is None
        finally:
            await trio.to_thread.run_sync(set_read_only, private_server, False)
        with trio.fail_after(60):
            assert await store.append("s", [ev(2)], expected_version=1) == 2
            results = await append_many(store, [f"b-{i}" for i in range(10)])
            assert set(results.values()) == {2}


async def test_sqlite_full_file_refuses_writes_and_recovers(sqlite_file: Path) -> None:
    """``PRAGMA max_page_count`` makes the file full, as a full disk would."""
    async with open_sqlite_store(sqlite_file) as store:
        await store.append("s", [ev(1)], expected_version=0)
        writer = store._writer.db
        (pages,) = writer.execute("PRAGMA page_count").fetchone()
        writer.execute(f"PRAGMA max_page_count = {pages}")
        big = NewEvent("Big", b"x" * 100_000)
        with pytest.raises(StoreError, match="full") as info:
            await store.append("s", [big], expected_version=1)
        assert isinstance(info.value.__cause__, sqlite3.Error)
        results = await append_many(store, [f"b-{i}" for i in range(10)], [big, big])
        assert all(isinstance(r, StoreError) for r in results.values()), results
        assert [e.data for e in await store.read("s")] == [b"event-1"]
        for i in range(10):
            assert await store.read(f"b-{i}") == []
        writer.execute("PRAGMA max_page_count = 1073741823")
        assert await store.append("s", [big], expected_version=1) == 2
        results = await append_many(store, [f"b-{i}" for i in range(10)], [big, big])
        assert set(results.values()) == {2}
