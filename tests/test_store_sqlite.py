"""What only the SQLite store has: a file that survives, group commit, its errors."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_aggregates._core._exceptions import (
    ConcurrencyConflict,
    DuplicateCommand,
    StoreError,
    StreamDeleted,
)
from trio_aggregates._stores._groupcommit import StoreStatistics
from trio_aggregates._stores._sqlite import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteEventStore,
    open_sqlite_store,
)
from trio_aggregates._stores._store import NewEvent, Snapshot


def ev(n: int | str) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to look at the file behind the store's back."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


async def test_everything_survives_reopening(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await store.append("kept", [ev(1), ev(2)], expected_version=0)
        await store.save_snapshot(Snapshot("kept", 2, 3, "State", b"snap"))
        await store.append("soft", [ev(1)], expected_version=0)
        await store.delete_stream("soft")
        await store.append("soft", [ev("new")], expected_version=0)
        await store.append("hard", [ev(1)], expected_version=0)
        await store.delete_stream("hard", hard=True)
    async with open_sqlite_store(db_path) as store:
        assert [e.data for e in await store.read("kept")] == [b"event-1", b"event-2"]
        assert await store.load_snapshot("kept") == Snapshot("kept", 2, 3, "State", b"snap")
        assert [e.data for e in await store.read("soft")] == [b"event-new"]
        with pytest.raises(StreamDeleted):
            await store.read("hard")
        assert await store.append("kept", [ev(3)], expected_version=2) == 3


async def test_wal_and_full_synchronous(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        with raw(db_path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # synchronous is per connection: look at the store's own writer.
        writer = store._writer.db
        assert writer.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


async def test_migrations_are_idempotent(db_path: Path) -> None:
    for _ in range(3):
        async with open_sqlite_store(db_path) as store:
            await store.append("s", [ev(1)], expected_version=None)
    with raw(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"streams", "events", "snapshots"} <= tables


async def test_concurrent_opens_of_a_new_file(db_path: Path) -> None:
    stores: list[SQLiteEventStore] = []

    async def open_one() -> None:
        async with open_sqlite_store(db_path) as store:
            stores.append(store)
            await store.append("s", [ev(1)], expected_version=None)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(open_one)
    assert len(stores) == 4
    async with open_sqlite_store(db_path) as store:
        assert await store.stream_version("s") == 4


async def test_group_commit_batches_concurrent_appends(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        assert store.statistics() == StoreStatistics(0, 0, 0, 0, 0)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(
                        functools.partial(store.append, f"s-{i}", [ev(i)], expected_version=0)
                    )
        stats = store.statistics()
        assert stats.appends == 200
        assert stats.writes == 200
        assert stats.failed_writes == 0
        assert stats.pending_writes == 0
        assert stats.transactions <= 5, stats
        for i in range(200):
            assert await store.stream_version(f"s-{i}") == 1


async def test_sequential_appends_are_one_transaction_each(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        for i in range(10):
            await store.append("s", [ev(i)], expected_version=i)
        assert store.statistics().transactions == 10
        assert store.statistics().appends == 10


async def test_failing_write_fails_alone_in_its_batch(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await store.append("taken", [ev(0)], expected_version=0)
        errors: dict[str, BaseException] = {}

        async def append(stream: str, event: NewEvent, expected: int) -> None:
            try:
                await store.append(stream, [event], expected_version=expected)
            except StoreError as exc:
                errors[stream] = exc

        before = store.statistics().transactions
        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, "ok-1", ev(1), 0)
            nursery.start_soon(append, "taken", ev(1), 0)  # conflict
            bad = NewEvent("Bad", object())  # type: ignore[arg-type]  # sqlite3 can't bind it
            nursery.start_soon(append, "bad", bad, 0)
            nursery.start_soon(append, "ok-2", ev(2), 0)
        assert store.statistics().transactions - before <= 2
        assert isinstance(errors["taken"], ConcurrencyConflict)
        assert type(errors["bad"]) is StoreError
        assert isinstance(errors["bad"].__cause__, sqlite3.Error)
        assert set(errors) == {"taken", "bad"}
        assert await store.stream_version("ok-1") == 1
        assert await store.stream_version("ok-2") == 1
        assert await store.stream_version("bad") == 0
        assert store.statistics().failed_writes == 2


async def test_schema_enforces_unique_versions(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await store.append("s", [ev(1)], expected_version=0)
    with raw(db_path) as db:
        (stream_id,) = db.execute("SELECT id FROM streams WHERE name = 's'").fetchone()
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at)"
                " VALUES (?, 1, 'X', x'', x'', 0)",
                (stream_id,),
            )


async def test_soft_delete_keeps_rows_hard_delete_erases_them(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await store.append("soft", [ev(1), ev(2)], expected_version=0)
        await store.append("hard", [ev(1), ev(2)], expected_version=0)
        await store.save_snapshot(Snapshot("hard", 2, 1, "S", b""))
        await store.delete_stream("soft")
        await store.delete_stream("hard", hard=True)
        with raw(db_path) as db:
            rows = db.execute(
                "SELECT s.name, s.state, count(e.version) FROM streams s"
                " LEFT JOIN events e ON e.stream_id = s.id GROUP BY s.id ORDER BY s.name"
            ).fetchall()
            assert rows == [("hard", 2, 0), ("soft", 1, 2)]
            assert db.execute("SELECT count(*) FROM snapshots").fetchone() == (0,)


async def test_corrupt_file_gives_store_error(db_path: Path) -> None:
    await trio.Path(db_path).write_bytes(b"this is not an SQLite database, not at all. " * 200)
    with pytest.raises(StoreError) as info:
        async with open_sqlite_store(db_path):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
async def test_unopenable_path_gives_store_error(tmp_path: Path, where: str) -> None:
    path = tmp_path / "no" / "such" / "dir" / "x.db"
    if where == "a-directory":
        path = tmp_path / "dir.db"
        path.mkdir()
    with pytest.raises(StoreError) as info:
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_newer_schema_is_refused(db_path: Path) -> None:
    async with open_sqlite_store(db_path):
        pass
    with raw(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        async with open_sqlite_store(db_path):
            pass  # pragma: no cover


async def test_closed_store_refuses_calls(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        pass
    await store.aclose()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(StoreError, match="closed"):
        await store.read("s")


async def test_close_finishes_queued_writes(db_path: Path) -> None:
    results: list[int] = []

    async def append(i: int) -> None:
        results.append(await store.append(f"s-{i}", [ev(i)], expected_version=0))

    async with open_sqlite_store(db_path) as store, trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(append, i)
        await trio.testing.wait_all_tasks_blocked()
        await store.aclose()
    assert results == [1] * 50
    async with open_sqlite_store(db_path) as store:
        for i in range(50):
            assert await store.stream_version(f"s-{i}") == 1


async def test_close_on_cancellation(db_path: Path) -> None:
    with trio.CancelScope() as scope:
        async with open_sqlite_store(db_path) as store:
            await store.append("s", [ev(1)], expected_version=0)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    with pytest.raises(StoreError, match="closed"):
        await store.read("s")


async def test_reads_run_alongside_writes(db_path: Path) -> None:
    async with open_sqlite_store(db_path, readers=3) as store:
        await store.append("s", [ev(i) for i in range(100)], expected_version=0)
        counts: list[int] = []

        async def reader() -> None:
            for _ in range(20):
                counts.append(len(await store.read("s")))

        async def writer() -> None:
            for i in range(20):
                await store.append("w", [ev(i)], expected_version=i)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)
            nursery.start_soon(writer)
        assert counts == [100] * 100
        assert await store.stream_version("w") == 20


async def test_invalid_options() -> None:
    with pytest.raises(ValueError):
        async with open_sqlite_store(":memory:", readers=0):
            pass  # pragma: no cover


async def test_unencodable_stream_name_gives_store_error(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        with pytest.raises(StoreError) as info:
            await store.append("lone \ud800 surrogate", [ev(1)], expected_version=0)
        assert isinstance(info.value.__cause__, UnicodeError)
        with pytest.raises(StoreError):
            await store.read("lone \ud800 surrogate")
        assert await store.append("fine", [ev(1)], expected_version=0) == 1


async def test_a_version_1_file_is_migrated(db_path: Path) -> None:
    """A file made by the library before command ids: upgraded on open, nothing lost."""
    with raw(db_path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for statement in _MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO streams (id, name, state) VALUES (1, 'old', 0)")
        db.execute(
            "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at)"
            " VALUES (1, 1, 'Happened', x'6f6c64', x'7b7d', 0)"
        )
    async with open_sqlite_store(db_path) as store:
        assert [e.data for e in await store.read("old")] == [b"old"]
        assert await store.find_command("old", "c") is None
        assert await store.append("old", [ev(2)], expected_version=1, command_id="c") == 2
        with pytest.raises(DuplicateCommand):
            await store.append("old", [ev(3)], expected_version=2, command_id="c")
    with raw(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("SELECT stream_id, command_id, version FROM commands").fetchall() == [
            (1, "c", 2)
        ]


async def test_hard_delete_erases_command_ids(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await store.append("s", [ev(1)], expected_version=0, command_id="c")
        await store.append("soft", [ev(1)], expected_version=0, command_id="c")
        await store.delete_stream("s", hard=True)
        await store.delete_stream("soft")
    with raw(db_path) as db:
        # The soft-deleted stream's ids stay with its detached row, like its events.
        rows = db.execute(
            "SELECT s.name, s.state, c.command_id"
            " FROM commands c JOIN streams s ON s.id = c.stream_id"
        ).fetchall()
        assert rows == [("soft", 1, "c")]


async def test_a_duplicate_in_a_batch_fails_alone(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await store.append("s", [ev(0)], expected_version=0, command_id="done")
        errors: dict[str, BaseException] = {}
        results: dict[str, int] = {}

        async def append(name: str, stream: str, command_id: str | None) -> None:
            try:
                results[name] = await store.append(
                    stream, [ev(name)], expected_version=None, command_id=command_id
                )
            except StoreError as exc:
                errors[name] = exc
            except DuplicateCommand as exc:
                errors[name] = exc

        before = store.statistics().transactions
        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, "dup", "s", "done")
            nursery.start_soon(append, "new", "s", "new")
            nursery.start_soon(append, "other", "t", "done")
            nursery.start_soon(append, "plain", "u", None)
        assert store.statistics().transactions - before <= 2
        assert set(errors) == {"dup"}
        assert isinstance(errors["dup"], DuplicateCommand) and errors["dup"].version == 1
        assert results == {"new": 2, "other": 1, "plain": 1}
