"""The command step of a live event-sourced aggregate, as plain state transitions.

Everything that affects a live aggregate's state, and the outcome of each
command, lives in this file (h11's rule for its state machine). It does no
I/O and knows nothing of Trio: :class:`LiveAggregate` says what to do next
(an *action*), the repository's task does it (the only ``await`` s: append,
read, look up a command id, load a snapshot) and feeds the outcome back. A
command goes::

    start ──► APPEND ──committed──► DONE
      │          ├──conflicted──► REBUILD ──rebuilt──► (decide again, or give up)
      │          ├──duplicate───► REBUILD ──rebuilt──► DONE (the first outcome)
      │          └──failed──────► FAIL (the state is unknown: rebuilt before the next command)
      ├──► CATCH_UP ──caught_up──► (newer events: decide again; none: FIND or FAIL)
      └──► REBUILD (the state is unknown) ──rebuilt──► (decide)

The rules, written down in one place:

* **Checks and refusals.** ``create`` needs an empty stream, ``execute`` a
  non-empty one, ``execute(create_if_missing=True)`` (mode :data:`ANY`)
  either; an ``expected_version`` must match. A refusal
  (:class:`CommandRejected`, :class:`WrongExpectedVersion`,
  :class:`AlreadyExists`, :class:`AggregateNotFound`) is answered only after
  catching up with the store (reading the events after :attr:`version`); if
  there were newer events, the command is decided again. So no refusal is
  decided on state older than what the store held when the command arrived,
  whatever other processes wrote. :class:`UnknownCommand` depends on no state.
* **Idempotency.** A command with the caller's own ``command_id`` that the
  aggregate remembers (its recent ids) is answered with the version after its
  first application, without deciding. Otherwise the id goes with the append
  and the store refuses it if the stream already holds it
  (:class:`DuplicateCommand`, whose version is the answer). A refusal of such
  a command is answered only after looking its id up in the store (FIND): a
  retry of a command that was applied is refused by the state it made
  (insufficient funds now), but its answer is the first outcome.
* **Tentative apply.** The events are encoded and applied to the live state
  *before* the append. An applier that raises fails the command with
  :class:`AggregateCrashed` (the applier's exception as ``__cause__``);
  nothing is stored. On the happy path the state is then already right; on
  any other outcome (conflict, duplicate, store error, applier error) it is
  *stale* and rebuilt from the store (snapshot, then events) before it is
  used again. Conflicts and failures are rare: the common path copies nothing.
* **Conflicts.** A :class:`ConcurrencyConflict` means another writer appended
  first: rebuild, then check and decide again, at most ``max_retries`` times
  more, then answer the conflict.
* **Store errors** answer the command and leave the state stale (did the
  append land? unknown); the next command rebuilds it first, and fails with
  the store's error if that rebuild fails. The aggregate task does not end.
* **Snapshots** are due when the version crosses a multiple of
  ``snapshot_every``.
* **The task ends** when it holds no stream (version 0, known) and nothing
  is queued: an ``execute`` on a missing key registers nothing for long, and a
  ``create`` queued behind it is still served by the same task.

Invariant: ``not stale`` implies ``state`` is the replay of the stream's
events ``1..version`` as the store holds them.
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final, Generic, TypeVar, final

import attrs
import msgspec

from .._core._exceptions import (
    AggregateCrashed,
    AggregateNotFound,
    AlreadyExists,
    CommandRejected,
    ConcurrencyConflict,
    DuplicateCommand,
    EventDecodeError,
    StoreError,
    TrioAggregatesError,
    UnknownCommand,
    WrongExpectedVersion,
)
from .._stores._store import NewEvent, RecordedEvent, Snapshot
from ._aggregate import NO_REPLY, Aggregate, Decision
from ._codec import EventCodec, type_name_of

__all__ = [
    "ANY",
    "APPEND",
    "CATCH_UP",
    "DONE",
    "EXISTING",
    "FAIL",
    "FIND",
    "NEW",
    "REBUILD",
    "Command",
    "Inspect",
    "LiveAggregate",
]

A = TypeVar("A", bound=Aggregate)

# -- requests -------------------------------------------------------------------

# A command's mode: which streams it may run on.
#: Any stream, with events or not (create-if-missing).
ANY: Final = 0
#: A stream with events (``execute``).
EXISTING: Final = 1
#: An empty stream (``create``).
NEW: Final = 2


class Command(msgspec.Struct, frozen=True, eq=False):
    """A command for a live aggregate, as :meth:`AggregateRepository.execute` sends it.

    Never changed once made. A :class:`msgspec.Struct`: one is made per
    command, in C (half the cost of an attrs class's ``__init__``).
    """

    command: object
    mode: int
    expected_version: int | None
    dry_run: bool
    verbose: bool
    #: The caller's own command id (``None`` for an id the runtime made: unique).
    command_id: str | None
    #: The events' metadata as UTF-8 JSON, but for the time of the append:
    #: ``{"command_id": ..., ..., "at": `` (closed with the time and ``}``);
    #: without its start, ``{"command_id": ...``, when ``command_id`` is
    #: ``None`` (the id is made with the events, in :meth:`LiveAggregate._decide`).
    metadata_head: bytes
    #: Answer ``(version, reply)`` (``reply`` ``None`` when the handler chose
    #: none; the events for a verbose dry run) instead of the version *or*
    #: the reply. The protocol server's form: it sends both.
    detailed: bool = False


@attrs.frozen
class Inspect:
    """Ask a live aggregate for a copy of its state and its version."""

    #: Catch up with the store first (the answer reflects every event
    #: committed before the request).
    fresh: bool = True


# Command ids, when the caller gives none: unique without a uuid4 per command
# (2 µs): 64 random bits per process, then a counter. Made only for a command
# that has events to store.
_AUTO_ID: Final = b'{"command_id":"' + uuid.uuid4().hex[:16].encode()
_id_counter = itertools.count()

#: The time of an append in the metadata, as JSON: msgspec writes a float's
#: shortest round-trip digits as ``repr`` does, at a tenth of its cost
#: (0.09 us against 0.9-1.5). Only ever given ``time.time()``: finite.
_json_time: Final = msgspec.json.encode


# -- actions ---------------------------------------------------------------------


@final
class _Action:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Append :attr:`LiveAggregate.new_events` at :attr:`~LiveAggregate.expected`
#: (with :attr:`~LiveAggregate.append_id`); then ``committed``, ``conflicted``,
#: ``duplicate`` or ``failed``.
APPEND: Final = _Action("APPEND")
#: Read the stream after :attr:`LiveAggregate.version`, feeding each page to
#: ``advance``; then ``caught_up`` (or ``failed``).
CATCH_UP: Final = _Action("CATCH_UP")
#: Load the latest snapshot (``reset``) and the events after it
#: (``advance``); then ``rebuilt`` (or ``failed``).
REBUILD: Final = _Action("REBUILD")
#: Look :attr:`LiveAggregate.command_id` up in the store; then ``found``.
FIND: Final = _Action("FIND")
#: Answer the caller with :attr:`LiveAggregate.result`.
DONE: Final = _Action("DONE")
#: Answer the caller with :attr:`LiveAggregate.error`.
FAIL: Final = _Action("FAIL")

# What to do once a catch-up or a rebuild is done.
_DECIDE: Final = 0  # check and decide (again)
_REFUSE: Final = 1  # a refusal waits: decide again if there were newer events
_ANSWER_DUPLICATE: Final = 2  # answer the version the store reported
_INSPECT: Final = 3  # answer a copy of the state
_GIVE_UP: Final = 4  # conflicts won: check once more, then answer the conflict

_NO_EVENTS: Final[tuple[NewEvent, ...]] = ()

#: How many of the caller's own command ids a live aggregate remembers.
RECENT_IDS: Final = 64


@final
class LiveAggregate(Generic[A]):
    """One live aggregate's state and its command step: pure transitions, no I/O."""

    __slots__ = (
        "_conflict",
        "_dup_version",
        "_fresh",
        "_mark",
        "_recent",
        "_refusal",
        "_reply",
        "_then",
        "append_id",
        "attempt",
        "codec",
        "error",
        "expected",
        "key",
        "max_retries",
        "new_events",
        "request",
        "result",
        "snapshot_version",
        "stale",
        "state",
        "type",
        "version",
    )

    def __init__(self, aggregate_type: type[A], key: Any, codec: EventCodec, max_retries: int):
        self.type = aggregate_type
        self.key = key
        self.codec = codec
        self.max_retries = max_retries
        self.state: A = aggregate_type()
        self.version = 0
        self.snapshot_version = 0
        # Invariant: not stale -> state is the replay of the stream's events 1..version.
        self.stale = True  # nothing loaded yet
        # The command in hand.
        self.request: Command | None = None
        self.attempt = 0
        self.new_events: Sequence[NewEvent] = _NO_EVENTS
        self.expected = 0
        self.append_id: str | None = None
        self.result: Any = None
        self.error: TrioAggregatesError | None = None
        self._reply: Any = NO_REPLY
        self._fresh = False  # caught up with the store since the command arrived
        self._then = _DECIDE
        self._mark = 0
        self._refusal: TrioAggregatesError | None = None
        self._conflict: ConcurrencyConflict | None = None
        self._dup_version = 0
        # The caller's own command ids this aggregate stored (or found), oldest first.
        self._recent: dict[str, int] | None = None

    # -- loading: reset, then advance page by page, then loaded ------------------

    def reset(self, snapshot: Snapshot | None) -> EventDecodeError | None:
        """Start a rebuild: from ``snapshot`` if it is usable, else from nothing.

        Returns the error that made a snapshot of this type unusable (for
        the caller to log), or ``None``.
        """
        self.stale = True
        cls = self.type
        if (
            snapshot is not None
            and snapshot.schema == cls.snapshot_schema
            and snapshot.type == type_name_of(cls)
        ):
            try:
                self.state = self.codec.decode_state(snapshot.data, cls)
            except EventDecodeError as exc:
                self.state, self.version, self.snapshot_version = cls(), 0, 0
                return exc
            self.version = self.snapshot_version = snapshot.version
            return None
        self.state, self.version, self.snapshot_version = cls(), 0, 0
        return None

    def advance(self, records: Sequence[RecordedEvent]) -> None:
        """Decode and apply stored events that follow :attr:`version`.

        Raises:
            EventDecodeError: an event cannot be read (the state stays
                consistent at :attr:`version`).
            AggregateCrashed: an applier raised (the state is now stale).
        """
        decode = self.codec.decode
        apply = self.state.apply
        for record in records:
            event = decode(record.type, record.data, where=f"{record.stream}@{record.version}")
            try:
                apply(event)
            except Exception as exc:
                self.stale = True
                raise _crashed(self.key, exc) from exc
            self.version = record.version

    def loaded(self) -> None:
        """A rebuild read every event: the state is the store's."""
        self.stale = False

    # -- a command ----------------------------------------------------------------

    def start(self, request: Command) -> _Action:
        """Take a new command; return what to do first."""
        self.request = request
        self.attempt = 0
        self._fresh = False
        self._refusal = self._conflict = None
        command_id = request.command_id
        if command_id is not None and self._recent is not None:
            version = self._recent.get(command_id)
            if version is not None:
                return self._answer(version)  # applied before: the first outcome
        if self.stale:
            return self._rebuild(_DECIDE)
        return self._decide()

    def inspect(self, request: Inspect) -> _Action:
        """Take a request for the state; return what to do first."""
        self.request = None
        self._fresh = False
        if self.stale:
            return self._rebuild(_INSPECT)
        if request.fresh:
            return self._catch_up(_INSPECT)
        return self._inspected()

    def committed(self, version: int) -> _Action:
        """The store took the events; the stream is now at ``version``."""
        self.version = version
        self.stale = False
        request = self.request
        assert request is not None
        if request.command_id is not None:
            self._remember(request.command_id, version)
        reply = self._reply
        if request.detailed:
            self.result = (version, None if reply is NO_REPLY else reply)
        else:
            self.result = version if reply is NO_REPLY else reply
        # An idle aggregate keeps nothing of its last command.
        self.request = self._reply = None
        self.new_events = _NO_EVENTS
        return DONE

    def append_failed(self, error: StoreError | DuplicateCommand) -> _Action:
        """The append raised ``error``: a duplicate, a conflict, or a store failure."""
        if isinstance(error, DuplicateCommand):
            return self.duplicate(error.version)
        if isinstance(error, ConcurrencyConflict):
            return self.conflicted(error)
        return self.failed(error)

    def conflicted(self, error: ConcurrencyConflict) -> _Action:
        """Another writer appended first (nothing of ours was stored)."""
        self.attempt += 1
        if self.attempt > self.max_retries:
            self._conflict = error
            return self._rebuild(_GIVE_UP)
        return self._rebuild(_DECIDE)

    def duplicate(self, version: int) -> _Action:
        """The stream already holds the command's id: it was applied at ``version``."""
        request = self.request
        assert request is not None and request.command_id is not None
        self._remember(request.command_id, version)
        self._dup_version = version
        return self._rebuild(_ANSWER_DUPLICATE)

    def failed(self, error: StoreError) -> _Action:
        """A store call failed: answer with ``error``; rebuild before the next command."""
        self.stale = True
        return self._fail(error)

    def caught_up(self) -> _Action:
        """The events after the version before CATCH_UP are applied."""
        self._fresh = True
        then = self._then
        if then is _INSPECT:
            return self._inspected()
        if then is _REFUSE and self.version == self._mark:
            return self._refuse_now()
        return self._decide()  # newer events: decide again

    def rebuilt(self) -> _Action:
        """The state is rebuilt from the store."""
        self.stale = False
        self._fresh = True
        then = self._then
        if then is _INSPECT:
            return self._inspected()
        if then is _ANSWER_DUPLICATE:
            return self._answer(self._dup_version)
        if then is _GIVE_UP:
            refused = self._check()
            if refused is not None:
                return self._refuse(refused)
            assert self._conflict is not None
            return self._fail(self._conflict)
        return self._decide()

    def found(self, version: int | None) -> _Action:
        """The store's answer to FIND: the version after the command, or ``None``."""
        request = self.request
        if version is not None and request is not None and request.command_id is not None:
            self._remember(request.command_id, version)
            return self._answer(version)
        assert self._refusal is not None
        return self._fail(self._refusal)

    # -- after the answer ----------------------------------------------------------

    def snapshot_due(self) -> bool:
        """Whether to save a snapshot now (then call :meth:`snapshot_saved`)."""
        every = self.type.snapshot_every
        return (
            bool(every)
            and not self.stale
            and (
                self.version // every > self.snapshot_version // every  # type: ignore[operator]
            )
        )

    def snapshot_saved(self, version: int) -> None:
        self.snapshot_version = version

    def should_end(self, queued: int) -> bool:
        """Whether the task should end: it holds no stream and nothing is queued.

        Not while the state is unknown (a failed rebuild reads as version 0).
        """
        return self.version == 0 and not self.stale and queued == 0

    # -- inside the step --------------------------------------------------------------

    def _check(self) -> TrioAggregatesError | None:
        request = self.request
        assert request is not None
        if request.mode == NEW and self.version > 0:
            return AlreadyExists(self.key)
        if request.mode == EXISTING and self.version == 0:
            return AggregateNotFound(self.key)
        expected = request.expected_version
        if expected is not None and expected != self.version:
            return WrongExpectedVersion(self.key, expected, self.version)
        return None

    def _decide(self) -> _Action:
        request = self.request
        assert request is not None
        # The checks; the common case (execute on an existing stream, no
        # expected version) in one comparison.
        if request.mode != EXISTING or self.version == 0 or request.expected_version is not None:
            refused = self._check()
            if refused is not None:
                return self._refuse(refused)
        state = self.state
        try:
            decided = state._handle(request.command)
        except CommandRejected as exc:
            return self._refuse(exc)
        except UnknownCommand as exc:
            return self._fail(exc)  # depends on no state
        if type(decided) is Decision:  # final: no subclass
            events, reply = decided.events, decided.reply
        else:
            events, reply = decided, NO_REPLY
        codec = self.codec
        if request.dry_run:
            for event in events:
                codec.encode(event)  # validates: every event can be stored
            return self._answer(self.version, list(events) if request.verbose else NO_REPLY)
        if not events:
            return self._answer(self.version, reply)
        head = request.metadata_head
        if request.command_id is None:
            at = _json_time(time.time())
            metadata = b'%b%016x"%b%b}' % (_AUTO_ID, next(_id_counter), head, at)
        else:
            metadata = head + _json_time(time.time()) + b"}"
        self.new_events = [NewEvent(*codec.encode(event), metadata) for event in events]
        self.expected = self.version
        self.append_id = request.command_id
        self._reply = reply
        # Tentative: the events go into the live state before the store has
        # them; only ``committed`` makes the state the store's again.
        self.stale = True
        try:
            for event in events:
                state.apply(event)
        except Exception as exc:
            return self._fail(_crashed(self.key, exc))  # nothing stored; rebuilt before next use
        return APPEND

    def _refuse(self, error: TrioAggregatesError) -> _Action:
        """Answer ``error``, but only on fresh state, and not for a command applied before."""
        if not self._fresh:
            self._refusal = error
            return self._catch_up(_REFUSE)
        self._refusal = error
        return self._refuse_now()

    def _refuse_now(self) -> _Action:
        request = self.request
        assert request is not None and self._refusal is not None
        if request.command_id is not None:
            return FIND
        return self._fail(self._refusal)

    def _inspected(self) -> _Action:
        if self.version == 0:
            return self._fail(AggregateNotFound(self.key))
        return self._done((copy.deepcopy(self.state), self.version))

    def _catch_up(self, then: int) -> _Action:
        self._then = then
        self._mark = self.version
        return CATCH_UP

    def _rebuild(self, then: int) -> _Action:
        self._then = then
        self.stale = True
        return REBUILD

    def _done(self, result: Any) -> _Action:
        self.result = result
        return DONE

    def _answer(self, version: int, reply: Any = NO_REPLY) -> _Action:
        """Answer a command: the version or the reply; ``(version, reply)`` if detailed."""
        request = self.request
        assert request is not None
        if request.detailed:
            self.result = (version, None if reply is NO_REPLY else reply)
        else:
            self.result = version if reply is NO_REPLY else reply
        return DONE

    def _fail(self, error: TrioAggregatesError) -> _Action:
        self.error = error
        return FAIL

    def _remember(self, command_id: str, version: int) -> None:
        recent = self._recent
        if recent is None:
            recent = self._recent = {}
        elif len(recent) >= RECENT_IDS and command_id not in recent:
            del recent[next(iter(recent))]
        recent[command_id] = version


def _crashed(key: Any, exc: Exception) -> AggregateCrashed:
    error = AggregateCrashed(key, exc)
    error.__cause__ = exc
    return error
