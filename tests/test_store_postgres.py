"""What only the PostgreSQL store has: many processes on one database, a server that goes away."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import psycopg
import pytest
import trio
import trio.testing
from _pgserver import PostgresServer
from conftest import PostgresDatabase, make_postgres_server

from trio_aggregates._core._exceptions import (
    ConcurrencyConflict,
    DuplicateCommand,
    StoreError,
    StreamDeleted,
)
from trio_aggregates._stores._postgres import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    PostgresEventStore,
    open_postgres_store,
)
from trio_aggregates._stores._store import NewEvent, Snapshot

pytestmark = pytest.mark.postgres


def ev(n: int | str) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


def query(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


async def test_two_stores_racing_never_both_win(postgres_database: PostgresDatabase) -> None:
    """Two independent stores (think: two processes) on one database."""
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as one, open_postgres_store(dsn) as two:
        wins: dict[str, list[str]] = {}
        conflicts: dict[str, list[str]] = {}

        async def append(store: PostgresEventStore, who: str, stream: str) -> None:
            try:
                await store.append(stream, [ev(who)], expected_version=0)
            except ConcurrencyConflict:
                conflicts.setdefault(stream, []).append(who)
            else:
                wins.setdefault(stream, []).append(who)

        for round in range(20):
            stream = f"race-{round}"
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(3):
                        nursery.start_soon(append, one, f"one-{i}", stream)
                        nursery.start_soon(append, two, f"two-{i}", stream)
            assert len(wins[stream]) == 1, (wins, conflicts)
            assert len(conflicts[stream]) == 5
            events = await two.read(stream)
            assert [e.data for e in events] == [f"event-{wins[stream][0]}".encode()]


async def test_two_stores_appending_anywhere_lose_nothing(
    postgres_database: PostgresDatabase,
) -> None:
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as one, open_postgres_store(dsn) as two:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(25):
                    for store, name in ((one, "one"), (two, "two")):
                        nursery.start_soon(
                            functools.partial(
                                store.append, "shared", [ev(f"{name}-{i}")], expected_version=None
                            )
                        )
        events = await one.read("shared")
        assert [e.version for e in events] == list(range(1, 51))
        assert len({e.data for e in events}) == 50


async def test_schema_enforces_unique_versions(postgres_database: PostgresDatabase) -> None:
    async with open_postgres_store(postgres_database.dsn) as store:
        await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(
            postgres_database.dsn,
            "INSERT INTO trio_aggregates_events (stream_id, version, type, data, metadata)"
            " SELECT id, 1, 'X', '', '' FROM trio_aggregates_streams WHERE name = 's'",
        )


async def test_migrations_idempotent(postgres_database: PostgresDatabase) -> None:
    dsn = postgres_database.dsn
    for i in range(3):
        async with open_postgres_store(dsn) as store:
            await store.append("s", [ev(i)], expected_version=i)
    rows = query(dsn, "SELECT version FROM trio_aggregates_schema ORDER BY version")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_concurrent_migrations_are_safe(postgres_database: PostgresDatabase) -> None:
    dsn = postgres_database.dsn
    opened: list[int] = []

    async def open_one(i: int) -> None:
        async with open_postgres_store(dsn) as store:
            opened.append(i)
            await store.append("s", [ev(i)], expected_version=None)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(open_one, i)
    assert sorted(opened) == list(range(6))
    rows = query(dsn, "SELECT version FROM trio_aggregates_schema ORDER BY version")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert query(dsn, "SELECT count(*) FROM trio_aggregates_events") == [(6,)]


async def test_newer_schema_is_refused(postgres_database: PostgresDatabase) -> None:
    async with open_postgres_store(postgres_database.dsn):
        pass
    query(
        postgres_database.dsn,
        "INSERT INTO trio_aggregates_schema (version) VALUES (%s)",
        SCHEMA_VERSION + 1,
    )
    with pytest.raises(StoreError, match="newer"):
        async with open_postgres_store(postgres_database.dsn):
            pass  # pragma: no cover


async def test_group_commit_batches_concurrent_appends(
    postgres_database: PostgresDatabase,
) -> None:
    async with open_postgres_store(postgres_database.dsn) as store:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(
                        functools.partial(store.append, f"s-{i}", [ev(i)], expected_version=0)
                    )
        stats = store.statistics()
        assert stats.appends == 200
        assert stats.failed_writes == 0
        assert stats.transactions <= 5, stats
        for i in range(200):
            assert await store.stream_version(f"s-{i}") == 1


async def test_failing_write_fails_alone_in_its_batch(
    postgres_database: PostgresDatabase,
) -> None:
    async with open_postgres_store(postgres_database.dsn) as store:
        await store.append("taken", [ev(0)], expected_version=0)
        errors: dict[str, BaseException] = {}

        async def append(stream: str, event: NewEvent, expected: int) -> None:
            try:
                await store.append(stream, [event], expected_version=expected)
            except StoreError as exc:
                errors[stream] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, "ok-1", ev(1), 0)
            nursery.start_soon(append, "taken", ev(1), 0)  # conflict
            # PostgreSQL text cannot hold NUL: the driver refuses this one.
            nursery.start_soon(append, "bad", NewEvent("Bad\x00Type", b""), 0)
            nursery.start_soon(append, "ok-2", ev(2), 0)
        assert set(errors) == {"taken", "bad"}
        assert isinstance(errors["taken"], ConcurrencyConflict)
        assert type(errors["bad"]) is StoreError
        assert isinstance(errors["bad"].__cause__, psycopg.Error)
        assert await store.stream_version("ok-1") == 1
        assert await store.stream_version("ok-2") == 1
        assert await store.stream_version("bad") == 0


async def test_soft_delete_keeps_rows_hard_delete_erases_them(
    postgres_database: PostgresDatabase,
) -> None:
    async with open_postgres_store(postgres_database.dsn) as store:
        await store.append("soft", [ev(1), ev(2)], expected_version=0)
        await store.append("hard", [ev(1), ev(2)], expected_version=0)
        await store.save_snapshot(Snapshot("hard", 2, 1, "S", b""))
        await store.delete_stream("soft")
        await store.delete_stream("hard", hard=True)
    rows = query(
        postgres_database.dsn,
        "SELECT s.name, s.state, count(e.version) FROM trio_aggregates_streams s"
        " LEFT JOIN trio_aggregates_events e ON e.stream_id = s.id"
        " GROUP BY s.id ORDER BY s.name",
    )
    assert rows == [("hard", 2, 0), ("soft", 1, 2)]
    assert query(postgres_database.dsn, "SELECT count(*) FROM trio_aggregates_snapshots") == [(0,)]


async def test_unreachable_server_gives_store_error(postgres_server: PostgresServer) -> None:
    dsn = f"host=127.0.0.1 port={postgres_server.port} user=nobody_here dbname=nothing"
    with pytest.raises(StoreError) as info:
        async with open_postgres_store(dsn):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


async def test_invalid_pool_sizes() -> None:
    with pytest.raises(ValueError):
        async with open_postgres_store("postgresql://x", min_size=3, max_size=2):
            pass  # pragma: no cover


async def test_closed_store_refuses_calls(postgres_database: PostgresDatabase) -> None:
    async with open_postgres_store(postgres_database.dsn) as store:
        pass
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(StoreError, match="closed"):
        await store.read("s")


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, free to stop and start."""
    server = make_postgres_server()
    try:
        yield server
    finally:
        server.destroy()


async def test_server_goes_away_and_comes_back(own_server: PostgresServer) -> None:
    async with open_postgres_store(own_server.dsn, min_size=2, max_size=4) as store:
        await store.append("s", [ev(1)], expected_version=0)
        await store.save_snapshot(Snapshot("s", 1, 1, "S", b"one"))

        await trio.to_thread.run_sync(own_server.stop)
        with pytest.raises(StoreError) as info:
            await store.append("s", [ev(2)], expected_version=1)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        with pytest.raises(StoreError) as info:
            await store.read("s")
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        with pytest.raises(StoreError):
            await store.load_snapshot("s")
        # Many at once: each caller gets its error, none hangs.
        failures: list[BaseException] = []

        async def doomed(i: int) -> None:
            try:
                await store.append(f"d-{i}", [ev(i)], expected_version=0)
            except StoreError as exc:
                failures.append(exc)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(doomed, i)
        assert len(failures) == 10

        await trio.to_thread.run_sync(own_server.start)
        with trio.fail_after(60):
            # The same store object works again, and the failed append left nothing.
            assert await store.stream_version("s") == 1
            assert await store.append("s", [ev(2)], expected_version=1) == 2
            assert [e.data for e in await store.read("s")] == [b"event-1", b"event-2"]
            assert await store.load_snapshot("s") == Snapshot("s", 1, 1, "S", b"one")
            for i in range(10):
                assert await store.stream_version(f"d-{i}") == 0


async def test_server_restarted_while_idle(own_server: PostgresServer) -> None:
    """Connections that died while idle are replaced without an error."""
    async with open_postgres_store(own_server.dsn, min_size=3, max_size=3) as store:
        await store.append("s", [ev(1)], expected_version=0)
        await trio.to_thread.run_sync(own_server.stop)
        await trio.to_thread.run_sync(own_server.start)
        with trio.fail_after(60):
            # Every pooled connection is stale; the pool checks and replaces them.
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(store.read, "s")
            assert await store.append("s", [ev(2)], expected_version=1) == 2


async def test_hard_delete_races_append_across_stores(
    postgres_database: PostgresDatabase,
) -> None:
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as one, open_postgres_store(dsn) as two:
        for round in range(10):
            stream = f"s-{round}"
            await one.append(stream, [ev(0)], expected_version=0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(two.delete_stream, stream, hard=True))

                async def append(stream: str = stream) -> None:
                    with contextlib.suppress(StreamDeleted):
                        await one.append(stream, [ev(1)], expected_version=None)

                nursery.start_soon(append)
            # Whatever the order, a tombstone holds no events.
            rows = query(
                dsn,
                "SELECT count(*) FROM trio_aggregates_events e"
                " JOIN trio_aggregates_streams s ON s.id = e.stream_id"
                " WHERE s.name = %s AND s.state = 2",
                stream,
            )
            assert rows == [(0,)]


async def test_open_store_accepts_both_url_schemes(postgres_database: PostgresDatabase) -> None:
    from trio_aggregates._stores._open_store import open_store

    for url in (
        postgres_database.url,
        postgres_database.url.replace("postgresql://", "postgres://"),
    ):
        async with open_store(url) as store:
            assert isinstance(store, PostgresEventStore)
            await store.append("s", [ev(url)], expected_version=None)
    async with open_postgres_store(postgres_database.dsn) as store:
        assert await store.stream_version("s") == 2


# -- batches: one transaction, one round trip, outcomes per op ----------------


@contextlib.asynccontextmanager
async def writer_held(store: PostgresEventStore, dsn: str) -> AsyncIterator[trio.Nursery]:
    """Keep the store's writer busy on a row lock held here, so that the writes
    started in the body queue up together; they form the next batch on exit.

    Every batch the store writes at once (``_batches_in_flight``) is held:
    one append to the locked stream each, a transaction each.
    """
    await store.append("busy", [ev(0)], expected_version=None)
    blocker = await trio.to_thread.run_sync(psycopg.connect, dsn)
    try:
        blocker.execute("SELECT id FROM trio_aggregates_streams WHERE name = 'busy' FOR UPDATE")
        async with trio.open_nursery() as nursery:
            for _ in range(store._batches_in_flight):
                nursery.start_soon(
                    functools.partial(store.append, "busy", [ev(1)], expected_version=None)
                )
                await trio.testing.wait_all_tasks_blocked()
            assert store.statistics().pending_writes == 0
            yield nursery
            await trio.testing.wait_all_tasks_blocked()
            assert store.statistics().pending_writes > 0
            await trio.to_thread.run_sync(blocker.commit)
    finally:
        await trio.to_thread.run_sync(blocker.close)


async def test_a_mixed_batch_is_one_transaction(postgres_database: PostgresDatabase) -> None:
    """Appends, a conflict, a duplicate command, a snapshot and deletes in one batch."""
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as store:
        await store.append("taken", [ev(0)], expected_version=0, command_id="done")
        await store.append("soft", [ev(0)], expected_version=0)
        outcomes: dict[str, object] = {}

        async def run(name: str, call: Callable[[], Awaitable[object]]) -> None:
            try:
                outcomes[name] = await call()
            except (StoreError, DuplicateCommand) as exc:
                outcomes[name] = exc

        before = store.statistics().transactions
        with trio.fail_after(60):
            async with writer_held(store, dsn) as nursery:
                for i in range(5):
                    nursery.start_soon(
                        run,
                        f"a-{i}",
                        functools.partial(store.append, f"a-{i}", [ev(i)], expected_version=0),
                    )
                nursery.start_soon(
                    run,
                    "conflict",
                    functools.partial(store.append, "taken", [ev(1)], expected_version=0),
                )
                nursery.start_soon(
                    run,
                    "duplicate",
                    functools.partial(
                        store.append, "taken", [ev(1)], expected_version=1, command_id="done"
                    ),
                )
                nursery.start_soon(
                    run,
                    "chained",
                    functools.partial(
                        store.append, "taken", [ev(1)], expected_version=1, command_id="new"
                    ),
                )
                nursery.start_soon(
                    run,
                    "snapshot",
                    functools.partial(store.save_snapshot, Snapshot("a-2", 1, 1, "S", b"s")),
                )
                nursery.start_soon(run, "soft", functools.partial(store.delete_stream, "soft"))
                nursery.start_soon(
                    run, "hard", functools.partial(store.delete_stream, "gone", hard=True)
                )
        # writer_held's appends, then one batch for all the others.
        held = 1 + store._batches_in_flight
        assert store.statistics().transactions - before == held + 1
        assert {f"a-{i}": outcomes[f"a-{i}"] for i in range(5)} == {f"a-{i}": 1 for i in range(5)}
        assert isinstance(outcomes["conflict"], ConcurrencyConflict)
        assert isinstance(outcomes["duplicate"], DuplicateCommand)
        assert outcomes["duplicate"].version == 1
        assert outcomes["chained"] == 2
        assert (
            outcomes["snapshot"] is None and outcomes["soft"] is None and outcomes["hard"] is None
        )
        assert await store.load_snapshot("a-2") == Snapshot("a-2", 1, 1, "S", b"s")
        assert await store.find_command("taken", "new") == 2
        assert await store.stream_version("soft") == 0
        with pytest.raises(StreamDeleted):
            await store.read("gone")
    # Every row the batch wrote carries one transaction id.
    rows = query(
        dsn,
        "SELECT e.xmin::text FROM trio_aggregates_events e JOIN trio_aggregates_streams s"
        " ON s.id = e.stream_id WHERE s.name LIKE 'a-%%' OR (s.name = 'taken' AND e.version = 2)"
        " UNION SELECT xmin::text FROM trio_aggregates_snapshots"
        " UNION SELECT xmin::text FROM trio_aggregates_commands WHERE command_id = 'new'"
        " UNION SELECT xmin::text FROM trio_aggregates_streams WHERE name IN ('soft', 'gone')",
    )
    assert len(rows) == 1, rows


async def test_a_server_side_error_fails_only_its_op(postgres_database: PostgresDatabase) -> None:
    """The batch's transaction fails; its ops are written again one at a time."""
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as store:
        query(
            dsn,
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.type = 'Poison' THEN RAISE EXCEPTION 'poisoned event'; END IF;"
            " RETURN NEW; END $$",
        )
        query(
            dsn,
            "CREATE TRIGGER poison BEFORE INSERT ON trio_aggregates_events"
            " FOR EACH ROW EXECUTE FUNCTION poison()",
        )
        errors: dict[str, BaseException] = {}

        async def append(stream: str, event: NewEvent, command_id: str | None = None) -> None:
            try:
                await store.append(stream, [event], expected_version=0, command_id=command_id)
            except StoreError as exc:
                errors[stream] = exc

        with trio.fail_after(60):
            async with writer_held(store, dsn) as nursery:
                for i in range(4):
                    nursery.start_soon(append, f"ok-{i}", ev(i), f"c-{i}")
                nursery.start_soon(append, "bad", NewEvent("Poison", b""), "c-bad")
                nursery.start_soon(store.save_snapshot, Snapshot("ok-0", 1, 1, "S", b""))
        assert set(errors) == {"bad"}
        assert type(errors["bad"]) is StoreError
        assert isinstance(errors["bad"].__cause__, psycopg.errors.RaiseException)
        assert "poisoned event" in str(errors["bad"])
        for i in range(4):
            assert await store.stream_version(f"ok-{i}") == 1
            assert await store.find_command(f"ok-{i}", f"c-{i}") == 1
        assert await store.stream_version("bad") == 0
        assert await store.find_command("bad", "c-bad") is None
        assert await store.load_snapshot("ok-0") is not None


async def test_a_version_2_schema_is_migrated(postgres_database: PostgresDatabase) -> None:
    """A schema made by the library before command ids: upgraded on open, nothing lost."""
    dsn = postgres_database.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE trio_aggregates_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version in (1, 2):
            for statement in _MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO trio_aggregates_schema (version) VALUES (%s)", (version,))
        conn.execute(
            "SELECT trio_aggregates_append_batch(ARRAY['old'], ARRAY[0::bigint], ARRAY[2],"
            " ARRAY['Happened', 'Happened'], ARRAY['a'::bytea, 'b'::bytea],"
            " ARRAY['{}'::bytea, '{}'::bytea])"
        )
    async with open_postgres_store(dsn) as store:
        assert [e.data for e in await store.read("old")] == [b"a", b"b"]
        assert await store.append("old", [ev(3)], expected_version=2, command_id="c") == 3
        with pytest.raises(DuplicateCommand):
            await store.append("old", [ev(4)], expected_version=3, command_id="c")
        assert await store.find_command("old", "c") == 3
    rows = query(dsn, "SELECT version FROM trio_aggregates_schema ORDER BY version")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert SCHEMA_VERSION >= 3


async def test_hard_delete_erases_command_ids(postgres_database: PostgresDatabase) -> None:
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as store:
        await store.append("hard", [ev(1)], expected_version=0, command_id="c")
        await store.append("soft", [ev(1)], expected_version=0, command_id="c")
        await store.delete_stream("hard", hard=True)
        await store.delete_stream("soft")
        assert await store.find_command("soft", "c") is None
    rows = query(
        dsn,
        "SELECT s.name, s.state FROM trio_aggregates_commands c"
        " JOIN trio_aggregates_streams s ON s.id = c.stream_id",
    )
    # The soft-deleted stream's ids stay with its detached row, like its events.
    assert rows == [("soft", 1)]
