"""An in-memory event store that fails, stalls or slows down when a test says so.

:class:`FaultyStore` is a real :class:`InMemoryEventStore` (every call does
what the store protocol says) with three kinds of injected trouble, each for
one operation and optionally only for some streams:

* :meth:`FaultyStore.fail`: calls raise (a :class:`StoreError` by default),
  before doing anything, or after doing their work (a lost ``COMMIT`` answer);
* :meth:`FaultyStore.hold`: calls wait at a :class:`Latch` until it is released
  (to catch a command mid-append, for ordering and cancellation tests);
* :meth:`FaultyStore.delay`: calls take a while (of Trio's clock: use the
  autojump clock).

and counters of what it was asked (``calls``, ``in_flight``,
``max_in_flight``, ``events_read``).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Final, Literal, TypeVar, final, get_args

import attrs
import trio

from .._core._exceptions import InvalidArgument, StoreError
from .._stores._store import InMemoryEventStore, NewEvent, RecordedEvent, Snapshot

__all__ = ["FaultyStore", "Latch", "Operation"]

T = TypeVar("T")

#: The store operations a fault can be injected into (the :class:`EventStore` methods).
Operation = Literal[
    "append",
    "find_command",
    "read",
    "stream_version",
    "read_all",
    "head_position",
    "save_snapshot",
    "load_snapshot",
    "delete_stream",
]
_OPERATIONS: Final = frozenset(get_args(Operation))


def _check_operation(operation: object) -> str:
    if operation not in _OPERATIONS:
        raise InvalidArgument(
            f"unknown store operation {operation!r}; one of {', '.join(sorted(_OPERATIONS))}"
        )
    return operation  # type: ignore[return-value]


def _stream_set(streams: str | Iterable[str] | None) -> frozenset[str] | None:
    if streams is None:
        return None
    if isinstance(streams, str):
        return frozenset((streams,))
    found = frozenset(streams)
    if not all(isinstance(s, str) for s in found):
        raise InvalidArgument(f"streams are names (str), not {streams!r}")
    return found


def _fresh(error: BaseException) -> BaseException:
    """A new instance of ``error`` (same class, attributes, args and cause), for
    each call that raises it: one object raised twice would chain its tracebacks."""
    copy = error.__class__.__new__(error.__class__)
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    if error.__cause__ is not None:
        copy.__cause__ = error.__cause__
    return copy


def _matches(rule: _Rule | Latch, operation: str, stream: str | None) -> bool:
    """Whether ``rule`` (a fault or a latch) applies to a call of ``operation`` on ``stream``."""
    return operation == rule.operation and (
        rule.streams is None or (stream is not None and stream in rule.streams)
    )


@attrs.define(eq=False)
class _Rule:
    """One injected fault: the calls it applies to (what it does: see the subclasses)."""

    operation: str
    streams: frozenset[str] | None


@attrs.define(eq=False)
class _Failure(_Rule):
    error: BaseException | None
    after_commit: bool
    # Calls still to fail (None: every call until healed).
    remaining: int | None


@attrs.define(eq=False)
class _Delay(_Rule):
    seconds: float


@final
class Latch:
    """Holds the store calls it matches until :meth:`release` (made by :meth:`FaultyStore.hold`).

    A held call waits *before* it does anything, and honours cancellation
    while it waits (a cancelled call does nothing). Used as a context manager
    (``with store.hold("append") as latch:``), the latch is released when the
    block ends, whatever happens, so that no test leaves a call hanging.

    Attributes:
        operation: the store operation it holds.
        streams: the streams it holds (``None``: all).
        waiting: how many calls it holds right now.
        held: how many calls it has held in all.
    """

    def __init__(self, operation: str, streams: frozenset[str] | None) -> None:
        self.operation = operation
        self.streams = streams
        self.waiting = 0
        self.held = 0
        self._released = trio.Event()
        self._changed = trio.Event()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called (later calls pass straight through)."""
        return self._released.is_set()

    def release(self) -> None:
        """Let every held call go on, and stop holding new ones. Idempotent."""
        self._released.set()

    async def wait_held(self, count: int = 1) -> None:
        """Wait until ``count`` calls are held at once (returns at once if they are).

        Always a checkpoint.

        Raises:
            RuntimeError: the latch is released before that many are held
                (they never will be).
        """
        await trio.lowlevel.checkpoint()
        while self.waiting < count:
            if self.released:
                raise RuntimeError(
                    f"the latch on {self.operation!r} was released before {count} "
                    f"calls were held at once"
                )
            changed = self._changed
            await changed.wait()

    async def _hold(self) -> None:
        self.waiting += 1
        self.held += 1
        self._notify()
        try:
            await self._released.wait()
        finally:
            self.waiting -= 1
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def __enter__(self) -> Latch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"holding {self.waiting}"
        return f"<Latch on {self.operation!r} ({state}, {self.held} held in all)>"


class FaultyStore(InMemoryEventStore):
    """An :class:`InMemoryEventStore` that fails, holds or delays calls on request.

    With no fault injected it is the in-memory store, plus counters. Faults
    are set for one *operation* (an :class:`EventStore` method name:
    ``"append"``, ``"read"``, ``"find_command"``, ``"stream_version"``,
    ``"read_all"``, ``"head_position"``, ``"save_snapshot"``,
    ``"load_snapshot"``, ``"delete_stream"``), optionally only for some
    streams (``read_all`` and ``head_position`` name no stream: only faults
    for every stream touch them). A call meets its delays first, then its
    latches, then its failure; whether a call fails is decided when it
    starts, by the earliest failure set that matches it. Faults apply to the
    calls made after they are set. A failing, held or delayed call is a
    schedule point, and honours cancellation while it waits (a call
    cancelled before its work does nothing).

    ::

        store = FaultyStore()
        store.fail("append", times=1)                 # the next append: StoreError
        store.fail("read", ConnectionError("reset"))  # every read, until healed
        store.fail("append", after_commit=True)       # appends commit, then raise
        with store.hold("append") as latch:           # appends wait here ...
            ...
            await latch.wait_held()                   # ... until one is held
        store.delay("append", 10.0)                   # appends take 10 s (Trio's clock)
        store.heal()                                  # every fault gone, latches released
        assert store.calls["append"] == 5

    Attributes:
        calls: calls made per operation (failed ones included), a
            :class:`collections.Counter`; clear it at will.
        in_flight: calls in progress per operation (held, delayed or running).
        max_in_flight: the most calls in progress at once, per operation.
        events_read: the events that ``read`` returned in all (a snapshot
            test's measure: how much of a stream was replayed). Reset it at will.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.max_in_flight: collections.Counter[str] = collections.Counter()
        self.events_read = 0
        self._failures: list[_Failure] = []
        self._delays: list[_Delay] = []
        self._latches: list[Latch] = []

    # -- injecting faults --

    def fail(
        self,
        operation: Operation,
        error: BaseException | None = None,
        *,
        times: int | None = None,
        streams: str | Iterable[str] | None = None,
        after_commit: bool = False,
    ) -> None:
        """Make calls of ``operation`` raise ``error``.

        Args:
            operation: the store method, e.g. ``"append"``.
            error: the exception to raise (a fresh copy each time, with its
                ``__cause__``); by default a :class:`StoreError` naming the
                operation and the stream, as a real store's failure would be.
            times: fail this many calls, then behave again; ``None``: every
                call until :meth:`heal`.
            streams: only calls on this stream (a name) or these streams.
            after_commit: let the call do its work first, then raise: the
                caller sees an error although the append (say) was stored,
                as when the database's answer to ``COMMIT`` is lost. Retries
                with the same ``command_id`` must then be applied once.

        Raises:
            InvalidArgument: an unknown operation, ``times`` < 1, or an
                ``error`` that is not an exception.
        """
        _check_operation(operation)
        if times is not None and (isinstance(times, bool) or not isinstance(times, int)):
            raise InvalidArgument(f"times must be an int or None, not {times!r}")
        if times is not None and times < 1:
            raise InvalidArgument(f"times must be >= 1, not {times}")
        if error is not None and not isinstance(error, BaseException):
            raise InvalidArgument(f"error must be an exception instance, not {error!r}")
        self._failures.append(_Failure(operation, _stream_set(streams), error, after_commit, times))

    def hold(self, operation: Operation, *, streams: str | Iterable[str] | None = None) -> Latch:
        """Make calls of ``operation`` wait until the returned latch is released.

        Raises:
            InvalidArgument: an unknown operation.
        """
        latch = Latch(_check_operation(operation), _stream_set(streams))
        self._latches.append(latch)
        return latch

    def delay(
        self, operation: Operation, seconds: float, *, streams: str | Iterable[str] | None = None
    ) -> None:
        """Make calls of ``operation`` sleep ``seconds`` (``trio.sleep``) before their work.

        Delays add up; :meth:`heal` removes them.

        Raises:
            InvalidArgument: an unknown operation, or ``seconds`` < 0.
        """
        _check_operation(operation)
        if not seconds >= 0:
            raise InvalidArgument(f"seconds must be >= 0, not {seconds!r}")
        self._delays.append(_Delay(operation, _stream_set(streams), seconds))

    def heal(self, operation: Operation | None = None) -> None:
        """Remove the failures and delays of ``operation`` (``None``: of all), and
        release its latches. Counters are kept."""
        if operation is not None:
            _check_operation(operation)

        def keep(rule: _Rule | Latch) -> bool:
            return operation is not None and rule.operation != operation

        for latch in self._latches:
            if not keep(latch):
                latch.release()
        self._latches = [latch for latch in self._latches if keep(latch)]
        self._failures = [rule for rule in self._failures if keep(rule)]
        self._delays = [rule for rule in self._delays if keep(rule)]

    # -- the interception --

    def _take_failure(self, operation: str, stream: str | None) -> _Failure | None:
        for rule in self._failures:
            if _matches(rule, operation, stream):
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._failures.remove(rule)
                return rule
        return None

    async def _intercept(
        self, operation: str, stream: str | None, call: Callable[[], Awaitable[T]]
    ) -> T:
        self.calls[operation] += 1
        self.in_flight[operation] += 1
        if self.in_flight[operation] > self.max_in_flight[operation]:
            self.max_in_flight[operation] = self.in_flight[operation]
        try:
            failure = self._take_failure(operation, stream)
            for rule in [d for d in self._delays if _matches(d, operation, stream)]:
                await trio.sleep(rule.seconds)
            for latch in [x for x in self._latches if _matches(x, operation, stream)]:
                if not latch.released:
                    await latch._hold()
            self._latches = [x for x in self._latches if not x.released]
            if failure is not None and not failure.after_commit:
                await trio.lowlevel.checkpoint()  # a failing call is a schedule point too
                raise self._error(failure, operation, stream)
            result = await call()
            if failure is not None:
                raise self._error(failure, operation, stream)
            return result
        finally:
            self.in_flight[operation] -= 1

    @staticmethod
    def _error(failure: _Failure, operation: str, stream: str | None) -> BaseException:
        if failure.error is not None:
            return _fresh(failure.error)
        where = "" if stream is None else f" of {stream!r}"
        if failure.after_commit:
            return StoreError(
                f"{operation}{where}: done, but the answer was lost (injected by FaultyStore)"
            )
        return StoreError(f"{operation}{where} failed (injected by FaultyStore)")

    # -- the store protocol --

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        command_id: str | None = None,
    ) -> int:
        async def call() -> int:
            return await InMemoryEventStore.append(
                self, stream, events, expected_version=expected_version, command_id=command_id
            )

        return await self._intercept("append", stream, call)

    async def find_command(self, stream: str, command_id: str) -> int | None:
        async def call() -> int | None:
            return await InMemoryEventStore.find_command(self, stream, command_id)

        return await self._intercept("find_command", stream, call)

    async def read(
        self, stream: str, *, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        async def call() -> list[RecordedEvent]:
            page = await InMemoryEventStore.read(
                self, stream, from_version=from_version, limit=limit
            )
            self.events_read += len(page)
            return page

        return await self._intercept("read", stream, call)

    async def stream_version(self, stream: str) -> int:
        async def call() -> int:
            return await InMemoryEventStore.stream_version(self, stream)

        return await self._intercept("stream_version", stream, call)

    async def read_all(
        self,
        from_position: int = 1,
        *,
        limit: int | None = 1000,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
    ) -> list[RecordedEvent]:
        async def call() -> list[RecordedEvent]:
            return await InMemoryEventStore.read_all(
                self, from_position, limit=limit, categories=categories, event_types=event_types
            )

        return await self._intercept("read_all", None, call)

    async def head_position(self) -> int:
        async def call() -> int:
            return await InMemoryEventStore.head_position(self)

        return await self._intercept("head_position", None, call)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        async def call() -> None:
            await InMemoryEventStore.save_snapshot(self, snapshot)

        await self._intercept("save_snapshot", snapshot.stream, call)

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        async def call() -> Snapshot | None:
            return await InMemoryEventStore.load_snapshot(self, stream)

        return await self._intercept("load_snapshot", stream, call)

    async def delete_stream(self, stream: str, *, hard: bool = False) -> None:
        async def call() -> None:
            await InMemoryEventStore.delete_stream(self, stream, hard=hard)

        await self._intercept("delete_stream", stream, call)

    def __repr__(self) -> str:
        faults = len(self._failures) + len(self._delays) + len(self._latches)
        return f"<FaultyStore: {faults} fault(s) set, calls {dict(self.calls)}>"
