"""One suite, every backend: the semantics of ``trio_aggregates._stores._store``'s docstring.

Each test runs unchanged on the in-memory store, on SQLite (a real file) and on
PostgreSQL (the session's throwaway server, a fresh database per test). Stores
are opened through ``open_store(url)``, so the URL routing is exercised too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
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
from trio_aggregates._stores._open_store import open_store
from trio_aggregates._stores._store import (
    EventStore,
    NewEvent,
    RecordedEvent,
    Snapshot,
    read_stream,
)

DURABLE_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
BACKENDS = ["memory", *DURABLE_BACKENDS]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    database = request.getfixturevalue("postgres_database")
    url: str = database.url
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[EventStore]:
    with trio.fail_after(60):
        async with open_store(store_url) as opened:
            yield opened


def ev(n: int | str, type: str = "Happened") -> NewEvent:
    return NewEvent(type, f"event-{n}".encode(), b'{"n": "%s"}' % str(n).encode())


def evs(start: int, stop: int) -> list[NewEvent]:
    return [ev(n) for n in range(start, stop)]


async def versions(store: EventStore, stream: str) -> list[int]:
    return [e.version for e in await store.read(stream)]


# -- basics -----------------------------------------------------------------


async def test_is_an_event_store(store: EventStore) -> None:
    assert isinstance(store, EventStore)


async def test_unknown_stream_reads_empty(store: EventStore) -> None:
    assert await store.read("nobody") == []
    assert await store.read("nobody", from_version=5, limit=3) == []
    assert await store.stream_version("nobody") == 0
    assert await store.load_snapshot("nobody") is None
    assert [e async for e in read_stream(store, "nobody")] == []


async def test_append_then_read(store: EventStore) -> None:
    assert await store.append("s", evs(1, 4), expected_version=0) == 3
    events = await store.read("s")
    assert [e.version for e in events] == [1, 2, 3]
    for n, e in enumerate(events, 1):
        assert isinstance(e, RecordedEvent)
        assert e.stream == "s"
        assert e.type == "Happened"
        assert e.data == f"event-{n}".encode()
        assert type(e.data) is bytes and type(e.metadata) is bytes
        assert e.metadata == b'{"n": "%d"}' % n
    assert await store.append("s", evs(4, 6), expected_version=3) == 5
    assert await versions(store, "s") == [1, 2, 3, 4, 5]
    assert await store.stream_version("s") == 5


async def test_streams_are_independent(store: EventStore) -> None:
    # LIKE wildcards and prefixes must not leak between streams.
    names = ["a", "a%", "a_", "ab", "A", "a "]
    for i, name in enumerate(names, 1):
        await store.append(name, evs(0, i), expected_version=0)
    for i, name in enumerate(names, 1):
        assert await store.stream_version(name) == i
        assert [e.stream for e in await store.read(name)] == [name] * i


async def test_many_events_in_one_append(store: EventStore) -> None:
    assert await store.append("big", evs(0, 1000), expected_version=0) == 1000
    events = await store.read("big")
    assert [e.version for e in events] == list(range(1, 1001))
    assert [e.data for e in events] == [f"event-{n}".encode() for n in range(1000)]


# -- paging -----------------------------------------------------------------


async def test_read_from_version_and_limit(store: EventStore) -> None:
    await store.append("s", evs(1, 11), expected_version=0)
    read = store.read
    assert [e.version for e in await read("s", from_version=4)] == list(range(4, 11))
    assert [e.version for e in await read("s", limit=3)] == [1, 2, 3]
    assert [e.version for e in await read("s", from_version=4, limit=3)] == [4, 5, 6]
    assert [e.version for e in await read("s", from_version=9, limit=5)] == [9, 10]
    assert [e.version for e in await read("s", from_version=10)] == [10]
    assert await read("s", from_version=11) == []
    assert await read("s", from_version=1000) == []
    assert await read("s", limit=0) == []
    assert [e.version for e in await read("s", from_version=0)] == list(range(1, 11))
    assert [e.version for e in await read("s", from_version=-5, limit=2)] == [1, 2]


@pytest.mark.parametrize(("count", "page_size"), [(25, 7), (20, 5), (3, 1000), (1, 1)])
async def test_read_stream_in_pages(store: EventStore, count: int, page_size: int) -> None:
    await store.append("s", evs(1, count + 1), expected_version=0)
    got = [e async for e in read_stream(store, "s", page_size=page_size)]
    assert [e.version for e in got] == list(range(1, count + 1))
    assert [e.data for e in got] == [f"event-{n}".encode() for n in range(1, count + 1)]
    tail = [e.version async for e in read_stream(store, "s", from_version=3, page_size=page_size)]
    assert tail == list(range(3, count + 1))


# -- expected versions ------------------------------------------------------


async def test_expected_version_none_appends_at_any_version(store: EventStore) -> None:
    assert await store.append("s", [ev(1)], expected_version=None) == 1
    assert await store.append("s", evs(2, 4), expected_version=None) == 3
    assert await versions(store, "s") == [1, 2, 3]


async def test_expected_version_zero_means_new_stream(store: EventStore) -> None:
    await store.append("s", evs(1, 3), expected_version=0)
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append("s", [ev(3)], expected_version=0)
    assert info.value.stream == "s"
    assert info.value.expected == 0
    assert info.value.actual == 2
    assert isinstance(info.value, StoreError)
    assert await versions(store, "s") == [1, 2]


@pytest.mark.parametrize("wrong", [1, 2, 4, 100, -1])
async def test_wrong_expected_version_appends_nothing(store: EventStore, wrong: int) -> None:
    await store.append("s", evs(1, 4), expected_version=0)
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append("s", evs(4, 6), expected_version=wrong)
    assert info.value.expected == wrong
    assert info.value.actual == 3
    assert await versions(store, "s") == [1, 2, 3]
    assert await store.stream_version("s") == 3


async def test_wrong_expected_version_on_new_stream(store: EventStore) -> None:
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append("new", [ev(1)], expected_version=1)
    assert info.value.actual == 0
    assert await store.stream_version("new") == 0
    assert await store.read("new") == []


async def test_empty_appends_check_the_version(store: EventStore) -> None:
    assert await store.append("s", [], expected_version=0) == 0
    assert await store.append("s", [], expected_version=None) == 0
    with pytest.raises(ConcurrencyConflict):
        await store.append("s", [], expected_version=1)
    assert await store.stream_version("s") == 0
    await store.append("s", evs(1, 3), expected_version=0)
    assert await store.append("s", [], expected_version=2) == 2
    assert await store.append("s", [], expected_version=None) == 2
    for wrong in (0, 1, 3):
        with pytest.raises(ConcurrencyConflict):
            await store.append("s", [], expected_version=wrong)
    assert await versions(store, "s") == [1, 2]


async def test_racing_appends_exactly_one_wins(store: EventStore) -> None:
    winners: list[int] = []
    losers: list[int] = []

    async def contender(n: int) -> None:
        try:
            await store.append("race", [ev(n)], expected_version=0)
        except ConcurrencyConflict as exc:
            assert exc.expected == 0
            losers.append(n)
        else:
            winners.append(n)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(contender, n)
    assert len(winners) == 1
    assert len(losers) == 19
    events = await store.read("race")
    assert [e.data for e in events] == [f"event-{winners[0]}".encode()]


async def test_racing_appends_with_expected_versions_chain(store: EventStore) -> None:
    """Racers that re-read after a conflict end with every event, each once."""

    async def writer(n: int) -> None:
        for _ in range(100):
            version = await store.stream_version("chain")
            try:
                await store.append("chain", [ev(n)], expected_version=version)
            except ConcurrencyConflict:
                continue
            return
        raise AssertionError("never got through")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(writer, n)
    events = await store.read("chain")
    assert [e.version for e in events] == list(range(1, 9))
    assert sorted(e.data for e in events) == sorted(f"event-{n}".encode() for n in range(8))


async def test_a_conflict_fails_alone(store: EventStore) -> None:
    """Appends made together with a conflicting one still commit."""
    await store.append("taken", [ev(0)], expected_version=0)
    results: dict[str, int | Exception] = {}

    async def append(stream: str, expected: int) -> None:
        try:
            results[stream] = await store.append(stream, [ev(stream)], expected_version=expected)
        except ConcurrencyConflict as exc:
            results[stream] = exc

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(append, f"free-{i}", 0)
            nursery.start_soon(append, "taken", 0)
    assert isinstance(results.pop("taken"), ConcurrencyConflict)
    assert results == {f"free-{i}": 1 for i in range(10)}
    for i in range(10):
        assert await store.stream_version(f"free-{i}") == 1


async def test_concurrent_appends_to_many_streams(store: EventStore) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(
                    functools.partial(store.append, f"s-{i}", evs(0, 2), expected_version=0)
                )
    for i in range(100):
        assert await store.stream_version(f"s-{i}") == 2


async def test_cancelled_appends_commit_entirely_or_not_at_all(store: EventStore) -> None:
    done: set[str] = set()

    async def append(stream: str) -> None:
        await store.append(stream, evs(0, 3), expected_version=0)
        done.add(stream)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(append, f"c-{i}")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    for i in range(30):
        stream = f"c-{i}"
        version = await store.stream_version(stream)
        assert version == (3 if stream in done else 0), stream
        assert len(await store.read(stream)) == version


async def test_cancelled_before_the_call_appends_nothing(store: EventStore) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.append("s", [ev(1)], expected_version=0)
    assert scope.cancelled_caught
    assert await store.stream_version("s") == 0


# -- snapshots --------------------------------------------------------------


async def test_snapshots_save_replace_load(store: EventStore) -> None:
    assert await store.load_snapshot("s") is None
    await store.append("s", evs(1, 4), expected_version=0)
    assert await store.load_snapshot("s") is None
    first = Snapshot("s", 2, 1, "State", b'{"total": 2}')
    await store.save_snapshot(first)
    assert await store.load_snapshot("s") == first
    second = Snapshot("s", 3, 2, "StateV2", b'{"total": 3}')
    await store.save_snapshot(second)
    assert await store.load_snapshot("s") == second
    assert await store.load_snapshot("other") is None
    # A snapshot does not change the stream.
    assert await versions(store, "s") == [1, 2, 3]


async def test_snapshot_of_a_stream_without_events(store: EventStore) -> None:
    snap = Snapshot("lonely", 0, 1, "State", b"")
    await store.save_snapshot(snap)
    assert await store.load_snapshot("lonely") == snap
    assert await store.stream_version("lonely") == 0
    assert await store.read("lonely") == []
    assert await store.append("lonely", [ev(1)], expected_version=0) == 1


# -- deletes ----------------------------------------------------------------


async def test_soft_delete_hides_events_and_frees_the_name(store: EventStore) -> None:
    await store.append("s", evs(1, 4), expected_version=0)
    await store.save_snapshot(Snapshot("s", 3, 1, "State", b"old"))
    await store.delete_stream("s")
    assert await store.read("s") == []
    assert await store.stream_version("s") == 0
    assert await store.load_snapshot("s") is None
    with pytest.raises(ConcurrencyConflict):
        await store.append("s", [ev("x")], expected_version=3)
    assert await store.append("s", [ev("new")], expected_version=0) == 1
    events = await store.read("s")
    assert [(e.version, e.data) for e in events] == [(1, b"event-new")]
    # And again.
    await store.delete_stream("s", hard=False)
    assert await store.stream_version("s") == 0
    assert await store.append("s", evs(1, 3), expected_version=0) == 2


async def test_soft_delete_of_unknown_stream_is_a_no_op(store: EventStore) -> None:
    await store.delete_stream("nobody")
    await store.delete_stream("nobody")
    assert await store.stream_version("nobody") == 0
    assert await store.append("nobody", [ev(1)], expected_version=0) == 1


async def test_soft_delete_leaves_other_streams(store: EventStore) -> None:
    await store.append("a", evs(1, 3), expected_version=0)
    await store.append("b", evs(1, 4), expected_version=0)
    await store.delete_stream("a")
    assert await versions(store, "b") == [1, 2, 3]


async def test_hard_delete_leaves_a_tombstone(store: EventStore) -> None:
    await store.append("s", evs(1, 4), expected_version=0)
    await store.save_snapshot(Snapshot("s", 3, 1, "State", b"x"))
    await store.delete_stream("s", hard=True)
    with pytest.raises(StreamDeleted) as info:
        await store.append("s", [ev(4)], expected_version=None)
    assert info.value.stream == "s"
    assert isinstance(info.value, StoreError)
    with pytest.raises(StreamDeleted):
        await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(StreamDeleted):
        await store.append("s", [], expected_version=None)
    with pytest.raises(StreamDeleted):
        await store.read("s")
    with pytest.raises(StreamDeleted):
        await store.stream_version("s")
    with pytest.raises(StreamDeleted):
        await store.load_snapshot("s")
    with pytest.raises(StreamDeleted):
        await store.save_snapshot(Snapshot("s", 1, 1, "State", b"x"))
    with pytest.raises(StreamDeleted):
        await store.delete_stream("s")
    with pytest.raises(StreamDeleted):
        await store.delete_stream("s", hard=True)
    with pytest.raises(StreamDeleted):
        [e async for e in read_stream(store, "s")]


async def test_hard_delete_of_unknown_stream_tombstones_it(store: EventStore) -> None:
    await store.delete_stream("never", hard=True)
    with pytest.raises(StreamDeleted):
        await store.append("never", [ev(1)], expected_version=0)
    assert await store.stream_version("other") == 0


async def test_hard_delete_after_soft_delete(store: EventStore) -> None:
    await store.append("s", evs(1, 3), expected_version=0)
    await store.delete_stream("s")
    await store.append("s", [ev("again")], expected_version=0)
    await store.delete_stream("s", hard=True)
    with pytest.raises(StreamDeleted):
        await store.read("s")


# -- contents ---------------------------------------------------------------


async def test_very_large_events(store: EventStore) -> None:
    data = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB
    metadata = b'{"blob": "' + b"m" * 1_000_000 + b'"}'
    assert len(data) == 5 * 1024 * 1024
    await store.append("big", [NewEvent("Big", data, metadata)], expected_version=0)
    await store.append("big", [NewEvent("Small", b"x")], expected_version=1)
    (big, small) = await store.read("big")
    assert big.data == data
    assert big.metadata == metadata
    assert small.data == b"x"
    await store.save_snapshot(Snapshot("big", 1, 1, "State", data))
    snapshot = await store.load_snapshot("big")
    assert snapshot is not None and snapshot.data == data


async def test_unicode_stream_names_types_and_data(store: EventStore) -> None:
    stream = "заказ/🦀-ñ-日本語-'quote'\"double\"; DROP TABLE"
    text = "Grüße, 世界! 🎉 \u200b"
    event = NewEvent("Événement✓", text.encode(), '{"who": "Zoë"}'.encode())
    assert await store.append(stream, [event], expected_version=0) == 1
    (recorded,) = await store.read(stream)
    assert recorded.stream == stream
    assert recorded.type == "Événement✓"
    assert recorded.data.decode() == text
    assert recorded.metadata.decode() == '{"who": "Zoë"}'
    assert await store.stream_version(stream) == 1
    await store.save_snapshot(Snapshot(stream, 1, 1, "État", "état".encode()))
    snapshot = await store.load_snapshot(stream)
    assert snapshot == Snapshot(stream, 1, 1, "État", "état".encode())
    assert await store.read(stream.upper()) == []


async def test_binary_data_and_metadata_round_trip(store: EventStore) -> None:
    data = bytes(range(256)) + b"\x00\x00\xff"
    events = [
        NewEvent("A", data, b'{"correlation_id": "c-1", "causation_id": "k-9"}'),
        NewEvent("B", b""),
        NewEvent("C", b"\x00", b""),
    ]
    await store.append("bin", events, expected_version=0)
    got = await store.read("bin")
    assert [(e.type, e.data, e.metadata) for e in got] == [
        ("A", data, b'{"correlation_id": "c-1", "causation_id": "k-9"}'),
        ("B", b"", b"{}"),
        ("C", b"\x00", b""),
    ]


async def test_recorded_at_is_set(store: EventStore) -> None:
    before = time.time()
    await store.append("s", evs(1, 3), expected_version=0)
    await store.append("s", evs(3, 4), expected_version=2)
    after = time.time()
    events = await store.read("s")
    # A little slack: the database's clock and ours are read at other moments.
    for e in events:
        assert isinstance(e.recorded_at, float)
        assert before - 5 <= e.recorded_at <= after + 5
    assert events[0].recorded_at <= events[2].recorded_at


async def test_stream_names_must_be_str(store: EventStore) -> None:
    with pytest.raises(TypeError):
        await store.append(b"bytes", [ev(1)], expected_version=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.read(1)  # type: ignore[arg-type]


# -- open_store ------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["mysql://localhost/db", "memory", "", "file:///tmp/x.db", "sqlite:/x.db", "sqlite:x"]
)
async def test_open_store_refuses_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        async with open_store(url):
            pass  # pragma: no cover


async def test_open_store_sqlite_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_aggregates._stores._sqlite import SQLiteEventStore

    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:///relative.db") as store:
        assert isinstance(store, SQLiteEventStore)
        await store.append("s", [ev(1)], expected_version=0)
    assert (tmp_path / "relative.db").exists()
    absolute = tmp_path / "sub dir" / "absolute.db"
    absolute.parent.mkdir()
    async with open_store("sqlite:///" + str(absolute).replace(" ", "%20")) as store:
        await store.append("s", [ev(1)], expected_version=0)
    assert absolute.exists()
    for url in ("sqlite:///:memory:", "sqlite://"):
        async with open_store(url) as store:
            assert isinstance(store, SQLiteEventStore)
            assert store.path == ":memory:"
            assert await store.append("s", evs(1, 3), expected_version=0) == 2
            assert await versions(store, "s") == [1, 2]


async def test_open_store_memory() -> None:
    from trio_aggregates._stores._store import InMemoryEventStore

    async with open_store("memory://") as store:
        assert isinstance(store, InMemoryEventStore)


# -- command ids (idempotent appends) ---------------------------------------


@pytest.fixture
def command_store(store: EventStore) -> EventStore:
    return store


async def test_command_id_is_recorded_with_the_version_after(command_store: EventStore) -> None:
    store = command_store
    assert await store.find_command("s", "c-1") is None
    assert await store.append("s", evs(1, 3), expected_version=0, command_id="c-1") == 2
    assert await store.find_command("s", "c-1") == 2
    assert await store.append("s", [ev(3)], expected_version=2, command_id="c-2") == 3
    assert await store.append("s", [ev(4)], expected_version=3) == 4
    assert await store.find_command("s", "c-1") == 2
    assert await store.find_command("s", "c-2") == 3
    assert await store.find_command("s", "c-3") is None
    assert await store.find_command("other", "c-1") is None


async def test_duplicate_command_appends_nothing(command_store: EventStore) -> None:
    store = command_store
    await store.append("s", evs(1, 3), expected_version=0, command_id="c-1")
    await store.append("s", [ev(3)], expected_version=2)
    # Checked before the expected version: a retry learns it was applied,
    # whatever version it expects.
    for expected in (0, 2, 3, None, 99):
        with pytest.raises(DuplicateCommand) as info:
            await store.append("s", [ev("again")], expected_version=expected, command_id="c-1")
        assert info.value.stream == "s"
        assert info.value.command_id == "c-1"
        assert info.value.version == 2
    with pytest.raises(DuplicateCommand):
        await store.append("s", [], expected_version=None, command_id="c-1")
    assert await versions(store, "s") == [1, 2, 3]


async def test_command_ids_are_per_stream(command_store: EventStore) -> None:
    store = command_store
    assert await store.append("a", [ev(1)], expected_version=0, command_id="same") == 1
    assert await store.append("b", evs(1, 3), expected_version=0, command_id="same") == 2
    assert await store.find_command("a", "same") == 1
    assert await store.find_command("b", "same") == 2


async def test_a_failed_append_records_no_command(command_store: EventStore) -> None:
    store = command_store
    await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(ConcurrencyConflict):
        await store.append("s", [ev(2)], expected_version=0, command_id="c")
    assert await store.find_command("s", "c") is None
    assert await store.append("s", [ev(2)], expected_version=1, command_id="c") == 2
    assert await store.find_command("s", "c") == 2


async def test_an_empty_append_records_its_command(command_store: EventStore) -> None:
    store = command_store
    assert await store.append("s", [], expected_version=0, command_id="nothing") == 0
    assert await store.find_command("s", "nothing") == 0
    assert await store.stream_version("s") == 0
    await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(DuplicateCommand) as info:
        await store.append("s", [ev(2)], expected_version=1, command_id="nothing")
    assert info.value.version == 0
    assert await versions(store, "s") == [1]


async def test_deleting_a_stream_forgets_its_command_ids(command_store: EventStore) -> None:
    store = command_store
    await store.append("s", [ev(1)], expected_version=0, command_id="c")
    await store.delete_stream("s")
    assert await store.find_command("s", "c") is None
    assert await store.append("s", evs(1, 4), expected_version=0, command_id="c") == 3
    assert await store.find_command("s", "c") == 3
    await store.delete_stream("s", hard=True)
    with pytest.raises(StreamDeleted):
        await store.find_command("s", "c")
    with pytest.raises(StreamDeleted):
        await store.append("s", [ev(1)], expected_version=None, command_id="c")


async def test_racing_appends_with_one_command_id_exactly_one_wins(
    command_store: EventStore,
) -> None:
    """Many tasks append the same command at once (all in one group-commit batch)."""
    store = command_store
    await store.append("s", [ev(0)], expected_version=0)
    winners: list[int] = []
    duplicates: list[int] = []

    async def contender(n: int, expected: int | None) -> None:
        try:
            winners.append(
                await store.append("s", [ev(n)], expected_version=expected, command_id="once")
            )
        except DuplicateCommand as exc:
            duplicates.append(exc.version)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # Keep the writer busy, so that the contenders queue up together.
            nursery.start_soon(functools.partial(store.append, "busy", [ev(0)], expected_version=0))
            await trio.testing.wait_all_tasks_blocked()
            for n in range(20):
                nursery.start_soon(contender, n, 1 if n % 2 else None)
    assert winners == [2]
    assert duplicates == [2] * 19
    assert await store.stream_version("s") == 2
    assert await store.find_command("s", "once") == 2


async def test_distinct_command_ids_in_one_batch_chain(command_store: EventStore) -> None:
    store = command_store
    results: dict[int, int] = {}

    async def append(n: int) -> None:
        results[n] = await store.append("s", [ev(n)], expected_version=None, command_id=f"c-{n}")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(append, n)
    assert sorted(results.values()) == list(range(1, 11))
    for n, version in results.items():
        assert await store.find_command("s", f"c-{n}") == version
        (event,) = await store.read("s", from_version=version, limit=1)
        assert event.data == f"event-{n}".encode()


async def test_command_ids_must_be_str(command_store: EventStore) -> None:
    store = command_store
    with pytest.raises(TypeError):
        await store.append("s", [ev(1)], expected_version=0, command_id=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.find_command("s", None)  # type: ignore[arg-type]
    assert await store.stream_version("s") == 0


@pytest.mark.parametrize("store_url", DURABLE_BACKENDS, indirect=True)
async def test_a_second_store_on_the_same_database_sees_command_ids(
    command_store: EventStore, store_url: str
) -> None:
    """Think: another process, or this one after a restart (durable stores only:
    an in-memory store is its own database)."""
    store = command_store
    assert await store.append("s", [ev(1)], expected_version=0, command_id="c-1") == 1
    with trio.fail_after(60):
        async with open_store(store_url) as other:
            assert await other.find_command("s", "c-1") == 1
            with pytest.raises(DuplicateCommand) as info:
                await other.append("s", [ev(1)], expected_version=0, command_id="c-1")
            assert info.value.version == 1
            assert await other.append("s", [ev(2)], expected_version=1, command_id="c-2") == 2
            # Both stores race to append one command: exactly one wins.
            outcomes: list[int | DuplicateCommand] = []

            async def append(target: EventStore) -> None:
                try:
                    outcomes.append(
                        await target.append("s", [ev(3)], expected_version=None, command_id="c-3")
                    )
                except DuplicateCommand as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as nursery:
                for target in (store, other, store, other):
                    nursery.start_soon(append, target)
    assert await store.find_command("s", "c-2") == 2
    assert outcomes.count(3) == 1
    assert [o.version for o in outcomes if isinstance(o, DuplicateCommand)] == [3, 3, 3]
    assert await versions(store, "s") == [1, 2, 3]


# -- the global order: positions and read_all ---------------------------------


async def test_positions_increase_across_streams(store: EventStore) -> None:
    await store.append("a-1", evs(0, 2), expected_version=0)
    await store.append("b-1", [ev(2)], expected_version=0)
    await store.append("a-2", evs(3, 5), expected_version=0)
    events = await store.read_all()
    assert [(e.stream, e.version) for e in events] == [
        ("a-1", 1),
        ("a-1", 2),
        ("b-1", 1),
        ("a-2", 1),
        ("a-2", 2),
    ]
    positions = [e.position for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 5 and positions[0] >= 1
    assert [e.data for e in events] == [f"event-{n}".encode() for n in range(5)]
    # read() gives each event the same position.
    for stream in ("a-1", "b-1", "a-2"):
        by_read = {(e.stream, e.version): e for e in await store.read(stream)}
        for e in events:
            if e.stream == stream:
                assert by_read[e.stream, e.version] == e
    assert await store.head_position() == positions[-1]


async def test_read_all_of_an_empty_store(store: EventStore) -> None:
    assert await store.read_all() == []
    assert await store.read_all(5, limit=None) == []
    assert await store.head_position() == 0


async def test_read_all_from_position_and_limit(store: EventStore) -> None:
    for n in range(10):
        await store.append(f"s-{n % 3}", [ev(n)], expected_version=None)
    every = await store.read_all(limit=None)
    assert len(every) == 10
    positions = [e.position for e in every]
    assert await store.read_all(limit=3) == every[:3]
    assert await store.read_all(positions[4]) == every[4:]
    assert await store.read_all(positions[4] + 1, limit=2) == every[5:7]
    assert await store.read_all(positions[-1] + 1) == []
    assert await store.read_all(0) == every
    assert await store.read_all(-3, limit=1) == every[:1]
    assert await store.read_all(limit=0) == []
    # Paging from the last position read gives every event once, in order.
    for page_size in (1, 3, 7, 10, 1000):
        assert await read_in_pages(store, page_size) == every


async def read_in_pages(store: EventStore, page_size: int) -> list[RecordedEvent]:
    """Every event, read_all page after page from the last position read."""
    got: list[RecordedEvent] = []
    start = 1
    while True:
        page = await store.read_all(start, limit=page_size)
        got += page
        if len(page) < page_size:
            return got
        start = page[-1].position + 1


async def test_read_all_filters(store: EventStore) -> None:
    await store.append("order-1", [ev(1, "Placed"), ev(2, "Paid")], expected_version=0)
    await store.append("customer-1", [ev(3, "Registered")], expected_version=0)
    await store.append("order-2", [ev(4, "Placed")], expected_version=0)
    await store.append("order", [ev(5, "Placed")], expected_version=0)  # no "-": all category
    await store.append("order_x-1", [ev(6, "Placed")], expected_version=0)
    await store.append("orderly-1", [ev(7, "Paid")], expected_version=0)
    await store.append("a%-1", [ev(8, "Paid")], expected_version=0)

    async def streams(**kwargs: object) -> list[str]:
        return [e.data.decode() for e in await store.read_all(**kwargs)]  # type: ignore[arg-type]

    assert await streams(categories=["order"]) == ["event-1", "event-2", "event-4", "event-5"]
    assert await streams(categories=["customer", "orderly"]) == ["event-3", "event-7"]
    assert await streams(categories=["a%"]) == ["event-8"]
    assert await streams(categories=["a_"]) == []
    assert await streams(categories=[]) == []
    assert await streams(event_types=["Paid"]) == ["event-2", "event-7", "event-8"]
    assert await streams(event_types=["Placed", "Registered"]) == [
        "event-1",
        "event-3",
        "event-4",
        "event-5",
        "event-6",
    ]
    assert await streams(categories=["order"], event_types=["Placed"]) == [
        "event-1",
        "event-4",
        "event-5",
    ]
    assert await streams(categories=["order"], event_types=["Placed"], limit=2) == [
        "event-1",
        "event-4",
    ]
    every = await store.read_all()
    third = every[3].position  # event-4
    assert [e.data for e in await store.read_all(third, categories=("order",))] == [
        b"event-4",
        b"event-5",
    ]


async def test_read_all_leaves_deleted_streams_out_and_never_reuses_positions(
    store: EventStore,
) -> None:
    await store.append("a-1", evs(0, 2), expected_version=0)
    await store.append("b-1", evs(2, 4), expected_version=0)
    await store.append("c-1", evs(4, 6), expected_version=0)
    before = await store.read_all()
    top = before[-1].position
    await store.delete_stream("a-1")
    await store.delete_stream("c-1", hard=True)
    assert [e.stream for e in await store.read_all()] == ["b-1", "b-1"]
    # The hard-deleted stream held the highest positions: they are not given again.
    await store.append("a-1", [ev(9)], expected_version=0)
    after = await store.read_all()
    assert [(e.stream, e.version) for e in after] == [("b-1", 1), ("b-1", 2), ("a-1", 1)]
    assert after[-1].position > top
    assert await store.head_position() == after[-1].position


async def test_read_all_concurrent_appends_get_distinct_positions(store: EventStore) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(
                functools.partial(store.append, f"s-{n}", evs(0, 3), expected_version=0)
            )
    every = await store.read_all(limit=None)
    assert len(every) == 60
    positions = [e.position for e in every]
    assert positions == sorted(set(positions))
    for n in range(20):
        mine = [e.version for e in every if e.stream == f"s-{n}"]
        assert mine == [1, 2, 3]


async def test_read_all_arguments_are_checked(store: EventStore) -> None:
    from trio_aggregates._core._exceptions import InvalidArgument

    with pytest.raises(InvalidArgument):
        await store.read_all("1")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await store.read_all(categories="order")
    with pytest.raises(InvalidArgument):
        await store.read_all(event_types=[1])  # type: ignore[list-item]
