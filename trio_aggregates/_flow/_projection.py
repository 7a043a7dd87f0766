"""Projections: events flow out of the store into read models, in order, exactly once in effect.

A *projection* is a class with one pure, synchronous handler per event class,
marked ``@projects`` (as ``@applies`` marks an aggregate's appliers). The
library runs it as a task: it reads the store's global order
(:meth:`EventStore.read_all`) from the projection's checkpoint, catches up page
by page, then follows live events through :func:`open_subscription`; each
handler gets the decoded event and an :class:`EventContext` (the event's
global position, stream, version, metadata and, for a durable store, ``db``:
the open transaction the runner writes the checkpoint in)::

    class Balances(Projection):
        reads = (Account,)              # aggregate types or event classes: the codec

        def setup(self, db):            # once per start, in a transaction
            db.execute("CREATE TABLE IF NOT EXISTS balances (key TEXT PRIMARY KEY, cents INT)")

        def clear(self, db):            # reset(): the read model back to nothing
            db.execute("DELETE FROM balances")

        @projects
        def deposited(self, event: Deposited, ctx: EventContext) -> None:
            ctx.db.execute(
                "INSERT INTO balances VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                "SET cents = cents + excluded.cents", (ctx.key, event.amount))

    async with open_projections(store, [Balances()]) as runner:
        ...                              # the projection runs while the block runs
        print(runner.statistics())

**Where the checkpoint lives.** Per projection ``name``, in a table
``trio_aggregates_checkpoints (name, position, updated_at)``:

* SQLite file store: in the store's file, through the runner's own
  :mod:`sqlite3` connection (in worker threads). Events are applied in
  batches (up to ``batch_size`` events that are already there), each batch in
  one ``BEGIN IMMEDIATE`` transaction holding the handlers' writes through
  ``ctx.db`` and the new checkpoint: a crash anywhere leaves both before or
  both after the batch. Exactly once in effect.
* PostgreSQL store: the same, through the runner's own psycopg connection
  (``store.conninfo``, so the same database and ``search_path``).
* The in-memory store (or any other): in memory, on the projection object
  itself. ``ctx.db`` is ``None``. Running the same object again continues
  where it stopped; a new object starts from position 1.
* ``checkpoint_in_store = False``: in memory too, whatever the store (a read
  model held in the projection object's attributes).

**At least once, elsewhere.** A handler that writes somewhere else than
``ctx.db`` (a file, another database, a search index) may see an event again
after a crash: the batch's checkpoint was not committed, the read model's
write was. The rule: the read model keeps the position of the last event it
applied (``ctx.position``, strictly increasing) and the handler skips an event
whose position is not above it. Positions increase strictly in the store's
global order but may have gaps.

**Failures.** A handler that raises (or an event that cannot be decoded) stops
that projection alone: its batch is rolled back (with a durable store; in
memory, the events before it stay applied and counted), its state becomes
``"failed"`` and its ``error`` a :class:`ProjectionFailed` naming the event's
position, stream and version, with the handler's exception as
``__cause__``. The other projections go on. :meth:`ProjectionRunner.reset`
rebuilds a projection from position 1 (a failed one too);
:meth:`ProjectionRunner.restart` runs a failed one again from its checkpoint.
A batch whose transaction could not be written (a store error: nothing of it
committed) is retried. A store error while
reading is retried, with a back-off up to ``poll_interval`` apart; the
projection's ``error`` shows the last one meanwhile.

**Cancellation.** Leaving :func:`open_projections` (or cancelling the scope of
:func:`run_projection`) waits for the batch in hand: its transaction commits
with its checkpoint (a worker thread is never abandoned mid-transaction), then
the task ends. Nothing runs outside the block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import sys
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Final, Literal, TypeVar, final

import attrs
import trio

from .._core._exceptions import InvalidArgument, StoreError, TrioAggregatesError
from .._runtime._aggregate import Aggregate, Marker, _mark
from .._runtime._codec import EventCodec
from .._stores._store import EventStore, RecordedEvent

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "EventContext",
    "Projection",
    "ProjectionFailed",
    "ProjectionRunner",
    "ProjectionStatistics",
    "RunningProjection",
    "open_projections",
    "projects",
    "run_projection",
]

logger = logging.getLogger("trio_aggregates.projection")

F = TypeVar("F", bound=Callable[..., Any])

_PROJECTS: Final = "__trio_aggregates_projects__"
CHECKPOINTS_TABLE: Final = "trio_aggregates_checkpoints"

State = Literal["starting", "running", "stopped", "failed"]


class ProjectionFailed(TrioAggregatesError):
    """A projection's (or process manager's) handler raised, or its event could not be decoded.

    The projection stopped at that event (its checkpoint is before it); the
    others go on. The handler's exception is the ``__cause__``.

    Attributes:
        name: the projection's name.
        position: the failing event's global position.
        stream, version: where the event is in its stream.
        event_type: its stored type name.
    """

    def __init__(
        self,
        name: str,
        record: RecordedEvent,
        reason: BaseException | None = None,
        *,
        kind: str = "projection",
    ) -> None:
        super().__init__(
            f"{kind} {name!r} failed on the event at position {record.position} "
            f"({record.type!r}, {record.stream}@{record.version}): {reason!r}"
        )
        self.name = name
        self.position = record.position
        self.stream = record.stream
        self.version = record.version
        self.event_type = record.type
        self.reason = reason


def _marker(attr: str, what: str, role: str) -> Marker:
    """``@projects`` and ``@reacts``: the aggregate's marking decorator, for event classes."""
    return _mark(
        attr,
        what,
        takes="event classes",
        example="Deposited",
        doc=(
            f"Mark a method as the {role} for an event class.\n\n"
            f"Use ``@{what}`` (the class is the annotation of the method's first\n"
            f"parameter after ``self``) or ``@{what}(SomeEvent, OtherEvent)``. The\n"
            f"method takes ``(self, event)`` or ``(self, event, ctx)`` (an\n"
            f":class:`EventContext`)."
        ),
    )


#: Mark a :class:`Projection` method as the handler of an event class.
projects = _marker(_PROJECTS, "projects", "projection handler")


def _event_types_of(
    cls: type, fn: Callable[..., Any], given: tuple[type, ...] | None
) -> tuple[tuple[type, ...], int]:
    """The event classes ``fn`` takes, and its number of parameters besides self (1 or 2)."""
    code = fn.__code__
    params = code.co_varnames[1 : code.co_argcount]
    if len(params) not in (1, 2):
        raise TypeError(
            f"{cls.__name__}.{fn.__name__} must take (self, event) or (self, event, ctx)"
        )
    if given is not None:
        return given, len(params)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise TypeError(
            f"{cls.__name__}.{fn.__name__}: cannot resolve its parameter's annotation "
            f"({exc}); name the class explicitly, e.g. @projects(MyEvent)"
        ) from exc
    hint = hints.get(params[0])
    if isinstance(hint, type):
        return (hint,), len(params)
    args = typing.get_args(hint)
    if args and all(isinstance(a, type) for a in args):
        return tuple(args), len(params)
    raise TypeError(
        f"{cls.__name__}.{fn.__name__}: annotate its event parameter with a class "
        f"(or name it: @projects(MyEvent)), not {hint!r}"
    )


@final
class EventContext:
    """What a handler knows about the event besides the event itself.

    Attributes:
        record: the stored event (:class:`RecordedEvent`).
        db: the open transaction the batch's checkpoint is written in: a
            :class:`sqlite3.Connection` (SQLite store), a
            ``psycopg.Connection`` (PostgreSQL store), or ``None`` (the
            checkpoint is kept in memory, and for process managers). Write
            the read model through it for exactly once in effect; never
            commit or roll back yourself.
    """

    __slots__ = ("_name", "db", "record")

    def __init__(self, record: RecordedEvent, db: Any, name: str) -> None:
        self.record = record
        self.db = db
        self._name = name

    @property
    def position(self) -> int:
        """The event's global position."""
        return self.record.position

    @property
    def stream(self) -> str:
        """The event's stream name."""
        return self.record.stream

    @property
    def key(self) -> str:
        """The key part of the stream name (after the first ``"-"``)."""
        return self.record.stream.partition("-")[2]

    @property
    def category(self) -> str:
        """The category part of the stream name (before the first ``"-"``)."""
        return self.record.stream.partition("-")[0]

    @property
    def version(self) -> int:
        """The event's version in its stream."""
        return self.record.version

    @property
    def recorded_at(self) -> float:
        """When the store wrote it (seconds since the epoch)."""
        return self.record.recorded_at

    @property
    def metadata(self) -> dict[str, Any]:
        """The event's metadata, decoded (``{}`` if it is not a JSON object)."""
        try:
            value = json.loads(self.record.metadata)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def command_id(self, step: str | int = 0) -> str:
        """A command id derived from this event: ``f"{name}:{position}:{step}"``.

        A process manager sends each command with one, so that a redelivered
        event (after a crash) cannot apply a command twice.
        """
        return f"{self._name}:{self.record.position}:{step}"

    def __repr__(self) -> str:
        r = self.record
        return f"<EventContext {r.type} at position {r.position} ({r.stream}@{r.version})>"


class _Flow:
    """What projections and process managers share: handlers, codec, name, filters."""

    _marker_attr: ClassVar[str] = _PROJECTS
    _kind: ClassVar[str] = "projection"

    #: The checkpoint's key (default: the class's name).
    name: ClassVar[str | None] = None
    #: Aggregate types (their events) or event classes this reads; the
    #: handlers' own classes are read too.
    reads: ClassVar[Sequence[type]] = ()
    #: Read only these stream categories (``None``: every stream).
    categories: ClassVar[Sequence[str] | None] = None
    #: Most events applied (and checkpointed) at a time.
    batch_size: ClassVar[int] = 500

    _handlers: ClassVar[dict[type, tuple[Callable[..., Any], int]]] = {}
    _flow_codec: ClassVar[EventCodec]
    _type_names: ClassVar[frozenset[str]] = frozenset()
    # The checkpoint when it is kept in memory (on the object itself).
    _trio_aggregates_position: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[type, tuple[Callable[..., Any], int]] = {}
        for klass in reversed(cls.__mro__):
            for fn in vars(klass).values():
                if callable(fn) and hasattr(fn, cls._marker_attr):
                    types, arity = _event_types_of(cls, fn, getattr(fn, cls._marker_attr))
                    for t in types:
                        handlers[t] = (fn, arity)
        cls._handlers = handlers
        codec = EventCodec()
        upcast_names: list[str] = []
        for item in cls.reads:
            if isinstance(item, type) and issubclass(item, Aggregate):
                source = item.codec()
                for type_name, event_cls in source.types.items():
                    codec.register(event_cls, type_name)
                for old_name, upcaster in source._upcasters.items():
                    if old_name not in codec._upcasters:
                        codec.add_upcaster(old_name, upcaster)
                        upcast_names.append(old_name)
            elif isinstance(item, type):
                codec.register(item)
            else:
                raise InvalidArgument(f"{cls.__name__}.reads lists classes, not {item!r}")
        for event_cls in handlers:
            if event_cls not in codec._by_type:
                codec.register(event_cls)
        cls._flow_codec = codec
        # Type names worth reading: those whose class has a handler, and old
        # names an upcaster may turn into one.
        names = {n for n, c in codec.types.items() if cls._handler_for(c) is not None}
        cls._type_names = frozenset(names | set(upcast_names))
        if cls.batch_size < 1:
            raise InvalidArgument(f"{cls.__name__}.batch_size must be >= 1")
        if cls.categories is not None and isinstance(cls.categories, str):
            raise InvalidArgument(f"{cls.__name__}.categories is a sequence of str, not a str")

    @classmethod
    def _handler_for(cls, event_cls: type) -> tuple[Callable[..., Any], int] | None:
        found = cls._handlers.get(event_cls)
        if found is None:
            for base in event_cls.__mro__[1:]:
                found = cls._handlers.get(base)
                if found is not None:
                    cls._handlers[event_cls] = found
                    break
        return found

    @property
    def flow_name(self) -> str:
        """The checkpoint key: the class attribute ``name``, or the class's name."""
        name = type(self).name
        return name if name else type(self).__name__

    async def _process_batch(
        self, checkpoints: _Checkpoints, batch: list[RecordedEvent]
    ) -> tuple[int, int]:
        """Apply ``batch`` and store the checkpoint; return (position reached, events handled)."""
        raise NotImplementedError

    def _decode(self, record: RecordedEvent) -> tuple[object, Callable[..., Any], int] | None:
        """The event and its handler, or ``None`` for an event this flow does not handle."""
        if record.type not in self._type_names:
            return None
        event = self._flow_codec.decode(
            record.type,
            record.data,
            where=f"position {record.position} ({record.stream}@{record.version})",
        )
        found = self._handler_for(type(event))
        if found is None:
            return None
        return event, found[0], found[1]


class Projection(_Flow):
    """Base class of projections: a read model fed by the store's events.

    Attributes:
        name: the checkpoint's key (default: the class's name). Two
            projections with one name share a checkpoint: do not.
        reads: aggregate types (all their event classes) or event classes
            the projection decodes; the handlers' classes are added.
        categories: read only these stream categories (``None``: all).
        batch_size: most events applied in one transaction (500).
        checkpoint_in_store: keep the checkpoint in the store's database
            (default). ``False``: in memory, on this object (for a read model
            held in the object's own attributes).

    Handlers are synchronous and do no I/O but through ``ctx.db``; with a
    durable store they run in a worker thread, one batch at a time. On
    SQLite a batch's transaction holds the database's write lock while its
    handlers run (appends wait for it): keep handlers quick, or
    ``batch_size`` small.
    """

    checkpoint_in_store: ClassVar[bool] = True

    async def _process_batch(
        self, checkpoints: _Checkpoints, batch: list[RecordedEvent]
    ) -> tuple[int, int]:
        return await checkpoints.apply(self, batch)

    def setup(self, db: Any) -> None:
        """Create the read model if need be (in a transaction, at each start; ``db`` is
        ``None`` when the checkpoint is kept in memory). Default: nothing."""

    def clear(self, db: Any) -> None:
        """Empty the read model, for :meth:`ProjectionRunner.reset` (in the transaction
        that sets the checkpoint back to 0). Default: nothing."""


@attrs.frozen
class ProjectionStatistics:
    """A projection's progress, from :meth:`ProjectionRunner.statistics`.

    Attributes:
        name: the projection's name.
        state: ``"starting"``, ``"running"``, ``"stopped"`` or ``"failed"``.
        position: the checkpoint: every event up to it is applied.
        head_position: the store's head position when last looked at.
        lag_positions: ``head_position - position`` (0 when caught up); with
            ``categories`` or events of other types, an upper bound.
        lag_seconds: when behind, how long ago the last applied event was
            recorded; 0 when caught up.
        events_handled: events handed to a handler since the start.
        error: why it failed (:class:`ProjectionFailed`), or the last store
            error while reading (retried), or ``None``.
        durable: the checkpoint is in the store's database, written in each
            batch's transaction (``False``: in memory, on the object).
    """

    name: str
    state: State
    position: int
    head_position: int
    lag_positions: int
    lag_seconds: float
    events_handled: int
    error: BaseException | None
    durable: bool = False


# -- checkpoints ----------------------------------------------------------------


class _Checkpoints:
    """Where a flow's checkpoint lives, and how a batch is applied with it."""

    transactional: ClassVar[bool] = False

    async def load(self, flow: _Flow) -> int:
        raise NotImplementedError

    async def setup(self, flow: Projection) -> None:
        raise NotImplementedError

    async def apply(self, flow: Projection, records: list[RecordedEvent]) -> tuple[int, int]:
        """Apply ``records``; return (position reached, events handled)."""
        raise NotImplementedError

    async def save(self, flow: _Flow, position: int) -> None:
        raise NotImplementedError

    async def reset(self, flow: _Flow) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def _apply_batch(flow: Projection, records: list[RecordedEvent], db: Any) -> int:
    """Run the handlers of ``records`` (in a transaction if ``db``); return how many ran.

    Raises:
        ProjectionFailed: a handler raised or an event did not decode.
    """
    name = flow.flow_name
    handled = 0
    for record in records:
        try:
            found = flow._decode(record)
            if found is None:
                continue
            event, handler, arity = found
            if arity == 1:
                handler(flow, event)
            else:
                handler(flow, event, EventContext(record, db, name))
        except Exception as exc:
            raise ProjectionFailed(name, record, exc) from exc
        handled += 1
    return handled


@final
class _MemoryCheckpoints(_Checkpoints):
    """The checkpoint on the flow object itself: at least once (the events are in memory)."""

    async def load(self, flow: _Flow) -> int:
        return flow._trio_aggregates_position

    async def setup(self, flow: Projection) -> None:
        flow.setup(None)

    async def apply(self, flow: Projection, records: list[RecordedEvent]) -> tuple[int, int]:
        handled = 0
        name = flow.flow_name
        for record in records:
            found = None
            try:
                found = flow._decode(record)
                if found is not None:
                    event, handler, arity = found
                    if arity == 1:
                        handler(flow, event)
                    else:
                        handler(flow, event, EventContext(record, None, name))
            except Exception as exc:
                raise ProjectionFailed(name, record, exc) from exc
            if found is not None:
                handled += 1
            flow._trio_aggregates_position = record.position
        return records[-1].position, handled

    async def save(self, flow: _Flow, position: int) -> None:
        flow._trio_aggregates_position = position

    async def reset(self, flow: _Flow) -> None:
        if isinstance(flow, Projection):
            flow.clear(None)
        flow._trio_aggregates_position = 0


class _Superseded(Exception):
    """Another runner of the projection moved its checkpoint (to ``position``)."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


def _upsert(mark: str, where: str = "") -> str:
    """Write a checkpoint row (``name, position, updated_at``), if ``where`` holds."""
    return (
        f"INSERT INTO {CHECKPOINTS_TABLE} (name, position, updated_at) "
        f"VALUES ({mark}, {mark}, {mark}) "
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
        f"updated_at = excluded.updated_at{where}"
    )


class _SQLCheckpoints(_Checkpoints):
    """The checkpoint in the store's SQL database, written with the read model's batch.

    A subclass gives its parameter mark and ``_run``: run a function on its
    connection in a transaction (in a worker thread, one at a time), its
    driver's errors as :class:`StoreError`.

    Two runners of one name (two processes, say) never both apply an event:
    a batch's checkpoint is written only if the row still holds the position
    this runner last read or wrote (compare and set, in the batch's
    transaction); else the batch rolls back, and the runner takes the row's
    position and skips what the other one applied.
    """

    transactional = True
    _mark: ClassVar[str]
    #: apply's batch in pipeline mode (fewer round trips), where the driver has one
    _pipeline: ClassVar[bool] = False

    def __init__(self) -> None:
        m = self._mark
        self._select = f"SELECT position FROM {CHECKPOINTS_TABLE} WHERE name = {m}"
        self._save = _upsert(m)  # unconditional: a reset
        self._advance = _upsert(m, f" WHERE {CHECKPOINTS_TABLE}.position = {m} RETURNING position")
        self._raise = _upsert(m, f" WHERE {CHECKPOINTS_TABLE}.position < excluded.position")
        #: per name: the position this runner last read or wrote
        self._known: dict[str, int] = {}

    async def _run(self, fn: Callable[[Any], Any], action: str, *, pipeline: bool = False) -> Any:
        raise NotImplementedError

    async def load(self, flow: _Flow) -> int:
        name = flow.flow_name
        position = int(await self._run(self._reader(name), f"read the checkpoint of {name!r}"))
        self._known[name] = position
        return position

    def _reader(self, name: str) -> Callable[[Any], int]:
        def read(db: Any) -> int:
            row = db.execute(self._select, (name,)).fetchone()
            return 0 if row is None else int(row[0])

        return read

    async def setup(self, flow: Projection) -> None:
        await self._run(flow.setup, f"set up {flow.flow_name!r}")

    async def apply(self, flow: Projection, records: list[RecordedEvent]) -> tuple[int, int]:
        name = flow.flow_name
        position = records[-1].position
        read = self._reader(name)
        while True:
            known = self._known.get(name, 0)
            if position <= known:
                return known, 0  # another runner of this name applied them
            todo = records if records[0].position > known else [
                r for r in records if r.position > known
            ]  # fmt: skip

            def batch(db: Any, todo: list[RecordedEvent] = todo, known: int = known) -> int:
                handled = _apply_batch(flow, todo, db)
                row = db.execute(self._advance, (name, position, time.time(), known)).fetchone()
                if row is None:
                    raise _Superseded(read(db))
                return handled

            try:
                handled = await self._run(
                    batch, f"apply a batch of {name!r}", pipeline=self._pipeline
                )
            except _Superseded as superseded:  # rolled back: take theirs, skip what they did
                logger.warning(
                    "projection %r: another runner moved its checkpoint to %d",
                    name,
                    superseded.position,
                )
                self._known[name] = superseded.position
                continue
            self._known[name] = position
            return position, int(handled)

    async def save(self, flow: _Flow, position: int) -> None:
        name = flow.flow_name
        await self._run(
            lambda db: db.execute(self._raise, (name, position, time.time())),
            f"save the checkpoint of {name!r}",
        )
        self._known[name] = max(position, self._known.get(name, 0))

    async def reset(self, flow: _Flow) -> None:
        name = flow.flow_name

        def reset(db: Any) -> None:
            if isinstance(flow, Projection):
                flow.clear(db)
            db.execute(self._save, (name, 0, time.time()))

        await self._run(reset, f"reset {name!r}")
        self._known[name] = 0


_SQLITE_SCHEMA: Final = (
    f"CREATE TABLE IF NOT EXISTS {CHECKPOINTS_TABLE} ("
    "name TEXT PRIMARY KEY, position INTEGER NOT NULL, updated_at REAL NOT NULL)"
)


@final
class _SQLiteCheckpoints(_SQLCheckpoints):
    """The checkpoint in the store's SQLite file, written with the read model's batch."""

    _mark = "?"

    def __init__(self, path: str, busy_timeout: float = 30.0) -> None:
        super().__init__()
        self._path = path
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._lock = trio.Lock()  # one transaction at a time on the connection

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(
                self._path,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._busy_timeout,
            )
            try:
                db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                # The checkpoint and the read model commit together: a power
                # loss may lose both of a last batch, never one without the other.
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute(_SQLITE_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[Any], Any], action: str, *, pipeline: bool = False) -> Any:
        def work() -> Any:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        async with self._lock:
            try:
                return await trio.to_thread.run_sync(work, abandon_on_cancel=False)
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite failed to {action}: {exc!r}") from exc

    async def aclose(self) -> None:
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await trio.to_thread.run_sync(db.close)


_PG_SCHEMA: Final = (
    f"CREATE TABLE IF NOT EXISTS {CHECKPOINTS_TABLE} ("
    "name TEXT PRIMARY KEY, position BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)"
)


@final
class _PostgresCheckpoints(_SQLCheckpoints):
    """The checkpoint in the store's PostgreSQL database, written with the read model's batch."""

    _mark = "%s"
    _pipeline = True

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._conn: Any = None
        self._lock = trio.Lock()

    def _connect(self) -> Any:
        import psycopg

        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._conn.close()
            self._conn = None
        if self._conn is None:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            try:
                statement_timeout = _statement_timeout(self._conninfo)
                if statement_timeout is not None:
                    # The store's own bound (its pool sets the same): a batch
                    # stuck on a lock fails with StoreError, the runner goes on.
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, false)", (statement_timeout,)
                    )
                # Two processes creating the table at once: one waits for the other.
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(7391118002)")
                    conn.execute(_PG_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[Any], Any], action: str, *, pipeline: bool = False) -> Any:
        import psycopg

        def work() -> Any:
            if pipeline:
                # The statements of the whole batch in one round trip or so
                # (pipeline mode). A server error then surfaces late, maybe
                # in a later handler: run the batch again statement by
                # statement, so that the failure names the right event.
                conn = self._connect()
                try:
                    with conn.transaction(), conn.pipeline():
                        return fn(conn)
                except ProjectionFailed as exc:
                    if not isinstance(exc.__cause__, psycopg.Error):
                        raise  # a handler's own exception: it is the right event
                except psycopg.Error:
                    pass
            conn = self._connect()
            with conn.transaction():
                return fn(conn)

        async with self._lock:
            try:
                return await trio.to_thread.run_sync(work, abandon_on_cancel=False)
            except psycopg.Error as exc:
                raise StoreError(f"PostgreSQL failed to {action}: {exc!r}") from exc

    async def aclose(self) -> None:
        async with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await trio.to_thread.run_sync(conn.close)


def _statement_timeout(conninfo: str) -> str | None:
    """The ``statement_timeout`` the PostgreSQL store's own connections get.

    Nine tenths of the store's ``timeout``, which its conninfo carries as
    ``tcp_user_timeout`` (milliseconds); ``None`` when the DSN's ``options``
    set a statement_timeout themselves (theirs stands) or there is no bound.
    """
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    if "statement_timeout" in str(params.get("options", "")):
        return None
    try:
        milliseconds = int(str(params["tcp_user_timeout"]))
    except (KeyError, ValueError):
        return None
    return f"{max(1, milliseconds * 9 // 10)}ms" if milliseconds > 0 else None


def _checkpoints_for(store: EventStore, flow: _Flow) -> _Checkpoints:
    """The checkpoint place for ``flow`` on ``store`` (see the module docstring)."""
    if isinstance(flow, Projection) and not flow.checkpoint_in_store:
        return _MemoryCheckpoints()
    from .._stores._sqlite import SQLiteEventStore

    if isinstance(store, SQLiteEventStore):
        if store.path == ":memory:" or store.path.startswith("file:"):
            return _MemoryCheckpoints()
        return _SQLiteCheckpoints(store.path)
    # A PostgreSQL store exists only if its module (and psycopg) was imported.
    postgres = sys.modules.get("trio_aggregates._stores._postgres")
    if postgres is not None and isinstance(store, postgres.PostgresEventStore):
        return _PostgresCheckpoints(store.conninfo)
    return _MemoryCheckpoints()


# -- running ------------------------------------------------------------------


@final
class RunningProjection:
    """One projection or process manager being run: its progress, and a reset.

    Returned by ``nursery.start(run_projection, ...)``, and held by a
    :class:`ProjectionRunner` for each of its projections.
    """

    def __init__(self, store: EventStore, flow: _Flow, poll_interval: float) -> None:
        self._store = store
        self._flow = flow
        self._poll_interval = poll_interval
        self._checkpoints = _checkpoints_for(store, flow)
        self.name = flow.flow_name
        self._kind = flow._kind
        self._state: State = "starting"
        self._position = 0
        self._head = 0
        self._handled = 0
        self._last_recorded_at: float | None = None
        # Every event up to here was read (with the flow's filters): for the lag.
        self._caught_up_to = 0
        self._idle = trio.Event()  # set when the live loop has nothing in hand
        self._error: BaseException | None = None
        self._scope: trio.CancelScope | None = None
        self._reset_wanted = False  # reset() or restart() asked for
        self._reset_clears = False  # reset(), not restart()
        self._reset_done: trio.Event | None = None
        self._wakeup = trio.Event()
        self._ended = trio.Event()

    @property
    def projection(self) -> _Flow:
        """The projection (or process manager) object."""
        return self._flow

    def statistics(self) -> ProjectionStatistics:
        """Its progress now (no I/O; the head position is refreshed by the running task)."""
        head = max(self._head, self._position)
        lag = head - max(self._position, self._caught_up_to)
        lag = max(lag, 0)
        seconds = 0.0
        if lag and self._last_recorded_at is not None:
            seconds = max(0.0, time.time() - self._last_recorded_at)
        return ProjectionStatistics(
            self.name,
            self._state,
            self._position,
            head,
            lag,
            seconds,
            self._handled,
            self._error,
            self._checkpoints.transactional,
        )

    async def reset(self) -> None:
        """Empty the read model (``clear``), set the checkpoint to 0, and rebuild from position 1.

        Waits for the batch in hand, then for the reset itself (not for the
        rebuild). Works on a failed projection too: it runs again.

        Raises:
            StoreError: the reset could not be written (the projection is
                then failed, with that error).
            TrioAggregatesError: the projection is not running any more.
        """
        await self._request(reset=True)

    async def restart(self) -> None:
        """Run a failed projection again, from its checkpoint (the failing event first).

        For a failure whose cause is gone (an external system that was
        down, a fixed handler). A running projection stops at its batch in
        hand and goes on from its checkpoint. Waits until it has restarted.

        Raises:
            TrioAggregatesError: the projection is not running any more.
        """
        await self._request(reset=False)

    async def _request(self, *, reset: bool) -> None:
        if self._ended.is_set():
            raise TrioAggregatesError(f"{self._kind} {self.name!r} is not running")
        done = self._reset_done = trio.Event()
        self._reset_wanted = True
        self._reset_clears = reset
        if self._scope is not None:
            self._scope.cancel()
        self._wakeup.set()
        await done.wait()
        if self._state == "failed" and isinstance(self._error, StoreError):
            raise self._error

    async def _serve(self, task_status: trio.TaskStatus[RunningProjection]) -> None:
        """The task: run, reset on demand, idle after a failure until a reset."""
        # The first run reports ready (its checkpoint loaded, or it failed to start).
        status: trio.TaskStatus[RunningProjection] | None = task_status
        try:
            while True:
                if self._reset_wanted:
                    self._reset_wanted = False
                    try:
                        if self._reset_clears:
                            await self._checkpoints.reset(self._flow)
                    except StoreError as exc:
                        self._fail(exc)
                    else:
                        self._error = None
                        if self._reset_clears:
                            self._handled = 0
                            self._position = 0
                            self._caught_up_to = 0
                        self._state = "starting"
                    if self._reset_done is not None:
                        self._reset_done.set()
                if self._state != "failed":
                    # Returns after a failure; cancelled for a reset.
                    with trio.CancelScope() as self._scope:
                        await self._run(status)
                    self._scope = None
                    status = None
                if self._state == "failed" and not self._reset_wanted:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()  # for a reset
        finally:
            if self._state != "failed":
                self._state = "stopped"
            self._ended.set()
            if self._reset_done is not None:
                self._reset_done.set()
            with trio.CancelScope(shield=True):
                await self._checkpoints.aclose()

    def _fail(self, error: BaseException) -> None:
        self._state = "failed"
        self._error = error
        if isinstance(error, ProjectionFailed):
            logger.error("%s", error, exc_info=error.__cause__)
        else:
            logger.error("projection %r failed: %r", self.name, error)

    async def _run(self, task_status: trio.TaskStatus[RunningProjection] | None) -> None:
        """Load the checkpoint, catch up, follow live; return on a failure."""
        flow = self._flow
        try:
            if isinstance(flow, Projection):
                await self._checkpoints.setup(flow)
            self._position = await self._checkpoints.load(flow)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, TrioAggregatesError)
                else StoreError(f"projection {self.name!r} could not start: {exc!r}")
            )
            self._fail(error)
            if task_status is not None:
                task_status.started(self)
            return
        self._state = "running"
        if task_status is not None:
            task_status.started(self)
        try:
            await self._follow()
        except ProjectionFailed as exc:
            self._fail(exc)
            # In memory, the events before the failing one stay applied.
            with trio.CancelScope(shield=True), contextlib.suppress(StoreError):
                self._position = await self._checkpoints.load(flow)

    def _filters(self) -> dict[str, Any]:
        flow = self._flow
        categories = list(flow.categories) if flow.categories is not None else None
        return {"categories": categories, "event_types": sorted(flow._type_names)}

    async def _follow(self) -> None:
        """Catch up through read_all pages, then follow a subscription, batch by batch."""
        flow = self._flow
        filters = self._filters()
        limit = flow.batch_size
        delay = 0.05
        await self._catch_up(filters, limit)
        # Live.
        from ._subscription import open_subscription

        while True:
            try:
                await self._live(open_subscription, filters)
            except StoreError as exc:
                self._error = exc
                await trio.sleep(delay)
                delay = min(delay * 2, self._poll_interval)

    async def _catch_up(self, filters: dict[str, Any], limit: int) -> None:
        """Apply read_all pages (one batch each) until a short one, reading the next
        page while the current one is applied."""
        store = self._store
        send, receive = trio.open_memory_channel[tuple[list[RecordedEvent], int]](1)
        failure: ProjectionFailed | None = None

        async def reader() -> None:
            position = self._position + 1
            delay = 0.05
            async with send:
                while True:
                    try:
                        head = await store.head_position()
                        page = await store.read_all(position, limit=limit, **filters)
                    except StoreError as exc:
                        self._error = exc
                        await trio.sleep(delay)
                        delay = min(delay * 2, self._poll_interval)
                        continue
                    self._error = None
                    try:
                        await send.send((page, head))
                    except trio.BrokenResourceError:
                        return  # the batches stopped (a failure)
                    if len(page) < limit:
                        return
                    position = page[-1].position + 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            try:
                async with receive:
                    async for page, head in receive:
                        self._head = max(self._head, head)
                        if page:
                            await self._handle(page)
                        if len(page) < limit:
                            # Every event up to ``head`` was readable: all seen.
                            self._caught_up_to = head
            except ProjectionFailed as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _live(self, open_subscription: Any, filters: dict[str, Any]) -> None:
        """Follow a subscription from the checkpoint; apply what is there in batches."""
        flow = self._flow
        send, receive = trio.open_memory_channel[RecordedEvent](flow.batch_size)
        failure: BaseException | None = None
        read_error: StoreError | None = None

        async def pump() -> None:
            nonlocal read_error
            async with send:
                try:
                    async with open_subscription(
                        self._store,
                        self._position + 1,
                        poll_interval=self._poll_interval,
                        **filters,
                    ) as subscription:
                        async for record in subscription:
                            self._head = max(self._head, record.position)
                            try:
                                send.send_nowait(record)
                            except trio.WouldBlock:
                                await send.send(record)
                except StoreError as exc:
                    read_error = exc
                except trio.BrokenResourceError:
                    pass  # the batches stopped (a failure)

        async def watch_head() -> None:
            # The head, for the statistics; and, when nothing this flow reads
            # lies between its checkpoint and the head, that it is caught up.
            while True:
                with trio.move_on_after(self._poll_interval):
                    await self._idle.wait()
                self._idle = trio.Event()
                # At most one look every 20 ms, however often the flow idles.
                await trio.sleep(min(0.02, self._poll_interval))
                try:
                    head = await self._store.head_position()
                    if head > max(self._position, self._caught_up_to):
                        pending = await self._store.read_all(self._position + 1, limit=1, **filters)
                        if not pending or pending[0].position > head:
                            self._caught_up_to = head
                except StoreError:
                    continue
                self._head = max(self._head, head)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            nursery.start_soon(watch_head)
            try:
                async with receive:
                    async for first in receive:
                        batch = [first]
                        while len(batch) < flow.batch_size:
                            try:
                                batch.append(receive.receive_nowait())
                            except trio.WouldBlock:
                                break
                        await self._handle(batch)
                        self._error = None
                        if receive.statistics().current_buffer_used == 0:
                            self._idle.set()
            except ProjectionFailed as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if read_error is not None:
            raise read_error

    async def _handle(self, batch: list[RecordedEvent]) -> None:
        """Apply one batch and store the checkpoint (never interrupted half-way).

        A store error (the transaction or the checkpoint could not be
        written: nothing of the batch was committed) is retried, a growing
        delay apart, up to ``poll_interval``; the statistics show it meanwhile.
        """
        delay = 0.05
        while True:
            try:
                with trio.CancelScope(shield=True):
                    position, handled = await self._flow._process_batch(self._checkpoints, batch)
            except StoreError as exc:
                self._error = exc
                logger.warning("%s %r: batch not written, retrying: %r", self._kind, self.name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, self._poll_interval)
                continue
            break
        self._error = None
        self._done(position, handled, batch[-1].recorded_at)
        await trio.lowlevel.checkpoint()

    def _done(self, position: int, handled: int, recorded_at: float) -> None:
        self._position = position
        self._handled += handled
        self._last_recorded_at = recorded_at
        self._head = max(self._head, position)


def _check_poll_interval(poll_interval: float) -> float:
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, int | float)
        or not 0 < poll_interval < math.inf
    ):
        raise InvalidArgument(f"poll_interval must be a positive number, not {poll_interval!r}")
    return float(poll_interval)


def _check_flow(flow: object) -> _Flow:
    if not isinstance(flow, _Flow):
        raise InvalidArgument(
            f"expected a Projection or ProcessManager instance, not {type(flow).__name__}"
        )
    return flow


async def run_projection(
    store: EventStore,
    projection: _Flow,
    *,
    poll_interval: float = 1.0,
    task_status: trio.TaskStatus[RunningProjection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one projection (or process manager) until cancelled.

    Use ``running = await nursery.start(run_projection, store, projection)``.

    Reports ready, with its :class:`RunningProjection`, once its checkpoint is
    loaded (or it failed to start: see its statistics). A failing handler
    stops this projection only: it is logged and kept in its statistics
    (``state == "failed"``), and the task idles until a reset or its
    cancellation; this call never raises for it, so that the caller's
    nursery and its other children go on.

    Cancellation: waits for the batch in hand (its transaction commits with
    its checkpoint; a process manager finishes the commands of its events in
    hand), then returns.

    Raises:
        InvalidArgument: ``projection`` is not a Projection or
            ProcessManager, or a bad ``poll_interval``.
    """
    running = RunningProjection(store, _check_flow(projection), _check_poll_interval(poll_interval))
    await running._serve(task_status)


@final
class ProjectionRunner:
    """The projections and process managers of an :func:`open_projections` block."""

    def __init__(self, store: EventStore, running: Mapping[str, RunningProjection]) -> None:
        self._store = store
        self._running = dict(running)

    def __getitem__(self, name: str) -> RunningProjection:
        """The running projection of that name."""
        return self._running[name]

    def __iter__(self) -> typing.Iterator[str]:
        return iter(self._running)

    def __len__(self) -> int:
        return len(self._running)

    def statistics(self) -> dict[str, ProjectionStatistics]:
        """Each projection's progress, by name."""
        return {name: r.statistics() for name, r in self._running.items()}

    async def reset(self, name: str) -> None:
        """Rebuild projection ``name`` from position 1 (see :meth:`RunningProjection.reset`).

        Raises:
            KeyError: no projection of that name.
        """
        await self._running[name].reset()

    async def restart(self, name: str) -> None:
        """Run projection ``name`` again from its checkpoint (see
        :meth:`RunningProjection.restart`).

        Raises:
            KeyError: no projection of that name.
        """
        await self._running[name].restart()

    async def wait_caught_up(self, position: int | None = None) -> None:
        """Wait until every projection that is not failed has applied ``position``
        (default: the store's head position now), or failed.

        A check every few milliseconds; bound it with ``trio.fail_after``.
        """
        if position is None:
            position = await self._store.head_position()
        await _wait_caught_up(self._running.values(), position)


async def _wait_caught_up(running: Iterable[RunningProjection], position: int) -> None:
    pending = list(running)
    while True:
        pending = [
            r
            for r in pending
            if r._state not in ("failed", "stopped")
            and r._position < position
            and r._caught_up_to < position
        ]
        if not pending:
            return
        await trio.sleep(0.005)


@asynccontextmanager
async def open_projections(
    store: EventStore,
    projections: Sequence[_Flow],
    *,
    poll_interval: float = 1.0,
) -> AsyncIterator[ProjectionRunner]:
    """Run ``projections`` (and process managers) as children of this block.

    Each starts from its checkpoint (loaded before the block's body runs),
    catches up, then follows live events. The body gets a
    :class:`ProjectionRunner` (statistics, reset).

    Args:
        store: the event store (memory, SQLite or PostgreSQL; see the module
            docstring for where checkpoints live).
        projections: :class:`Projection` and :class:`ProcessManager`
            instances, with distinct names.
        poll_interval: how often the head position is refreshed for the
            statistics, and the longest wait between tries after a store error
            (the subscription's own polling fallback too).

    Leaving the block cancels them: each finishes its batch in hand and
    stores its checkpoint first. A failing projection does not end the
    block; it shows in :meth:`ProjectionRunner.statistics`. An exception from
    the body propagates unchanged, not wrapped in an exception group.

    Raises:
        InvalidArgument: not projections, two with one name, or a bad
            ``poll_interval``.
    """
    poll_interval = _check_poll_interval(poll_interval)
    flows = [_check_flow(p) for p in projections]
    names = [f.flow_name for f in flows]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"two projections with one name in {names!r}")
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            running: dict[str, RunningProjection] = {}
            for flow in flows:
                r = RunningProjection(store, flow, poll_interval)
                running[r.name] = await nursery.start(r._serve)
            try:
                yield ProjectionRunner(store, running)
            except BaseException as exc:
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Ctrl-C may land in any task, nested groups deep: it wins, alone.
        fatal = group.split((KeyboardInterrupt, SystemExit))[0]
        if fatal is not None:
            first: BaseException = fatal
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        if group.split(trio.Cancelled)[1] is not None:
            raise TrioAggregatesError(
                "internal error in trio_aggregates (please report it)"
            ) from group
        if body_error is None:
            raise  # cancelled from outside: the enclosing scope takes it
    if body_error is not None:
        raise body_error
