"""Group commit: batching the writes of many tasks into one transaction.

This module knows nothing of databases: :class:`_GroupCommit` takes a batch
function (``run_batch``) and the durable store core (``_durable.py``) gives
it one that writes a batch in one transaction.

Writes queue up while a transaction is being written; the next transaction
writes all of them. The first waiting writer becomes the *leader* and runs the
batch (through ``run_batch``, in a worker thread for the SQL stores), then hands the
lead to the next queued task. There is no background task, so no hidden
nursery and no exception group can escape a store's ``open_*``.

A queued writer sleeps in :func:`trio.lowlevel.wait_task_rescheduled` (no
``trio.Event`` per write): the leader wakes it directly with its outcome, or
with the lead.

Cancellation: a write still in the queue is withdrawn (nothing is written);
once its transaction has begun, it completes and the caller gets its real
result, the cancellation taking effect at the next checkpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar, final

import attrs
import outcome
import trio

from .._core._exceptions import StoreError

__all__ = ["StoreStatistics"]


@attrs.frozen
class StoreStatistics:
    """Counters of a durable store's writer, from ``statistics()``.

    Attributes:
        transactions: write transactions committed. With group commit this is
            far below ``writes`` when many tasks write at once.
        appends: ``append`` calls that committed.
        writes: write calls (appends, snapshots, deletes) that committed.
        failed_writes: write calls that failed (conflicts, deleted streams,
            driver errors).
        pending_writes: write calls queued for the next transaction right now.
    """

    transactions: int
    appends: int
    writes: int
    failed_writes: int
    pending_writes: int


# -- group commit ------------------------------------------------------------

OpT = TypeVar("OpT")

# A request's states: queued; handed the lead (out of the queue); taken into a batch.
_PENDING: Final = 0
_PROMOTED: Final = 1
_TAKEN: Final = 2

# What a queued writer is woken with when it becomes the leader (the results
# of writes are ints or None, never this).
_LEAD: Final = object()


@final
class _Request(Generic[OpT]):
    """One queued write: its op, its state, and the task sleeping on it."""

    __slots__ = ("op", "state", "task")

    def __init__(self, op: OpT, task: trio.lowlevel.Task | None) -> None:
        self.op = op
        self.state = _PENDING
        self.task = task  # None for the leader's own write: it never sleeps


@attrs.frozen
class _BatchResult:
    outcomes: list[outcome.Outcome[Any]]
    committed: bool


@final
class _GroupCommit(Generic[OpT]):
    """Batches writes from many tasks into one transaction, written in a worker thread.

    There is no background task: the first writer to arrive becomes the
    *leader*, takes every queued write, and awaits ``run_batch`` on them
    (shielded from cancellation); writes arriving meanwhile queue up, each task
    asleep in ``wait_task_rescheduled``. When its batch is done, the leader
    reschedules every writer of the batch with its outcome, then hands
    leadership to the first queued write's task, which writes the next batch.
    ``run_batch`` must return one outcome per write, in order, and
    ``committed`` (whether the transaction committed).

    ``max_batches`` batches may be written at once (each by its own leader):
    a writer that arrives while fewer are in flight leads at once. With more
    than one, ``run_batch`` must be safe to run concurrently (each batch on
    its own connection, say). A batch's writes keep their order of arrival;
    batches in flight together are not ordered. Both durable stores use one
    (see ``_batches_in_flight`` in ``_postgres.py`` for why).

    Cancellation: a write still queued is withdrawn (nothing is written): the
    abort function removes it from the queue. Once taken into a batch it cannot
    be withdrawn (the abort function refuses): the call waits for the
    transaction and returns its result (or raises its error); the cancellation
    takes effect at the caller's next checkpoint. So a cancelled write was
    either committed entirely or not at all. A write handed the lead has been
    rescheduled already, so it leads (shielded) whatever happens.
    """

    __slots__ = (
        "_idle",
        "_is_append",
        "_leaders",
        "_max_batches",
        "_pending",
        "_run_batch",
        "appends",
        "failed_writes",
        "transactions",
        "writes",
    )

    def __init__(
        self,
        run_batch: Callable[[list[OpT]], Awaitable[_BatchResult]],
        is_append: Callable[[OpT], bool],
        *,
        max_batches: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self._is_append = is_append
        self._max_batches = max_batches
        # The queued writes, in order of arrival (a writer handed the lead
        # leaves the queue). Invariant: the queue is empty unless
        # ``_leaders == _max_batches`` (a free slot takes the whole queue).
        self._pending: list[_Request[OpT]] = []
        # Batches being written right now, each by its leader.
        self._leaders = 0
        # Made only when someone waits for the writer to go idle (aclose).
        self._idle: trio.Event | None = None
        self.transactions = 0
        self.appends = 0
        self.writes = 0
        self.failed_writes = 0

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            transactions=self.transactions,
            appends=self.appends,
            writes=self.writes,
            failed_writes=self.failed_writes,
            pending_writes=len(self._pending),
        )

    async def submit(self, op: OpT) -> Any:
        """Queue ``op`` for the next transaction; return its result or raise its error.

        Cancellation: while ``op`` is queued, it is withdrawn (never handed to
        ``run_batch``) and :exc:`trio.Cancelled` is raised; once taken into a
        batch (or leading one), the call returns the op's outcome and the
        cancellation takes effect at the caller's next checkpoint.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._leaders < self._max_batches:
            self._leaders += 1
            request = _Request(op, None)
            request.state = _PROMOTED
            return await self._lead(request)
        request = _Request(op, trio.lowlevel.current_task())
        self._pending.append(request)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if request.state == _PENDING:
                # Not written, and now never will be.
                self._pending.remove(request)
                return trio.lowlevel.Abort.SUCCEEDED
            # Taken into a batch: its outcome is coming; the cancellation waits
            # for the next checkpoint.
            return trio.lowlevel.Abort.FAILED

        # Woken with the write's outcome (returned or raised), or with the lead.
        result = await trio.lowlevel.wait_task_rescheduled(abort)
        if result is _LEAD:
            return await self._lead(request)
        return result

    # Ctrl-C: never raised in here, where it would leave the batch's writers
    # unanswered or turn into their error; Trio delivers it to the main task
    # instead (the PostgreSQL store runs its usual write in this frame).
    @trio.lowlevel.enable_ki_protection
    async def _lead(self, own: _Request[OpT]) -> Any:
        """Write the queued batch (``own`` among it); return ``own``'s result.

        Shielded from cancellation and protected from :exc:`KeyboardInterrupt`
        (see :func:`trio.lowlevel.enable_ki_protection`): once a batch is
        taken, every writer in it gets its outcome.
        """
        own.task = None
        own_result: outcome.Outcome[Any] | None = None
        with trio.CancelScope(shield=True):
            try:
                # Let the writes of tasks woken in this same tick join the batch.
                await trio.lowlevel.cancel_shielded_checkpoint()
                batch = [own, *self._pending]
                self._pending = []
                ops = []
                for request in batch:
                    request.state = _TAKEN
                    ops.append(request.op)
                try:
                    result = await self._run_batch(ops)
                except BaseException as exc:  # pragma: no cover - run_batch catches all
                    error = StoreError("internal error in the store's writer, please report")
                    error.__cause__ = exc
                    result = _BatchResult([outcome.Error(error) for _ in ops], committed=False)
                if result.committed:
                    self.transactions += 1
                writes = failed = appends = 0
                is_append = self._is_append
                reschedule = trio.lowlevel.reschedule
                for request, res in zip(batch, result.outcomes, strict=True):
                    if type(res) is outcome.Value:
                        writes += 1
                        if is_append(request.op):
                            appends += 1
                    else:
                        failed += 1
                    if request.task is None:
                        own_result = res
                    else:
                        reschedule(request.task, res)
                self.writes += writes
                self.appends += appends
                self.failed_writes += failed
            finally:
                self._hand_off()
        assert own_result is not None
        return own_result.unwrap()

    def _hand_off(self) -> None:
        if self._pending:
            # The slot passes to the first queued write.
            successor = self._pending.pop(0)
            successor.state = _PROMOTED
            assert successor.task is not None
            trio.lowlevel.reschedule(successor.task, outcome.Value(_LEAD))
        else:
            self._leaders -= 1
            if self._leaders == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        """Wait until every queued write is done."""
        while self._leaders:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
