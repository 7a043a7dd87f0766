"""Subscriptions: every event of a store, in the global order, caught up then live.

``async with open_subscription(store, from_position) as subscription:`` starts
one *feeder* task, a child of the block, which pages through
``store.read_all`` from ``from_position`` and hands each event to the body
through a bounded memory channel; ``async for event in subscription`` takes
them in position order. When a page comes back short, the feeder has caught
up: it waits for a wake-up, then reads again from the position after the last
event it handed out. Catching up and following live are the same loop, so
there is no switch at which an event could be skipped or handed out twice:
the store's global-order guarantee (no new event ever appears below one
``read_all`` returned) does the rest.

Wake-ups, whichever come first:

* in-process: the stores set a signal after every committed append made
  through the same store object (``_AppendSignal`` in ``_store.py``);
* PostgreSQL: ``LISTEN`` on a connection of the subscription's own; every
  transaction that appends events sends a ``NOTIFY`` when it commits, from
  any process (``_open_listener`` in ``_postgres.py``);
* polling every ``poll_interval`` seconds, always: so a missed notification
  only adds latency, and an SQLite file written by another process is
  followed too.

Backpressure: the feeder hands out whole pages, one channel message per
page (a message per event cost about as much as reading the event: 209k
events/s through the channel against 334k/s for SQLite's ``read_all``). It
reads the next page only once at most ``buffer_size`` of the events it read
are still waiting to be handed out, so a slow consumer makes the feeder wait
before it reads on, and slows nothing else; meanwhile the body works through
those last ``buffer_size`` events while the next page is read (in the store's
worker thread, or from the network).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Protocol, final

import trio

from .._core._exceptions import InvalidArgument, StoreError, TrioAggregatesError
from .._stores._store import EventStore, RecordedEvent, _AppendSignal, _check_read_all

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Subscription", "open_subscription"]

logger = logging.getLogger("trio_aggregates.subscription")

# Events read per read_all call.
_PAGE_SIZE: Final = 1000


class _Listener(Protocol):
    """A store's cross-process wake-up (PostgreSQL's LISTEN)."""

    def drain(self) -> None:
        """Forget the notifications received so far (before a read)."""

    async def wait(self) -> None:
        """Return once a notification arrived since the last :meth:`drain`.

        Never raises but for cancellation: a lost connection makes it wait
        for ever (the caller polls meanwhile) and reconnect at the next call.
        """


@final
class _Failed:
    """What the feeder sends last when the store failed."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_NO_PAGE: Final[Sequence[RecordedEvent]] = ()


@final
class Subscription:
    """The events of a store in position order: ``async for event in subscription``.

    Made by :func:`open_subscription`, usable only inside its block.

    Attributes:
        position: the position of the last event handed out
            (``from_position - 1`` before the first).
    """

    # The feeder sends pages; the body takes their events one by one from
    # ``_page``. The backlog (events sent, not yet taken) is ``_sent -
    # _taken - _index``, never counted per event: a feeder that must wait for
    # room sets ``_wake_at``, the number of events taken at which to wake it,
    # and the body compares each index it takes with ``_wake``, that number
    # as an index into the page in hand.
    __slots__ = (
        "_error",
        "_index",
        "_limit",
        "_page",
        "_receive",
        "_room",
        "_sent",
        "_taken",
        "_wake",
        "_wake_at",
        "position",
    )

    def __init__(
        self, receive: trio.MemoryReceiveChannel[Any], from_position: int, buffer_size: int
    ) -> None:
        self._receive = receive
        self._limit = buffer_size
        self._page = _NO_PAGE
        self._index = 0  # of the next event to take in _page
        self._taken = 0  # events in the pages before _page
        self._sent = 0  # events in every page sent
        self._wake_at = -1
        self._wake = -1
        self._room: trio.Event | None = None
        self._error: BaseException | None = None
        self.position = from_position - 1

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> RecordedEvent:
        """Return the next event, waiting for one if needed.

        A checkpoint: a cancellation check for every event, and a full
        schedule point at least once per page (when the next page is taken).
        Cancelled, it hands out nothing (the event is the next call's).

        Raises:
            StoreError: the store failed (the events before the failure have
                all been handed out); raised again by every later call.
            trio.ClosedResourceError: the subscription's block was left.
        """
        index = self._index
        page = self._page
        if index < len(page):
            # The page in hand: no trip through the scheduler (taking the
            # page was one), but a cancellation still lands here.
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            page = await self._next_page()
            index = 0
        event = page[index]
        self._index = index + 1
        if index == self._wake:
            self._wake_feeder()
        self.position = event.position
        return event

    async def _next_page(self) -> Sequence[RecordedEvent]:
        if self._error is not None:
            raise self._error
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:  # pragma: no cover - the feeder ends only on failure
            raise StopAsyncIteration from None
        if type(item) is _Failed:
            self._error = item.error
            raise item.error
        self._taken += len(self._page)
        self._page = item
        self._index = 0
        self._wake = self._wake_at - self._taken - 1 if self._wake_at >= 0 else -1
        return item  # type: ignore[no-any-return]

    def _wake_feeder(self) -> None:
        self._wake = self._wake_at = -1
        if self._room is not None:
            self._room.set()

    def _sending(self, page: Sequence[RecordedEvent]) -> None:
        """The feeder sends ``page``."""
        self._sent += len(page)

    async def _wait_for_room(self) -> None:
        """The feeder waits until at most ``buffer_size`` events are left to take."""
        while (excess := self._sent - self._taken - self._index - self._limit) > 0:
            self._wake_at = self._taken + self._index + excess
            self._wake = self._wake_at - self._taken - 1
            self._room = trio.Event()
            await self._room.wait()
        self._room = None

    def _close(self) -> None:
        """The block was left: drop the page in hand (the channel says the rest)."""
        self._page = _NO_PAGE
        self._index = 0
        self._wake = self._wake_at = -1


async def _wait(armed: trio.Event | None, listener: _Listener | None, poll_interval: float) -> None:
    """Wait for a wake-up (``armed`` set, or a notification), at most ``poll_interval``."""
    with trio.move_on_after(poll_interval):
        if listener is None:
            if armed is None:
                await trio.sleep_forever()
            else:
                await armed.wait()
            return
        if armed is None:
            await listener.wait()
            return
        async with trio.open_nursery() as nursery:

            async def first(wait: Any) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, armed.wait)
            nursery.start_soon(first, listener.wait)


async def _follow(
    store: EventStore,
    send: trio.MemorySendChannel[Any],
    subscription: Subscription,
    position: int,
    categories: Sequence[str] | None,
    event_types: Sequence[str] | None,
    poll_interval: float,
) -> None:
    """Hand out every event from ``position`` on: read pages, wait when caught up."""
    signal: _AppendSignal | None = getattr(store, "_append_signal", None)
    if not isinstance(signal, _AppendSignal):
        signal = None
    open_listener = getattr(store, "_open_listener", None)
    listening: AbstractAsyncContextManager[_Listener | None] = (
        open_listener() if open_listener is not None else _no_listener()
    )
    filtered = categories is not None or event_types is not None
    async with listening as listener:
        while True:
            # Armed before the read: an append committed after it wakes us.
            armed = signal.arm() if signal is not None else None
            if listener is not None:
                listener.drain()
            # With filters, the events after the last one handed out may all be
            # of other streams or types: the head position, read before the
            # page, says how far a short page has looked, so that the next read
            # starts beyond it instead of scanning them again at every wake-up.
            head = await store.head_position() if filtered else 0
            page = await store.read_all(
                position, limit=_PAGE_SIZE, categories=categories, event_types=event_types
            )
            if page:
                subscription._sending(page)
                send.send_nowait(page)  # unbounded: the backlog bounds it
                position = page[-1].position + 1
            if len(page) < _PAGE_SIZE:
                # Nothing new will appear at or below the head (the store's
                # global-order guarantee), and a short page holds every
                # matching event up to it.
                position = max(position, head + 1)
                await _wait(armed, listener, poll_interval)
            # A slow consumer sets the pace: read on once it has room.
            await subscription._wait_for_room()


@asynccontextmanager
async def _no_listener() -> AsyncIterator[None]:
    yield None


async def _feed(
    store: EventStore,
    send: trio.MemorySendChannel[Any],
    subscription: Subscription,
    position: int,
    categories: Sequence[str] | None,
    event_types: Sequence[str] | None,
    poll_interval: float,
) -> None:
    """The feeder task: never raises but for cancellation (errors go down the channel)."""
    async with send:
        try:
            await _follow(
                store, send, subscription, position, categories, event_types, poll_interval
            )
        except StoreError as exc:
            failure = _Failed(exc)
        except Exception as exc:
            # A store outside this library raised something else.
            error = StoreError(f"the event store failed: {exc!r}")
            error.__cause__ = exc
            failure = _Failed(error)
        else:  # pragma: no cover - _follow loops until cancelled
            return
        with contextlib.suppress(trio.BrokenResourceError):  # the body left meanwhile
            await send.send(failure)


@asynccontextmanager
async def open_subscription(
    store: EventStore,
    from_position: int = 1,
    *,
    categories: Sequence[str] | None = None,
    event_types: Sequence[str] | None = None,
    buffer_size: int = 256,
    poll_interval: float = 1.0,
) -> AsyncIterator[Subscription]:
    """Follow every event of ``store`` from ``from_position`` on, in position order.

    Usage::

        async with open_subscription(store, from_position=checkpoint + 1) as subscription:
            async for event in subscription:
                ...  # event.position, event.stream, event.type, event.data

    The events already stored come first (read in pages with
    :meth:`EventStore.read_all`), then the new ones as they are appended, with
    no gap and no duplicate between the two: each event once, in position
    order, the events of deleted streams left out. A child task of the block
    reads them page by page (1000 events) and hands the pages to the body's
    ``async for``: a slow consumer slows only itself (the feeder waits for
    room before it reads on).

    Args:
        store: any :class:`EventStore`.
        from_position: the first position wanted (1: everything).
        categories: only the events of streams in these categories (the part
            of a stream's name before the first ``"-"``); ``None``: all.
        event_types: only the events of these types; ``None``: all.
        buffer_size: how many of the events read may still wait to be
            handed out when the feeder reads the next page (an int, at least
            0): at most ``buffer_size`` + one page are read ahead, and the
            body works through the last ``buffer_size`` events of a page
            while the next one is read.
        poll_interval: seconds between reads when no wake-up comes (positive).
            Appends made through the same store object wake the subscription
            at once, and on PostgreSQL so do appends from any process
            (``LISTEN``/``NOTIFY``, on a connection the subscription opens
            for itself once it has caught up: count one more connection per
            subscription); polling catches the rest (an SQLite file written
            by another process, a lost notification).

    Raises:
        InvalidArgument: an argument is out of range or of the wrong type.
        StoreError: from ``async for``: the store failed (after the events
            read before the failure). It is the store's own error, never an
            exception group; the subscription yields nothing more.

    Cancellation: leaving the block (normally, by an exception, or cancelled)
    cancels the feeder; nothing runs after the block. An exception from the
    body propagates unchanged, not wrapped in an exception group.
    """
    start, _, cats, types = _check_read_all(from_position, None, categories, event_types)
    if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) or buffer_size < 0:
        raise InvalidArgument(f"buffer_size must be an int >= 0, not {buffer_size!r}")
    if (
        not isinstance(poll_interval, int | float)
        or isinstance(poll_interval, bool)
        or not 0 < poll_interval < math.inf
    ):
        raise InvalidArgument(f"poll_interval must be a positive number, not {poll_interval!r}")
    # Pages and a last _Failed: as many pages as the backlog lets through.
    send, receive = trio.open_memory_channel[Any](math.inf)
    subscription = Subscription(receive, start, buffer_size)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _feed,
                store,
                send,
                subscription,
                start,
                None if cats is None else sorted(cats),
                None if types is None else sorted(types),
                float(poll_interval),
            )
            with receive:
                try:
                    yield subscription
                except BaseException as exc:
                    body_error = exc
                finally:
                    subscription._close()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if group.split(trio.Cancelled)[1] is not None:
            fatal = [e for e in group.exceptions if isinstance(e, KeyboardInterrupt | SystemExit)]
            if not fatal:
                raise TrioAggregatesError(
                    "internal error in trio_aggregates (please report it)"
                ) from group
            raise fatal[0] from None
        if body_error is None:
            raise
    if body_error is not None:
        raise body_error
