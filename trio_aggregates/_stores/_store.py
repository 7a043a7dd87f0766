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
* The global order: every event gets a *position* when it is appended
  (``RecordedEvent.position``), increasing strictly across all streams, with
  possible gaps, never reused (not even after a hard delete).
  ``read_all(from_position, limit=, categories=, event_types=)`` returns the
  events with ``position >= from_position`` in position order, the events of
  deleted streams (soft or hard) left out; the *category* of a stream is the
  part of its name before the first ``"-"`` (the whole name if it has none).
  Invariant 8 of the design: once ``read_all`` has returned an event at
  position P, no later call returns a *new* event below P, however many
  writers (tasks or processes) append at once. ``head_position()`` is the
  highest position readable now (0 for none).

Errors: stores raise :class:`StoreError` (or its subclasses) and never let a
driver's exception escape; the driver's exception is the ``__cause__``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from itertools import starmap
from typing import Any, Final, Protocol, final, runtime_checkable

import attrs
import msgspec
import trio

from .._core._exceptions import (
    ConcurrencyConflict,
    DuplicateCommand,
    InvalidArgument,
    StreamDeleted,
)

__all__ = [
    "EventStore",
    "category_of",
    "InMemoryEventStore",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "read_stream",
]


class NewEvent(msgspec.Struct, frozen=True, gc=False):
    """An encoded event to append.

    Immutable, compared and hashed by value; a frozen :class:`msgspec.Struct`
    like :class:`RecordedEvent` (made in C: a command's events are made on
    every append).

    Attributes:
        type: the event's stable type name.
        data: the encoded event (JSON or MessagePack bytes).
        metadata: encoded metadata (timestamp, causation/correlation ids, ...).
    """

    type: str
    data: bytes
    metadata: bytes = b"{}"


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as the store holds it.

    Immutable, compared and hashed by value, and picklable. A
    :class:`msgspec.Struct` (rather than an attrs class): a store reading a
    page of a thousand events builds them in C, at about a tenth of the cost
    of an attrs class's generated ``__init__`` (0.06-0.1 us against
    0.8-1.0 us an event, measured on these machines). Its fields hold atomic
    values, so the garbage collector does not track it: a projection holding
    many costs the collector nothing. :func:`msgspec.structs.replace` makes a
    changed copy; ``attrs.evolve`` does not apply.

    Attributes:
        stream: the stream's name.
        version: its position in the stream, from 1.
        type: the event's stable type name.
        data: the encoded event.
        metadata: the encoded metadata.
        recorded_at: when the store wrote it (seconds since the epoch, UTC).
        position: its place in the store's global order (from 1, increasing
            strictly across all streams, possibly with gaps); 0 only for a
            record made by hand.
    """

    stream: str
    version: int
    type: str
    data: bytes
    metadata: bytes
    recorded_at: float
    position: int = 0


def _records_of(rows: Iterable[Sequence[Any]]) -> list[RecordedEvent]:
    """Records from rows of their seven fields in order, each value already
    of its field's type (a store's own typed columns): built in C."""
    return list(starmap(RecordedEvent, rows))


#: A page of rows of RecordedEvent's fields, as :func:`_checked_records` checks them.
_ROWS: Final = list[tuple[str, int, str, bytes, bytes, float, int]]


def _checked_records(rows: list[Any]) -> list[RecordedEvent] | None:
    """Records from rows of their seven fields in order, if every value is of
    its field's type; ``None`` if any is not (then read the page carefully).
    """
    checked = _checked(rows, _ROWS)
    return None if checked is None else _records_of(checked)


def _checked(rows: list[Any], row_type: Any) -> list[Any] | None:
    """``rows`` as ``row_type`` (a list of tuples of field types), if every value
    is of its field's type; ``None`` if any is not.

    msgspec checks the whole page in one pass, in C. ``bytes`` is given as a
    type the rows hold natively, so a ``str`` is refused where bytes are
    expected rather than read as base64. An integer where a float is
    expected becomes a float, as the stores' careful readings make it.
    """
    try:
        return _convert(rows, row_type, strict=True, builtin_types=_NATIVE)  # type: ignore[no-any-return]
    except msgspec.ValidationError:
        return None


_convert: Final = msgspec.convert
_NATIVE: Final = (bytes,)


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

    async def read_all(
        self,
        from_position: int = 1,
        *,
        limit: int | None = 1000,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` events of every stream with ``position >= from_position``,
        in position order, optionally only those of the given stream categories
        and event types. The events of deleted streams are left out.

        Once this has returned an event at position P, no later call returns a
        new event below P (see the module docstring).

        Raises:
            StoreError: the backend failed.
        """
        ...

    async def head_position(self) -> int:
        """Return the highest position readable now (0 if none)."""
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


def category_of(stream: str) -> str:
    """The category of a stream: the part of its name before the first ``"-"``."""
    return stream.partition("-")[0]


def _check_read_all(
    from_position: int,
    limit: int | None,
    categories: Sequence[str] | None,
    event_types: Sequence[str] | None,
) -> tuple[int, int | None, frozenset[str] | None, frozenset[str] | None]:
    """Check and normalize ``read_all``'s arguments: (start >= 1, limit >= 0 or None, sets)."""
    if not isinstance(from_position, int) or isinstance(from_position, bool):
        raise InvalidArgument(f"from_position must be an int, not {type(from_position).__name__}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise InvalidArgument(f"limit must be an int or None, not {type(limit).__name__}")
    return (
        max(from_position, 1),
        None if limit is None else max(limit, 0),
        _names("categories", categories),
        _names("event_types", event_types),
    )


def _names(what: str, names: Sequence[str] | None) -> frozenset[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise InvalidArgument(f"{what} must be a sequence of str, not a str")
    found = frozenset(names)
    for name in found:
        if not isinstance(name, str):
            raise InvalidArgument(f"{what} must hold str, not {type(name).__name__}")
    return found


@final
class _AppendSignal:
    """The in-process wake-up: set after every committed append.

    A waiter calls :meth:`arm` *before* it reads, then waits on the event it
    got: an append committed after the read sets it. Events are made only
    when someone waits, so an append nobody waits for costs one attribute test.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def arm(self) -> trio.Event:
        """The event the next :meth:`notify` sets."""
        if self._event is None:
            self._event = trio.Event()
        return self._event

    def notify(self) -> None:
        """Wake every task waiting for new events (from the Trio thread)."""
        event = self._event
        if event is not None:
            self._event = None
            event.set()


def _check_command_id(command_id: object, *, required: bool = False) -> None:
    """Refuse a command id that is not a str (``None`` too, if ``required``)."""
    if isinstance(command_id, str) or (command_id is None and not required):
        return
    raise InvalidArgument(f"command ids are str, not {type(command_id).__name__}")


@attrs.define(eq=False)
class _MemoryStream:
    name: str
    # (type, data, metadata, recorded_at, position): tuples of atomic values,
    # which the garbage collector stops tracking, so a big store costs it nothing.
    events: list[tuple[str, bytes, bytes, float, int]] = attrs.field(factory=list)
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
    # The global order: the event at position p is version _log_versions[p-1]
    # of _log_streams[p-1] (left out of read_all once that stream object is no
    # longer the live one of its name: deleted).
    _log_streams: list[_MemoryStream] = attrs.field(factory=list, init=False)
    _log_versions: list[int] = attrs.field(factory=list, init=False)
    _append_signal: _AppendSignal = attrs.field(factory=_AppendSignal, init=False)

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
        return self._append_now(stream, events, expected_version, command_id)

    # The synchronous bodies (``_*_now``): what each call does after its
    # cancellation check. An aggregate whose store is exactly this class runs
    # a command through them from the caller's task when it is idle (see
    # ``AggregateRepository._run_now``): the same code, so the same outcomes.

    def _append_now(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        command_id: str | None,
    ) -> int:
        if type(stream) is not str or stream in self._tombstones:
            self._check(stream)  # raises, but for a subclass of str
        if command_id is not None and type(command_id) is not str:
            _check_command_id(command_id)  # raises, but for a subclass of str
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
            entry = self._streams[stream] = _MemoryStream(stream)
        if events:
            now = time.time()
            first = len(self._log_versions) + 1
            count = len(events)
            if count == 1:  # the commonest append, without the generators
                e = events[0]
                entry.events.append((e.type, e.data, e.metadata, now, first))
                self._log_streams.append(entry)
                version += 1
                self._log_versions.append(version)
            else:
                entry.events.extend(
                    (e.type, e.data, e.metadata, now, p) for p, e in enumerate(events, first)
                )
                self._log_streams.extend([entry] * count)
                self._log_versions.extend(range(version + 1, version + count + 1))
                version += count
            if self._append_signal._event is not None:  # someone waits (see notify)
                self._append_signal.notify()
        if command_id is not None:
            if entry.commands is None:
                entry.commands = {}
            entry.commands[command_id] = version
        return version

    async def find_command(self, stream: str, command_id: str) -> int | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        return self._find_command_now(stream, command_id)

    def _find_command_now(self, stream: str, command_id: str) -> int | None:
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
        return self._read_now(stream, from_version, limit)

    def _read_now(self, stream: str, from_version: int, limit: int | None) -> list[RecordedEvent]:
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

    async def read_all(
        self,
        from_position: int = 1,
        *,
        limit: int | None = 1000,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` events from ``from_position`` on, in position order.

        See :meth:`EventStore.read_all`. Not a schedule point (only a cancellation check).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        start, count, cats, types = _check_read_all(from_position, limit, categories, event_types)
        found: list[RecordedEvent] = []
        if count == 0:
            return found
        live = self._streams
        log_streams = self._log_streams
        log_versions = self._log_versions
        for index in range(start - 1, len(log_versions)):
            entry = log_streams[index]
            name = entry.name
            if live.get(name) is not entry:
                continue  # a deleted stream's event
            if cats is not None and name.partition("-")[0] not in cats:
                continue
            version = log_versions[index]
            type_, data, metadata, recorded_at, position = entry.events[version - 1]
            if types is not None and type_ not in types:
                continue
            found.append(RecordedEvent(name, version, type_, data, metadata, recorded_at, position))
            if len(found) == count:
                break
        return found

    async def head_position(self) -> int:
        """Return the position of the last event appended (0 if none)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return len(self._log_versions)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._save_snapshot_now(snapshot)

    def _save_snapshot_now(self, snapshot: Snapshot) -> None:
        self._check(snapshot.stream)
        entry = self._streams.get(snapshot.stream)
        if entry is None:
            entry = self._streams[snapshot.stream] = _MemoryStream(snapshot.stream)
        entry.snapshot = snapshot

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        return self._load_snapshot_now(stream)

    def _load_snapshot_now(self, stream: str) -> Snapshot | None:
        self._check(stream)
        entry = self._streams.get(stream)
        return None if entry is None else entry.snapshot

    async def delete_stream(self, stream: str, *, hard: bool = False) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(stream)
        entry = self._streams.pop(stream, None)
        if hard:
            self._tombstones.add(stream)
            if entry is not None:
                entry.events.clear()  # erased (read_all skips the stream: not live)
        elif entry is not None:
            self._detached.append(entry)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
