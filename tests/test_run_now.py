"""An idle aggregate on the in-memory store runs a call in its caller's task.

The protocol server's hot path (``Registry._call_soon``) asks the aggregate's
runner (``AggregateRepository._run_now``) to run a command to its answer
right away when the aggregate's task waits for a message with nothing queued
and its store is exactly :class:`InMemoryEventStore`. These tests check that
this is invisible but for speed: the same answers, the same order, the same
crash, the same snapshots and idle timer as through the aggregate's task.
"""

from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing
from _examples import bank

from trio_aggregates import (
    AggregateCrashed,
    InMemoryEventStore,
    NewEvent,
    handles,
    open_aggregates,
)
from trio_aggregates._core._registry import Call
from trio_aggregates._runtime._command import EXISTING
from trio_aggregates.testing import FaultyStore

Account, OpenAccount, Deposit, Withdraw = (
    bank.Account,
    bank.OpenAccount,
    bank.Deposit,
    bank.Withdraw,
)


@attrs.frozen
class Explode:
    pass


@attrs.define
class ShakyAccount(bank.Account):
    category = "Shaky"
    snapshot_every = None

    @handles
    def explode(self, command: Explode) -> bank.Deposited:
        raise RuntimeError("handler bug")


class Answers:
    """A completion callback that keeps what it got, in order."""

    def __init__(self) -> None:
        self.got: list[outcome.Outcome[Any]] = []

    def __call__(self, result: outcome.Outcome[Any]) -> None:
        self.got.append(result)


def soon(repo: Any, key: str, command: object) -> tuple[Call | None, Answers]:
    answers = Answers()
    return repo._execute_soon(key, command, answers), answers


async def idle_account(repo: Any, key: str = "a") -> None:
    await repo.create(key, OpenAccount("ann"))
    await trio.testing.wait_all_tasks_blocked()  # its task waits in its mailbox


def deposited(amount: int) -> NewEvent:
    return NewEvent("account.deposited", b'{"amount":%d}' % amount, b"{}")


async def test_an_idle_aggregate_answers_before_the_call_returns() -> None:
    store = InMemoryEventStore()
    async with open_aggregates(Account, store) as repo:
        await idle_account(repo)
        call, answers = soon(repo, "a", Deposit(5))
        assert call is not None
        # Answered in this task: no checkpoint has passed.
        assert [a.unwrap() for a in answers.got] == [(2, None)]
        assert call.answered
        assert [r.type for r in await store.read(Account.stream_name("a"))] == [
            "account.opened",
            "account.deposited",
        ]
        assert (await repo.load("a")).balance == 5
        assert repo.registry.statistics().live == 1


async def test_a_store_that_is_not_exactly_the_memory_store_goes_through_the_task() -> None:
    async with open_aggregates(Account, FaultyStore()) as repo:
        await idle_account(repo)
        call, answers = soon(repo, "a", Deposit(5))
        assert call is not None
        assert answers.got == []  # queued: the aggregate's task answers it
        await trio.testing.wait_all_tasks_blocked()
        assert [a.unwrap() for a in answers.got] == [(2, None)]


async def test_a_message_in_the_mailbox_keeps_its_place() -> None:
    async with open_aggregates(Account, InMemoryEventStore()) as repo:
        await idle_account(repo)
        send = repo.registry.get("a")
        assert send is not None
        first = Call(
            repo._detailed_request(Deposit(1), EXISTING, None, False, None, None, None, None)
        )
        send.send_nowait(first)  # handed to the waiting task, which has not run yet
        call, answers = soon(repo, "a", Deposit(2))
        assert call is not None
        assert answers.got == []  # not run here: it would overtake the first
        assert await first.wait() == (2, None)
        await trio.testing.wait_all_tasks_blocked()
        assert [a.unwrap() for a in answers.got] == [(3, None)]
        assert (await repo.load("a")).balance == 3


async def test_a_refusal_reads_newer_events_first_and_a_conflict_rebuilds() -> None:
    store = InMemoryEventStore()
    stream = Account.stream_name("a")
    async with open_aggregates(Account, store) as repo:
        await idle_account(repo)
        # Another writer deposits 100: the live state (balance 0) is behind.
        await store.append(stream, [deposited(100)], expected_version=1)
        # Refused on the live state, decided again on the store's: accepted.
        call, answers = soon(repo, "a", Withdraw(60))
        assert call is not None
        assert [a.unwrap() for a in answers.got] == [(3, None)]
        # Another writer again; this deposit meets a conflict, rebuilds, retries.
        await store.append(stream, [deposited(7)], expected_version=3)
        call, answers = soon(repo, "a", Deposit(1))
        assert [a.unwrap() for a in answers.got] == [(5, None)]
        assert (await repo.load("a")).balance == 100 - 60 + 7 + 1
        # A real refusal, answered here too.
        call, answers = soon(repo, "a", Withdraw(1000))
        assert len(answers.got) == 1
        with pytest.raises(bank.InsufficientFunds):
            answers.got[0].unwrap()
        assert await repo.version("a") == 5


async def test_a_handler_bug_crashes_the_aggregate_task_as_usual() -> None:
    store = InMemoryEventStore()
    async with open_aggregates(ShakyAccount, store) as repo:
        await idle_account(repo)
        call, answers = soon(repo, "a", Explode())
        assert call is not None
        assert answers.got == []  # not answered here: the task runs it, and crashes
        await trio.testing.wait_all_tasks_blocked()
        assert len(answers.got) == 1
        with pytest.raises(AggregateCrashed) as info:
            answers.got[0].unwrap()
        assert isinstance(info.value.__cause__, RuntimeError)
        assert repo.registry.statistics().crashes == 1
        assert "a" not in repo.registry
        assert await repo.version("a") == 1  # nothing stored; it comes back


async def test_a_snapshot_falls_due_here_and_is_saved() -> None:
    store = InMemoryEventStore()
    async with open_aggregates(Account, store) as repo:
        await idle_account(repo)
        every = Account.snapshot_every
        for _ in range(every - 1):
            soon(repo, "a", Deposit(1))
        snapshot = await store.load_snapshot(Account.stream_name("a"))
        assert snapshot is not None
        assert snapshot.version == every
        assert (await repo.load("a")).balance == every - 1


async def test_a_call_run_here_rearms_the_idle_timer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_aggregates(Account, InMemoryEventStore(), idle_timeout=10) as repo:
        await idle_account(repo)
        await trio.sleep(8)
        _, answers = soon(repo, "a", Deposit(1))
        assert len(answers.got) == 1
        await trio.sleep(8)  # 16 s after the create, 8 after the deposit
        assert "a" in repo.registry
        await trio.sleep(4)
        assert "a" not in repo.registry
        assert repo.registry.statistics().passivations == 1
