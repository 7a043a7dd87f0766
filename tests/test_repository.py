"""The runtime: ``open_aggregates`` and ``AggregateRepository`` on real stores.

Most tests run on the in-memory store and on a real SQLite file. Time-based tests
(idle passivation, call timeouts) and tests that count blocked tasks use the
in-memory store only: the autojump clock jumps while a real SQLite thread works.
Failing, slow and gated stores are the testing kit's :class:`FaultyStore`
(``trio_aggregates.testing``): a real in-memory store with a real interleaving
(a slow append, a latch on reads, an append whose answer is lost), not a mock;
so is the second writer that always gets there first, below. Tests that need
nothing but an ``Account`` on a fresh in-memory store take the kit's
``aggregates`` fixture.
"""

import functools
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import msgspec
import pytest
import trio
import trio.testing
from _examples import bank
from hypothesis import given, strategies as st

from trio_aggregates import (
    AggregateCrashed,
    AggregateNotFound,
    AggregateRepository,
    AlreadyExists,
    CallTimeout,
    CommandRejected,
    ConcurrencyConflict,
    Decision,
    EventDecodeError,
    EventStore,
    InMemoryEventStore,
    InvalidArgument,
    InvalidKey,
    NewEvent,
    RegistryClosed,
    Snapshot,
    StoreError,
    TrioAggregatesError,
    UnknownCommand,
    UnknownEventType,
    WrongExpectedVersion,
    applies,
    event_type,
    handles,
    open_aggregates,
)
from trio_aggregates._runtime._command import ANY, EXISTING, NEW
from trio_aggregates.testing import FaultyStore, Repositories

Account = bank.Account
OpenAccount, Deposit, Withdraw = bank.OpenAccount, bank.Deposit, bank.Withdraw
Deposited, Withdrawn, AccountOpened = bank.Deposited, bank.Withdrawn, bank.AccountOpened

# -- test domain: an account that can crash, and a ledger of multi-event commands --


@attrs.frozen
class Boom:
    pass


@attrs.define
class FragileAccount(bank.Account):
    category = "Fragile"
    snapshot_every = None  # these tests are about crashes only

    @handles
    def boom(self, command: Boom) -> None:
        raise RuntimeError("handler bug")


@attrs.frozen
class AddLines:
    tag: str
    count: int


@attrs.frozen
class LineAdded:
    tag: str
    n: int


@attrs.define
class Ledger(bank.Account):
    category = "Ledger"
    snapshot_every = None
    lines: list[str] = attrs.Factory(list)

    @handles
    def add_lines(self, command: AddLines) -> list[LineAdded]:
        return [LineAdded(command.tag, i) for i in range(command.count)]

    @applies
    def line_added(self, event: LineAdded) -> None:
        self.lines.append(f"{event.tag}:{event.n}")


@event_type("snappy")
@attrs.define
class Snappy(bank.Account):
    category = "Snappy"
    snapshot_every = 3


@event_type("snappy")
@attrs.define
class SnappyV2(bank.Account):
    """The same stream and state type name as Snappy, with a new snapshot schema."""

    category = "Snappy"
    snapshot_every = 3
    snapshot_schema = 2


# -- stores ---------------------------------------------------------------------


@pytest.fixture
def aggregate_types() -> list[type[Any]]:
    """What the kit's ``aggregates`` fixture runs: ``aggregates[Account]``."""
    return [Account]


def disk_full() -> StoreError:
    """A store's error for a full disk, with the driver's error as its cause."""
    error = StoreError("disk full")
    error.__cause__ = OSError(28, "No space left on device")
    return error


class InterferingStore(InMemoryEventStore):
    """While ``interfere`` is set, another writer appends a deposit right before every append."""

    def __init__(self) -> None:
        super().__init__()
        self.interfere = False
        self.attempts = 0
        self.foreign = 0

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, expected_version: int | None, **kw: Any
    ) -> int:
        if self.interfere:
            self.attempts += 1
            foreign = NewEvent(*Account.codec().encode(Deposited(1, "foreign")))
            await super().append(stream, [foreign], expected_version=None)
            self.foreign += 1
        return await super().append(stream, events, expected_version=expected_version, **kw)


@pytest.fixture(params=["memory", "sqlite"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> EventStore | str:
    """What ``open_aggregates`` is given: a shared in-memory store, or an SQLite file URL."""
    if request.param == "memory":
        return InMemoryEventStore()
    return f"sqlite:///{tmp_path}/x.db"


async def seed(store: EventStore, aggregate: Any, key: object, *events: object) -> int:
    """Append encoded events straight to the store, as another program would."""
    stream = aggregate.stream_name(key)
    version = await store.stream_version(stream)
    encoded = [NewEvent(*aggregate.codec().encode(e)) for e in events]
    return await store.append(stream, encoded, expected_version=version)


async def stored(store: EventStore, aggregate: Any, key: object) -> int:
    return await store.stream_version(aggregate.stream_name(key))


def references(history: list[Any]) -> list[Any]:
    return [getattr(e.event, "reference", None) for e in history]


# -- create / execute ----------------------------------------------------------


async def test_create_then_execute_gives_versions_1_2_3(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        assert await repo.create("a", OpenAccount("ann", 10)) == 1
        assert await repo.execute("a", Deposit(100)) == 2
        assert await repo.execute("a", Withdraw(30)) == 3
        assert await repo.execute("a", Deposit(5)) == 4
        assert await repo.version("a") == 4
        assert await repo.load("a") == Account("ann", 75, 10, False)
        assert await repo.replay("a") == (Account("ann", 75, 10, False), 4)
        assert [e.event for e in await repo.history("a")] == [
            AccountOpened("ann", 10),
            Deposited(100),
            Withdrawn(30),
            Deposited(5),
        ]
        assert [e.version for e in await repo.history("a")] == [1, 2, 3, 4]


async def test_keys_of_every_allowed_type(target: Any) -> None:
    keys = ["s", 7, uuid.UUID(int=5)]
    async with open_aggregates(Account, target) as repo:
        for key in keys:
            assert await repo.create(key, OpenAccount(str(key))) == 1
            assert (await repo.load(key)).owner == str(key)
            assert str(key) in repo.registry  # the registry's key: the one string form


async def test_handler_reply_replaces_the_version(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(42))
        assert await repo.execute("a", bank.GetBalance()) == 42
        assert await repo.version("a") == 2  # a reply-only decision stores nothing


async def test_execute_on_a_missing_key_is_not_found_and_registers_nothing(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        with pytest.raises(AggregateNotFound) as info:
            await repo.execute("ghost", Deposit(1))
        assert info.value.key == "ghost"
        assert isinstance(info.value, LookupError)
        assert "ghost" not in repo.registry
        assert len(repo.registry) == 0
        with pytest.raises(AggregateNotFound):
            await repo.load("ghost")
        with pytest.raises(AggregateNotFound):
            await repo.version("ghost")
        assert "ghost" not in repo.registry
        stats = repo.registry.statistics()
        # Each started (a create may be queued behind it) and ended with no stream.
        assert (stats.declined, stats.live, stats.starting) == (0, 0, 0)
        assert await stored(repo.store, Account, "ghost") == 0
        assert await repo.history("ghost") == []


async def test_create_on_an_existing_key_already_exists(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        assert await repo.create("a", OpenAccount("ann")) == 1
        with pytest.raises(AlreadyExists) as info:
            await repo.create("a", OpenAccount("bob"))
        assert info.value.key == "a"
        # also when the aggregate is not live: a second repository on the same store
        store = repo.store if isinstance(target, InMemoryEventStore) else target
        async with open_aggregates(Account, store) as other:
            with pytest.raises(AlreadyExists):
                await other.create("a", OpenAccount("carl"))
        assert await repo.load("a") == Account("ann")
        assert await repo.version("a") == 1


async def test_rejected_create_leaves_no_aggregate_behind(aggregates: Repositories) -> None:
    repo = aggregates[Account]
    with pytest.raises(bank.InvalidAmount):
        await repo.create("a", OpenAccount("ann", -5))
    with pytest.raises(AggregateNotFound):
        await repo.load("a")
    assert "a" not in repo.registry


async def test_rejected_command_keeps_the_aggregate_alive_and_unchanged(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(50))
        before = await repo.load("a")
        activations = repo.registry.statistics().activations
        with pytest.raises(bank.InsufficientFunds) as info:
            await repo.execute("a", Withdraw(51))
        assert isinstance(info.value, CommandRejected)
        with pytest.raises(bank.InvalidAmount):
            await repo.execute("a", Deposit(-1))
        assert "a" in repo.registry
        stats = repo.registry.statistics()
        assert (stats.activations, stats.crashes) == (activations, 0)
        assert await repo.load("a") == before
        assert await repo.version("a") == 2
        assert await stored(repo.store, Account, "a") == 2
        assert await repo.execute("a", Withdraw(50)) == 3  # still serving


async def test_unknown_command(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        with pytest.raises(UnknownCommand, match="RegisterUser"):
            await repo.execute("a", bank.RegisterUser("x", "x@y.z"))
        with pytest.raises(UnknownCommand):
            await repo.create("b", "not a command object")
        assert "a" in repo.registry
        assert repo.registry.statistics().crashes == 0
        assert await repo.execute("a", Deposit(1)) == 2


async def test_handler_exception_crashes_only_that_aggregate_and_loses_nothing(
    target: Any,
) -> None:
    async with open_aggregates(FragileAccount, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.create("b", OpenAccount("bob"))
        for i in range(3):
            await repo.execute("a", Deposit(10, f"d{i}"))
        acknowledged = await repo.history("a")
        with pytest.raises(AggregateCrashed) as info:
            await repo.execute("a", Boom())
        assert isinstance(info.value.__cause__, RuntimeError)
        assert str(info.value.__cause__) == "handler bug"
        assert info.value.key == "a"
        assert "a" not in repo.registry  # the aggregate ended
        assert "b" in repo.registry  # its sibling did not
        stats = repo.registry.statistics()
        assert (stats.crashes, stats.activations) == (1, 2)
        assert await repo.history("a") == acknowledged
        # the next command reactivates it from the store, with every event
        assert await repo.execute("a", Deposit(1, "after")) == 5
        assert repo.registry.statistics().activations == 3
        assert await repo.load("a") == (await repo.replay("a"))[0]
        assert (await repo.load("a")).balance == 31
        assert await repo.history("a") == [*acknowledged, (await repo.history("a"))[-1]]


async def crash_with_a_queue(repo: Any, store: FaultyStore, key: str) -> dict[str, object]:
    """Store "first" slowly, queue Boom and q0..q4 behind it, in that order; return answers."""
    await repo.create(key, OpenAccount("ann"))
    latch = store.hold("append")
    results: dict[str, object] = {}

    async def send(name: str, command: object) -> None:
        try:
            results[name] = await repo.execute(key, command)
        except AggregateCrashed as exc:
            results[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "first", Deposit(1, "first"))
            await trio.testing.wait_all_tasks_blocked()
            assert latch.waiting == 1  # the aggregate is busy storing "first"
            nursery.start_soon(send, "boom", Boom())
            await trio.testing.wait_all_tasks_blocked()
            for i in range(5):
                nursery.start_soon(send, f"q{i}", Deposit(1, f"q{i}"))
                await trio.testing.wait_all_tasks_blocked()
            latch.release()
    return results


async def test_commands_queued_behind_a_crash_are_answered_once_each() -> None:
    store = FaultyStore()
    async with open_aggregates(FragileAccount, store) as repo:
        results = await crash_with_a_queue(repo, store, "a")
        assert isinstance(results.pop("boom"), AggregateCrashed)
        assert results["first"] == 2
        assert sorted(results.values()) == [2, 3, 4, 5, 6, 7]
        history = await repo.history("a")
        assert references(history)[:2] == [None, "first"]
        assert sorted(references(history)[2:]) == ["q0", "q1", "q2", "q3", "q4"]
        for name, version in results.items():
            assert history[version - 1].event.reference == name  # answered with its own event
        assert repo.registry.statistics().crashes == 1


async def test_commands_queued_behind_a_crash_keep_their_arrival_order() -> None:
    store = FaultyStore()
    async with open_aggregates(FragileAccount, store) as repo:
        for round_ in range(10):  # each round keeps the order by chance at most 1 time in 2
            key = f"a{round_}"
            await crash_with_a_queue(repo, store, key)
            assert references(await repo.history(key))[2:] == ["q0", "q1", "q2", "q3", "q4"]


# -- ordering and races ----------------------------------------------------------


async def test_commands_run_one_at_a_time_in_arrival_order() -> None:
    store = FaultyStore()
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        latch = store.hold("append")
        versions: dict[int, int] = {}

        async def deposit(i: int) -> None:
            versions[i] = await repo.execute("a", Deposit(i + 1, f"r{i}"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(deposit, i)
                    # each command is in the mailbox before the next is sent
                    await trio.testing.wait_all_tasks_blocked()
                    assert latch.waiting == 1  # only ever one command in the store at once
                latch.release()
        assert versions == {i: i + 2 for i in range(20)}
        assert references(await repo.history("a"))[1:] == [f"r{i}" for i in range(20)]


async def test_concurrent_commands_never_interleave(target: Any) -> None:
    async with open_aggregates(Ledger, target) as repo:
        await repo.create("l", OpenAccount("ann"))
        versions: dict[str, int] = {}

        async def add(tag: str, count: int) -> None:
            versions[tag] = await repo.execute("l", AddLines(tag, count))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(add, f"t{i}", 1 + i % 4)
        total = 1 + sum(1 + i % 4 for i in range(30))
        assert await repo.version("l") == total
        history = await repo.history("l")
        assert [e.version for e in history] == list(range(1, total + 1))
        # each command's events form one contiguous block ending at the version it got
        blocks: dict[str, list[int]] = {}
        for e in history[1:]:
            blocks.setdefault(e.event.tag, []).append(e.version)
        for tag, positions in blocks.items():
            assert positions == list(range(positions[0], positions[0] + len(positions)))
            assert positions[-1] == versions[tag]
            assert [history[p - 1].event.n for p in positions] == list(range(len(positions)))
        assert (await repo.load("l")).lines == [f"{e.event.tag}:{e.event.n}" for e in history[1:]]


async def test_concurrent_create_of_one_key_exactly_one_wins(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        winners: list[str] = []
        losers: list[str] = []

        async def create(name: str) -> None:
            try:
                assert await repo.create("k", OpenAccount(name)) == 1
                winners.append(name)
            except AlreadyExists:
                losers.append(name)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(25):
                    nursery.start_soon(create, f"owner{i}")
        assert len(winners) == 1
        assert len(losers) == 24
        assert [e.event for e in await repo.history("k")] == [AccountOpened(winners[0], 0)]
        assert repo.registry.statistics().activations == 1


async def test_concurrent_create_from_two_repositories_exactly_one_wins(target: Any) -> None:
    outcomes: list[object] = []

    async def side(name: str) -> None:
        async with open_aggregates(Account, target) as repo:
            try:
                outcomes.append(await repo.create("k", OpenAccount(name)))
            except (AlreadyExists, WrongExpectedVersion) as exc:
                # WrongExpectedVersion: see test_create_losing_to_another_writer_is_already_exists
                outcomes.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(side, f"owner{i}")
    assert outcomes.count(1) == 1
    assert len(outcomes) == 4
    async with open_aggregates(Account, target) as repo:
        assert await repo.version("k") == 1
        assert len(await repo.history("k")) == 1


async def test_create_losing_to_another_writer_is_already_exists() -> None:
    store = InMemoryEventStore()
    async with open_aggregates(Account, store) as repo:
        assert await repo.create("k", OpenAccount("me"), dry_run=True) == 0  # live, at 0
        await seed(store, Account, "k", AccountOpened("other", 0))  # another process wins
        with pytest.raises(AlreadyExists):
            await repo.create("k", OpenAccount("me"))


# -- optimistic concurrency ------------------------------------------------------


async def test_conflict_injected_by_a_second_writer_is_retried(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(100))
        assert await repo.version("a") == 2  # live, at version 2
        # a second writer (another repository on the same store) gets there first
        async with open_aggregates(Account, repo.store) as other:
            assert await other.execute("a", Deposit(7, "other")) == 3
            assert await other.execute("a", Withdraw(50, "other")) == 4
        # and one appending straight to the store, with the right expected version
        await repo.store.append(
            "Account-a",
            [NewEvent(*Account.codec().encode(Deposited(1, "raw")))],
            expected_version=4,
        )
        assert await repo.execute("a", Withdraw(8, "mine")) == 6  # retried after catching up
        live = await repo.load("a")
        assert (live, 6) == await repo.replay("a")
        assert live.balance == 100 + 7 - 50 + 1 - 8
        assert references(await repo.history("a")) == [None, None, "other", "other", "raw", "mine"]


async def test_conflict_retry_decides_again_on_the_new_state(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(100))
        async with open_aggregates(Account, repo.store) as other:
            await other.execute("a", Withdraw(90))
        # live state says 100, the store says 10: the re-decision refuses
        with pytest.raises(bank.InsufficientFunds):
            await repo.execute("a", Withdraw(50))
        assert "a" in repo.registry
        assert (await repo.load("a")).balance == 10
        assert await repo.version("a") == 3


async def test_writer_that_keeps_winning_gives_concurrency_conflict() -> None:
    store = InterferingStore()
    async with open_aggregates(Account, store, max_retries=2) as repo:
        await repo.create("a", OpenAccount("ann"))
        store.interfere = True
        with pytest.raises(ConcurrencyConflict) as info:
            await repo.execute("a", Deposit(500, "mine"))
        assert info.value.stream == "Account-a"
        assert store.attempts == 3  # the first try and max_retries=2 retries
        assert "mine" not in references(await repo.history("a"))
        assert "a" in repo.registry  # a conflict is an answer, not a crash
        store.interfere = False
        assert await repo.execute("a", Deposit(500, "mine")) == 5
        assert (await repo.load("a"), 5) == await repo.replay("a")
        assert (await repo.load("a")).balance == 503


async def test_max_retries_zero_answers_the_first_conflict() -> None:
    store = InterferingStore()
    async with open_aggregates(Account, store, max_retries=0) as repo:
        await repo.create("a", OpenAccount("ann"))
        store.interfere = True
        with pytest.raises(ConcurrencyConflict):
            await repo.execute("a", Deposit(5))
        assert store.attempts == 1
        assert await stored(store, Account, "a") == 2  # only the foreign event


async def test_max_retries_zero_recovers_once_the_other_writer_stops() -> None:
    async with open_aggregates(Account, InMemoryEventStore(), max_retries=0) as repo:
        await repo.create("a", OpenAccount("ann"))
        await seed(repo.store, Account, "a", Deposited(1, "foreign"))  # one foreign write
        with pytest.raises(ConcurrencyConflict):
            await repo.execute("a", Deposit(5))
        # nobody else writes any more: this must work
        assert await repo.execute("a", Deposit(5)) == 3


async def test_caller_expected_version(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        assert await repo.execute("a", Deposit(5), expected_version=1) == 2
        with pytest.raises(WrongExpectedVersion) as info:
            await repo.execute("a", Deposit(5), expected_version=1)
        assert (info.value.expected, info.value.actual, info.value.key) == (1, 2, "a")
        assert await stored(repo.store, Account, "a") == 2
        assert "a" in repo.registry
        # the stream moved behind the live aggregate's back: the retry finds out
        await seed(repo.store, Account, "a", Deposited(1, "foreign"))
        with pytest.raises(WrongExpectedVersion) as info:
            await repo.execute("a", Deposit(5), expected_version=2)
        assert (info.value.expected, info.value.actual) == (2, 3)
        assert await repo.execute("a", Deposit(5), expected_version=3) == 4


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1"])
async def test_expected_version_must_be_a_non_negative_int(
    bad: object, aggregates: Repositories
) -> None:
    repo = aggregates[Account]
    await repo.create("a", OpenAccount("ann"))
    with pytest.raises(ValueError, match="expected_version"):
        await repo.execute("a", Deposit(5), expected_version=bad)  # type: ignore[arg-type]


# -- dry run ------------------------------------------------------------------


async def test_dry_run_writes_nothing(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(10))
        assert await repo.execute("a", Deposit(5), dry_run=True) == 2
        assert await repo.execute("a", Withdraw(3, "x"), dry_run=True, verbose=True) == [
            Withdrawn(3, "x")
        ]
        with pytest.raises(bank.InsufficientFunds):
            await repo.execute("a", Withdraw(11), dry_run=True)
        assert await stored(repo.store, Account, "a") == 2
        assert await repo.version("a") == 2
        assert (await repo.load("a")).balance == 10
        assert await repo.create("b", OpenAccount("bob"), dry_run=True) == 0
        assert await repo.create("c", OpenAccount("c"), dry_run=True, verbose=True) == [
            AccountOpened("c", 0)
        ]
        assert await stored(repo.store, Account, "b") == 0
        assert await stored(repo.store, Account, "c") == 0
        assert await repo.create("b", OpenAccount("bob")) == 1  # it really was not created


# -- timeouts and idle passivation (in-memory store, autojump clock) -------------


async def test_timeout_gives_call_timeout(autojump_clock: trio.testing.MockClock) -> None:
    store = FaultyStore()
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        store.delay("append", 10)
        results: list[object] = []

        async def queued() -> None:
            try:
                results.append(await repo.execute("a", Deposit(2, "queued"), timeout=1))
            except CallTimeout as exc:
                results.append(exc)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queued)  # waits behind "slow" and gives up first
            with pytest.raises(CallTimeout) as info:
                await repo.execute("a", Deposit(1, "slow"), timeout=1)
        assert isinstance(info.value, trio.TooSlowError)
        assert trio.current_time() - start == pytest.approx(1)
        assert isinstance(results[0], CallTimeout)
        # the command already being stored completes; the one never taken is skipped
        await trio.sleep(20)
        assert references(await repo.history("a")) == [None, "slow"]
        assert await repo.version("a") == 2
        store.heal("append")
        assert await repo.execute("a", Deposit(3), timeout=1) == 3


async def test_idle_passivation_is_on_by_default_after_300_s(
    aggregates: Repositories,
    autojump_clock: trio.testing.MockClock,
) -> None:
    repo = aggregates[Account]
    await repo.create("a", OpenAccount("ann"))
    await repo.execute("a", Deposit(10))
    before = await repo.load("a")
    start = trio.current_time()
    await trio.sleep_until(start + 299.5)
    assert "a" in repo.registry
    await trio.sleep_until(start + 300.5)
    assert "a" not in repo.registry
    stats = repo.registry.statistics()
    assert (stats.passivations, stats.live) == (1, 0)
    assert await repo.load("a") == before
    assert await repo.version("a") == 2
    assert repo.registry.statistics().activations == 2


async def test_idle_timeout_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryEventStore()
    async with open_aggregates(Account, store, idle_timeout=5) as repo:
        await repo.create("a", OpenAccount("ann"))
        await trio.sleep(4.9)
        assert "a" in repo.registry
        await repo.execute("a", Deposit(1))  # a message re-arms the timer
        await trio.sleep(4.9)
        assert "a" in repo.registry
        await trio.sleep(0.2)
        assert "a" not in repo.registry
        assert await repo.execute("a", Deposit(1)) == 3
    async with open_aggregates(Account, store, idle_timeout=None) as repo:
        await repo.version("a")
        await trio.sleep(10_000)
        assert "a" in repo.registry
        assert repo.registry.statistics().passivations == 0


async def test_command_racing_idle_passivation_is_answered_and_stored_exactly_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    idle = 10.0
    store = InMemoryEventStore()
    raced = 0  # passivations that happened at the very moment the commands arrived
    async with open_aggregates(Account, store, idle_timeout=idle) as repo:
        for round_ in range(5):
            keys = [f"r{round_}k{i}" for i in range(20)]
            for key in keys:
                await repo.create(key, OpenAccount(key))
            deadline = trio.current_time() + idle  # every aggregate's idle deadline
            answers: dict[str, list[int]] = {key: [] for key in keys}
            before = repo.registry.statistics().passivations

            async def send(
                key: str, reference: str, deadline: float, answers: dict[str, list[int]]
            ) -> None:
                await trio.sleep_until(deadline)  # wakes together with the reaper
                answers[key].append(await repo.execute(key, Deposit(1, reference)))

            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(send, key, f"{key}-a", deadline, answers)
                    nursery.start_soon(send, key, f"{key}-b", deadline, answers)
            assert trio.current_time() == deadline
            raced += repo.registry.statistics().passivations - before
            for key in keys:
                assert sorted(answers[key]) == [2, 3]
                history = await repo.history(key)
                assert sorted(references(history)[1:]) == [f"{key}-a", f"{key}-b"]
                assert (await repo.load(key)).balance == 2
            await trio.sleep(idle * 2)  # passivate them all before the next round
    # some commands really did arrive as their aggregate was being passivated
    assert raced > 0
    assert raced < 100


# -- activation ---------------------------------------------------------------


async def test_a_slow_loading_stream_does_not_delay_other_keys() -> None:
    store = FaultyStore()
    await seed(store, Account, "slow", AccountOpened("s", 0), Deposited(5))
    await seed(store, Account, "fast", AccountOpened("f", 0))
    latch = store.hold("read", streams="Account-slow")
    async with open_aggregates(Account, store) as repo:
        results: list[int] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def slow(amount: int) -> None:
                    results.append(await repo.execute("slow", Deposit(amount)))

                nursery.start_soon(slow, 1)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(slow, 2)  # waits for the same activation
                await trio.testing.wait_all_tasks_blocked()
                assert "slow" not in repo.registry  # not ready before its stream is loaded
                assert repo.registry.statistics().starting == 1
                assert await repo.execute("fast", Deposit(9)) == 2
                assert (await repo.load("fast")).balance == 9
                assert results == []
                latch.release()
        assert sorted(results) == [3, 4]
        assert (await repo.load("slow")).balance == 8
        assert repo.registry.statistics().activations == 2


async def test_max_concurrent_loads_bounds_concurrent_loads() -> None:
    store = FaultyStore()
    keys = [f"k{i}" for i in range(7)]
    for key in keys:
        await seed(store, Account, key, AccountOpened(key, 0))
    latch = store.hold("read", streams=[Account.stream_name(key) for key in keys])
    async with open_aggregates(Account, store, max_concurrent_loads=2) as repo:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(repo.execute, key, Deposit(1))
                await trio.testing.wait_all_tasks_blocked()
                assert (store.in_flight["read"], store.max_in_flight["read"]) == (2, 2)
                assert latch.waiting == 2
                assert repo.registry.statistics().starting == len(keys)
                latch.release()
        assert store.max_in_flight["read"] == 2
        assert sorted(repo.registry.keys()) == keys
        for key in keys:
            assert await repo.version(key) == 2


@pytest.mark.parametrize("bad", [0, -1])
async def test_open_aggregates_refuses_bad_settings(bad: int) -> None:
    with pytest.raises(ValueError):
        async with open_aggregates(Account, InMemoryEventStore(), max_concurrent_loads=bad):
            pass  # pragma: no cover
    with pytest.raises(ValueError):
        async with open_aggregates(Account, InMemoryEventStore(), max_retries=bad - 1):
            pass  # pragma: no cover


# -- metadata -----------------------------------------------------------------


async def test_metadata_is_stored_with_every_event(target: Any) -> None:
    async with open_aggregates(Ledger, target) as repo:
        before = time.time()
        await repo.create("l", OpenAccount("ann"))
        await repo.execute(
            "l",
            AddLines("x", 3),
            command_id="cmd-1",
            correlation_id="corr-1",
            causation_id="cause-1",
        )
        after = time.time()
        history = await repo.history("l")
        first, *lines = history
        assert first.metadata["command"] == "OpenAccount"
        assert len(first.metadata["command_id"]) == 32  # a fresh id: 32 hex digits
        int(first.metadata["command_id"], 16)
        assert "correlation_id" not in first.metadata
        assert len(lines) == 3
        for event in lines:
            assert event.metadata["command_id"] == "cmd-1"
            assert event.metadata["correlation_id"] == "corr-1"
            assert event.metadata["causation_id"] == "cause-1"
            assert event.metadata["command"] == "AddLines"
            assert before - 1 <= event.metadata["at"] <= after + 1
            assert before - 1 <= event.recorded_at <= after + 1
        # metadata is stored as JSON data in the store
        raw = await repo.store.read("Ledger-l", from_version=2, limit=1)
        assert json.loads(raw[0].metadata)["command_id"] == "cmd-1"


async def test_transfer_carries_its_correlation_id(aggregates: Repositories) -> None:
    repo = aggregates[Account]
    await repo.create("s", OpenAccount("s"))
    await repo.create("t", OpenAccount("t"))
    await repo.execute("s", Deposit(100))
    assert await bank.transfer(repo, "s", "t", 60)
    assert not await bank.transfer(repo, "s", "t", 60)  # insufficient funds
    withdrawn = (await repo.history("s"))[-1]
    deposited = (await repo.history("t"))[-1]
    assert withdrawn.metadata["correlation_id"] == deposited.metadata["correlation_id"]
    assert withdrawn.event.reference == withdrawn.metadata["correlation_id"]
    assert ((await repo.load("s")).balance, (await repo.load("t")).balance) == (40, 60)


# -- snapshots ----------------------------------------------------------------


async def test_snapshot_is_saved_every_n_events(target: Any) -> None:
    async with open_aggregates(Snappy, target) as repo:
        await repo.create("s", OpenAccount("ann"))
        await repo.execute("s", Deposit(1))
        assert await repo.store.load_snapshot("Snappy-s") is None
        await repo.execute("s", Deposit(2))
        # the snapshot is saved after the reply; the next message is taken after that
        assert await repo.version("s") == 3
        snapshot = await repo.store.load_snapshot("Snappy-s")
        assert snapshot is not None
        assert (snapshot.version, snapshot.schema, snapshot.type) == (3, 1, "snappy")
        assert repo.registry.statistics().crashes == 0


async def test_account_keeps_serving_concurrent_commands_past_its_snapshot_interval(
    aggregates: Repositories,
) -> None:
    # bank.Account has snapshot_every = 50: snapshots are taken between queued commands.
    repo = aggregates[Account]
    await repo.create("a", OpenAccount("ann"))
    failures: list[BaseException] = []

    async def deposit() -> None:
        try:
            await repo.execute("a", Deposit(1))
        except Exception as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(80):
            nursery.start_soon(deposit)
    assert failures == []
    assert repo.registry.statistics().crashes == 0
    assert await repo.version("a") == 81


async def test_next_activation_uses_the_snapshot() -> None:
    store = FaultyStore()
    async with open_aggregates(Snappy, store) as repo:
        await repo.create("s", OpenAccount("ann"))
        for i in range(4):
            await repo.execute("s", Deposit(10 + i))
        live = await repo.load("s")
    store.events_read = 0
    async with open_aggregates(Snappy, store) as repo:
        assert await repo.load("s") == live
        assert await repo.version("s") == 5
        assert store.events_read == 2  # only the events after the snapshot at 3


async def test_a_stored_snapshot_with_the_right_schema_is_used() -> None:
    # A snapshot that disagrees with the events (balance 999) shows that it was read.
    store = FaultyStore()
    await seed(store, Snappy, "s", AccountOpened("ann", 0), Deposited(1), Deposited(2))
    state = {"owner": "ann", "balance": 999, "overdraft_limit": 0, "closed": False}
    await store.save_snapshot(Snapshot("Snappy-s", 3, 1, "snappy", json.dumps(state).encode()))
    async with open_aggregates(Snappy, store) as repo:
        assert (await repo.load("s")).balance == 999
        assert store.events_read == 0


async def test_a_changed_snapshot_schema_ignores_the_old_snapshot() -> None:
    store = FaultyStore()
    await seed(store, Snappy, "s", AccountOpened("ann", 0), Deposited(1), Deposited(2))
    state = {"owner": "ann", "balance": 999, "overdraft_limit": 0, "closed": False}
    await store.save_snapshot(Snapshot("Snappy-s", 3, 1, "snappy", json.dumps(state).encode()))
    async with open_aggregates(SnappyV2, store) as repo:
        assert await repo.load("s") == SnappyV2("ann", 3, 0, False)
        assert store.events_read == 3  # rebuilt from every event
        assert await repo.version("s") == 3


async def test_a_snapshot_of_another_state_shape_is_ignored_even_with_the_same_schema(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A field renamed without bumping snapshot_schema: the old snapshot would
    structure with a default for the new field (silently wrong); it is ignored,
    with a warning naming the difference, and the state rebuilt from the events."""
    store = FaultyStore()
    await seed(store, Snappy, "s", AccountOpened("ann", 0), Deposited(1), Deposited(2))
    old_shape = {"owner": "ann", "cents": 999, "overdraft_limit": 0, "closed": False}
    await store.save_snapshot(Snapshot("Snappy-s", 3, 1, "snappy", json.dumps(old_shape).encode()))
    async with open_aggregates(Snappy, store) as repo:
        assert (await repo.load("s")).balance == 3
        assert store.events_read == 3  # rebuilt from every event
    assert "missing ['balance'], unknown ['cents']" in caplog.text


async def test_a_snapshot_of_another_state_type_is_ignored() -> None:
    store = FaultyStore()
    await seed(store, Snappy, "s", AccountOpened("ann", 0), Deposited(4))
    await store.save_snapshot(Snapshot("Snappy-s", 2, 1, "something.else", b'{"balance": 999}'))
    async with open_aggregates(Snappy, store) as repo:
        assert (await repo.load("s")).balance == 4
        assert store.events_read == 2


async def test_an_unreadable_snapshot_falls_back_to_the_events() -> None:
    store = InMemoryEventStore()
    await seed(store, Snappy, "s", AccountOpened("ann", 0), Deposited(4))
    await store.save_snapshot(Snapshot("Snappy-s", 2, 1, "snappy", b"corrupt"))
    async with open_aggregates(Snappy, store) as repo:
        assert (await repo.load("s")).balance == 4


@attrs.define
class UpcastingAccount(bank.Account):
    category = "Account"
    snapshot_every = None
    upcasters: ClassVar[dict[str, Any]] = {
        "legacy.deposit": lambda d: ("account.deposited", {"amount": d["cents"], "reference": None})
    }


async def test_old_event_shapes_are_upcast_on_load() -> None:
    store = InMemoryEventStore()
    opened = NewEvent(*Account.codec().encode(AccountOpened("ann", 0)))
    legacy = NewEvent("legacy.deposit", b'{"cents": 250}')
    await store.append("Account-old", [opened, legacy], expected_version=0)
    async with open_aggregates(UpcastingAccount, store) as repo:
        assert (await repo.load("old")).balance == 250
        assert await repo.execute("old", Withdraw(50)) == 3
        assert [e.event for e in await repo.history("old")][1] == Deposited(250)
    async with open_aggregates(Account, store) as repo:  # without the upcaster
        with pytest.raises(UnknownEventType, match=r"legacy\.deposit"):
            await repo.load("old")


# -- bad data and failing stores ----------------------------------------------


async def test_unreadable_streams_fail_only_their_own_callers(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        await repo.create("good", OpenAccount("g"))
        opened = NewEvent(*Account.codec().encode(AccountOpened("x", 0)))
        await repo.store.append(
            "Account-alien",
            [opened, NewEvent("account.teleported", b"{}")],
            expected_version=0,
        )
        await repo.store.append(
            "Account-corrupt",
            [opened, NewEvent("account.deposited", b"{not json")],
            expected_version=0,
        )
        with pytest.raises(UnknownEventType, match=r"account\.teleported.*Account-alien@2"):
            await repo.execute("alien", Deposit(1))
        with pytest.raises(EventDecodeError, match="Account-corrupt@2") as info:
            await repo.execute("corrupt", Deposit(1))
        assert not isinstance(info.value, UnknownEventType)
        with pytest.raises(UnknownEventType):
            await repo.load("alien")
        with pytest.raises(UnknownEventType):
            await repo.history("alien")
        with pytest.raises(EventDecodeError):
            await repo.replay("corrupt")
        assert "alien" not in repo.registry
        assert "corrupt" not in repo.registry
        assert not repo.registry.closed
        assert repo.registry.statistics().start_failures == 3
        assert await repo.execute("good", Deposit(1)) == 2
        assert await repo.create("new", OpenAccount("n")) == 1


async def test_store_failure_on_append_is_the_answer_and_the_aggregate_rebuilds() -> None:
    store = FaultyStore()
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(10))
        store.fail("append", disk_full())
        with pytest.raises(StoreError, match="disk full") as info:
            await repo.execute("a", Deposit(5))
        assert isinstance(info.value.__cause__, OSError)
        assert "a" in repo.registry  # the aggregate stays; its state is rebuilt before use
        assert repo.registry.statistics().crashes == 0  # an answer, not a crash
        assert await stored(store, Account, "a") == 2
        store.heal("append")
        assert await repo.execute("a", Deposit(5)) == 3
        assert (await repo.load("a")).balance == 15
        assert repo.registry.statistics().activations == 1


async def test_store_failure_on_load_reaches_the_caller() -> None:
    store = FaultyStore()
    await seed(store, Account, "a", AccountOpened("ann", 0))
    async with open_aggregates(Account, store) as repo:
        store.fail("read", StoreError("connection lost"))
        with pytest.raises(StoreError, match="connection lost"):
            await repo.execute("a", Deposit(1))
        assert "a" not in repo.registry
        store.heal("read")
        assert await repo.execute("a", Deposit(1)) == 2


@pytest.mark.parametrize("key", [[1], 3.5, None, True, b"bytes", ("t",)], ids=repr)
async def test_invalid_keys_are_refused(key: Any, aggregates: Repositories) -> None:
    repo = aggregates[Account]
    with pytest.raises(InvalidKey) as info:
        await repo.execute(key, Deposit(1))
    assert isinstance(info.value, TypeError)
    with pytest.raises(InvalidKey):
        await repo.create(key, OpenAccount("x"))
    with pytest.raises(InvalidKey):
        await repo.load(key)
    with pytest.raises(InvalidKey):
        await repo.version(key)
    with pytest.raises(InvalidKey):
        await repo.replay(key)
    with pytest.raises(InvalidKey):
        await repo.history(key)
    assert len(repo.registry) == 0
    assert repo.registry.statistics().starting == 0


# -- load, version, lifetime ----------------------------------------------------


async def test_load_returns_a_copy_and_version_the_version(target: Any) -> None:
    async with open_aggregates(Ledger, target) as repo:
        await repo.create("l", OpenAccount("ann"))
        await repo.execute("l", AddLines("x", 2))
        copy = await repo.load("l")
        copy.balance = 1_000_000
        copy.lines.append("forged")
        assert await repo.load("l") == Ledger("ann", 0, 0, False, ["x:0", "x:1"])
        assert await repo.version("l") == 3


async def test_leaving_the_block_ends_every_aggregate(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        for i in range(5):
            await repo.create(f"k{i}", OpenAccount(str(i)))
        assert len(repo.registry) == 5
    stats = repo.registry.statistics()
    assert (stats.live, stats.normal_ends, stats.crashes, stats.closed) == (0, 5, 0, True)
    assert len(repo.registry) == 0
    with pytest.raises(RegistryClosed):
        await repo.execute("k0", Deposit(1))
    assert repo.aggregate_type is Account


async def test_commands_still_queued_at_exit_get_an_answer() -> None:
    store = FaultyStore()
    results: dict[int, object] = {}

    async def send(repo: Any, i: int) -> None:
        try:
            results[i] = await repo.execute("a", Deposit(1, f"r{i}"))
        except RegistryClosed as exc:
            results[i] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as outer, open_aggregates(Account, store) as repo:
            await repo.create("a", OpenAccount("ann"))
            latch = store.hold("append")
            for i in range(3):
                outer.start_soon(send, repo, i)
                await trio.testing.wait_all_tasks_blocked()
            assert latch.waiting == 1  # r0 is being stored, r1 and r2 are queued
            latch.release()
    assert results[0] == 2, results  # the command in hand completes
    assert isinstance(results[1], RegistryClosed)
    assert isinstance(results[2], RegistryClosed)
    async with open_aggregates(Account, store) as repo:
        assert references(await repo.history("a")) == [None, "r0"]


async def test_cancelling_the_block_is_a_clean_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.move_on_after(1) as scope:
        async with open_aggregates(Account, InMemoryEventStore()) as repo:
            await repo.create("a", OpenAccount("ann"))
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_metadata_ids_with_quotes_and_unicode_round_trip(aggregates: Repositories) -> None:
    awkward = 'a"b\\c\n\u00e9\U0001f600'
    repo = aggregates[Account]
    await repo.create("q", OpenAccount("q"), correlation_id=awkward, causation_id="</x>")
    (opened,) = await repo.history("q")
    assert opened.metadata["correlation_id"] == awkward
    assert opened.metadata["causation_id"] == "</x>"


async def test_default_command_ids_are_unique(aggregates: Repositories) -> None:
    repo = aggregates[Account]
    await repo.create("u", OpenAccount("u"))
    for _ in range(20):
        await repo.execute("u", Deposit(1))
    history = await repo.history("u")
    ids = [e.metadata["command_id"] for e in history]
    assert len(set(ids)) == len(ids) == 21


# -- issue 8: every promise holds (create races, one stream one aggregate, fresh
# -- refusals, tentative apply, idempotent commands, store errors) ---------------


@attrs.frozen
class Poison:
    pass


@event_type("touchy.poisoned")
@attrs.frozen
class Poisoned:
    pass


@attrs.define
class TouchyAccount(bank.Account):
    """An account whose applier for Poisoned changes the state, then raises."""

    category = "Touchy"
    snapshot_every = None

    @handles
    def poison(self, command: Poison) -> Poisoned:
        return Poisoned()

    @applies
    def poisoned(self, event: Poisoned) -> None:
        self.balance = -999
        raise ZeroDivisionError("applier bug")


async def outcome_of(call: Any) -> object:
    try:
        return await call
    except AggregateNotFound as exc:
        return exc


@pytest.mark.parametrize("first", ["execute", "load", "version"])
async def test_create_racing_a_first_call_on_a_new_key_creates(target: Any, first: str) -> None:
    async with open_aggregates(Account, target) as repo:
        for i in range(20):
            key = f"new{i}"
            results: dict[str, object] = {}

            async def other(key: str = key, results: dict[str, object] = results) -> None:
                if first == "execute":
                    call = repo.execute(key, Deposit(1))
                else:
                    call = getattr(repo, first)(key)
                results["other"] = await outcome_of(call)

            async def create(key: str = key, results: dict[str, object] = results) -> None:
                results["create"] = await repo.create(key, OpenAccount("ann"))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(other)  # first: it activates the key
                    nursery.start_soon(create)
            assert results["create"] == 1, (key, results)
            if not isinstance(results["other"], AggregateNotFound):
                assert first != "execute" or results["other"] == 2
            assert await repo.version(key) in (1, 2)
        assert repo.registry.statistics().crashes == 0


async def test_a_missing_key_leaves_no_task_behind(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        with pytest.raises(AggregateNotFound):
            await repo.version("ghost")
        assert "ghost" not in repo.registry
        assert repo.registry.statistics().live == 0


async def test_keys_naming_one_stream_are_one_aggregate(target: Any) -> None:
    store = FaultyStore() if target == "memory" else target
    ident = uuid.UUID(int=0xABC)
    async with open_aggregates(Account, store) as repo:
        assert await repo.create(1, OpenAccount("one")) == 1
        assert await repo.create(ident, OpenAccount("uuid")) == 1
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(repo.execute, 1 if i % 2 else "1", Deposit(1))
                    nursery.start_soon(repo.execute, ident if i % 2 else str(ident), Deposit(1))
        assert set(repo.registry.keys()) == {"1", str(ident)}
        stats = repo.registry.statistics()
        assert (stats.live, stats.activations) == (2, 2)
        assert await repo.version("1") == await repo.version(1) == 11
        assert (await repo.load(str(ident))).balance == (await repo.load(ident)).balance == 10
        with pytest.raises(AlreadyExists):
            await repo.create("1", OpenAccount("again"))
        if isinstance(store, FaultyStore):
            assert store.calls["append"] == 22  # no conflict between two live copies: no retries


async def test_a_category_with_a_dash_is_refused_when_used() -> None:
    @attrs.define
    class Later(bank.Account):
        category = "Later"

    Later.category = "Later-on"  # "Later-on" + "x" would be "Later" + "on-x"
    with pytest.raises(InvalidArgument, match="'-'"):
        async with open_aggregates(Later, InMemoryEventStore()):
            pass  # pragma: no cover
    with pytest.raises(InvalidArgument):
        Later.stream_name("x")


async def test_a_runtime_behind_the_store_does_not_reject_on_stale_state(target: Any) -> None:
    async with open_aggregates(Account, target) as a, open_aggregates(Account, target) as b:
        await a.create("x", OpenAccount("ann"))
        assert await a.version("x") == 1  # a is live, at balance 0
        assert await b.execute("x", Deposit(100)) == 2
        assert await a.execute("x", Withdraw(50)) == 3  # decided on the store's state
        assert (await a.load("x", fresh=False)).balance == 50
        with pytest.raises(bank.InsufficientFunds):  # a true refusal is still one
            await a.execute("x", Withdraw(51))


async def test_a_runtime_behind_the_store_takes_a_correct_expected_version(target: Any) -> None:
    async with open_aggregates(Account, target) as a, open_aggregates(Account, target) as b:
        await a.create("x", OpenAccount("ann"))
        assert await a.version("x") == 1
        assert await b.execute("x", Deposit(1)) == 2
        assert await a.execute("x", Deposit(1), expected_version=2) == 3


async def test_a_wrong_expected_version_reports_the_stores_version(target: Any) -> None:
    async with open_aggregates(Account, target) as a, open_aggregates(Account, target) as b:
        await a.create("x", OpenAccount("ann"))
        assert await a.version("x") == 1
        await b.execute("x", Deposit(1))
        await b.execute("x", Deposit(1))
        with pytest.raises(WrongExpectedVersion) as info:
            await a.execute("x", Deposit(1), expected_version=2)  # a is at 1, the store at 3
        assert (info.value.expected, info.value.actual) == (2, 3)


async def test_load_and_version_are_fresh_unless_told_otherwise(target: Any) -> None:
    async with open_aggregates(Account, target) as a, open_aggregates(Account, target) as b:
        await a.create("x", OpenAccount("ann"))
        assert await a.version("x") == 1
        await b.execute("x", Deposit(7))
        assert await a.version("x", fresh=False) == 1  # from memory
        assert (await a.load("x", fresh=False)).balance == 0
        assert await a.version("x") == 2  # every event committed before the call
        assert (await a.load("x")).balance == 7
        await b.execute("x", Deposit(1))
        assert (await a.load("x")).balance == 8
        assert await a.execute("x", Deposit(1)) == 4  # no conflict: a caught up


async def test_an_applier_that_raises_fails_the_command_and_stores_nothing(target: Any) -> None:
    async with open_aggregates(TouchyAccount, target) as repo:
        await repo.create("a", OpenAccount("ann"))
        await repo.execute("a", Deposit(10))
        with pytest.raises(AggregateCrashed) as info:
            await repo.execute("a", Poison())
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert await stored(repo.store, TouchyAccount, "a") == 2  # nothing stored
        assert "a" in repo.registry  # still serving, with its previous state
        assert (await repo.load("a")).balance == 10
        assert await repo.execute("a", Deposit(1)) == 3
        stats = repo.registry.statistics()
        assert (stats.crashes, stats.activations) == (0, 1)
        store = repo.store if isinstance(target, InMemoryEventStore) else target
    async with open_aggregates(TouchyAccount, store) as repo:  # no poisoned stream
        assert (await repo.load("a")).balance == 11


async def test_a_retry_after_a_timeout_is_applied_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    store.delay("append", 10.0)
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        with pytest.raises(CallTimeout):
            await repo.execute("a", Deposit(5), command_id="c1", timeout=1.0)
        # the first is being stored still; the retry is answered with its outcome
        assert await repo.execute("a", Deposit(5), command_id="c1") == 2
        assert await repo.execute("a", Deposit(5), command_id="c1") == 2
        assert await stored(store, Account, "a") == 2
        assert (await repo.load("a")).balance == 5
        assert await repo.execute("a", Deposit(5), command_id="c2") == 3


async def test_a_retry_after_a_cancellation_is_applied_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    store.delay("append", 10.0)
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        async with trio.open_nursery() as nursery:
            # one being stored, one queued behind it: cancel both callers
            with trio.move_on_after(1.0):
                first = functools.partial(repo.execute, "a", Deposit(5), command_id="c1")
                nursery.start_soon(first)
                await trio.testing.wait_all_tasks_blocked()
                await repo.execute("a", Deposit(7), command_id="c2")
            nursery.cancel_scope.cancel()
        assert await repo.execute("a", Deposit(5), command_id="c1") == 2
        assert await repo.execute("a", Deposit(7), command_id="c2") in (2, 3)
        history = await repo.history("a")
        assert sorted(e.metadata["command_id"] for e in history[1:]) in (["c1"], ["c1", "c2"])
        assert [e.metadata["command_id"] for e in history].count("c1") == 1


async def test_a_retry_after_an_unknown_outcome_is_applied_once() -> None:
    store = FaultyStore()
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        # The append commits, then raises: COMMIT's answer is lost.
        store.fail("append", StoreError("connection lost during COMMIT"), after_commit=True)
        with pytest.raises(StoreError, match="COMMIT"):
            await repo.execute("a", Deposit(5), command_id="c1")
        store.heal("append")
        assert await repo.execute("a", Deposit(5), command_id="c1") == 2
        assert (await repo.load("a")).balance == 5
        assert await stored(store, Account, "a") == 2


async def test_retries_after_a_restart_are_applied_once(target: Any) -> None:
    store = target
    async with open_aggregates(Account, store) as repo:
        assert await repo.create("a", OpenAccount("ann"), command_id="open") == 1
        assert await repo.execute("a", Deposit(5), command_id="d1") == 2
        assert await repo.execute("a", Withdraw(5), command_id="w1") == 3
    async with open_aggregates(Account, store) as repo:  # a fresh runtime: nothing in memory
        assert await repo.execute("a", Deposit(5), command_id="d1") == 2  # refused by the store
        assert await repo.create("a", OpenAccount("ann"), command_id="open") == 1
        # refused by the state the first application made (balance 0): looked up
        assert await repo.execute("a", Withdraw(5), command_id="w1") == 3
        with pytest.raises(bank.InsufficientFunds):
            await repo.execute("a", Withdraw(5), command_id="w2")
        with pytest.raises(AlreadyExists):
            await repo.create("a", OpenAccount("ann"), command_id="open2")
        assert await repo.version("a") == 3
        assert (await repo.load("a")).balance == 0


async def test_a_retry_from_another_runtime_is_applied_once(target: Any) -> None:
    async with open_aggregates(Account, target) as a, open_aggregates(Account, target) as b:
        await a.create("x", OpenAccount("ann"))
        assert await b.version("x") == 1  # b is live too, and stays at version 1
        assert await a.execute("x", Deposit(5), command_id="c1") == 2
        assert await b.execute("x", Deposit(5), command_id="c1") == 2
        assert await b.execute("x", Deposit(5), expected_version=2, command_id="c1") == 2
        assert await a.version("x") == await b.version("x") == 2


async def test_every_caller_gets_a_store_error_while_writes_fail() -> None:
    store = FaultyStore()
    async with open_aggregates(Account, store) as repo:
        await repo.create("a", OpenAccount("ann"))
        store.fail("append", disk_full())
        errors: list[BaseException] = []

        async def deposit() -> None:
            try:
                await repo.execute("a", Deposit(1))
            except TrioAggregatesError as exc:
                errors.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(deposit)
        assert [type(e) for e in errors] == [StoreError] * 10
        # the state is rebuilt before each command; a failed rebuild fails that command
        store.fail("read", StoreError("connection lost"))
        with pytest.raises(StoreError, match="connection lost"):
            await repo.execute("a", Deposit(1))
        store.heal()
        assert await repo.execute("a", Deposit(1)) == 2
        assert repo.registry.statistics().activations == 1


async def test_command_ids_must_be_non_empty_strings(aggregates: Repositories) -> None:
    repo = aggregates[Account]
    await repo.create("a", OpenAccount("ann"))
    for bad in ["", 5]:
        with pytest.raises(InvalidArgument):
            await repo.execute("a", Deposit(1), command_id=bad)  # type: ignore[arg-type]


async def test_errors_name_the_key_as_the_caller_gave_it() -> None:
    async with open_aggregates(Account, "memory://") as accounts:
        with pytest.raises(AggregateNotFound) as info:
            await accounts.execute(5, Deposit(1))
        assert info.value.key == 5
        with pytest.raises(AggregateNotFound) as info:
            await accounts.load("5")
        assert info.value.key == "5"


# -- for the protocol server: create-if-missing, extra metadata, version and reply --


async def test_create_if_missing_creates_or_executes_in_one_call(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        assert await repo.execute("a", OpenAccount("ann"), create_if_missing=True) == 1
        assert await repo.execute("a", Deposit(5), create_if_missing=True) == 2
        assert await repo.load("a") == Account("ann", 5, 0, False)
        # the handler decides on a fresh state for a new key: refusals as usual
        with pytest.raises(bank.InsufficientFunds):
            await repo.execute("b", Withdraw(5), create_if_missing=True)
        with pytest.raises(AggregateNotFound):
            await repo.version("b")
        # expected_version still holds: 0 means "only if new"
        with pytest.raises(WrongExpectedVersion):
            await repo.execute("a", Deposit(1), create_if_missing=True, expected_version=0)
        assert await repo.execute("c", Deposit(1), create_if_missing=True, expected_version=0) == 1
        assert await stored(repo.store, Account, "a") == 2


async def test_create_if_missing_is_idempotent_with_a_command_id(target: Any) -> None:
    async with open_aggregates(Account, target) as repo:
        for _ in range(2):
            version = await repo.execute(
                "a", Deposit(5), create_if_missing=True, command_id="dep-1"
            )
            assert version == 1
        assert await stored(repo.store, Account, "a") == 1


async def test_extra_metadata_is_merged_into_each_events_metadata(target: Any) -> None:
    async with open_aggregates(Ledger, target) as repo:
        await repo.create("l", OpenAccount("ann"), metadata={"user": "bob", "n": [1, 2]})
        await repo.execute(
            "l", AddLines("x", 2), metadata={"ip": "::1"}, correlation_id="corr", command_id="c"
        )
        await repo.execute("l", AddLines("y", 1), metadata={})
        first, *lines, last = await repo.history("l")
        assert first.metadata["user"] == "bob" and first.metadata["n"] == [1, 2]
        assert first.metadata["command"] == "OpenAccount"
        for event in lines:
            assert event.metadata["ip"] == "::1"
            assert event.metadata["correlation_id"] == "corr"
            assert event.metadata["command_id"] == "c"
            assert event.metadata["command"] == "AddLines"
            assert isinstance(event.metadata["at"], float)
        assert set(last.metadata) == {"command_id", "command", "at"}


@pytest.mark.parametrize(
    "metadata",
    [
        {"command_id": "x"},
        {"correlation_id": "x"},
        {"causation_id": "x"},
        {"command": "x"},
        {"at": 1},
        {1: "x"},
        {"bad": object()},
        ["not", "a", "mapping"],
    ],
)
async def test_bad_extra_metadata_is_refused_before_anything_happens(
    metadata: Any, aggregates: Repositories
) -> None:
    repo = aggregates[Account]
    with pytest.raises(InvalidArgument):
        await repo.create("a", OpenAccount("ann"), metadata=metadata)
    with pytest.raises(InvalidArgument):
        await repo.execute("a", OpenAccount("ann"), metadata=metadata, create_if_missing=True)
    assert len(repo.registry) == 0
    assert await stored(repo.store, Account, "a") == 0


@attrs.define
class Teller(bank.Account):
    """An account whose deposit replies with the new balance."""

    category = "Teller"

    @handles
    def deposit(self, command: Deposit) -> Decision:
        return Decision([Deposited(command.amount)], reply=self.balance + command.amount)


async def test_execute_detailed_gives_the_version_and_the_reply(target: Any) -> None:
    async with open_aggregates(Teller, target) as repo:
        assert await repo._execute_detailed("t", OpenAccount("ann"), mode=NEW) == (1, None)
        assert await repo._execute_detailed("t", Deposit(4)) == (2, 4)
        assert await repo.execute("t", Deposit(1)) == 5  # the public form: the reply only
        assert await repo._execute_detailed("t", bank.GetBalance()) == (3, 5)
        assert await repo._execute_detailed("t", Deposit(2), dry_run=True) == (3, [Deposited(2)])
        assert await repo._execute_detailed("u", Deposit(2), mode=ANY) == (1, 2)
        with pytest.raises(AlreadyExists):
            await repo._execute_detailed("t", OpenAccount("ann"), mode=NEW)
        with pytest.raises(AggregateNotFound):
            await repo._execute_detailed("v", Deposit(2))
        # a retried command id: the first version, no reply (the runtime keeps versions)
        assert await repo._execute_detailed("t", Deposit(1), command_id="d") == (4, 6)
        assert await repo._execute_detailed("t", Deposit(1), command_id="d") == (4, None)
        assert await repo.version("t") == 4


@given(
    command=st.sampled_from(
        [bank.Deposit(1, "r"), bank.Withdraw(2, None), bank.OpenAccount("o"), bank.GetBalance()]
    ),
    mode=st.sampled_from([EXISTING, ANY, NEW]),
    expected=st.none() | st.integers(0, 5),
    dry_run=st.booleans(),
    command_id=st.none() | st.text(min_size=1, max_size=5),
    correlation_id=st.none() | st.text(max_size=5),
    causation_id=st.none() | st.text(max_size=5),
    metadata=st.none() | st.dictionaries(st.sampled_from(["who", "why"]), st.text(max_size=3)),
)
def test_the_plain_request_shortcut_makes_what_request_makes(
    command: object,
    mode: int,
    expected: int | None,
    dry_run: bool,
    command_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    metadata: dict[str, str] | None,
) -> None:
    """``_detailed_request`` (the protocol server's) skips ``_request`` for a
    request with no id, metadata or expected version, once its command class
    is known: the record it makes is the one ``_request`` would."""
    make = AggregateRepository._request
    make(command, EXISTING, None, False, False, None, None, None)  # the class is known
    repository = AggregateRepository.__new__(AggregateRepository)  # uses no state
    made = repository._detailed_request(
        command, mode, expected, dry_run, command_id, correlation_id, causation_id, metadata
    )
    wanted = make(
        command, mode, 0 if mode == NEW else expected, dry_run, dry_run,
        command_id, correlation_id, causation_id, metadata, detailed=True,
    )  # fmt: skip
    assert msgspec.structs.astuple(made) == msgspec.structs.astuple(wanted)
