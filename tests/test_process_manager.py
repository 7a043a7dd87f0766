"""Process managers on the in-memory store, SQLite and the real PostgreSQL.

* Every event redelivered (the checkpoint set back to 0) applies no command twice.
* A restart continues from the durable checkpoint.
* The events of one stream are handled in order, streams concurrently.
* A store error is retried with the same command ids; a failing reaction stops
  the process manager alone, naming the event's position.
* Leaving the block waits for the reaction in hand and stores the checkpoint.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio

from trio_aggregates import (
    Aggregate,
    AggregateRepository,
    EventStore,
    InMemoryEventStore,
    InvalidArgument,
    NewEvent,
    StoreError,
    applies,
    event_type,
    handles,
    open_aggregates,
    open_store,
)
from trio_aggregates._flow._process_manager import ProcessManager, reacts
from trio_aggregates._flow._projection import (
    EventContext,
    Projection,
    ProjectionFailed,
    open_projections,
    projects,
)


@attrs.frozen
class Order:
    amount: int


@event_type("shop.ordered")
@attrs.frozen
class Ordered:
    amount: int


@attrs.define
class Shop(Aggregate):
    total: int = 0

    @handles
    def order(self, command: Order) -> Ordered:
        return Ordered(command.amount)

    @applies
    def ordered(self, event: Ordered) -> None:
        self.total += event.amount


@attrs.frozen
class Bill:
    amount: int


@attrs.frozen
class Note:
    text: str


@event_type("ledger.billed")
@attrs.frozen
class Billed:
    amount: int


@event_type("ledger.noted")
@attrs.frozen
class Noted:
    text: str


@attrs.define
class Ledger(Aggregate):
    billed: int = 0
    notes: int = 0

    @handles
    def bill(self, command: Bill) -> Billed:
        return Billed(command.amount)

    @handles
    def note(self, command: Note) -> Noted:
        return Noted(command.text)

    @applies
    def on_billed(self, event: Billed) -> None:
        self.billed += event.amount

    @applies
    def on_noted(self, event: Noted) -> None:
        self.notes += 1


class Billing(ProcessManager):
    """Each order bills its shop's ledger, then adds a note: two commands per event."""

    reads = (Shop,)
    fail_on: ClassVar[int | None] = None

    def __init__(self, ledgers: AggregateRepository[Ledger]) -> None:
        self.ledgers = ledgers
        self.seen: list[tuple[str, int, int]] = []  # (stream, version, position)

    @reacts
    async def ordered(self, event: Ordered, ctx: EventContext) -> None:
        if event.amount == self.fail_on:
            raise RuntimeError(f"cannot bill {event.amount}")
        self.seen.append((ctx.stream, ctx.version, ctx.position))
        await self.ledgers.execute(
            ctx.key, Bill(event.amount), create_if_missing=True, command_id=ctx.command_id("bill")
        )
        await trio.lowlevel.checkpoint()  # let other streams' reactions interleave
        await self.ledgers.execute(ctx.key, Note("billed"), command_id=ctx.command_id("note"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/pm.db"
    else:
        yield request.getfixturevalue("postgres_database").url


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/pm.db"
    else:
        yield request.getfixturevalue("postgres_database").url


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[EventStore]:
    async with open_store(url) as store:
        yield store


async def order_many(store: EventStore, count: int, *, shops: int = 5, start: int = 0) -> None:
    async with open_aggregates(Shop, store) as shops_repo:
        for i in range(start, start + count):
            await shops_repo.execute(i % shops, Order(i + 1), create_if_missing=True)


def expected(count: int, *, shops: int = 5) -> dict[str, tuple[int, int]]:
    """Per shop: (amount billed, notes) once each order was handled exactly once."""
    model: dict[str, tuple[int, int]] = {}
    for i in range(count):
        billed, notes = model.get(str(i % shops), (0, 0))
        model[str(i % shops)] = (billed + i + 1, notes + 1)
    return model


async def ledgers_state(ledgers: AggregateRepository[Ledger], shops: int = 5) -> dict[str, Any]:
    result = {}
    for key in range(shops):
        ledger = await ledgers.load(key)
        replayed, _ = await ledgers.replay(key)
        assert ledger == replayed
        result[str(key)] = (ledger.billed, ledger.notes)
    return result


async def wait_for(predicate: Any, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (polling statistics, bounded)
            await trio.sleep(0.005)


async def test_redelivered_events_apply_no_command_twice(store_url: str) -> None:
    async with opened(store_url) as store, open_aggregates(Ledger, store) as ledgers:
        await order_many(store, 40)
        billing = Billing(ledgers)
        async with open_projections(store, [billing], poll_interval=0.05) as runner:
            await order_many(store, 20, start=40)  # live too (the ledgers' events interleave)
            await runner.wait_caught_up()
            assert await ledgers_state(ledgers) == expected(60)
            versions = [await ledgers.version(k) for k in range(5)]
            # Every event again (as after a crash before any checkpoint).
            billing.seen.clear()
            await runner.reset("Billing")
            await runner.wait_caught_up()
            assert len(billing.seen) == 60  # all handled again ...
            stats = runner.statistics()["Billing"]
            assert stats.state == "running" and stats.lag_positions == 0
        # ... and not one command applied twice.
        assert await ledgers_state(ledgers) == expected(60)
        assert [await ledgers.version(k) for k in range(5)] == versions == [24] * 5


async def test_a_restart_continues_from_the_checkpoint(durable_url: str) -> None:
    async with opened(durable_url) as store, open_aggregates(Ledger, store) as ledgers:
        await order_many(store, 30)
        async with open_projections(store, [Billing(ledgers)]) as runner:
            await runner.wait_caught_up()
        await order_many(store, 10, start=30)
        again = Billing(ledgers)  # a new object: the checkpoint is in the database
        async with open_projections(store, [again]) as runner:
            await runner.wait_caught_up()
        # Only the 10 new orders (versions 7 and 8 of each shop).
        assert sorted((s, v) for s, v, _ in again.seen) == sorted(
            (f"Shop-{k}", v) for k in range(5) for v in (7, 8)
        )
        assert await ledgers_state(ledgers) == expected(40)


async def test_one_stream_in_order_streams_concurrently(store_url: str) -> None:
    async with opened(store_url) as store, open_aggregates(Ledger, store) as ledgers:
        await order_many(store, 100, shops=10)
        billing = Billing(ledgers)
        async with open_projections(store, [billing]) as runner:
            await runner.wait_caught_up()
        by_stream: dict[str, list[int]] = collections.defaultdict(list)
        for stream, version, _ in billing.seen:
            by_stream[stream].append(version)
        assert all(v == list(range(1, 11)) for v in by_stream.values()), by_stream
        # Concurrently: the positions were not handled in global order.
        positions = [p for _, _, p in billing.seen]
        assert sorted(positions) == list(range(1, 101)) and positions != sorted(positions)


class FlakyLedgers:
    """A repository whose first ``failures`` calls fail with a store error
    (after doing the command: the worst case, the answer lost)."""

    def __init__(self, ledgers: AggregateRepository[Ledger], failures: int) -> None:
        self.ledgers = ledgers
        self.failures = failures
        self.command_ids: list[str] = []

    async def execute(self, key: Any, command: Any, **kwargs: Any) -> Any:
        self.command_ids.append(kwargs["command_id"])
        result = await self.ledgers.execute(key, command, **kwargs)
        if self.failures:
            self.failures -= 1
            raise StoreError("the answer was lost")
        return result


async def test_store_errors_are_retried_with_the_same_command_ids() -> None:
    store = InMemoryEventStore()
    async with open_aggregates(Ledger, store) as ledgers:
        await order_many(store, 1)
        flaky = FlakyLedgers(ledgers, failures=3)
        billing = Billing(flaky)  # type: ignore[arg-type]
        async with open_projections(store, [billing]) as runner:
            await runner.wait_caught_up()
            assert runner.statistics()["Billing"].state == "running"
        assert flaky.command_ids == ["Billing:1:bill"] * 4 + ["Billing:1:note"]
        assert await ledgers_state(ledgers, shops=1) == expected(1, shops=1)


async def test_retries_run_out_and_a_failing_reaction_stops_only_its_manager() -> None:
    store = InMemoryEventStore()

    class Count(Projection):
        reads = (Shop,)
        checkpoint_in_store = False
        handled = 0

        @projects
        def ordered(self, event: Ordered) -> None:
            self.handled += 1

    class OutOfRetries(Billing):
        retry_attempts = 2
        retry_delay = 0.001

    class Broken(Billing):
        fail_on = 7

    async with open_aggregates(Ledger, store) as ledgers:
        await order_many(store, 20)
        count = Count()
        broken = Broken(ledgers)
        flaky = OutOfRetries(FlakyLedgers(ledgers, failures=100))  # type: ignore[arg-type]
        async with open_projections(store, [count, broken, flaky]) as runner:
            await wait_for(
                lambda: all(
                    runner.statistics()[n].state == "failed" for n in ("Broken", "OutOfRetries")
                )
            )
            await order_many(store, 5, start=20)
            await runner.wait_caught_up()
            stats = runner.statistics()
            assert stats["Count"].state == "running" and stats["Count"].lag_positions == 0
            assert count.handled == 25
            error = stats["Broken"].error
            assert isinstance(error, ProjectionFailed)
            assert error.position == 7 and "position 7" in str(error)
            assert isinstance(error.__cause__, RuntimeError)
            # The checkpoint stops before the failing event (events of other
            # streams in its batch may be handled: they are again, idempotently).
            assert stats["Broken"].position == 6
            out = stats["OutOfRetries"].error
            assert isinstance(out, ProjectionFailed) and isinstance(out.__cause__, StoreError)
            assert out.position == 1 and stats["OutOfRetries"].position == 0


async def test_leaving_the_block_waits_for_the_reaction_in_hand(autojump_clock: Any) -> None:
    store = InMemoryEventStore()
    started, release = trio.Event(), trio.Event()
    finished = []

    class Slow(ProcessManager):
        reads = (Shop,)

        @reacts
        async def ordered(self, event: Ordered, ctx: EventContext) -> None:
            started.set()
            await release.wait()
            await trio.sleep(1)
            finished.append(ctx.position)

    await order_many(store, 1)
    slow = Slow()
    async with trio.open_nursery() as nursery:
        async with open_projections(store, [slow]):
            await started.wait()

            async def let_go() -> None:
                await trio.sleep(5)
                release.set()

            nursery.start_soon(let_go)
        # The block ended only after the reaction did, with its checkpoint stored.
        assert finished == [1]
        assert trio.current_time() >= 6
        assert slow._trio_aggregates_position == 1


async def test_a_reaction_failing_on_a_live_event_while_more_arrive() -> None:
    """The manager fails while its subscription still hands events over (its channel
    full, the reactions being slower): it stops alone, the others go on."""
    store = InMemoryEventStore()

    class SlowBroken(ProcessManager):
        reads = (Shop,)
        batch_size = 2

        @reacts
        async def ordered(self, event: Ordered) -> None:
            for _ in range(5):
                await trio.lowlevel.checkpoint()
            if event.amount == 13:
                raise RuntimeError("13")

    class Count(Projection):
        reads = (Shop,)
        checkpoint_in_store = False
        handled = 0

        @projects
        def ordered(self, event: Ordered) -> None:
            self.handled += 1

    count = Count()
    first = NewEvent("shop.ordered", b'{"amount": 100}')
    events = [NewEvent("shop.ordered", b'{"amount": %d}' % (i + 1)) for i in range(30)]
    async with open_projections(store, [SlowBroken(), count]) as runner:
        await store.append("Shop-0", [first], expected_version=0)
        await runner.wait_caught_up(1)  # caught up: from now on, live
        await store.append("Shop-0", events, expected_version=1)  # one page
        await wait_for(lambda: runner.statistics()["SlowBroken"].state == "failed")
        await runner.wait_caught_up()
        error = runner.statistics()["SlowBroken"].error
        assert isinstance(error, ProjectionFailed) and error.position == 14
        assert runner.statistics()["Count"].state == "running"
    assert count.handled == 31


async def test_ctrl_c_in_a_reaction_comes_out_alone() -> None:
    """A KeyboardInterrupt landing in a reaction (events of several streams handled
    at once: nested task groups) leaves the block as itself, not in a group."""
    store = InMemoryEventStore()
    await order_many(store, 10)

    class Interrupted(ProcessManager):
        reads = (Shop,)

        @reacts
        async def ordered(self, event: Ordered) -> None:
            await trio.lowlevel.checkpoint()
            if event.amount == 7:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        async with open_projections(store, [Interrupted()]):
            await trio.sleep_forever()


def test_reactions_are_coroutines_and_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="async def"):

        class Sync(ProcessManager):
            @reacts
            def ordered(self, event: Ordered) -> None:
                pass

    with pytest.raises(InvalidArgument):

        class NoConcurrency(ProcessManager):
            max_concurrency = 0
