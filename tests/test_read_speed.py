"""The fast read paths: records checked and built in C, a page at a time,
subscriptions handing out whole pages.

What they must keep: the records ``RecordedEvent(...)`` would make; the
careful path for every column another program may have written differently;
a subscription's read-ahead bound, its cancellation semantics and its order.
"""

from __future__ import annotations

import gc
import math
import pickle
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing

from trio_aggregates._core._exceptions import EventDecodeError
from trio_aggregates._flow._subscription import _PAGE_SIZE, Subscription, open_subscription
from trio_aggregates._stores._sqlite import open_sqlite_store
from trio_aggregates._stores._store import (
    InMemoryEventStore,
    NewEvent,
    RecordedEvent,
    _checked_records,
)


def ev(n: int) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


# -- records checked and built in C ----------------------------------------------


def test_checked_records_are_the_records_the_constructor_makes() -> None:
    rows = [
        ("order-1", 1, "Placed", b"{}", b'{"m": 1}', 1.5, 7),
        ("order-2", 3, "Paid", b"\x00", b"{}", 2.25, 9),
    ]
    built = _checked_records(rows)
    made = [RecordedEvent(*row) for row in rows]
    assert built == made
    assert [type(r) for r in built] == [RecordedEvent, RecordedEvent]
    assert [hash(r) for r in built] == [hash(r) for r in made]
    assert [repr(r) for r in built] == [repr(r) for r in made]
    assert repr(made[0]) == (
        "RecordedEvent(stream='order-1', version=1, type='Placed', data=b'{}', "
        "metadata=b'{\"m\": 1}', recorded_at=1.5, position=7)"
    )
    assert [msgspec.structs.astuple(r) for r in built] == rows
    assert pickle.loads(pickle.dumps(built)) == made
    assert msgspec.structs.replace(built[0], version=2) == RecordedEvent(
        *rows[0][:1], 2, *rows[0][2:]
    )
    with pytest.raises(AttributeError):
        built[0].version = 5  # type: ignore[misc]
    assert not gc.is_tracked(built[0])  # atomic fields: the collector skips it
    assert _checked_records([]) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", b"order-1"),
        ("version", 1.0),
        ("version", True),
        ("version", "1"),
        ("type", b"Placed"),
        ("data", "e30="),  # text, and valid base64: still not bytes
        ("data", None),
        ("metadata", "{}"),
        ("recorded_at", "1.5"),
        ("recorded_at", True),
        ("position", 7.0),
    ],
)
def test_checked_records_refuse_a_value_of_another_type(field: str, value: object) -> None:
    row = ["order-1", 1, "Placed", b"{}", b"{}", 1.5, 7]
    row[FIELDS.index(field)] = value
    assert _checked_records([tuple(row)]) is None
    assert _checked_records([("order-0", 1, "Placed", b"{}", b"{}", 1.5, 6), tuple(row)]) is None


def test_checked_records_read_an_integer_time_as_a_float() -> None:
    (record,) = _checked_records([("order-1", 1, "Placed", b"{}", b"{}", 1704164645, 7)]) or [None]
    assert record == RecordedEvent("order-1", 1, "Placed", b"{}", b"{}", 1704164645.0, 7)
    assert type(record.recorded_at) is float


FIELDS = ("stream", "version", "type", "data", "metadata", "recorded_at", "position")


# -- SQLite: every column checked, page by page ---------------------------------------

# A row another program wrote, with one column in a storage class the store
# never writes, and what the careful path reads from it.
FOREIGN = {
    "type": ("x'466f726569676e'", "type", "Foreign"),  # a blob
    "data": ("'text data'", "data", b"text data"),  # text
    "metadata": ("'{}'", "metadata", b"{}"),  # text
    "recorded_at": ("'2024-01-02 03:04:05'", "recorded_at", 1704164645.0),  # text
}


@pytest.mark.parametrize("column", sorted(FOREIGN))
async def test_sqlite_a_foreign_column_in_a_full_page_takes_the_careful_path(
    tmp_path: Path, column: str
) -> None:
    path = tmp_path / "events.db"
    values = {
        "type": "'Happened'",
        "data": "x'00'",
        "metadata": "x'7b7d'",
        "recorded_at": "1.5",
    }
    literal, field, expected = FOREIGN[column]
    values[column] = literal
    with trio.fail_after(60):
        async with open_sqlite_store(path) as store:
            for n in range(15):
                await store.append(f"a-{n}", [ev(n)] * 100, expected_version=0)
            with sqlite3.connect(path) as db:
                db.execute(
                    "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
                    f"VALUES (1, 101, {values['type']}, {values['data']}, {values['metadata']}, "
                    f"{values['recorded_at']})"
                )
            # The foreign row (position 1501) in the middle of a page of 1000.
            page = await store.read_all(1001, limit=1000)
            assert [e.position for e in page] == list(range(1001, 1502))
            foreign = page[-1]
            assert (foreign.stream, foreign.version) == ("a-0", 101)
            assert getattr(foreign, field) == expected
            for event in page:
                assert type(event.type) is str
                assert type(event.data) is bytes
                assert type(event.metadata) is bytes
                assert type(event.recorded_at) is float
            assert page[:-1] == (await store.read_all(1001, limit=500))
            # A short page goes row by row: checked as well.
            (alone,) = await store.read_all(1501, limit=1)
            assert alone == foreign
            short = await store.read_all(1490)
            assert short == page[-12:]


@pytest.mark.parametrize("events", [5, 100])  # a page read by rows, by columns
async def test_sqlite_a_version_that_is_not_whole_fails_the_page(
    tmp_path: Path, events: int
) -> None:
    path = tmp_path / "events.db"
    with trio.fail_after(60):
        async with open_sqlite_store(path) as store:
            await store.append("a-1", [ev(n) for n in range(events)], expected_version=0)
            with sqlite3.connect(path) as db:
                db.execute(
                    "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
                    f"VALUES (1, {events}.5, 'Happened', x'00', x'7b7d', 1.5)"
                )
            with pytest.raises(EventDecodeError, match=r"'a-1'.*version .*not a whole number"):
                await store.read_all()
            assert len(await store.read_all(limit=events)) == events


@pytest.mark.parametrize("column", sorted(FOREIGN))
async def test_sqlite_a_foreign_column_in_a_long_stream_takes_the_careful_path(
    tmp_path: Path, column: str
) -> None:
    """A stream's read (an aggregate loading) of 32 rows or more goes by
    columns too: a foreign row among them is read the careful way."""
    path = tmp_path / "events.db"
    values = {"type": "'Happened'", "data": "x'00'", "metadata": "x'7b7d'", "recorded_at": "1.5"}
    literal, field, expected = FOREIGN[column]
    values[column] = literal
    with trio.fail_after(60):
        async with open_sqlite_store(path) as store:
            await store.append("a-1", [ev(n) for n in range(100)], expected_version=0)
            by_rows = await store.read("a-1", limit=31)
            by_columns = await store.read("a-1")
            assert by_columns[:31] == by_rows
            assert [(e.stream, e.version, e.data) for e in by_columns] == [
                ("a-1", n + 1, f"event-{n}".encode()) for n in range(100)
            ]
            assert [e.position for e in by_columns] == list(range(1, 101))
            with sqlite3.connect(path) as db:
                db.execute(
                    "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
                    f"VALUES (1, 101, {values['type']}, {values['data']}, {values['metadata']}, "
                    f"{values['recorded_at']})"
                )
            events = await store.read("a-1")
            assert events[:100] == by_columns
            assert getattr(events[100], field) == expected
            assert type(events[100].recorded_at) is float


# -- subscriptions: pages, read-ahead, cancellation ----------------------------------


@attrs.define
class CountingStore:
    """A memory store that counts the events its ``read_all`` returned."""

    inner: InMemoryEventStore
    read: int = 0

    async def read_all(self, *args: Any, **kwargs: Any) -> list[RecordedEvent]:
        page = await self.inner.read_all(*args, **kwargs)
        self.read += len(page)
        return page

    async def head_position(self) -> int:
        return await self.inner.head_position()


async def filled(events: int) -> InMemoryEventStore:
    store = InMemoryEventStore()
    for n in range(0, events, 100):
        await store.append(f"s-{n}", [ev(n + k) for k in range(100)], expected_version=0)
    return store


@pytest.mark.parametrize("buffer_size", [0, 1, 256, 999, 1000, 1001, 2500])
async def test_the_feeder_reads_on_exactly_when_the_backlog_is_down_to_buffer_size(
    buffer_size: int,
) -> None:
    total = 3500
    inner = await filled(total)
    store = CountingStore(inner)
    got: list[RecordedEvent] = []
    with trio.fail_after(60):
        async with open_subscription(
            store,  # type: ignore[arg-type]
            buffer_size=buffer_size,
            poll_interval=3600,
        ) as subscription:
            for taken in range(total + 1):
                await trio.testing.wait_all_tasks_blocked()
                # The feeder has read every page it may read: the next one
                # would leave more than buffer_size events waiting.
                pages = (taken + buffer_size) // _PAGE_SIZE + 1
                assert store.read == min(total, pages * _PAGE_SIZE), taken
                if taken < total:
                    got.append(await subscription.__anext__())
                    assert subscription.position == got[-1].position
    assert got == await inner.read_all(limit=None)


async def events_after_a_cancel(
    subscription: Subscription, before: int, after: int
) -> tuple[Sequence[RecordedEvent], Sequence[RecordedEvent]]:
    first = [await subscription.__anext__() for _ in range(before)]
    position = subscription.position
    with trio.CancelScope() as scope:
        scope.cancel()
        await subscription.__anext__()
    assert scope.cancelled_caught
    assert subscription.position == position
    rest = [await subscription.__anext__() for _ in range(after)]
    return first, rest


@pytest.mark.parametrize("before", [0, 1, 999, 1000, 1001])
async def test_a_cancelled_anext_hands_out_nothing(before: int) -> None:
    # 0 and 1000: waiting for a page; 1, 999 and 1001: in the middle of one.
    store = await filled(2000)
    every = await store.read_all(limit=None)
    with trio.fail_after(60):
        async with open_subscription(store, buffer_size=10) as subscription:
            first, rest = await events_after_a_cancel(subscription, before, 2000 - before)
    assert [*first, *rest] == every


async def test_leaving_the_block_mid_page_closes_the_subscription() -> None:
    store = await filled(300)
    with trio.fail_after(60):
        async with open_subscription(store) as subscription:
            await subscription.__anext__()
        with pytest.raises(trio.ClosedResourceError):
            await subscription.__anext__()


@pytest.mark.parametrize("seed", range(6))
async def test_the_backlog_with_pages_of_any_size(seed: int) -> None:
    # The feeder's side of the subscription driven by hand with pages of
    # random sizes (live pages are short): after every event taken, it has
    # sent the next page exactly when the backlog fell to buffer_size.
    rng = random.Random(seed)
    limit = rng.choice([0, 1, 5, 50, 300])
    sizes = [rng.choice([1, 2, 7, 40, 299, 301, 1000]) for _ in range(40)]
    pages = []
    position = 0
    for size in sizes:
        pages.append(
            [RecordedEvent("s-1", 1, "T", b"", b"", 0.0, position + k + 1) for k in range(size)]
        )
        position += size
    send, receive = trio.open_memory_channel[Any](math.inf)
    subscription = Subscription(receive, 1, limit)
    sent = 0

    async def feeder() -> None:
        nonlocal sent
        for page in pages:
            subscription._sending(page)
            send.send_nowait(page)
            sent += 1
            await subscription._wait_for_room()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feeder)
            for taken in range(position + 1):
                await trio.testing.wait_all_tasks_blocked()
                # The model: pages go out while the backlog is at most the limit.
                expected, total = 0, 0
                while expected < len(pages) and (expected == 0 or total - taken <= limit):
                    total += len(pages[expected])
                    expected += 1
                assert sent == expected, (taken, limit)
                if taken < position:
                    event = await subscription.__anext__()
                    assert event.position == taken + 1
