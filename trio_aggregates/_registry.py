"""The aggregate registry: a nursery that owns one task and one mailbox per key.

This module knows nothing of event sourcing (like ``trio._core`` knows nothing
of sockets). Its rules, the Trio form of extreme_system's AggregateRegistry:

* **One live aggregate per key.** :meth:`Registry.ensure` and
  :meth:`Registry.register` on a key that is starting wait for that start-up
  instead of starting a second task.
* **A key is present exactly while its aggregate can take messages.** The key
  enters the registry inside ``task_status.started()`` (in the aggregate's own
  task, before any other task runs) and leaves it, synchronously, at the
  moment the aggregate can take no more: when its task ends, when the registry
  passivates it, or when the registry shuts down. The receive end is closed at
  the same moment, so a send end kept after that fails at once with
  :class:`trio.BrokenResourceError`.
* **No message is lost silently.** When an aggregate ends, the messages still
  queued in its mailbox are re-delivered once, in order, to a fresh
  activation, by a background task of the registry (the fresh start-up is
  reserved at once, so later callers queue behind the leftovers). Calls the
  aggregate took but never answered are failed (:class:`AggregateCrashed` if
  it raised, :class:`AggregateGone` if it returned). At shutdown, queued calls
  are answered with :class:`RegistryClosed`. A plain message that cannot be
  re-delivered (the fresh start-up failed) is logged at WARNING.
* **Failure is contained.** An exception in an aggregate is logged at WARNING
  and ends that aggregate only; nothing propagates into the registry's nursery.
* **Nothing outlives the block.** Leaving ``async with open_registry()`` closes
  every mailbox; aggregates finish the message in hand and return; after
  ``shutdown_timeout`` seconds the stragglers are cancelled.

Idle passivation does not cost a cancel scope per message: a mailbox records
when its aggregate last started waiting, and one *reaper* task per registry
sleeps until the earliest deadline. It passivates an aggregate only while the
aggregate is blocked in ``receive`` with an empty mailbox, and it does so
without a checkpoint between that check and closing the mailbox, so no message
can slip in between.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Hashable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, TypeAlias, final

import attrs
import outcome
import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from ._exceptions import (
    AggregateCrashed,
    AggregateDeclined,
    AggregateGone,
    AggregateNotFound,
    AggregateStartError,
    CallAlreadyAnswered,
    CallTimeout,
    InvalidArgument,
    InvalidKey,
    KeyAlreadyRegistered,
    RegistryClosed,
    TrioAggregatesError,
    _copy_error,
)

__all__ = [
    "AggregateFunction",
    "Call",
    "Mailbox",
    "Registry",
    "RegistryStatistics",
    "open_registry",
]

logger = logging.getLogger("trio_aggregates.registry")

SendEnd: TypeAlias = "trio.MemorySendChannel[Any]"


class AggregateFunction(Protocol):
    """The shape of an aggregate function.

    It runs as the aggregate's task: it does its start-up, calls
    ``task_status.started()`` when ready, then serves its mailbox::

        async def counter(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
            total = 0                      # start-up: load state, ...
            task_status.started()          # now registered; register() returns
            async for message in mailbox:  # ends on shutdown or passivation
                if isinstance(message, Call):
                    total += message.message
                    message.reply(total)

    Returning before ``started()`` declines the start-up (nothing is
    registered); raising before it is a failed start-up; raising after it is
    a crash (logged, contained).
    """

    def __call__(
        self, key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any]
    ) -> Awaitable[object]: ...


# -- calls ------------------------------------------------------------------


@final
class Call:
    """The envelope :meth:`Registry.call` puts in a mailbox.

    The aggregate answers it exactly once, with :meth:`reply` or :meth:`fail`;
    both are synchronous and never a checkpoint. A second answer raises
    :class:`CallAlreadyAnswered`. Answering a call whose caller has stopped
    waiting (cancelled, or timed out) is allowed and does nothing more.

    Attributes:
        message: what the caller sent.
    """

    __slots__ = ("_abandoned", "_holder", "_outcome", "_redelivered", "_task", "message")

    def __init__(self, message: Any) -> None:
        self.message = message
        self._outcome: outcome.Outcome[Any] | None = None
        self._task: trio.lowlevel.Task | None = None
        self._holder: Mailbox | None = None
        self._abandoned = False
        self._redelivered = False

    def __repr__(self) -> str:
        state = "answered" if self._outcome is not None else "pending"
        return f"<Call {self.message!r} {state}>"

    @property
    def answered(self) -> bool:
        """Whether :meth:`reply` or :meth:`fail` was called."""
        return self._outcome is not None

    @property
    def abandoned(self) -> bool:
        """Whether the caller stopped waiting (its wait was cancelled)."""
        return self._abandoned

    def reply(self, value: Any = None) -> None:
        """Answer the call with ``value``; the caller's ``call`` returns it."""
        self._resolve(outcome.Value(value))

    def fail(self, exception: BaseException) -> None:
        """Answer the call with ``exception``; the caller's ``call`` raises it."""
        if not isinstance(exception, BaseException):
            raise InvalidArgument(f"fail() takes an exception, not {exception!r}")
        self._resolve(outcome.Error(exception))

    def _resolve(self, result: outcome.Outcome[Any]) -> None:
        if self._outcome is not None:
            raise CallAlreadyAnswered(f"{self!r} was already answered")
        self._outcome = result
        holder = self._holder
        if holder is not None:
            self._holder = None
            if holder._in_hand is self:
                holder._in_hand = None
            elif holder._held is not None:
                holder._held.discard(self)
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task, result)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        self._abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> Any:
        """Wait for the answer and return it (or raise the exception it carries).

        For a :class:`Call` you put in a mailbox yourself; :meth:`Registry.call`
        does this for you. Cancellation withdraws the wait: the call is marked
        :attr:`abandoned` and a late answer is dropped.

        Raises:
            AggregateGone: the aggregate ended before it took the call.
            trio.BusyResourceError: another task is already waiting for it.
        """
        result = self._outcome
        if result is not None:
            await trio.lowlevel.checkpoint()
            return result.unwrap()
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting for this call")
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(self._abort)


# -- mailboxes --------------------------------------------------------------

_PASSIVATED: Final = "passivated"
_CLOSED: Final = "closed"


@final
class Mailbox(trio.abc.ReceiveChannel[Any]):
    """An aggregate's receive side: its own memory channel, plus what the registry needs.

    Iterate it (``async for message in mailbox``) or call :meth:`receive`.
    Iteration ends (``receive`` raises :class:`trio.EndOfChannel`) when the
    registry closes the mailbox: at shutdown, or when the aggregate was idle
    for :attr:`idle_timeout` seconds (then :attr:`passivated` is true). The
    aggregate then returns; code after the loop is its idle hook.

    Every message received re-arms the idle timer. :class:`Call` messages are
    tracked until answered, so that a crash or an early return answers them.
    """

    __slots__ = (
        "_ended_by",
        "_fn",
        "_heap_seq",
        "_held",
        "_idle_since",
        "_idle_timeout",
        "_in_hand",
        "_receive",
        "_registry",
        "_retired",
        "_send",
        "key",
    )

    def __init__(
        self,
        registry: Registry,
        key: Any,
        send: SendEnd,
        receive: trio.MemoryReceiveChannel[Any],
        idle_timeout: float | None,
        fn: AggregateFunction,
    ) -> None:
        self.key = key
        self._fn = fn
        self._registry = registry
        self._send = send
        self._receive = receive
        self._idle_timeout = idle_timeout
        self._idle_since = 0.0
        self._heap_seq = 0  # the seq of its live entry in the reaper's heap; 0: none
        self._ended_by: str | None = None
        self._retired = False
        # Calls taken and not yet answered: the latest one, and (rarely) older
        # ones the aggregate kept to answer later. No allocation per call.
        self._in_hand: Call | None = None
        self._held: set[Call] | None = None

    def __repr__(self) -> str:
        return f"<Mailbox of {self.key!r}>"

    @property
    def send_channel(self) -> SendEnd:
        """The send end that :meth:`Registry.get` returns for this aggregate."""
        return self._send

    @property
    def passivated(self) -> bool:
        """Whether the registry closed this mailbox because the aggregate was idle."""
        return self._ended_by is _PASSIVATED

    @property
    def idle_timeout(self) -> float | None:
        """Seconds without a message after which the aggregate is passivated.

        ``None`` disables passivation. The aggregate may set it itself (in its
        start-up, like ``init/1`` returning ``{:ok, state, timeout}``, or later).
        """
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise InvalidArgument(f"idle_timeout must be positive or None, not {value!r}")
        self._idle_timeout = value
        if value is not None:
            self._idle_since = trio.current_time()
            if self._registry._mailboxes.get(self.key) is self:
                self._registry._schedule(self, earlier=True)

    def _took(self, message: Any) -> Any:
        if type(message) is Call:
            message._holder = self
            previous = self._in_hand
            if previous is not None:  # still unanswered: the aggregate kept it
                if self._held is None:
                    self._held = set()
                self._held.add(previous)
            self._in_hand = message
        return message

    def _unanswered(self) -> list[Call]:
        calls = [] if self._in_hand is None else [self._in_hand]
        if self._held:
            calls.extend(self._held)
        self._in_hand = self._held = None
        return calls

    def receive_nowait(self) -> Any:
        """Take a queued message without waiting.

        Raises:
            trio.WouldBlock: the mailbox is empty.
            trio.EndOfChannel: the registry closed the mailbox.
        """
        try:
            message = self._receive.receive_nowait()
        except trio.ClosedResourceError:
            if self._ended_by is None:
                raise
            raise trio.EndOfChannel from None
        return self._took(message)

    async def receive(self) -> Any:
        """Wait for the next message; a checkpoint, like any Trio receive.

        Raises:
            trio.EndOfChannel: the registry closed the mailbox (shutdown or
                passivation).
            trio.ClosedResourceError: the aggregate closed it itself.
        """
        if self._idle_timeout is not None:
            self._idle_since = trio.current_time()
        try:
            message = await self._receive.receive()
        except trio.ClosedResourceError:
            if self._ended_by is None:
                raise
            raise trio.EndOfChannel from None
        return self._took(message)

    def __aiter__(self) -> Mailbox:
        return self

    async def __anext__(self) -> Any:
        if self._idle_timeout is not None:
            self._idle_since = trio.current_time()
        try:
            message = await self._receive.receive()
        except trio.ClosedResourceError:
            if self._ended_by is None:
                raise
            raise StopAsyncIteration from None
        return self._took(message)

    async def aclose(self) -> None:
        """Stop taking messages: the key leaves the registry at once.

        Queued calls are re-routed to a fresh activation, as when the
        aggregate returns.
        """
        self._registry._retire(self)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> trio.MemoryChannelStatistics:
        """The underlying memory channel's statistics (``current_buffer_used``, ...)."""
        return self._receive.statistics()


# -- statistics -------------------------------------------------------------


@attrs.frozen
class RegistryStatistics:
    """A snapshot of a registry's counters, from :meth:`Registry.statistics`.

    Attributes:
        live: aggregates registered now (able to take messages).
        starting: activations whose start-up is in progress.
        activations: start-ups that finished (the aggregate became live).
        normal_ends: aggregates that returned (shutdown included).
        crashes: aggregates that raised after start-up.
        passivations: aggregates ended by the idle timeout.
        declined: start-ups that declined (returned before ``started()``).
        start_failures: start-ups that raised.
        mailbox_backlog: messages queued in all live mailboxes.
        closed: whether the registry has begun to shut down.

    ``live`` drops the moment a key leaves; the end counters move when the
    task has actually ended (a passivated aggregate may still run its idle
    hook), so ``activations == live + normal_ends + crashes + passivations``
    holds once no aggregate task is between the two.
    """

    live: int
    starting: int
    activations: int
    normal_ends: int
    crashes: int
    passivations: int
    declined: int
    start_failures: int
    mailbox_backlog: int
    closed: bool

    @property
    def live_count(self) -> int:
        """The same as :attr:`live`."""
        return self.live


@attrs.define
class _Counters:
    activations: int = 0
    normal_ends: int = 0
    crashes: int = 0
    passivations: int = 0
    declined: int = 0
    start_failures: int = 0


# -- start-up -------------------------------------------------------------


@final
class _Pending:
    """A start-up in progress, for the tasks that wait on it instead of starting another."""

    __slots__ = ("_event", "error", "finished", "scope")

    def __init__(self) -> None:
        self._event: trio.Event | None = None  # made only if someone waits
        self.finished = False
        self.error: TrioAggregatesError | None = None
        #: The scope of ``nursery.start``'s own nursery, around the start-up
        #: alone: shutdown bounds a start-up with its deadline.
        self.scope: trio.CancelScope | None = None

    async def wait(self) -> None:
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    def finish(self) -> None:
        self.finished = True
        if self._event is not None:
            self._event.set()


class _Declined(Exception):
    """Raised out of ``nursery.start`` when an aggregate returned before ``started()``."""


@final
class _StartupStatus:
    """The ``task_status`` an aggregate function gets: registers the key when started."""

    __slots__ = ("_mailbox", "_status")

    def __init__(self, mailbox: Mailbox, status: trio.TaskStatus[SendEnd | None]) -> None:
        self._mailbox = mailbox
        self._status: trio.TaskStatus[SendEnd | None] | None = status

    @property
    def is_started(self) -> bool:
        return self._status is None

    def started(self, value: object = None) -> None:
        """Report the aggregate ready: its key enters the registry now.

        The value is ignored; ``register`` returns the mailbox's send end.
        """
        status = self._status
        if status is None:
            raise RuntimeError("called 'started' twice on the same task status")
        self._status = None
        mailbox = self._mailbox
        registry = mailbox._registry
        if registry._closed:
            # Ready too late: the registry is shutting down. End at once.
            mailbox._ended_by = _CLOSED
            mailbox._receive.close()
            status.started(None)
            return
        registry._live[mailbox.key] = mailbox._send
        registry._mailboxes[mailbox.key] = mailbox
        registry._counters.activations += 1
        if mailbox._idle_timeout is not None:
            mailbox._idle_since = trio.current_time()
            registry._schedule(mailbox)
        status.started(mailbox._send)


class _Unset:
    def __repr__(self) -> str:
        return "<the registry's setting>"


_UNSET: Final = _Unset()


# -- the registry -----------------------------------------------------------


@final
class Registry:
    """Aggregates by key, each a child task of the registry's nursery.

    Create one with :func:`open_registry`. ``get``, ``has_key``, ``in``,
    ``len`` and iteration are synchronous and never checkpoints; ``register``,
    ``ensure`` and ``call`` are checkpoints.
    """

    __slots__ = (
        "_aggregate",
        "_closed",
        "_counters",
        "_heap",
        "_idle_timeout",
        "_live",
        "_mailbox_size",
        "_mailboxes",
        "_nursery",
        "_reaper_scope",
        "_reaper_started",
        "_seq",
        "_shutdown_timeout",
        "_starting",
    )

    def __init__(
        self,
        nursery: trio.Nursery,
        aggregate: AggregateFunction | None,
        mailbox_size: float,
        idle_timeout: float | None,
        shutdown_timeout: float,
    ) -> None:
        self._nursery = nursery
        self._aggregate = aggregate
        self._mailbox_size = mailbox_size
        self._idle_timeout = idle_timeout
        self._shutdown_timeout = shutdown_timeout
        self._live: dict[Any, SendEnd] = {}
        self._mailboxes: dict[Any, Mailbox] = {}
        self._starting: dict[Any, _Pending] = {}
        self._counters = _Counters()
        self._closed = False
        self._heap: list[tuple[float, int, Mailbox]] = []
        self._seq = itertools.count(1)
        self._reaper_scope: trio.CancelScope | None = None
        self._reaper_started = False

    def __repr__(self) -> str:
        return f"<Registry live={len(self._live)} closed={self._closed}>"

    # -- lookups (synchronous, O(1), never a checkpoint) --

    def get(self, key: Hashable) -> SendEnd | None:
        """Return the send end of the aggregate registered under ``key``, or ``None``.

        Raises:
            InvalidKey: ``key`` is not hashable.
        """
        try:
            return self._live.get(key)
        except TypeError:
            raise InvalidKey(f"aggregate keys must be hashable, not {key!r}") from None

    def has_key(self, key: Hashable) -> bool:
        """Whether an aggregate is registered under ``key`` (``key in registry``).

        Raises:
            InvalidKey: ``key`` is not hashable.
        """
        try:
            return key in self._live
        except TypeError:
            raise InvalidKey(f"aggregate keys must be hashable, not {key!r}") from None

    __contains__ = has_key

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the live keys (a snapshot: safe across checkpoints)."""
        return iter(list(self._live))

    def keys(self) -> list[Any]:
        """The live keys, as a list."""
        return list(self._live)

    @property
    def closed(self) -> bool:
        """Whether the registry has begun to shut down."""
        return self._closed

    def statistics(self) -> RegistryStatistics:
        """Return the registry's counters; O(live aggregates) for the backlog."""
        c = self._counters
        backlog = sum(m._receive.statistics().current_buffer_used for m in self._mailboxes.values())
        return RegistryStatistics(
            live=len(self._live),
            starting=len(self._starting),
            activations=c.activations,
            normal_ends=c.normal_ends,
            crashes=c.crashes,
            passivations=c.passivations,
            declined=c.declined,
            start_failures=c.start_failures,
            mailbox_backlog=backlog,
            closed=self._closed,
        )

    # -- activation --

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosed("the registry is closed")

    async def register(
        self,
        key: Hashable,
        aggregate: AggregateFunction | None = None,
        *,
        idle_timeout: float | object | None = _UNSET,
    ) -> SendEnd:
        """Start an aggregate under ``key``, wait until it is ready, and return its send end.

        Args:
            key: any hashable value.
            aggregate: the aggregate function; the registry's default if ``None``.
            idle_timeout: overrides the registry's idle timeout for this aggregate.

        Cancellation: if cancelled during start-up, nothing is registered and the
        start-up task is cancelled too; no task is left behind.

        Raises:
            KeyAlreadyRegistered: ``key`` has a live aggregate (``.existing``).
            AggregateDeclined: the aggregate returned before ``started()``.
            AggregateStartError: the start-up raised (the cause).
            RegistryClosed: the registry is shutting down.
            InvalidKey: ``key`` is not hashable.
        """
        fn = aggregate if aggregate is not None else self._aggregate
        if fn is None:
            raise InvalidArgument(
                "register() needs an aggregate function (the registry has no default)"
            )
        idle = self._idle_timeout if idle_timeout is _UNSET else idle_timeout
        if idle is not None and not (isinstance(idle, int | float) and idle > 0):
            raise InvalidArgument(f"idle_timeout must be positive or None, not {idle!r}")
        while True:
            existing = self.get(key)
            self._check_open()
            if existing is not None:
                await trio.lowlevel.checkpoint()
                existing = self.get(key)  # as it is now, after the checkpoint
                if existing is not None:
                    raise KeyAlreadyRegistered(key, existing)
                continue
            pending = self._starting.get(key)
            if pending is None:
                return await self._activate(key, fn, idle)
            await pending.wait()

    async def ensure(self, key: Hashable, aggregate: AggregateFunction | None = None) -> SendEnd:
        """Return the live aggregate's send end for ``key``, activating it if needed.

        Many tasks ensuring the same key at once produce exactly one activation
        and all get the same send end. The activation runs ``aggregate``, or
        the registry's default aggregate function. A checkpoint even when the
        aggregate is live.

        Cancellation: as :meth:`register`; a waiter that is cancelled does not
        disturb the others.

        Raises:
            AggregateDeclined: as :meth:`register` (every task waiting on the
                declined start-up gets its own copy).
            AggregateStartError: as :meth:`register` (likewise).
            AggregateNotFound: no live aggregate and no aggregate function.
            RegistryClosed: the registry is shutting down.
            InvalidKey: ``key`` is not hashable.
        """
        while True:
            send = self.get(key)
            if send is not None:
                await trio.lowlevel.checkpoint()
                send = self.get(key)  # as it is now, after the checkpoint
                if send is not None:
                    return send
                continue
            self._check_open()
            pending = self._starting.get(key)
            if pending is None:
                fn = aggregate if aggregate is not None else self._aggregate
                if fn is None:
                    raise AggregateNotFound(key)
                return await self._activate(key, fn, self._idle_timeout)
            await pending.wait()
            error = pending.error
            if error is not None:
                raise _copy_error(error)

    async def _activate(
        self,
        key: Any,
        fn: AggregateFunction,
        idle: float | None,
        pending: _Pending | None = None,
    ) -> SendEnd:
        if pending is None:
            pending = _Pending()
        self._starting[key] = pending
        try:
            send: SendEnd | None = await self._nursery.start(self._run, key, fn, idle, pending)
        except _Declined:
            self._counters.declined += 1
            pending.error = AggregateDeclined(key)
            raise _copy_error(pending.error) from None
        except AggregateStartError as exc:
            self._counters.start_failures += 1
            pending.error = exc
            raise
        except RuntimeError:
            # The nursery refused the start (it is closing), or shutdown
            # cancelled the start-up ("exited without calling started()").
            if self._closed:
                raise RegistryClosed("the registry is closed") from None
            raise
        finally:
            if self._starting.get(key) is pending:
                del self._starting[key]
            pending.finish()
        if send is None:
            raise RegistryClosed("the registry closed while the aggregate was starting")
        return send

    async def _run(
        self,
        key: Any,
        fn: AggregateFunction,
        idle: float | None,
        pending: _Pending,
        *,
        task_status: trio.TaskStatus[SendEnd | None],
    ) -> None:
        # Until started(), this task runs in nursery.start's own nursery, in
        # the caller's task tree: its scope covers the start-up and nothing else.
        parent = trio.lowlevel.current_task().parent_nursery
        if parent is not None:
            pending.scope = parent.cancel_scope
            if self._closed:
                pending.scope.deadline = self._nursery.cancel_scope.deadline
        del parent, pending  # the idle task must not keep start()'s nursery alive
        send: SendEnd
        receive: trio.MemoryReceiveChannel[Any]
        send, receive = trio.open_memory_channel(self._mailbox_size)
        mailbox = Mailbox(self, key, send, receive, idle, fn)
        status = _StartupStatus(mailbox, task_status)
        del task_status  # keep the idle task small: trio's status object stays behind
        try:
            await fn(key, mailbox, task_status=status)
        except Exception as exc:
            if not status.is_started:
                receive.close()
                raise AggregateStartError(key, exc) from exc
            self._counters.crashes += 1
            logger.warning("aggregate %r crashed: %r", key, exc, exc_info=exc)
            self._retire(mailbox, ended=True, crash=exc)
            return
        except BaseException:
            # Cancelled (start-up cancelled, or the shutdown grace period ran
            # out), or KeyboardInterrupt: end cleanly, then let it propagate.
            if status.is_started:
                self._counters.normal_ends += 1
                self._retire(mailbox, ended=True)
            else:
                receive.close()
            raise
        if not status.is_started:
            receive.close()
            raise _Declined
        if mailbox._ended_by is _PASSIVATED:
            self._counters.passivations += 1
        else:
            self._counters.normal_ends += 1
        self._retire(mailbox, ended=True)

    # -- retirement (synchronous: no other task runs in between) --

    def _retire(
        self, mailbox: Mailbox, *, ended: bool = False, crash: BaseException | None = None
    ) -> None:
        """Take ``mailbox`` out of service: unregister it, close it, deal with what it holds.

        Queued messages are re-routed (or, at shutdown, answered with
        RegistryClosed). Calls the aggregate took are left for it to answer
        while its task runs (it finishes the message in hand); once the task
        has ``ended``, those it never answered are failed.
        """
        key = mailbox.key
        if self._mailboxes.get(key) is mailbox:
            del self._mailboxes[key]
            del self._live[key]
        for call in mailbox._unanswered() if ended else ():
            call._holder = None
            if call._outcome is not None:
                continue
            if crash is not None:
                error: TrioAggregatesError = AggregateCrashed(key, crash)
                error.__cause__ = crash
            elif self._closed:
                error = RegistryClosed(f"the registry closed while {key!r} held the call")
            else:
                error = AggregateGone(key, "ended without answering the call")
            call._resolve(outcome.Error(error))
        if mailbox._retired:
            return
        mailbox._retired = True
        if mailbox._ended_by is None:
            mailbox._ended_by = _CLOSED
        leftovers: list[Any] = []
        receive = mailbox._receive
        while True:
            try:
                leftovers.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                break
        receive.close()  # blocked senders and stale send ends now get BrokenResourceError
        if not leftovers:
            return
        if self._closed:
            self._undeliverable(key, leftovers, RegistryClosed("the registry closed"))
            return
        again = [m for m in leftovers if type(m) is not Call or not m._redelivered]
        if len(again) < len(leftovers):
            once = [m for m in leftovers if type(m) is Call and m._redelivered]
            self._undeliverable(key, once, AggregateGone(key, "ended before it took the call"))
        if not again:
            return
        # Re-deliver, in order, to a fresh activation. Reserving the start-up
        # now makes later callers wait for it, so the leftovers go first.
        pending = None if key in self._starting else _Pending()
        if pending is not None:
            self._starting[key] = pending
        self._nursery.start_soon(
            self._redeliver, key, mailbox._fn, mailbox._idle_timeout, again, pending
        )

    async def _redeliver(
        self,
        key: Any,
        fn: AggregateFunction,
        idle: float | None,
        messages: list[Any],
        pending: _Pending | None,
    ) -> None:
        """Send what an ended aggregate left in its mailbox to a fresh activation."""
        for message in messages:
            if type(message) is Call:
                message._redelivered = True
        try:
            if self._closed:
                if pending is not None and self._starting.get(key) is pending:
                    del self._starting[key]
                    pending.finish()
                raise RegistryClosed("the registry closed")
            if pending is not None:
                send = await self._activate(key, fn, idle, pending)
            else:
                send = await self.ensure(key, fn)
        except TrioAggregatesError as exc:
            self._undeliverable(key, messages, exc)
            return
        except BaseException:
            self._undeliverable(key, messages, RegistryClosed("the registry closed"))
            raise
        for i, message in enumerate(messages):
            try:
                try:
                    send.send_nowait(message)
                except trio.WouldBlock:
                    await send.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                gone = AggregateGone(key, "ended before it took the call")
                self._undeliverable(key, messages[i:], gone)
                return
            except BaseException:
                self._undeliverable(key, messages[i:], RegistryClosed("the registry closed"))
                raise

    def _undeliverable(self, key: Any, messages: list[Any], error: TrioAggregatesError) -> None:
        """Answer the calls among ``messages`` with ``error``; log the other messages as lost."""
        lost = 0
        for message in messages:
            if type(message) is not Call:
                lost += 1
            elif message._outcome is None:
                message._resolve(outcome.Error(_copy_error(error)))
        if lost:
            logger.warning("%d message(s) for %r could not be delivered: %r", lost, key, error)

    # -- calls --

    async def call(
        self,
        key: Hashable,
        message: Any,
        *,
        timeout: float | None = None,
        aggregate: AggregateFunction | None = None,
    ) -> Any:
        """Send ``message`` to the aggregate under ``key`` and return its answer.

        Activates the aggregate if needed (:meth:`ensure`, with ``aggregate``
        or the default aggregate function), puts a :class:`Call`
        in its mailbox (waiting while the mailbox is full), and waits for the
        aggregate's :meth:`Call.reply` or :meth:`Call.fail`. If the aggregate
        ended before taking the call, the call is re-routed once to a fresh
        activation.

        Cancellation: the caller stops waiting and the call is marked
        :attr:`Call.abandoned`. A call still queued is delivered all the same
        (the aggregate may skip it: the event-sourced runtime does); one the
        aggregate already took may still be acted on. Its answer is dropped.

        Raises:
            CallTimeout: no answer within ``timeout`` seconds (counting
                activation and waiting for mailbox space).
            AggregateCrashed: the aggregate raised while handling the call.
            AggregateGone: the aggregate ended without answering, twice.
            RegistryClosed: the registry is shutting down.
            InvalidKey: ``key`` is not hashable.
            AggregateDeclined: activation declined (as :meth:`ensure`).
            AggregateStartError: activation failed (as :meth:`ensure`).
            AggregateNotFound: no live aggregate and no aggregate function.
            Exception: whatever the aggregate answered with :meth:`Call.fail`.
        """
        if timeout is not None:
            with trio.move_on_after(timeout):
                return await self.call(key, message, aggregate=aggregate)
            raise CallTimeout(f"no answer from {key!r} within {timeout} seconds")
        # The hot path, written out flat: a round trip is two task switches.
        for _ in range(2):
            try:
                send = self._live.get(key)
            except TypeError:
                raise InvalidKey(f"aggregate keys must be hashable, not {key!r}") from None
            if send is None:
                send = await self.ensure(key, aggregate)
            call = Call(message)
            try:
                try:
                    send.send_nowait(call)
                except trio.WouldBlock:
                    await send.send(call)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # it ended just now: once more, to a fresh activation
            if call._outcome is not None:
                return await call.wait()
            call._task = trio.lowlevel.current_task()
            return await trio.lowlevel.wait_task_rescheduled(call._abort)
        raise AggregateGone(key, "ended before it took the call, twice")

    # -- idle passivation --

    def _schedule(self, mailbox: Mailbox, *, earlier: bool = False) -> None:
        """Give ``mailbox`` an entry in the reaper's heap, unless it has one.

        Entries are lazy: a later deadline (the aggregate took a message) is
        found when the entry comes up. With ``earlier`` (a shorter timeout
        was set) a new entry replaces the old, which is skipped as stale.
        """
        idle = mailbox._idle_timeout
        if idle is None or (mailbox._heap_seq and not earlier):
            return
        deadline = mailbox._idle_since + idle
        seq = mailbox._heap_seq = next(self._seq)
        heapq.heappush(self._heap, (deadline, seq, mailbox))
        if not self._reaper_started:
            self._reaper_started = True
            self._nursery.start_soon(self._reap)
        elif self._reaper_scope is not None and deadline < self._reaper_scope.deadline:
            self._reaper_scope.deadline = deadline

    async def _reap(self) -> None:
        heap = self._heap
        while not self._closed:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._reaper_scope = scope
                await trio.sleep_forever()
            self._reaper_scope = None
            now = trio.current_time()
            while heap and heap[0][0] <= now and not self._closed:
                _, seq, mailbox = heapq.heappop(heap)
                if seq != mailbox._heap_seq:
                    continue  # stale: replaced by an earlier entry
                mailbox._heap_seq = 0
                idle = mailbox._idle_timeout
                if mailbox._retired or idle is None:
                    continue
                due = mailbox._idle_since + idle
                if due > now:
                    self._schedule(mailbox)
                    continue
                stats = mailbox._receive.statistics()
                if stats.tasks_waiting_receive and not stats.current_buffer_used:
                    mailbox._ended_by = _PASSIVATED
                    self._retire(mailbox)
                else:
                    # Busy with a message: it re-arms when it waits again.
                    mailbox._idle_since = now
                    self._schedule(mailbox)

    # -- shutdown --

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for mailbox in list(self._mailboxes.values()):
            self._retire(mailbox)
        if self._reaper_scope is not None:
            self._reaper_scope.cancel()
        self._heap.clear()
        deadline = trio.current_time() + self._shutdown_timeout
        self._nursery.cancel_scope.deadline = deadline
        for pending in self._starting.values():
            # Start-ups run in their callers' tasks, outside the nursery's scope.
            if pending.scope is not None:
                pending.scope.deadline = deadline


@asynccontextmanager
async def open_registry(
    aggregate: AggregateFunction | None = None,
    *,
    mailbox_size: float = 64,
    idle_timeout: float | None = None,
    shutdown_timeout: float = 5.0,
) -> AsyncIterator[Registry]:
    """Open a registry whose nursery owns every aggregate it starts.

    Args:
        aggregate: the default aggregate function, used by ``ensure``/``call``
            and by ``register`` when none is given.
        mailbox_size: each mailbox's buffer; a full mailbox makes senders wait
            (``send_nowait`` raises :class:`trio.WouldBlock`). ``math.inf`` for
            unbounded.
        idle_timeout: seconds without a message after which an aggregate is
            passivated (``None``: never). Overridable per aggregate.
        shutdown_timeout: the grace period at exit: aggregates still running
            after it are cancelled.

    Leaving the block closes every mailbox: aggregates finish the message in
    hand and return; calls still queued get :class:`RegistryClosed`. The block
    waits for every aggregate to end (at most ``shutdown_timeout`` seconds,
    then cancels them). An exception from the body propagates unchanged, not
    wrapped in an exception group.
    """
    if not (isinstance(mailbox_size, int) or mailbox_size == math.inf) or mailbox_size < 0:
        raise InvalidArgument(f"mailbox_size must be an int >= 0 or math.inf, not {mailbox_size!r}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise InvalidArgument(f"idle_timeout must be positive or None, not {idle_timeout!r}")
    body_error: BaseException | None = None
    reraise: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            registry = Registry(nursery, aggregate, mailbox_size, idle_timeout, shutdown_timeout)
            try:
                yield registry
            except BaseException as exc:
                body_error = exc
            finally:
                registry._close()
    except BaseExceptionGroup as group:
        only_cancelled = group.split(trio.Cancelled)[1] is None
        if only_cancelled and body_error is None:
            raise
        if not only_cancelled:
            fatal = [e for e in group.exceptions if isinstance(e, KeyboardInterrupt | SystemExit)]
            if not fatal:
                raise TrioAggregatesError(
                    "internal error in trio_aggregates (please report it)"
                ) from group
            reraise = fatal[0]
    if reraise is not None:
        raise reraise
    if body_error is not None:
        raise body_error
