"""Group commit: the single writer path both durable stores share.

Writes queue up while a transaction is being written; the next transaction
writes all of them. The first waiting writer becomes the *leader* and runs the
batch (in a worker thread, through the store's ``run_batch``), then hands the
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

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar, final

import attrs
import outcome
import trio

from ._exceptions import StoreError
from ._store import NewEvent, Snapshot

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

# A request's states: queued; queued and handed the lead; taken into a batch.
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
        "_leading",
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
    ) -> None:
        self._run_batch = run_batch
        self._is_append = is_append
        self._pending: list[_Request[OpT]] = []
        self._leading = False
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
        """Queue ``op`` for the next transaction; return its result or raise its error."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._leading:
            self._leading = True
            request = _Request(op, None)
            request.state = _PROMOTED
            self._pending.append(request)
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

    async def _lead(self, own: _Request[OpT]) -> Any:
        """Write the queued batch (``own`` among it); return ``own``'s result."""
        own.task = None
        own_result: outcome.Outcome[Any] | None = None
        with trio.CancelScope(shield=True):
            try:
                # Let the writes of tasks woken in this same tick join the batch.
                await trio.lowlevel.cancel_shielded_checkpoint()
                batch, self._pending = self._pending, []
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
            successor = self._pending[0]
            successor.state = _PROMOTED
            assert successor.task is not None
            trio.lowlevel.reschedule(successor.task, outcome.Value(_LEAD))
        else:
            self._leading = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        """Wait until every queued write is done."""
        while self._leading:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


# -- the SQLite store -------------------------------------------------------


def _check_name(stream: object) -> None:
    if not isinstance(stream, str):
        raise TypeError(f"stream names are str, not {type(stream).__name__}")


@final
class _Append:
    __slots__ = ("events", "expected_version", "stream")

    def __init__(
        self, stream: str, events: Sequence[NewEvent], expected_version: int | None
    ) -> None:
        self.stream = stream
        self.events = events
        self.expected_version = expected_version


@final
class _SaveSnapshot:
    __slots__ = ("snapshot",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot


@final
class _Delete:
    __slots__ = ("hard", "stream")

    def __init__(self, stream: str, hard: bool) -> None:
        self.stream = stream
        self.hard = hard


_WriteOp = _Append | _SaveSnapshot | _Delete


def _describe(op: _WriteOp) -> str:
    """What a write does, for error messages."""
    if isinstance(op, _Append):
        return f"append to stream {op.stream!r}"
    if isinstance(op, _SaveSnapshot):
        return f"save a snapshot of stream {op.snapshot.stream!r}"
    return f"delete stream {op.stream!r}"


class _GroupCommitStore:
    """The write half of the durable stores: every write goes through group commit."""

    __slots__ = ()

    async def _write(self, op: _WriteOp) -> Any:
        raise NotImplementedError

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        command_id: str | None = None,
    ) -> int:
        """Append ``events`` atomically; return the stream's new version.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version``
                (also when another process appended first).
            StreamDeleted: the stream was hard-deleted.
            StoreError: the database failed; nothing was appended.
        """
        _check_name(stream)
        if command_id is not None:
            # Recorded by the SQL backends in the next step; refuse rather than ignore.
            raise StoreError("this store does not record command ids yet")
        version: int = await self._write(_Append(stream, tuple(events), expected_version))
        return version

    async def find_command(self, stream: str, command_id: str) -> int | None:
        """Return the version recorded with ``command_id``, or ``None``."""
        _check_name(stream)
        raise StoreError("this store does not record command ids yet")

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``, replacing the stream's previous one.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: the database failed; the previous snapshot is kept.
        """
        _check_name(snapshot.stream)
        await self._write(_SaveSnapshot(snapshot))

    async def delete_stream(self, stream: str, *, hard: bool = False) -> None:
        """Soft- or hard-delete ``stream`` (see :class:`EventStore`).

        Raises:
            StreamDeleted: the stream was already hard-deleted.
            StoreError: the database failed; nothing changed.
        """
        _check_name(stream)
        await self._write(_Delete(stream, hard))
