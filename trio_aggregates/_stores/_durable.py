"""The durable store core: what the SQLite and PostgreSQL stores share.

A durable store is a :class:`_DurableStore` subclass. The core owns the outer
shell: the write operations (:class:`_Append`, :class:`_SaveSnapshot`,
:class:`_Delete`), the group-commit writer they go through
(``_groupcommit.py``), :meth:`~_DurableStore.statistics`, the write calls
(``append``, ``save_snapshot``, ``delete_stream``) with their argument checks,
turning a batch that failed as a whole into one error per write, and
``aclose``'s shielded, idempotent close. A backend keeps only SQL,
connections and migrations, and fills in the hooks:

* :meth:`~_DurableStore._write_batch`: write a batch of ops in one go and
  return one outcome per op (a conflict or a deleted stream fails its op
  alone); raising :exc:`StoreError` fails every op of the batch;
* :meth:`~_DurableStore._close_connections`: close what the store holds, once
  the queued writes are done;
* the class variable ``_backend`` ("SQLite", "PostgreSQL"), for messages,
  and ``_batches_in_flight``: how many batches may be written at once (1
  for SQLite's single writer connection);
* the reads (``read``, ``read_all``, ``head_position``, ``stream_version``,
  ``load_snapshot``, ``find_command``), which are queries and so the
  backend's own.

The shell sets ``_append_signal`` after every committed batch: the
in-process wake-up of subscriptions (``_subscription.py``).

Both backends keep the same stream states in their ``streams`` table
(:data:`_LIVE`, :data:`_SOFT_DELETED`, :data:`_TOMBSTONE`) and split a batch
into *runs* of ops that one set-based statement can write
(:func:`_split_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Final, TypeVar, final

import attrs
import outcome
import trio

from .._core._exceptions import InvalidArgument, StoreError
from ._groupcommit import StoreStatistics, _BatchResult, _GroupCommit
from ._store import NewEvent, Snapshot, _AppendSignal, _check_command_id

__all__: list[str] = []

T = TypeVar("T")

# A stream row's state, in both databases' ``streams`` table.
_LIVE: Final = 0
_SOFT_DELETED: Final = 1  # detached: its events stay for audit, invisible
_TOMBSTONE: Final = 2  # hard-deleted: no events, refuses reads and writes


def _check_name(stream: object) -> None:
    if not isinstance(stream, str):
        raise InvalidArgument(f"stream names are str, not {type(stream).__name__}")


# -- write operations ---------------------------------------------------------


@final
class _Append:
    __slots__ = ("command_id", "events", "expected_version", "stream")

    def __init__(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        command_id: str | None = None,
    ) -> None:
        self.stream = stream
        self.events = events
        self.expected_version = expected_version
        self.command_id = command_id


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


def _op_stream(op: _WriteOp) -> str:
    """The name of the stream ``op`` writes to."""
    return op.snapshot.stream if isinstance(op, _SaveSnapshot) else op.stream


def _is_append(op: _WriteOp) -> bool:
    return type(op) is _Append


def _split_runs(items: Sequence[T], joins: Callable[[T], bool]) -> Iterator[tuple[bool, int, int]]:
    """Split ``items`` into runs: yield ``(is_run, start, end)`` in order.

    A run is a maximal stretch of consecutive items for which ``joins`` is
    true (``is_run`` true); every other item comes alone (``is_run`` false,
    ``end == start + 1``).
    """
    count = len(items)
    start = 0
    while start < count:
        end = start
        while end < count and joins(items[end]):
            end += 1
        if end > start:
            yield True, start, end
        else:
            end = start + 1
            yield False, start, end
        start = end


def _wrap_error(backend: str, exc: BaseException, action: str) -> StoreError:
    """A :exc:`StoreError` saying what ``backend`` failed to do, ``exc`` as its cause."""
    error = StoreError(f"{backend} failed to {action}: {exc}")
    error.__cause__ = exc
    return error


def _fail_all(ops: Sequence[object], error: StoreError) -> _BatchResult:
    """A batch none of whose writes happened: each fails with ``error``."""
    return _BatchResult([outcome.Error(error) for _ in ops], committed=False)


# -- the store core -------------------------------------------------------------


@attrs.define(eq=False)
class _DurableStore:
    """The outer shell of a durable store; a backend subclasses it (see the module docstring).

    Writes go through group commit. Cancellation: a write still queued is
    withdrawn (nothing is written) and :exc:`trio.Cancelled` is raised; once
    its batch has begun, the call returns its result (or raises its error) and
    the cancellation takes effect at the next checkpoint. So a cancelled write
    either committed entirely or not at all.

    Errors: only :exc:`StoreError` and its subclasses (the driver's exception
    as ``__cause__``); :exc:`DuplicateCommand` from ``append`` when the
    stream already holds its command id (nothing appended); and
    :exc:`InvalidArgument` (a :exc:`TypeError`) for a stream name or command
    id that is not a str. Calls after :meth:`aclose` raise :exc:`StoreError`.
    """

    #: The backend's name, for messages ("SQLite", "PostgreSQL").
    _backend: ClassVar[str] = "the database"
    #: How many batches may be written at once (see ``_GroupCommit``).
    _batches_in_flight: ClassVar[int] = 1

    _group: _GroupCommit[_WriteOp] = attrs.field(init=False)
    _closed: bool = attrs.field(default=False, init=False)
    # Set after each committed batch (in-process wake-ups for subscriptions,
    # see ``_subscription.py``; a batch without events only costs them a read).
    _append_signal: _AppendSignal = attrs.field(factory=_AppendSignal, init=False)

    def __attrs_post_init__(self) -> None:
        self._group = _GroupCommit(self._run_batch, _is_append, max_batches=self._batches_in_flight)

    # -- hooks ------------------------------------------------------------

    async def _write_batch(self, ops: list[_WriteOp]) -> _BatchResult:
        """Write ``ops`` (never empty) in one go; return one outcome per op, in order.

        Runs with cancellation shielded (group commit's leader calls it).
        Raising :exc:`StoreError` fails every op of the batch.
        """
        raise NotImplementedError

    async def _close_connections(self) -> None:
        """Close every connection; called once, after the last queued write."""
        raise NotImplementedError

    # -- the shell --------------------------------------------------------

    def _wrap(self, exc: BaseException, action: str) -> StoreError:
        return _wrap_error(self._backend, exc, action)

    async def _run_batch(self, ops: list[_WriteOp]) -> _BatchResult:
        try:
            result = await self._write_batch(ops)
        except StoreError as exc:
            return _fail_all(ops, exc)
        if result.committed:
            self._append_signal.notify()
        return result

    def statistics(self) -> StoreStatistics:
        """Return the writer's counters (transactions, appends, ...). Not a checkpoint."""
        return self._group.statistics()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the {self._backend} event store is closed")

    async def _write(self, op: _WriteOp) -> Any:
        self._check_open()
        return await self._group.submit(op)

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        command_id: str | None = None,
    ) -> int:
        """Append ``events`` atomically; return the stream's new version.

        With ``command_id``, the store records in the same transaction that
        the stream holds this command, at the version returned.

        Raises:
            DuplicateCommand: the stream already holds ``command_id`` (checked
                before the expected version, also when another process
                appended it); nothing was appended.
            ConcurrencyConflict: the stream is not at ``expected_version``
                (also when another process appended first).
            StreamDeleted: the stream was hard-deleted.
            StoreError: the database failed; nothing was appended (unless the
                connection was lost during ``COMMIT``: then it may have been).
        """
        _check_name(stream)
        _check_command_id(command_id)
        version: int = await self._write(
            _Append(stream, tuple(events), expected_version, command_id)
        )
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

    async def aclose(self) -> None:
        """Finish the queued writes, then close every connection. Idempotent.

        Cancellation: closing is shielded; it waits for the writes already
        queued and the calls in progress, then closes the connections.
        """
        with trio.CancelScope(shield=True):
            if self._closed:
                await trio.lowlevel.checkpoint()
                return
            self._closed = True
            await self._group.wait_idle()
            await self._close_connections()
