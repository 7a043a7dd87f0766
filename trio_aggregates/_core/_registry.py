"""The aggregate registry: a nursery that owns one task and one mailbox per key.

This module knows nothing of event sourcing (like ``trio._core`` knows nothing
of sockets). Its rules, the Trio form of extreme_system's AggregateRegistry:

* **One task per key.** A key has at most one aggregate task at any instant,
  from the start of its start-up to the moment the task returns: a task still
  running code after its mailbox loop (a flush, say) holds the key, and the
  key's next activation starts only after it has returned. :meth:`Registry.ensure`,
  :meth:`Registry.register` and :meth:`Registry.call` on a key that is
  starting or winding down wait for it.
* **A key is present exactly while its aggregate can take messages.** The key
  enters the registry inside ``task_status.started()`` (in the aggregate's own
  task, before any other task runs) and leaves it, synchronously, at the
  moment the aggregate can take no more: when its task ends, when the registry
  passivates it, or when the registry shuts down. The receive end is closed at
  the same moment, so a send end kept after that fails at once with
  :class:`trio.BrokenResourceError`.
* **Every call gets one answer.** Messages still queued when a mailbox closes
  are handed, in order, to the key's next activation (started by the
  registry as soon as the old task has returned; later callers queue behind
  them). A call is re-routed like this however often it races a passivation;
  only an activation that ended on its own without taking a single message
  answers its queue with :class:`AggregateGone` (re-routing to it again
  would never end). Calls the aggregate took but never answered are failed
  when its task ends (:class:`AggregateCrashed` if it raised,
  :class:`AggregateGone` if it returned). At shutdown, queued calls are
  answered with :class:`RegistryClosed`. A plain message that cannot be
  delivered is logged at WARNING.
* **A withdrawn call is never delivered.** A call whose caller stopped
  waiting (cancelled, timed out) before the aggregate took it is skipped by
  the mailbox; one already taken completes and its answer is dropped.
* **Failure is contained.** An exception in an aggregate is logged at WARNING
  and ends that aggregate only; nothing propagates into the registry's nursery.
* **Nothing outlives the block.** Leaving ``async with open_registry()`` closes
  every mailbox; aggregates finish the message in hand and return; after
  ``shutdown_timeout`` seconds the stragglers are cancelled.
* **Ctrl-C cannot corrupt the bookkeeping.** Every function here that makes
  two changes that belong together runs under
  :func:`trio.lowlevel.enable_ki_protection` (as Trio's own channels and
  locks do), so a :exc:`KeyboardInterrupt` lands before or after it, never in
  between. The aggregate function itself is not protected.

The lifecycle of each mailbox (starting → live → closing → winding down →
gone) is one field, :attr:`Mailbox._state`, written only by the transition
methods of :class:`Registry` (the section "the mailbox lifecycle" below).

Idle passivation does not cost a cancel scope per message: a mailbox records
when its aggregate last started waiting, and one :class:`_Reaper` per
registry sleeps until the earliest deadline. It passivates an aggregate only
while the aggregate is blocked in ``receive`` with an empty mailbox, and it
does so without a checkpoint between that check and closing the mailbox, so
no message can slip in between. A caller that activates an aggregate has its
call put in the mailbox inside ``started()``, so the reaper cannot close the
fresh mailbox under it either.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, TypeAlias, final

import attrs
import outcome
import trio
from trio.lowlevel import enable_ki_protection

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
            ...                            # wind-down: the key's next task waits

    Returning before ``started()`` declines the start-up (nothing is
    registered); raising before it is a failed start-up; raising after it is
    a crash (logged, contained). Code after the loop runs while the key is
    *winding down*: no second task starts for the key until it returns.
    """

    def __call__(
        self, key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any]
    ) -> Awaitable[object]: ...


# -- calls ------------------------------------------------------------------


class Answerable(Protocol):
    """What a mailbox's runner answers (``Mailbox._runner``): a :class:`Call`,
    or a caller's own record of the answer (``Registry._ran_here``)."""

    message: Any

    def reply(self, value: Any = None) -> None: ...

    def fail(self, exception: BaseException) -> None: ...


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

    __slots__ = ("_abandoned", "_callback", "_outcome", "_task", "message")

    def __init__(self, message: Any) -> None:
        self.message = message
        self._outcome: outcome.Outcome[Any] | None = None
        self._task: trio.lowlevel.Task | None = None
        self._abandoned = False
        # Registry._call_soon: called with the outcome instead of waking a task.
        self._callback: Callable[[outcome.Outcome[Any]], None] | None = None

    def __repr__(self) -> str:
        state = "answered" if self._outcome is not None else "pending"
        return f"<Call {self.message!r} {state}>"

    @property
    def answered(self) -> bool:
        """Whether :meth:`reply` or :meth:`fail` was called."""
        return self._outcome is not None

    @property
    def abandoned(self) -> bool:
        """Whether the caller stopped waiting (its wait was cancelled).

        A mailbox never hands out a call abandoned before the aggregate took
        it; an aggregate sees this only on a call it took before its caller left.
        """
        return self._abandoned

    @enable_ki_protection
    def reply(self, value: Any = None) -> None:
        """Answer the call with ``value``; the caller's ``call`` returns it."""
        self._resolve(outcome.Value(value))

    @enable_ki_protection
    def fail(self, exception: BaseException) -> None:
        """Answer the call with ``exception``; the caller's ``call`` raises it."""
        if not isinstance(exception, BaseException):
            raise InvalidArgument(f"fail() takes an exception, not {exception!r}")
        self._resolve(outcome.Error(exception))

    @enable_ki_protection
    def _resolve(self, result: outcome.Outcome[Any]) -> None:
        if self._outcome is not None:
            raise CallAlreadyAnswered(f"{self!r} was already answered")
        self._outcome = result
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task, result)
            return
        callback = self._callback
        if callback is not None:
            self._callback = None
            try:
                callback(result)
            except Exception:  # pragma: no cover (the callbacks catch their own errors)
                logger.exception("a call's completion callback failed (please report it)")

    @enable_ki_protection
    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        self._abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    @enable_ki_protection
    async def wait(self) -> Any:
        """Wait for the answer and return it (or raise the exception it carries).

        For a :class:`Call` you put in a mailbox yourself; :meth:`Registry.call`
        does this for you.

        Cancellation withdraws the call for good: it is marked
        :attr:`abandoned`. If the aggregate has not taken it yet, it never
        will (its mailbox skips it); if the aggregate already took it, the
        aggregate completes it and the answer is dropped.

        Raises:
            AggregateGone: the aggregate ended before it answered the call.
            trio.BusyResourceError: another task is already waiting for it.
            Exception: whatever the aggregate answered with :meth:`fail`.
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

# The lifecycle of a mailbox, and so of its aggregate task (see Mailbox._state).
_STARTING: Final = "starting"
_LIVE: Final = "live"
_CLOSING: Final = "closing"
_WINDING_DOWN: Final = "winding down"
_GONE: Final = "gone"

# Why a mailbox stopped taking messages (Mailbox._ended_by).
_PASSIVATED: Final = "passivated"
_SHUTDOWN: Final = "shutdown"
_ACLOSED: Final = "aclosed"
_RETURNED: Final = "returned"


@final
class Mailbox(trio.abc.ReceiveChannel[Any]):
    """An aggregate's receive side: its own memory channel, plus what the registry needs.

    Iterate it (``async for message in mailbox``) or call :meth:`receive`.
    Iteration ends (``receive`` raises :class:`trio.EndOfChannel`) when the
    registry closes the mailbox: at shutdown, or when the aggregate was idle
    for :attr:`idle_timeout` seconds (then :attr:`passivated` is true). The
    aggregate then returns; code after the loop is its idle hook, and the
    key's next activation waits for it.

    Every message received re-arms the idle timer. A :class:`Call` whose
    caller stopped waiting before the aggregate took it is skipped. Calls
    taken are tracked until answered, so that a crash or an early return
    answers them.
    """

    __slots__ = (
        "_carry",
        "_changed",
        "_channel",
        "_ended_by",
        "_error",
        "_fn",
        "_heap_seq",
        "_held",
        "_held_limit",
        "_idle_since",
        "_idle_timeout",
        "_in_hand",
        "_receive",
        "_registry",
        "_runner",
        "_scope",
        "_send",
        "_state",
        "_took_any",
        "key",
    )

    def __init__(
        self, registry: Registry, key: Any, fn: AggregateFunction, idle_timeout: float | None
    ) -> None:
        self.key = key
        self._fn = fn
        self._registry = registry
        send: SendEnd
        receive: trio.MemoryReceiveChannel[Any]
        send, receive = trio.open_memory_channel(registry._mailbox_size)
        self._send = send
        self._receive = receive
        # The channel's shared state, read by _is_idle and _ran_here: the one
        # Trio's memory channel has had since 0.12 (statistics() makes an
        # object, on _call_soon's hot path); None with another channel.
        channel = getattr(receive, "_state", None)
        if not (hasattr(channel, "receive_tasks") and hasattr(channel, "data")):
            channel = None  # pragma: no cover - another Trio's channel
        self._channel: Any = channel
        self._idle_timeout = idle_timeout
        self._idle_since = 0.0
        self._heap_seq = 0  # the seq of its live entry in the reaper's heap; 0: none
        # Invariant: _state is written only by the Registry's transition methods,
        # and in order: starting -> live -> closing -> winding down -> gone
        # (skipping steps is allowed, going back is not). While it is not gone,
        # registry._tasks[key] is self; it is live exactly while
        # registry._live[key] is self._send and the receive end is open; a
        # task runs the aggregate function from the start-up until it is gone.
        self._state: str = _STARTING
        self._ended_by: str | None = None  # why it stopped taking messages
        self._took_any = False  # whether the aggregate took a message (re-routing needs progress)
        # Messages carried across activations: while starting, those to put
        # in the mailbox when it goes live (the activating caller's call, or
        # an ended activation's leftovers); while closing or winding down,
        # the leftovers for the key's next activation.
        self._carry: list[Any] | None = None
        self._changed: trio.Event | None = None  # set at the next transition, if anyone waits
        self._error: TrioAggregatesError | None = None  # why the start-up failed
        #: The scope of ``nursery.start``'s own nursery, around the start-up
        #: alone (shutdown bounds a start-up with its deadline); None once live.
        self._scope: trio.CancelScope | None = None
        # Calls taken and not yet answered: the latest one, and (rarely) older
        # ones the aggregate kept to answer later, pruned as the list grows.
        # The mailbox tracks them itself: a Call never touches its mailbox.
        self._in_hand: Call | None = None
        self._held: list[Call] | None = None
        self._held_limit = 8
        #: Set by an aggregate whose every step can run without waiting
        #: (the runtime's, on the in-memory store): runs a call to its answer
        #: in the caller's task; False if it must be queued. Used only while
        #: the aggregate waits in receive with nothing queued (_call_soon).
        self._runner: Callable[[Answerable], bool] | None = None

    def __repr__(self) -> str:
        return f"<Mailbox of {self.key!r} ({self._state})>"

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
    @enable_ki_protection
    def idle_timeout(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise InvalidArgument(f"idle_timeout must be positive or None, not {value!r}")
        self._idle_timeout = value
        if value is not None:
            self._idle_since = trio.current_time()
            if self._state is _LIVE:
                self._registry._reaper.add(self, earlier=True)

    def _ended_unused(self) -> bool:
        """Whether it ended on its own (returned, raised, closed itself) without taking anything.

        Re-routing a message to the key's next activation would never end then.
        """
        return not self._took_any and self._ended_by in (_RETURNED, _ACLOSED)

    def _is_idle(self) -> bool:
        """Whether the aggregate waits in ``receive`` with nothing queued.

        Read from the channel's state (``_channel``), else from its statistics.
        """
        channel = self._channel
        if channel is None:  # pragma: no cover - another Trio's channel
            stats = self._receive.statistics()
            return stats.tasks_waiting_receive > 0 and stats.current_buffer_used == 0
        return bool(channel.receive_tasks) and not channel.data

    def _put_down(self) -> None:
        """The aggregate goes back to its mailbox: keep the last call only if unanswered."""
        call = self._in_hand
        if call is not None:
            self._in_hand = None
            if call._outcome is None:
                self._hold(call)

    def _hold(self, call: Call) -> None:
        held = self._held
        if held is None:
            self._held = [call]
            return
        held.append(call)
        if len(held) >= self._held_limit:
            held[:] = [c for c in held if c._outcome is None]
            self._held_limit = max(8, 2 * len(held))

    def _unanswered(self) -> list[Call]:
        self._put_down()
        held = self._held or []
        self._held = None
        return [call for call in held if call._outcome is None]

    @enable_ki_protection
    def receive_nowait(self) -> Any:
        """Take a queued message without waiting.

        Raises:
            trio.WouldBlock: the mailbox is empty.
            trio.EndOfChannel: the mailbox was closed (shutdown, passivation,
                or :meth:`aclose`).
        """
        self._put_down()
        while True:
            try:
                message = self._receive.receive_nowait()
            except trio.ClosedResourceError:
                self._registry._saw_end(self)
                raise trio.EndOfChannel from None
            if type(message) is Call:
                if message._abandoned:
                    continue  # withdrawn before the aggregate took it
                self._in_hand = message
            self._took_any = True
            return message

    @enable_ki_protection
    async def receive(self) -> Any:
        """Wait for the next message; a checkpoint, like any Trio receive.

        Calls withdrawn by their callers are skipped.

        Raises:
            trio.EndOfChannel: the mailbox was closed (shutdown, passivation,
                or :meth:`aclose`).
        """
        self._put_down()
        if self._idle_timeout is not None:
            self._idle_since = trio.current_time()
        while True:
            try:
                message = await self._receive.receive()
            except trio.ClosedResourceError:
                self._registry._saw_end(self)
                raise trio.EndOfChannel from None
            if type(message) is Call:
                if message._abandoned:
                    continue  # withdrawn before the aggregate took it
                self._in_hand = message
            self._took_any = True
            return message

    def __aiter__(self) -> Mailbox:
        return self

    @enable_ki_protection
    async def __anext__(self) -> Any:
        # receive(), written out again: this is every aggregate's hot path.
        call = self._in_hand
        if call is not None:
            self._in_hand = None
            if call._outcome is None:
                self._hold(call)
        if self._idle_timeout is not None:
            self._idle_since = trio.current_time()
        while True:
            try:
                message = await self._receive.receive()
            except trio.ClosedResourceError:
                self._registry._saw_end(self)
                raise StopAsyncIteration from None
            if type(message) is Call:
                if message._abandoned:
                    continue  # withdrawn before the aggregate took it
                self._in_hand = message
            self._took_any = True
            return message

    @enable_ki_protection
    async def aclose(self) -> None:
        """Stop taking messages: the key leaves the registry at once.

        Queued calls go to the key's next activation, as when the aggregate
        returns; it starts once this task has returned.
        """
        if self._state is _LIVE:
            self._registry._close_mailbox(self, _ACLOSED)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> trio.MemoryChannelStatistics:
        """The underlying memory channel's statistics (``current_buffer_used``, ...)."""
        return self._receive.statistics()

    @enable_ki_protection
    def _wake(self) -> None:
        """Wake the tasks waiting for this mailbox's next transition."""
        event = self._changed
        if event is not None:
            self._changed = None
            event.set()

    async def _wait_changed(self) -> None:
        """Wait for this mailbox's next transition (a checkpoint)."""
        event = self._changed
        if event is None:
            event = self._changed = trio.Event()
        await event.wait()


# -- idle passivation -------------------------------------------------------


@final
class _Reaper:
    """The idle deadlines of live mailboxes, and the one task that acts on them.

    A lazy heap, like Trio's ``Deadlines``: a mailbox has at most one current
    entry (the one whose seq is its ``_heap_seq``). An aggregate that took
    messages since its entry was pushed is found when the entry comes up and
    pushed again with its new deadline; a shorter timeout set meanwhile
    pushes a new entry and makes the old one stale; stale entries, and
    entries of mailboxes no longer live, are skipped when popped.
    """

    __slots__ = ("_heap", "_registry", "_running", "_scope", "_seq")

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._heap: list[tuple[float, int, Mailbox]] = []
        self._seq = itertools.count(1)
        self._scope: trio.CancelScope | None = None
        self._running = False

    @enable_ki_protection
    def add(self, mailbox: Mailbox, *, earlier: bool = False) -> None:
        """Give ``mailbox`` an entry, unless it has one (or ``earlier``: a shorter timeout)."""
        idle = mailbox._idle_timeout
        if idle is None or (mailbox._heap_seq and not earlier):
            return
        deadline = mailbox._idle_since + idle
        seq = mailbox._heap_seq = next(self._seq)
        heapq.heappush(self._heap, (deadline, seq, mailbox))
        if not self._running:
            self._running = True
            self._registry._nursery.start_soon(self._run)
        elif self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline

    @enable_ki_protection
    def expire(self, now: float) -> None:
        """Passivate every live mailbox whose aggregate has been idle until ``now``."""
        heap = self._heap
        registry = self._registry
        while heap and heap[0][0] <= now and not registry._closed:
            _, seq, mailbox = heapq.heappop(heap)
            if seq != mailbox._heap_seq:
                continue  # stale: replaced by an earlier entry
            mailbox._heap_seq = 0
            idle = mailbox._idle_timeout
            if mailbox._state is not _LIVE or idle is None:
                continue
            if mailbox._idle_since + idle > now:
                self.add(mailbox)  # it took a message since: its new deadline
            elif mailbox._is_idle():
                registry._close_mailbox(mailbox, _PASSIVATED)
            else:
                # Busy with a message: it re-arms when it waits again.
                mailbox._idle_since = now
                self.add(mailbox)

    @enable_ki_protection
    async def _run(self) -> None:
        heap = self._heap
        while not self._registry._closed:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            self.expire(trio.current_time())

    @enable_ki_protection
    def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._heap.clear()


# -- statistics -------------------------------------------------------------


@attrs.frozen
class RegistryStatistics:
    """A snapshot of a registry's counters, from :meth:`Registry.statistics`.

    Attributes:
        live: aggregates registered now (able to take messages).
        starting: activations whose start-up is in progress.
        winding_down: aggregates whose mailbox is closed but whose task still
            runs (finishing the message in hand, or code after its loop);
            their keys' next activations wait for them.
        activations: start-ups that finished (the aggregate became live).
        normal_ends: aggregates that returned (shutdown included).
        crashes: aggregates that raised after start-up.
        passivations: aggregates ended by the idle timeout.
        declined: start-ups that declined (returned before ``started()``).
        start_failures: start-ups that raised.
        mailbox_backlog: messages queued in all live mailboxes.
        closed: whether the registry has begun to shut down.

    ``live`` drops the moment a key leaves, and ``winding_down`` rises by the
    same; the end counters move when the task has actually ended. So
    ``activations == live + winding_down + normal_ends + crashes +
    passivations`` holds at every checkpoint.
    """

    live: int
    starting: int
    winding_down: int
    activations: int
    normal_ends: int
    crashes: int
    passivations: int
    declined: int
    start_failures: int
    mailbox_backlog: int
    closed: bool


@attrs.define
class _Counters:
    activations: int = 0
    normal_ends: int = 0
    crashes: int = 0
    passivations: int = 0
    declined: int = 0
    start_failures: int = 0


# -- start-up -------------------------------------------------------------


class _Declined(Exception):
    """Raised out of ``nursery.start`` when an aggregate returned before ``started()``."""


@final
class _StartupStatus:
    """The ``task_status`` an aggregate function gets: its ``started()`` makes the key live."""

    __slots__ = ("_mailbox", "_status")

    def __init__(self, mailbox: Mailbox, status: trio.TaskStatus[SendEnd | None]) -> None:
        self._mailbox = mailbox
        self._status: trio.TaskStatus[SendEnd | None] | None = status

    @property
    def is_started(self) -> bool:
        return self._status is None

    @enable_ki_protection
    def started(self, value: object = None) -> None:
        """Report the aggregate ready: its key enters the registry now.

        The value is ignored; ``register`` returns the mailbox's send end.
        """
        status = self._status
        if status is None:
            raise RuntimeError("called 'started' twice on the same task status")
        self._status = None
        mailbox = self._mailbox
        live = mailbox._registry._go_live(mailbox)
        status.started(mailbox._send if live else None)


class _Unset:
    def __repr__(self) -> str:
        return "<the registry's setting>"


_UNSET: Final = _Unset()


def _invalid_key(key: Any, exc: BaseException) -> InvalidKey:
    if isinstance(exc, TypeError):
        error = InvalidKey(f"aggregate keys must be hashable, not {key!r}")
    else:
        error = InvalidKey(f"aggregate key {key!r} cannot be hashed or compared: {exc!r}")
    error.__cause__ = exc
    return error


def _check_new_key(key: Any) -> None:
    """Refuse a key that could never be looked up again (not equal to itself)."""
    try:
        hash(key)
        same = bool(key == key)
    except Exception as exc:
        raise _invalid_key(key, exc) from exc
    if not same:
        raise InvalidKey(f"aggregate key {key!r} is not equal to itself (it could not be found)")


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
        "_idle_timeout",
        "_live",
        "_mailbox_size",
        "_now",
        "_nursery",
        "_reaper",
        "_shutdown_timeout",
        "_tasks",
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
        # trio.current_time() without its two wrappers (the hot paths' clock).
        self._now = trio.lowlevel.current_clock().current_time
        # Invariant: _tasks maps each key that has an aggregate task (starting,
        # live, closing or winding down) to that task's mailbox, so a key never
        # has two; _live maps exactly the keys whose mailbox is live to its send
        # end (the hot path reads it alone). Both are written only by the
        # lifecycle transitions below.
        self._tasks: dict[Any, Mailbox] = {}
        self._live: dict[Any, SendEnd] = {}
        self._counters = _Counters()
        self._closed = False
        self._reaper = _Reaper(self)

    def __repr__(self) -> str:
        return f"<Registry live={len(self._live)} closed={self._closed}>"

    # -- lookups (synchronous, O(1), never a checkpoint) --

    def get(self, key: Hashable) -> SendEnd | None:
        """Return the send end of the aggregate registered under ``key``, or ``None``.

        Raises:
            InvalidKey: ``key`` is not hashable (or its ``__hash__`` or
                ``__eq__`` raised: the error is the cause).
        """
        try:
            return self._live.get(key)
        except Exception as exc:
            raise _invalid_key(key, exc) from exc

    def has_key(self, key: Hashable) -> bool:
        """Whether an aggregate is registered under ``key`` (``key in registry``).

        Raises:
            InvalidKey: as :meth:`get`.
        """
        try:
            return key in self._live
        except Exception as exc:
            raise _invalid_key(key, exc) from exc

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
        """Return the registry's counters; O(aggregate tasks) for the backlog."""
        c = self._counters
        starting = winding_down = backlog = 0
        for mailbox in self._tasks.values():
            state = mailbox._state
            if state is _LIVE:
                backlog += mailbox._receive.statistics().current_buffer_used
            elif state is _STARTING:
                starting += 1
            else:
                winding_down += 1
        return RegistryStatistics(
            live=len(self._live),
            starting=starting,
            winding_down=winding_down,
            activations=c.activations,
            normal_ends=c.normal_ends,
            crashes=c.crashes,
            passivations=c.passivations,
            declined=c.declined,
            start_failures=c.start_failures,
            mailbox_backlog=backlog,
            closed=self._closed,
        )

    # -- the mailbox lifecycle: every write of Mailbox._state is here --
    #
    #   starting ──started()──> live ──closed──> closing ──loop saw the end──> winding down
    #      │                     │                  │                              │
    #      └──declined/failed────┴──task returned───┴──────────────────────────────┴──> gone
    #
    # All synchronous and KeyboardInterrupt-protected: no other task (and no
    # Ctrl-C) comes between the steps of a transition.

    @enable_ki_protection
    def _new_mailbox(self, key: Any, fn: AggregateFunction, idle: float | None) -> Mailbox:
        """(nothing) -> starting: the key is reserved for one new task."""
        _check_new_key(key)
        mailbox = Mailbox(self, key, fn, idle)
        self._tasks[key] = mailbox
        return mailbox

    @enable_ki_protection
    def _go_live(self, mailbox: Mailbox) -> bool:
        """starting -> live, inside ``started()``; False if the registry closed meanwhile."""
        assert mailbox._state is _STARTING
        self._counters.activations += 1
        mailbox._scope = None  # the idle task must not keep start()'s nursery alive
        carry = mailbox._carry
        mailbox._carry = None
        if self._closed:
            # Ready too late: the registry is shutting down. End at once.
            mailbox._state = _CLOSING
            mailbox._ended_by = _SHUTDOWN
            mailbox._receive.close()
            if carry:
                self._undeliverable(mailbox.key, carry, RegistryClosed("the registry closed"))
            mailbox._wake()
            return False
        mailbox._state = _LIVE
        self._live[mailbox.key] = mailbox._send
        if carry:
            # The activating caller's call, or the previous activation's
            # leftovers: in the mailbox before anyone else's, and before the
            # reaper could find it idle. They fit: a fresh mailbox is empty
            # and no larger a list is ever carried.
            send = mailbox._send
            for message in carry:
                send.send_nowait(message)
        if mailbox._idle_timeout is not None:
            mailbox._idle_since = trio.current_time()
            self._reaper.add(mailbox)
        mailbox._wake()
        return True

    @enable_ki_protection
    def _passivate_where(self, predicate: Callable[[Any], bool]) -> int:
        """Passivate every live aggregate whose key satisfies ``predicate``; how many.

        Internal (a cluster node handing shards off). Not a checkpoint. As an
        idle passivation: the message in hand is finished, queued ones wait
        for the key's next activation.
        """
        keys = [key for key in self._live if predicate(key)]
        for key in keys:
            mailbox = self._tasks.get(key)
            if mailbox is not None and mailbox._state is _LIVE:
                self._close_mailbox(mailbox, _PASSIVATED)
        return len(keys)

    @enable_ki_protection
    def _close_mailbox(self, mailbox: Mailbox, why: str) -> None:
        """live -> closing: the key leaves, the mailbox takes no more; leftovers wait.

        Queued messages are taken out, in order (withdrawn calls dropped): at
        shutdown their calls get RegistryClosed, otherwise they wait for the
        key's next activation, which starts when this task is gone.
        """
        assert mailbox._state is _LIVE
        key = mailbox.key
        del self._live[key]
        mailbox._state = _CLOSING
        mailbox._ended_by = why
        leftovers: list[Any] = []
        receive = mailbox._receive
        while True:
            try:
                message = receive.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                break
            if type(message) is not Call or not message._abandoned:
                leftovers.append(message)
        receive.close()  # blocked senders and stale send ends now get BrokenResourceError
        if leftovers:
            if self._closed:
                self._undeliverable(key, leftovers, RegistryClosed("the registry closed"))
            else:
                mailbox._carry = leftovers

    @enable_ki_protection
    def _saw_end(self, mailbox: Mailbox) -> None:
        """closing -> winding down: the aggregate's receive found the mailbox closed."""
        if mailbox._state is _CLOSING:
            mailbox._state = _WINDING_DOWN

    @enable_ki_protection
    def _task_ended(
        self, mailbox: Mailbox, crash: BaseException | None = None, *, interrupted: bool = False
    ) -> None:
        """live / closing / winding down -> gone: the task has returned (or raised).

        Calls it took and never answered are failed (``interrupted``: it was
        cancelled or got Ctrl-C, so the registry is going down); the key is
        free; its leftovers, if any, go to a fresh activation reserved at once
        (so later callers queue behind them); waiters wake.
        """
        key = mailbox.key
        if mailbox._state is _LIVE:
            self._close_mailbox(mailbox, _RETURNED)
        for call in mailbox._unanswered():
            if crash is not None:
                error: TrioAggregatesError = AggregateCrashed(key, crash)
                error.__cause__ = crash
            elif self._closed or interrupted:
                error = RegistryClosed(f"the registry closed while {key!r} held the call")
            else:
                error = AggregateGone(key, "ended without answering the call")
            call._resolve(outcome.Error(error))
        mailbox._state = _GONE
        if self._tasks.get(key) is mailbox:
            del self._tasks[key]
        leftovers = mailbox._carry
        mailbox._carry = None
        if leftovers:
            self._hand_over(mailbox, leftovers)
        mailbox._wake()

    @enable_ki_protection
    def _start_ended(self, mailbox: Mailbox, error: TrioAggregatesError | None) -> None:
        """starting -> gone: the start-up declined, failed or was cancelled."""
        if mailbox._state is not _STARTING:
            return
        mailbox._state = _GONE
        mailbox._error = error
        mailbox._scope = None
        key = mailbox.key
        if self._tasks.get(key) is mailbox:
            del self._tasks[key]
        mailbox._receive.close()
        carry = mailbox._carry
        mailbox._carry = None
        if carry:
            if error is None:
                error = (
                    RegistryClosed("the registry closed")
                    if self._closed
                    else AggregateGone(key, "ended before it took the call")
                )
            self._undeliverable(key, carry, error)
        mailbox._wake()

    @enable_ki_protection
    def _task_returned(self, mailbox: Mailbox) -> None:
        """The aggregate function returned: declined (before ``started()``) or ended."""
        if mailbox._state is _STARTING:
            self._counters.declined += 1
            self._start_ended(mailbox, AggregateDeclined(mailbox.key))
            raise _Declined
        if mailbox._ended_by is _PASSIVATED:
            self._counters.passivations += 1
        else:
            self._counters.normal_ends += 1
        self._task_ended(mailbox)

    @enable_ki_protection
    def _task_raised(self, mailbox: Mailbox, exc: Exception) -> None:
        """The aggregate function raised: a failed start-up (raised on), or a crash."""
        key = mailbox.key
        if mailbox._state is _STARTING:
            self._counters.start_failures += 1
            error = AggregateStartError(key, exc)
            error.__cause__ = exc
            self._start_ended(mailbox, error)
            raise error
        self._counters.crashes += 1
        logger.warning("aggregate %r crashed: %r", key, exc, exc_info=exc)
        self._task_ended(mailbox, crash=exc)

    @enable_ki_protection
    def _task_interrupted(self, mailbox: Mailbox) -> None:
        """The aggregate task was cancelled, or got a KeyboardInterrupt."""
        if mailbox._state is _GONE:
            return
        if mailbox._state is _STARTING:
            self._start_ended(mailbox, None)
            return
        self._counters.normal_ends += 1
        self._task_ended(mailbox, interrupted=True)

    def _hand_over(self, old: Mailbox, leftovers: list[Any]) -> None:
        """Give an ended activation's leftovers to a fresh one, started in the background."""
        key = old.key
        if self._closed:
            self._undeliverable(key, leftovers, RegistryClosed("the registry closed"))
            return
        if old._ended_unused():
            # It ended on its own without taking anything: so would the next.
            self._undeliverable(key, leftovers, AggregateGone(key, "ended before it took the call"))
            return
        fresh = Mailbox(self, key, old._fn, old._idle_timeout)
        fresh._carry = leftovers
        self._tasks[key] = fresh
        self._nursery.start_soon(self._redeliver, fresh)

    def _undeliverable(self, key: Any, messages: list[Any], error: TrioAggregatesError) -> None:
        """Answer the calls among ``messages`` with ``error``; log the other messages as lost."""
        lost = 0
        for message in messages:
            if type(message) is not Call:
                lost += 1
            elif message._outcome is None and not message._abandoned:
                message._resolve(outcome.Error(_copy_error(error)))
        if lost:
            logger.warning("%d message(s) for %r could not be delivered: %r", lost, key, error)

    # -- activation --

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosed("the registry is closed")

    @enable_ki_protection
    async def register(
        self,
        key: Hashable,
        aggregate: AggregateFunction | None = None,
        *,
        idle_timeout: float | object | None = _UNSET,
    ) -> SendEnd:
        """Start an aggregate under ``key``, wait until it is ready, and return its send end.

        If the key's previous aggregate is still winding down (running code
        after its mailbox loop), the start waits for it to return.

        Args:
            key: any hashable value equal to itself.
            aggregate: the aggregate function; the registry's default if ``None``.
            idle_timeout: overrides the registry's idle timeout for this aggregate.

        Cancellation: if cancelled during start-up, nothing is registered and the
        start-up task is cancelled too; no task is left behind.

        Raises:
            KeyAlreadyRegistered: ``key`` has a live aggregate (``.existing``).
            AggregateDeclined: the aggregate returned before ``started()``.
            AggregateStartError: the start-up raised (the cause).
            RegistryClosed: the registry is shutting down.
            InvalidKey: ``key`` is not hashable, or not equal to itself.
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
            mailbox = self._tasks.get(key)
            if mailbox is None:
                mailbox = self._new_mailbox(key, fn, idle)
                await self._start(mailbox)
                return mailbox._send
            await mailbox._wait_changed()

    @enable_ki_protection
    async def ensure(self, key: Hashable, aggregate: AggregateFunction | None = None) -> SendEnd:
        """Return the live aggregate's send end for ``key``, activating it if needed.

        Many tasks ensuring the same key at once produce exactly one activation
        and all get the same send end. The activation runs ``aggregate``, or
        the registry's default aggregate function; if the key's previous
        aggregate is still winding down, it waits for it to return first. A
        checkpoint even when the aggregate is live.

        Cancellation: as :meth:`register`; a waiter that is cancelled does not
        disturb the others.

        Raises:
            AggregateDeclined: as :meth:`register` (every task waiting on the
                declined start-up gets its own copy).
            AggregateStartError: as :meth:`register` (likewise).
            AggregateNotFound: no live aggregate and no aggregate function.
            RegistryClosed: the registry is shutting down.
            InvalidKey: ``key`` is not hashable, or not equal to itself.
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
            mailbox = self._tasks.get(key)
            if mailbox is None:
                fn = aggregate if aggregate is not None else self._aggregate
                if fn is None:
                    _check_new_key(key)
                    raise AggregateNotFound(key)
                mailbox = self._new_mailbox(key, fn, self._idle_timeout)
                await self._start(mailbox)
                return mailbox._send
            await mailbox._wait_changed()
            if mailbox._error is not None:
                raise _copy_error(mailbox._error)

    @enable_ki_protection
    async def _start(self, mailbox: Mailbox) -> None:
        """Run the start-up of a starting ``mailbox`` in this task's tree; return once live.

        Raises the start-up's error (the mailbox is gone then).
        """
        try:
            send: SendEnd | None = await self._nursery.start(self._run, mailbox)
        except _Declined:
            assert mailbox._error is not None
            raise _copy_error(mailbox._error) from None
        except AggregateStartError:
            raise
        except RuntimeError:
            # The nursery refused the start (it is closing), or shutdown
            # cancelled the start-up ("exited without calling started()").
            self._start_ended(mailbox, None)
            if self._closed:
                raise RegistryClosed("the registry is closed") from None
            raise
        except BaseException:
            self._start_ended(mailbox, None)  # cancelled before the start-up ran
            raise
        if send is None:
            raise RegistryClosed("the registry closed while the aggregate was starting")

    async def _run(self, mailbox: Mailbox, *, task_status: trio.TaskStatus[SendEnd | None]) -> None:
        # Not KeyboardInterrupt-protected: the aggregate function runs in this
        # frame (Ctrl-C must interrupt a busy aggregate). Its end is recorded by
        # the protected _task_* methods, and the finally records it even if a
        # KeyboardInterrupt lands between the aggregate's return and them.
        try:
            # Until started(), this task runs in nursery.start's own nursery, in
            # the caller's task tree: its scope covers the start-up and nothing else.
            parent = trio.lowlevel.current_task().parent_nursery
            if parent is not None:
                mailbox._scope = parent.cancel_scope
                if self._closed:
                    mailbox._scope.deadline = self._nursery.cancel_scope.deadline
            del parent  # the idle task must not keep start()'s nursery alive
            status = _StartupStatus(mailbox, task_status)
            del task_status  # keep the idle task small: trio's status object stays behind
            try:
                await mailbox._fn(mailbox.key, mailbox, task_status=status)
            except Exception as exc:
                self._task_raised(mailbox, exc)
                return
            except BaseException:
                # Cancelled (start-up cancelled, or the shutdown grace period ran
                # out), or KeyboardInterrupt: end cleanly, then let it propagate.
                self._task_interrupted(mailbox)
                raise
            self._task_returned(mailbox)
        finally:
            if mailbox._state is not _GONE:
                self._task_interrupted(mailbox)

    @enable_ki_protection
    async def _redeliver(self, mailbox: Mailbox) -> None:
        """Start the activation that takes an ended activation's leftovers."""
        # On failure the leftovers got the start-up's error (_start_ended).
        with contextlib.suppress(TrioAggregatesError):
            await self._start(mailbox)

    # -- calls --

    @enable_ki_protection
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
        ends before taking the call (a passivation racing the call, say), the
        call goes to the key's next activation, however often that happens.

        Cancellation: the caller stops waiting and the call is withdrawn
        (:attr:`Call.abandoned`). If the aggregate has not taken it yet, it
        never will: the mailbox skips it. If the aggregate already took it,
        the aggregate completes it and the answer is dropped.

        Raises:
            CallTimeout: no answer within ``timeout`` seconds (counting
                activation, waiting for a winding-down predecessor, and
                waiting for mailbox space). The call is withdrawn as on
                cancellation.
            AggregateCrashed: the aggregate raised while handling the call.
            AggregateGone: the aggregate returned without answering the
                call, or ended on its own before it took any message.
            RegistryClosed: the registry is shutting down.
            InvalidKey: ``key`` is not hashable, or not equal to itself.
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
        try:
            send = self._live.get(key)
        except Exception as exc:
            raise _invalid_key(key, exc) from exc
        call = Call(message)
        if send is not None:
            try:
                send.send_nowait(call)
            except trio.WouldBlock:
                pass  # full: wait for space below
            else:
                call._task = trio.lowlevel.current_task()
                return await trio.lowlevel.wait_task_rescheduled(call._abort)
        try:
            await self._deliver(key, call, aggregate)
        except BaseException:
            call._abandoned = True  # if a start-up carries it, it is withdrawn
            raise
        result = call._outcome
        if result is not None:  # answered already (taken at once, or refused at shutdown)
            return result.unwrap()
        call._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(call._abort)

    def _call_soon(
        self,
        key: Hashable,
        message: Any,
        callback: Callable[[outcome.Outcome[Any]], None],
        *,
        run_here: bool = True,
    ) -> Call | None:
        """Put a :class:`Call` in a live aggregate's mailbox, if it has room; never waits.

        Internal (the protocol server's hot path): instead of a task waiting
        for the answer, ``callback`` gets the outcome, called synchronously
        by whoever answers (the aggregate's task, the registry failing the
        call, or the aggregate's runner, before this returns: see
        ``Mailbox._runner``); it must be quick and never raise. To withdraw the call,
        set its ``_abandoned``: a mailbox skips it if the aggregate has not
        taken it, else the callback still runs. Returns ``None`` (and puts
        nothing anywhere) when ``key`` has no live activation or its mailbox
        is full: the caller then uses :meth:`call`. ``run_here=False``: only
        queue it (the caller has just tried :meth:`_ran_here` itself).
        """
        send = self._live.get(key)
        if send is None:
            return None
        call = Call(message)
        call._callback = callback
        if run_here and self._ran_here(key, call):
            return call
        try:
            send.send_nowait(call)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return None
        return call

    def _ran_here(self, key: Hashable, call: Answerable) -> bool:
        """Answer ``call`` in the calling task through the aggregate's runner
        (``Mailbox._runner``), if ``key`` has a live activation that has one
        and waits in ``receive`` with nothing queued; ``False`` (nothing
        done) otherwise. Never waits, never a checkpoint.

        Internal (the protocol server's and _call_soon's hot path). Answered
        here, it is as if the aggregate had taken the call and gone back to
        its mailbox: no other task ran in between.
        """
        if key not in self._live:
            return False
        mailbox = self._tasks[key]
        runner = mailbox._runner
        if runner is None:
            return False
        channel = mailbox._channel  # _is_idle, inline
        if channel is None:
            if not mailbox._is_idle():  # pragma: no cover - another Trio's channel
                return False
        elif not channel.receive_tasks or channel.data:
            return False
        if not runner(call):
            return False
        mailbox._took_any = True
        if mailbox._idle_timeout is not None:
            mailbox._idle_since = self._now()
        return True

    async def _deliver(self, key: Any, call: Call, aggregate: AggregateFunction | None) -> None:
        """Put ``call`` in the mailbox of a live activation of ``key``: the slow path.

        Always a checkpoint. Waits for a start-up or a wind-down in progress,
        activates the aggregate if there is none, waits for mailbox space, and
        tries again whenever the mailbox closed under it.
        """
        while True:
            self._check_open()
            mailbox = self._tasks.get(key)
            if mailbox is None:
                fn = aggregate if aggregate is not None else self._aggregate
                if fn is None:
                    _check_new_key(key)
                    raise AggregateNotFound(key)
                mailbox = self._new_mailbox(key, fn, self._idle_timeout)
                carried = self._mailbox_size > 0
                if carried:
                    mailbox._carry = [call]  # in the mailbox the moment it is live
                await self._start(mailbox)
                if carried:
                    return
                if mailbox._ended_unused():  # before we could send: it would again
                    raise AggregateGone(key, "ended before it took the call")
                continue
            if mailbox._state is not _LIVE:
                await mailbox._wait_changed()
                if mailbox._error is not None:
                    raise _copy_error(mailbox._error)
                continue
            send = mailbox._send
            try:
                try:
                    send.send_nowait(call)  # only after a checkpoint of this loop
                except trio.WouldBlock:
                    await send.send(call)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # It ended while we waited for space: to the next activation,
                # unless it ended on its own without taking anything.
                if mailbox._ended_unused():
                    self._check_open()
                    raise AggregateGone(key, "ended before it took the call") from None

    # -- shutdown --

    @enable_ki_protection
    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reaper.close()
        deadline = trio.current_time() + self._shutdown_timeout
        self._nursery.cancel_scope.deadline = deadline
        for mailbox in list(self._tasks.values()):
            state = mailbox._state
            if state is _LIVE:
                self._close_mailbox(mailbox, _SHUTDOWN)
            elif state is _STARTING:
                # Start-ups run in their callers' tasks, outside the nursery's scope.
                if mailbox._scope is not None:
                    mailbox._scope.deadline = deadline
            else:
                leftovers = mailbox._carry
                mailbox._carry = None
                if leftovers:
                    self._undeliverable(
                        mailbox.key, leftovers, RegistryClosed("the registry closed")
                    )
            mailbox._wake()  # waiters find the registry closed


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
        raise reraise from None  # alone: not chained to the body's cancellation
    if body_error is not None:
        raise body_error
