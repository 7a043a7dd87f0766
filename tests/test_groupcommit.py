"""Group commit on its own: a fake batch function, no database.

The fake "writes" a batch by recording it, taking one second of (mock) time,
and answering each op ``op * 10``, or an error for the ops it is told to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing

from trio_aggregates._core._exceptions import StoreError
from trio_aggregates._stores._groupcommit import StoreStatistics, _BatchResult, _GroupCommit


class Refused(Exception):
    pass


@attrs.define
class FakeDatabase:
    """The batch function: records batches, who wrote them, and when."""

    duration: float = 1.0
    fail_ops: set[int] = attrs.Factory(set)
    fail_batches: bool = False
    raise_in_batch: bool = False
    gate: trio.Event | None = None
    ki_protected: list[bool] = attrs.Factory(list)
    batches: list[list[int]] = attrs.Factory(list)
    leaders: list[trio.lowlevel.Task] = attrs.Factory(list)
    started: list[float] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def run_batch(self, ops: list[int]) -> _BatchResult:
        self.batches.append(list(ops))
        self.ki_protected.append(trio.lowlevel.currently_ki_protected())
        fail = self.fail_batches  # decided when the batch begins
        self.leaders.append(trio.lowlevel.current_task())
        self.started.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(self.duration)
        if self.raise_in_batch:
            raise RuntimeError("the batch function itself broke")
        if fail:
            error = StoreError("disk full")
            return _BatchResult([outcome.Error(error) for _ in ops], committed=False)
        outcomes: list[outcome.Outcome[int]] = [
            outcome.Error(Refused(op)) if op in self.fail_ops else outcome.Value(op * 10)
            for op in ops
        ]
        return _BatchResult(list(outcomes), committed=True)

    async def wait_for_batch(self, number: int) -> None:
        """Wait until batch ``number`` (from 1) has begun."""
        while len(self.batches) < number:
            await self._changed.wait()

    @property
    def written(self) -> list[int]:
        return [op for batch in self.batches for op in batch]


async def start_in_order(nursery: trio.Nursery, fn: Callable[[int], Any], ops: list[int]) -> None:
    """Start a writer per op, each queued before the next starts (Trio shuffles
    tasks started together)."""
    for op in ops:
        nursery.start_soon(fn, op)
        await trio.testing.wait_all_tasks_blocked()


def make(
    db: FakeDatabase, is_append: Callable[[int], bool] = lambda op: op >= 0
) -> _GroupCommit[int]:
    return _GroupCommit(db.run_batch, is_append)


async def test_a_lone_write_is_a_batch_of_one(autojump_clock: trio.testing.MockClock) -> None:
    db = FakeDatabase()
    group = make(db)
    assert group.statistics() == StoreStatistics(0, 0, 0, 0, 0)
    assert await group.submit(4) == 40
    assert db.batches == [[4]]
    assert group.statistics() == StoreStatistics(
        transactions=1, appends=1, writes=1, failed_writes=0, pending_writes=0
    )
    # Nothing queued, so the next write leads again at once.
    assert await group.submit(5) == 50
    assert db.batches == [[4], [5]]
    assert db.started == [0.0, 1.0]


async def test_concurrent_writers_share_the_next_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase()
    group = make(db)
    results: dict[int, int] = {}

    async def write(op: int) -> None:
        results[op] = await group.submit(op)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)  # 0 is being written (for one second)
        await start_in_order(nursery, write, list(range(1, 11)))
        assert group.statistics().pending_writes == 10
    # The first write went alone; the ten that queued meanwhile shared one
    # transaction, in the order they arrived.
    assert db.batches == [[0], list(range(1, 11))]
    assert results == {op: op * 10 for op in range(11)}
    assert trio.current_time() == 2.0
    assert group.statistics() == StoreStatistics(2, 11, 11, 0, 0)


async def test_each_writer_gets_its_own_outcome(autojump_clock: trio.testing.MockClock) -> None:
    db = FakeDatabase(fail_ops={3, 6})
    # Only non-negative ops count as appends.
    group = make(db)
    results: dict[int, int | BaseException] = {}

    async def write(op: int) -> None:
        try:
            results[op] = await group.submit(op)
        except Refused as exc:
            results[op] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 100)
        await db.wait_for_batch(1)
        await start_in_order(nursery, write, [5, 3, -1, 6, 2])
    assert db.batches == [[100], [5, 3, -1, 6, 2]]
    assert results[5] == 50 and results[-1] == -10 and results[2] == 20 and results[100] == 1000
    assert isinstance(results[3], Refused) and results[3].args == (3,)
    assert isinstance(results[6], Refused) and results[6].args == (6,)
    stats = group.statistics()
    # One op that is not an append (-1) is a write but not an append.
    assert stats == StoreStatistics(
        transactions=2, appends=3, writes=4, failed_writes=2, pending_writes=0
    )


async def test_a_failing_batch_fails_every_write_in_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase()
    group = make(db)
    errors: list[BaseException] = []

    async def write(op: int) -> None:
        try:
            await group.submit(op)
        except StoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)
        db.fail_batches = True  # the next batch fails as a whole
        await start_in_order(nursery, write, [1, 2, 3, 4])
    assert db.batches == [[0], [1, 2, 3, 4]]
    assert [str(e) for e in errors] == ["disk full"] * 4
    assert group.statistics() == StoreStatistics(1, 1, 1, 4, 0)
    # The writer carries on.
    db.fail_batches = False
    assert await group.submit(7) == 70
    assert group.statistics().transactions == 2


async def test_a_batch_function_that_raises_gives_store_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase(raise_in_batch=True)
    group = make(db)
    with pytest.raises(StoreError, match="internal error") as info:
        await group.submit(1)
    assert isinstance(info.value.__cause__, RuntimeError)
    db.raise_in_batch = False
    assert await group.submit(2) == 20


async def test_the_lead_passes_to_the_first_queued_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase()
    group = make(db)
    tasks: dict[int, trio.lowlevel.Task] = {}

    async def write(op: int) -> None:
        tasks[op] = trio.lowlevel.current_task()
        assert await group.submit(op) == op * 10

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)
        await start_in_order(nursery, write, [1, 2, 3])
        await db.wait_for_batch(2)
        assert db.batches == [[0], [1, 2, 3]]
        await start_in_order(nursery, write, [4, 5])
    # No background task: each batch ran in the task of its first writer.
    assert db.batches == [[0], [1, 2, 3], [4, 5]]
    assert db.leaders == [tasks[0], tasks[1], tasks[4]]
    assert group._leaders == 0
    await group.wait_idle()  # idle: returns at once


async def test_a_queued_write_cancelled_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase()
    group = make(db)
    results: dict[int, int] = {}

    async def write(op: int) -> None:
        results[op] = await group.submit(op)

    scope = trio.CancelScope()

    async def cancellable(op: int) -> None:
        with scope:
            results[op] = await group.submit(op)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)
        nursery.start_soon(write, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancellable, 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(write, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert group.statistics().pending_writes == 3
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert group.statistics().pending_writes == 2
    assert scope.cancelled_caught
    # Withdrawn: never handed to the batch function, never answered.
    assert 2 not in db.written
    assert 2 not in results
    assert db.batches == [[0], [1, 3]]
    assert results == {0: 0, 1: 10, 3: 30}
    assert group.statistics() == StoreStatistics(2, 3, 3, 0, 0)


async def test_a_queued_leader_in_waiting_cancelled_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first queued write (the next leader) withdrawn: the lead goes to the next one."""
    db = FakeDatabase()
    group = make(db)
    results: dict[int, int] = {}
    tasks: dict[int, trio.lowlevel.Task] = {}

    async def write(op: int, scope: trio.CancelScope | None = None) -> None:
        tasks[op] = trio.lowlevel.current_task()
        with scope or trio.CancelScope():
            results[op] = await group.submit(op)

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)
        nursery.start_soon(write, 1, scope)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(write, 2)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert db.batches == [[0], [2]]
    assert db.leaders == [tasks[0], tasks[2]]
    assert results == {0: 0, 2: 20}


async def test_a_write_cancelled_mid_batch_completes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Taken into a batch, a write cannot be withdrawn: it returns its result,
    and the cancellation takes effect at its next checkpoint."""
    db = FakeDatabase()
    group = make(db)
    returned: dict[int, int] = {}
    reached_checkpoint: list[int] = []
    scopes = {op: trio.CancelScope() for op in range(4)}

    async def write(op: int) -> None:
        with scopes[op]:
            returned[op] = await group.submit(op)
            reached_checkpoint.append(op)
            await trio.lowlevel.checkpoint()
            raise AssertionError("not cancelled at the next checkpoint")  # pragma: no cover

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)
        # 0 leads its own batch: cancel it while the batch is being written.
        scopes[0].cancel()
        await start_in_order(nursery, write, [1, 2, 3])
        await db.wait_for_batch(2)
        assert db.batches == [[0], [1, 2, 3]]
        # 1 leads the second batch; 2 and 3 are in it: cancel them all mid-batch.
        for op in (1, 2, 3):
            scopes[op].cancel()
    assert returned == {0: 0, 1: 10, 2: 20, 3: 30}
    assert sorted(reached_checkpoint) == [0, 1, 2, 3]
    assert all(scope.cancelled_caught for scope in scopes.values())
    assert group.statistics() == StoreStatistics(2, 4, 4, 0, 0)


async def test_a_write_cancelled_before_the_call_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase()
    group = make(db)
    with trio.CancelScope() as scope:
        scope.cancel()
        await group.submit(1)
    assert scope.cancelled_caught
    assert db.batches == []
    assert group._leaders == 0


async def test_wait_idle_waits_for_every_queued_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase()
    group = make(db)
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, group.submit, [0, 1, 2, 3, 4])
        await db.wait_for_batch(1)
        await group.wait_idle()
        assert db.written == [0, 1, 2, 3, 4]
        assert trio.current_time() == 2.0
        assert group.statistics().pending_writes == 0


async def test_a_gated_batch_holds_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    """While a transaction is stuck, writes queue up; nothing runs twice."""
    db = FakeDatabase(gate=trio.Event())
    group = make(db)
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, group.submit, list(range(50)))
        await trio.sleep(1000)
        assert db.batches == [[0]]
        assert group.statistics().pending_writes == 49
        assert db.gate is not None
        db.gate.set()
    assert db.batches == [[0], list(range(1, 50))]


async def test_two_batches_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    """With ``max_batches=2`` a second writer leads at once; later ones queue
    for the first slot that frees, and share its batch."""
    db = FakeDatabase()
    group = _GroupCommit(db.run_batch, lambda op: True, max_batches=2)
    results: dict[int, int] = {}
    tasks: dict[int, trio.lowlevel.Task] = {}

    async def write(op: int) -> None:
        tasks[op] = trio.lowlevel.current_task()
        results[op] = await group.submit(op)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 0)
        await db.wait_for_batch(1)
        await trio.sleep(0.5)
        nursery.start_soon(write, 1)
        await db.wait_for_batch(2)  # in flight together with the first
        assert db.started == [0.0, 0.5]
        await start_in_order(nursery, write, [2, 3, 4])
        assert group.statistics().pending_writes == 3
        await db.wait_for_batch(3)
    # The first slot freed at 1.0: the queued writes went in one batch, led by
    # the first of them.
    assert db.batches == [[0], [1], [2, 3, 4]]
    assert db.started == [0.0, 0.5, 1.0]
    assert db.leaders == [tasks[0], tasks[1], tasks[2]]
    assert results == {op: op * 10 for op in range(5)}
    assert group.statistics() == StoreStatistics(3, 5, 5, 0, 0)
    assert group._leaders == 0
    await group.wait_idle()


async def test_wait_idle_waits_for_every_batch_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FakeDatabase(duration=2.0)
    group = _GroupCommit(db.run_batch, lambda op: True, max_batches=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(group.submit, 0)
        await db.wait_for_batch(1)
        await trio.sleep(1)
        nursery.start_soon(group.submit, 1)
        await db.wait_for_batch(2)
        await group.wait_idle()
        assert trio.current_time() == 3.0
        assert db.written == [0, 1]


async def test_a_batch_is_written_protected_from_ctrl_c(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ctrl-C is never raised inside a batch (it would leave its writers
    unanswered, or become their error): Trio delivers it to the main task."""
    db = FakeDatabase()
    group = make(db)
    assert not trio.lowlevel.currently_ki_protected()
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, group.submit, [1, 2, 3])
    assert await group.submit(4) == 40
    assert len(db.batches) >= 2
    assert db.ki_protected == [True] * len(db.batches)
