"""The event store protocol, the records it deals in, and the in-memory store.

A store keeps *streams*: for each stream name, an ordered list of events with
versions 1, 2, 3, ... A stream that has no events is at version 0. Stores deal
in encoded events (a type name and bytes); encoding and decoding is the
aggregate runtime's business (see ``_codec.py``), so that a store never runs
code to load what it holds.

Every backend implements :class:`EventStore` with the same semantics, and the
conformance suite in ``tests/test_store_conformance.py`` holds them to it:

* ``append(stream, events, expected_version=v)`` appends atomically, all or
  nothing, only if the stream is at version ``v`` (``None``: any version), and
  returns the new version. A mismatch raises :class:`ConcurrencyConflict`; two
  writers racing with the same expected version can never both win. An empty
  append checks the version and returns it.
* ``append(..., command_id=c)``: idempotency. The store records ``(stream,
  c)`` with the stream's version right after the append, in the append's own
  transaction (an empty append records it too). An append whose
  ``command_id`` the stream already holds appends nothing and raises
  :class:`DuplicateCommand` carrying that recorded version; this check comes
  before the expected-version check, so a retry of a command that was
  applied learns so even though the stream has moved on. Of two appends with
  the same command id racing (in one process or several), exactly one wins.
  ``find_command(stream, c)`` returns the recorded version or ``None``.
  Deleting a stream (soft or hard) forgets its command ids.
* ``read(stream, from_version=1, limit=None)`` returns one page of events with
  ``version >= from_version``, in order; a missing stream reads as empty.
* ``delete_stream(stream, hard=False)``: a *soft* delete detaches the stream's
  events (they stay in storage for audit, but are no longer visible), and the
  name starts again from version 0. A *hard* delete erases the events and
  snapshots and leaves a tombstone: later appends and reads raise
  :class:`StreamDeleted`.
* Snapshots: one per stream, the latest saved wins; ``load_snapshot`` returns
  ``None`` for none.

Errors: stores raise :class:`StoreError` (or its subclasses) and never let a
driver's exception escape; the driver's exception is the ``__cause__``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, runtime_checkable

import attrs
import trio

from ._exceptions import ConcurrencyConflict, DuplicateCommand, InvalidArgument, StreamDeleted

__all__ = [
    "EventStore",
    "InMemoryEventStore",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "read_stream",
]


@attrs.frozen
class NewEvent:
    """An encoded event to append.

    Attributes:
        type: the event's stable type name.
        data: the encoded event (JSON or MessagePack bytes).
        metadata: encoded metadata (timestamp, causation/correlation ids, ...).
    """

    type: str
    data: bytes
    metadata: bytes = b"{}"


@attrs.frozen
class RecordedEvent:
    """An event as the store holds it.

    Attributes:
        stream: the stream's name.
        version: its position in the stream, from 1.
        type: the event's stable type name.
        data: the encoded event.
        metadata: the encoded metadata.
        recorded_at: when the store wrote it (seconds since the epoch, UTC).
    """

    stream: str
    version: int
    type: str
    data: bytes
    metadata: bytes
    recorded_at: float


@attrs.frozen
class Snapshot:
    """An encoded snapshot of a stream's state.

    Attributes:
        stream: the stream's name.
        version: the stream version the state reflects (events up to it).
        schema: the state shape's version; a changed shape bumps it, so old
            snapshots are ignored rather than misread.
        type: the state's type name.
        data: the encoded state.
    """

    stream: str
    version: int
    schema: int
    type: str
    data: bytes


@runtime_checkable
class EventStore(Protocol):
    """What every event store backend implements. See the module docstring."""

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        command_id: str | None = None,
    ) -> int:
        """Append ``events`` atomically; return the stream's new version.

        With ``command_id``, the store also records that the stream holds this
        command, at the version this append returns (in the same transaction).

        Raises:
            DuplicateCommand: the stream already holds ``command_id`` (checked
                before the expected version); nothing was appended.
            ConcurrencyConflict: the stream is not at ``expected_version``.
            StreamDeleted: the stream was hard-deleted.
            StoreError: the backend failed; nothing was appended.
        """
        ...

    async def find_command(self, stream: str, command_id: str) -> int | None:
        """Return the stream's version right after the append that carried
        ``command_id``, or ``None`` if the stream does not hold it.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: the backend failed.
        """
        ...

    async def read(
        self, stream: str, *, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` events of ``stream`` from ``from_version`` on."""
        ...

    async def stream_version(self, stream: str) -> int:
        """Return the stream's version (0 for a stream with no events)."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``, replacing the stream's previous one."""
        ...

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        """Return the stream's latest snapshot, or ``None``."""
        ...

    async def delete_stream(self, stream: str, *, hard: bool = False) -> None:
        """Soft- or hard-delete ``stream`` (see the module docstring)."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources. Idempotent."""
        ...


async def read_stream(
    store: EventStore, stream: str, *, from_version: int = 1, page_size: int = 1000
) -> AsyncGenerator[RecordedEvent, None]:
    """Yield every event of ``stream`` from ``from_version`` on, reading in pages."""
    version = from_version
    while True:
        page = await store.read(stream, from_version=version, limit=page_size)
        for event in page:
            yield event
        if len(page) < page_size:
            return
        version = page[-1].version + 1


def _check_command_id(command_id: object, *, required: bool = False) -> None:
    """Refuse a command id that is not a str (``None`` too, if ``required``)."""
    if isinstance(command_id, str) or (command_id is None and not required):
        return
    raise InvalidArgument(f"command ids are str, not {type(command_id).__name__}")


@attrs.define(eq=False)
class _MemoryStream:
    # (type, data, metadata, recorded_at): tuples of atomic values, which the
    # garbage collector stops tracking, so a big store costs it nothing.
    events: list[tuple[str, bytes, bytes, float]] = attrs.field(factory=list)
    snapshot: Snapshot | None = None
    # command id -> the stream's version right after the append that carried it
    commands: dict[str, int] | None = None


@attrs.define(eq=False)
class InMemoryEventStore:
    """An event store held in a dict: fast, for tests, examples and benchmarks.

    Nothing survives the process. Every call checks for cancellation (a
    cancelled call does nothing), but is not a schedule point: in memory there
    is nothing to wait for. Calls never fail but for bad arguments and the
    documented errors (conflicts, deleted streams).
    """

    _streams: dict[str, _MemoryStream] = attrs.field(factory=dict, init=False)
    _tombstones: set[str] = attrs.field(factory=set, init=False)
    _detached: list[_MemoryStream] = attrs.field(factory=list, init=False)

    def _check(self, stream: str) -> None:
        if not isinstance(stream, str):
            raise InvalidArgument(f"stream names are str, not {type(stream).__name__}")
        if stream in self._tombstones:
            raise StreamDeleted(stream)

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        command_id: str | None = None,
    ) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        _check_command_id(command_id)
        entry = self._streams.get(stream)
        if command_id is not None and entry is not None and entry.commands is not None:
            applied = entry.commands.get(command_id)
            if applied is not None:
                raise DuplicateCommand(stream, command_id, applied)
        version = len(entry.events) if entry is not None else 0
        if expected_version is not None and expected_version != version:
            raise ConcurrencyConflict(stream, expected_version, version)
        if not events and command_id is None:
            return version
        if entry is None:
            entry = self._streams[stream] = _MemoryStream()
        if events:
            now = time.time()
            entry.events.extend((e.type, e.data, e.metadata, now) for e in events)
            version += len(events)
        if command_id is not None:
            if entry.commands is None:
                entry.commands = {}
            entry.commands[command_id] = version
        return version

    async def find_command(self, stream: str, command_id: str) -> int | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        _check_command_id(command_id, required=True)
        entry = self._streams.get(stream)
        if entry is None or entry.commands is None:
            return None
        return entry.commands.get(command_id)

    async def read(
        self, stream: str, *, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        entry = self._streams.get(stream)
        if entry is None:
            return []
        start = max(from_version, 1) - 1
        end = None if limit is None else start + max(limit, 0)
        return [
            RecordedEvent(stream, version, *record)
            for version, record in enumerate(entry.events[start:end], start + 1)
        ]

    async def stream_version(self, stream: str) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        entry = self._streams.get(stream)
        return 0 if entry is None else len(entry.events)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(snapshot.stream)
        entry = self._streams.get(snapshot.stream)
        if entry is None:
            entry = self._streams[snapshot.stream] = _MemoryStream()
        entry.snapshot = snapshot

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        entry = self._streams.get(stream)
        return None if entry is None else entry.snapshot

    async def delete_stream(self, stream: str, *, hard: bool = False) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        entry = self._streams.pop(stream, None)
        if hard:
            self._tombstones.add(stream)
        elif entry is not None:
            self._detached.append(entry)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
