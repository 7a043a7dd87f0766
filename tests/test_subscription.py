"""Subscriptions: catch up, then follow live, with no gap and no duplicate at the switch.

Every test runs on the in-memory store, SQLite (a real file) and the real
PostgreSQL (the session's throwaway server, a schema per test).
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_aggregates._core._exceptions import InvalidArgument, StoreError
from trio_aggregates._flow._subscription import Subscription, open_subscription
from trio_aggregates._stores._open_store import open_store
from trio_aggregates._stores._store import EventStore, InMemoryEventStore, NewEvent, RecordedEvent
from trio_aggregates.testing import FaultyStore

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    url: str = request.getfixturevalue("postgres_database").url
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[EventStore]:
    with trio.fail_after(60):
        async with open_store(store_url) as opened:
            yield opened


def ev(n: int, type: str = "Happened") -> NewEvent:
    return NewEvent(type, f"event-{n}".encode())


async def take(subscription: Subscription, count: int) -> list[RecordedEvent]:
    got = []
    async for event in subscription:
        got.append(event)
        if len(got) == count:
            break
    return got


def check_order(events: Sequence[RecordedEvent]) -> None:
    positions = [e.position for e in events]
    assert positions == sorted(set(positions)), "out of order or duplicated"


async def test_catch_up_then_live(store: EventStore) -> None:
    for n in range(30):
        await store.append(f"s-{n % 4}", [ev(n)], expected_version=None)
    with trio.fail_after(30):
        async with open_subscription(store) as subscription:
            assert subscription.position == 0
            first = await take(subscription, 30)
            assert subscription.position == first[-1].position
            for n in range(30, 45):
                await store.append(f"s-{n % 4}", [ev(n)], expected_version=None)
            second = await take(subscription, 15)
    got = first + second
    assert got == await store.read_all(limit=None)
    assert [e.data for e in got] == [f"event-{n}".encode() for n in range(45)]
    check_order(got)


async def test_no_gap_and_no_duplicate_while_writers_append(store: EventStore) -> None:
    writers_done = trio.Event()

    async def writer(n: int) -> None:
        rng = random.Random(n)
        for i in range(60):
            events = [ev(1000 * n + 10 * i + k) for k in range(rng.randint(1, 3))]
            await store.append(f"w{n}-{i % 5}", events, expected_version=None)
            if rng.random() < 0.3:
                await trio.lowlevel.checkpoint()

    got: list[RecordedEvent] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def writers() -> None:
                async with trio.open_nursery() as inner:
                    for n in range(4):
                        inner.start_soon(writer, n)
                writers_done.set()

            nursery.start_soon(writers)
            # Subscribe while the writers are busy: part catch-up, part live.
            while await store.head_position() < 20:  # noqa: ASYNC110 - polls the store
                await trio.sleep(0.001)
            async with open_subscription(store, buffer_size=8) as subscription:

                async def collect() -> None:
                    async for event in subscription:
                        got.append(event)

                async with trio.open_nursery() as reading:
                    reading.start_soon(collect)
                    # The last event may come before or after the writers are
                    # seen done: wait for both, then for the head.
                    await writers_done.wait()
                    head = await store.head_position()
                    while not got or got[-1].position < head:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    reading.cancel_scope.cancel()
    check_order(got)
    assert got == await store.read_all(limit=None)


async def test_from_a_position(store: EventStore) -> None:
    for n in range(10):
        await store.append("s-1", [ev(n)], expected_version=None)
    every = await store.read_all()
    with trio.fail_after(30):
        async with open_subscription(store, every[6].position) as subscription:
            assert subscription.position == every[6].position - 1
            assert await take(subscription, 4) == every[6:]
        async with open_subscription(store, every[-1].position + 1) as subscription:
            await store.append("s-1", [ev(10)], expected_version=None)
            (event,) = await take(subscription, 1)
            assert event.data == b"event-10"


async def test_filters(store: EventStore) -> None:
    await store.append("order-1", [ev(1, "Placed"), ev(2, "Paid")], expected_version=0)
    await store.append("user-1", [ev(3, "Registered")], expected_version=0)
    with trio.fail_after(30):
        async with (
            open_subscription(store, categories=["order"]) as orders,
            open_subscription(store, event_types=["Paid", "Registered"]) as typed,
            open_subscription(store, categories=["order"], event_types=["Placed"]) as both,
        ):
            assert [e.data for e in await take(orders, 2)] == [b"event-1", b"event-2"]
            assert [e.data for e in await take(typed, 2)] == [b"event-2", b"event-3"]
            assert [e.data for e in await take(both, 1)] == [b"event-1"]
            await store.append("user-2", [ev(4, "Placed")], expected_version=0)
            await store.append("order-2", [ev(5, "Placed")], expected_version=0)
            assert [e.data for e in await take(orders, 1)] == [b"event-5"]
            assert [e.data for e in await take(both, 1)] == [b"event-5"]
            await store.append("order-2", [ev(6, "Paid")], expected_version=1)
            assert [e.data for e in await take(typed, 1)] == [b"event-6"]


async def test_a_slow_consumer_slows_only_itself(store: EventStore) -> None:
    with trio.fail_after(60):
        async with open_subscription(store, buffer_size=2) as subscription:
            # The consumer takes nothing while 200 events are appended: the
            # writer is not held up (nor does anything grow without bound).
            for n in range(200):
                await store.append(f"s-{n % 7}", [ev(n)], expected_version=None)
            got = await take(subscription, 200)
    assert [e.data for e in got] == [f"event-{n}".encode() for n in range(200)]
    check_order(got)


async def test_leaving_the_block_ends_the_feeder(store: EventStore) -> None:
    await store.append("s-1", [ev(0), ev(1)], expected_version=0)
    parent = trio.lowlevel.current_task()
    with trio.fail_after(30):
        async with open_subscription(store) as subscription:
            (nursery,) = parent.child_nurseries[-1:]
            assert len(nursery.child_tasks) == 1  # the feeder
            await take(subscription, 1)
        # The feeder was a child of the block: gone with it.
        assert nursery not in parent.child_nurseries
        assert not nursery.child_tasks
        with pytest.raises(trio.ClosedResourceError):
            await subscription.__anext__()


async def test_an_error_in_the_body_propagates_unwrapped(store: EventStore) -> None:
    await store.append("s-1", [ev(0)], expected_version=0)
    with trio.fail_after(30), pytest.raises(KeyError):
        async with open_subscription(store) as subscription:
            async for _ in subscription:
                raise KeyError("mine")


async def test_cancelled_while_waiting(store: EventStore) -> None:
    with trio.fail_after(30):
        with trio.move_on_after(0.2) as scope:
            async with open_subscription(store, poll_interval=0.01) as subscription:
                async for _ in subscription:
                    pytest.fail("no events")  # pragma: no cover
        assert scope.cancelled_caught


async def test_appends_through_the_same_store_wake_the_subscription_at_once(
    store: EventStore,
) -> None:
    # The poll interval is far beyond the deadline: only a wake-up can deliver.
    with trio.fail_after(10):
        async with open_subscription(store, poll_interval=3600) as subscription:
            for n in range(5):
                await trio.sleep(0.01)  # let the feeder wait, caught up
                await store.append("s-1", [ev(n)], expected_version=None)
                (event,) = await take(subscription, 1)
                assert event.data == f"event-{n}".encode()


@pytest.mark.parametrize("store_url", BACKENDS[1:], indirect=True)
async def test_appends_through_another_store_object_are_followed(store_url: str) -> None:
    # Another store object on the same database (another process, in effect):
    # PostgreSQL wakes through NOTIFY, SQLite by polling.
    poll = 3600 if store_url.startswith("postgres") else 0.05
    with trio.fail_after(30):
        async with (
            open_store(store_url) as reader,
            open_store(store_url) as writer,
            open_subscription(reader, poll_interval=poll) as subscription,
        ):
            for n in range(3):
                await trio.sleep(0.05)
                await writer.append("s-1", [ev(n)], expected_version=None)
                (event,) = await take(subscription, 1)
                assert event.data == f"event-{n}".encode()


# -- store failures -------------------------------------------------------------


@pytest.mark.parametrize("error", [StoreError("the disk is on fire"), RuntimeError("a bug")])
async def test_a_store_error_surfaces_as_store_error(
    error: Exception, autojump_clock: trio.testing.MockClock
) -> None:
    store = FaultyStore()
    await store.append("s-1", [ev(0), ev(1)], expected_version=0)
    got = []
    with pytest.raises(StoreError) as info:
        async with open_subscription(store, poll_interval=1) as subscription:
            async for event in subscription:
                got.append(event)
                store.fail("read_all", error)
                await store.append("s-1", [ev(2)], expected_version=None)
    assert [e.data for e in got] == [b"event-0", b"event-1"]
    # (FaultyStore raises a copy of the error it was given.)
    if isinstance(error, StoreError):
        assert type(info.value) is StoreError and str(info.value) == str(error)
    else:
        cause = info.value.__cause__
        assert type(cause) is RuntimeError and str(cause) == str(error)
    # Raised again, never a hang, if asked again.
    with pytest.raises(StoreError):
        await subscription.__anext__()


async def test_a_closed_store_fails_the_subscription(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_store(f"sqlite:///{tmp_path / 'x.db'}") as store:
            await store.append("s-1", [ev(0)], expected_version=0)
            with pytest.raises(StoreError, match="closed"):
                async with open_subscription(store, poll_interval=0.01) as subscription:
                    assert len(await take(subscription, 1)) == 1
                    await store.aclose()
                    await take(subscription, 1)


# -- arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"buffer_size": -1},
        {"buffer_size": 1.5},
        {"buffer_size": math.inf},
        {"poll_interval": 0},
        {"poll_interval": math.inf},
        {"poll_interval": "1"},
        {"categories": "order"},
        {"event_types": [1]},
        {"from_position": "1"},
    ],
)
async def test_arguments_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        async with open_subscription(InMemoryEventStore(), **kwargs):
            pass  # pragma: no cover


async def test_memory_wake_up_takes_no_time(autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryEventStore()
    async with open_subscription(store, poll_interval=100) as subscription:
        await trio.sleep(1)
        start = trio.current_time()
        await store.append("s-1", [ev(0)], expected_version=0)
        (event,) = await take(subscription, 1)
        assert trio.current_time() == start
        assert event.position == 1


async def test_a_filtered_subscription_does_not_scan_other_events_again() -> None:
    # Events of other categories after the last match are looked at once:
    # the next read starts past them (at the head position read before).
    starts: list[int] = []

    class Counting(InMemoryEventStore):
        async def read_all(self, from_position: int = 1, **kwargs: Any) -> list[RecordedEvent]:
            starts.append(from_position)
            return await super().read_all(from_position, **kwargs)

    store = Counting()
    await store.append("order-1", [ev(0)], expected_version=0)
    with trio.fail_after(10):
        async with open_subscription(store, categories=["order"], poll_interval=100) as orders:
            assert [e.data for e in await take(orders, 1)] == [b"event-0"]
            for n in range(1, 11):
                await store.append("other-1", [ev(n)], expected_version=None)
                await trio.testing.wait_all_tasks_blocked()
            starts.clear()
            await store.append("order-1", [ev(11)], expected_version=None)
            assert [e.data for e in await take(orders, 1)] == [b"event-11"]
    assert starts[0] == 12  # not 2: events 2 to 11 were not read again


@pytest.mark.postgres
async def test_postgres_going_away_fails_the_subscription_with_store_error() -> None:
    # A server of this test's own: stopped while the subscription follows it
    # live (its LISTEN connection is cut too); the next read fails, and the
    # StoreError comes out of ``async for``, after the events read before.
    from conftest import make_postgres_server

    from trio_aggregates._stores._postgres import open_postgres_store

    server = make_postgres_server()
    try:
        with trio.fail_after(60):
            async with open_postgres_store(server.dsn, timeout=10) as store:
                await store.append("s-1", [ev(0)], expected_version=0)
                got: list[RecordedEvent] = []
                with pytest.raises(StoreError):
                    async with open_subscription(store, poll_interval=0.05) as subscription:
                        async for event in subscription:
                            got.append(event)
                            await trio.sleep(0.2)  # caught up, listening
                            await trio.to_thread.run_sync(server.stop)
                assert [e.data for e in got] == [b"event-0"]
    finally:
        server.destroy()
