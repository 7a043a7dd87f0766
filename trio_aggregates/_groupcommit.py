"""Group commit: the single writer path both durable stores share.

Writes queue up while a transaction is being written; the next transaction
writes all of them. The first waiting writer becomes the *leader* and runs the
batch (in a worker thread, through the store's ``run_batch``), then hands the
lead to the next queued task. There is no background task, so no hidden
nursery and no exception group can escape a store's ``open_*``.

Cancellation: a write still in the queue is withdrawn (nothing is written);
once its transaction has begun, it completes and the caller gets its real
result, the cancellation taking effect at the next checkpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, final

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

_PENDING, _PROMOTED, _TAKEN, _DONE = "pending", "promoted", "taken", "done"


@attrs.define(eq=False)
class _Request(Generic[OpT]):
    op: OpT
    state: str = _PENDING
    result: outcome.Outcome[Any] | None = None
    wakeup: trio.Event = attrs.Factory(trio.Event)


@attrs.frozen
class _BatchResult:
    outcomes: list[outcome.Outcome[Any]]
    committed: bool


@final
@attrs.define(eq=False)
class _GroupCommit(Generic[OpT]):
    """Batches writes from many tasks into one transaction, written in a worker thread.

    There is no background task: the first writer to arrive becomes the
    *leader*, takes every queued write, and awaits ``run_batch`` on them
    (shielded from cancellation); writes arriving meanwhile queue up. When its
    batch is done, the leader hands leadership to the first queued write's
    task, which writes the next batch. ``run_batch`` must return one outcome per write, in order,
    and ``committed`` (whether the transaction committed).

    Cancellation: a write still queued is withdrawn (nothing is written). Once
    taken into a batch it cannot be withdrawn: the call waits for the
    transaction and returns its result (or raises its error); the cancellation
    takes effect at the caller's next checkpoint. So a cancelled write was
    either committed entirely or not at all.
    """

    _run_batch: Callable[[list[OpT]], Awaitable[_BatchResult]]
    _is_append: Callable[[OpT], bool]
    _pending: list[_Request[OpT]] = attrs.field(factory=list, init=False)
    _leading: bool = attrs.field(default=False, init=False)
    _idle: trio.Event = attrs.field(factory=trio.Event, init=False)
    transactions: int = attrs.field(default=0, init=False)
    appends: int = attrs.field(default=0, init=False)
    writes: int = attrs.field(default=0, init=False)
    failed_writes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._idle.set()

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
        request = _Request(op)
        self._pending.append(request)
        if not self._leading:
            self._leading = True
            self._idle = trio.Event()
            request.state = _PROMOTED
        else:
            try:
                await request.wakeup.wait()
            except trio.Cancelled:
                if request.state in (_PENDING, _PROMOTED):
                    # Not written, and now never will be.
                    self._pending.remove(request)
                    if request.state == _PROMOTED:
                        self._hand_off()
                    raise
                # Taken into a batch: its outcome is coming, wait for it.
                with trio.CancelScope(shield=True):
                    await request.wakeup.wait()
        if request.state == _PROMOTED:
            await self._lead()
        assert request.result is not None
        return request.result.unwrap()

    async def _lead(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                # Let the writes of tasks woken in this same tick join the batch.
                await trio.lowlevel.cancel_shielded_checkpoint()
                batch, self._pending = self._pending, []
                for request in batch:
                    request.state = _TAKEN
                ops = [request.op for request in batch]
                try:
                    result = await self._run_batch(ops)
                except BaseException as exc:  # pragma: no cover - run_batch catches all
                    error = StoreError("internal error in the store's writer, please report")
                    error.__cause__ = exc
                    result = _BatchResult([outcome.Error(error) for _ in ops], committed=False)
                if result.committed:
                    self.transactions += 1
                for request, res in zip(batch, result.outcomes, strict=True):
                    request.result = res
                    request.state = _DONE
                    if isinstance(res, outcome.Value):
                        self.writes += 1
                        if self._is_append(request.op):
                            self.appends += 1
                    else:
                        self.failed_writes += 1
                    request.wakeup.set()
            finally:
                self._hand_off()

    def _hand_off(self) -> None:
        if self._pending:
            successor = self._pending[0]
            successor.state = _PROMOTED
            successor.wakeup.set()
        else:
            self._leading = False
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until every queued write is done."""
        while self._leading:
            await self._idle.wait()


# -- the SQLite store -------------------------------------------------------


def _check_name(stream: object) -> None:
    if not isinstance(stream, str):
        raise TypeError(f"stream names are str, not {type(stream).__name__}")


@attrs.frozen
class _Append:
    stream: str
    events: Sequence[NewEvent]
    expected_version: int | None


@attrs.frozen
class _SaveSnapshot:
    snapshot: Snapshot


@attrs.frozen
class _Delete:
    stream: str
    hard: bool


_WriteOp = _Append | _SaveSnapshot | _Delete


class _GroupCommitStore:
    """The write half of the durable stores: every write goes through group commit."""

    __slots__ = ()

    async def _write(self, op: _WriteOp) -> Any:
        raise NotImplementedError

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, expected_version: int | None
    ) -> int:
        """Append ``events`` atomically; return the stream's new version.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version``
                (also when another process appended first).
            StreamDeleted: the stream was hard-deleted.
            StoreError: the database failed; nothing was appended.
        """
        _check_name(stream)
        version: int = await self._write(_Append(stream, tuple(events), expected_version))
        return version

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
