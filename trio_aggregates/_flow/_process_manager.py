"""Process managers: events in, commands out, each command applied once.

A *process manager* reacts to events by sending commands to aggregates,
through :class:`AggregateRepository` objects it was given. Its reactions are
``async`` methods marked ``@reacts``; each gets the event and an
:class:`EventContext`, whose :meth:`EventContext.command_id` derives a command
id from the triggering event, ``f"{name}:{position}:{step}"``::

    class TransferSaga(ProcessManager):
        reads = (Transfer,)

        def __init__(self, accounts, transfers):
            self.accounts, self.transfers = accounts, transfers

        @reacts
        async def requested(self, event: TransferRequested, ctx: EventContext) -> None:
            await self.accounts.execute(
                event.source, Withdraw(event.amount), command_id=ctx.command_id("withdraw"))
            await self.transfers.execute(
                ctx.key, MarkWithdrawn(), command_id=ctx.command_id("withdrawn"))

It runs like a projection (:func:`open_projections`, :func:`run_projection`):
from its checkpoint (in the store's database, table
``trio_aggregates_checkpoints``; in memory for the in-memory store), catching
up then following live events, in batches of the events already there. Within
a batch, the events of one stream are handled in order, one at a time, and
different streams concurrently (at most ``max_concurrency`` at once); the
checkpoint is stored after the batch. After a crash the events after the
checkpoint are handled again: every command they send carries the same
command id as the first time, so the repositories apply none twice (a retried
command returns the version after its first application). That is the rule
for reactions: **send every command with** ``command_id=ctx.command_id(step)``,
one distinct ``step`` per command of a reaction, and make what else they do
idempotent.

**Errors.** A reaction whose command fails with a :class:`StoreError` (a
:class:`ConcurrencyConflict` too) or a :class:`CallTimeout` is run again, with
the same command ids, up to ``retry_attempts`` times with a growing delay.
Any other exception (or the last retry's) stops this process manager alone,
as a failed projection: :class:`ProjectionFailed` naming the event's position,
the checkpoint left just before the first event not handled.

Open the process managers *inside* the blocks of the repositories they send
commands to (``open_aggregates``), so that they end first::

    async with open_aggregates(Account, store) as accounts, \\
            open_aggregates(Transfer, store) as transfers:
        async with open_projections(store, [TransferSaga(accounts, transfers)]):
            ...

**Cancellation.** Leaving the block waits for the batch in hand (its
reactions and their commands: bound them with the repositories' ``timeout=``)
and stores its checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Final

import trio

from .._core._exceptions import CallTimeout, InvalidArgument, StoreError
from .._stores._store import RecordedEvent
from ._projection import (
    EventContext,
    ProjectionFailed,
    _Checkpoints,
    _Flow,
    _marker,
)

__all__ = ["ProcessManager", "reacts"]

_REACTS: Final = "__trio_aggregates_reacts__"

#: Mark a :class:`ProcessManager` coroutine method as the reaction to an event class.
reacts = _marker(_REACTS, "reacts", "process manager reaction")

_KIND: Final = "process manager"

#: Errors after which a reaction is run again (same command ids).
_RETRIED: Final = (StoreError, CallTimeout)


class ProcessManager(_Flow):
    """Base class of process managers (sagas): reactions that send commands.

    Attributes:
        name: the checkpoint's key and the command ids' prefix (default: the
            class's name). Changing it re-runs every event with new ids:
            do not, once it ran.
        reads, categories: as for :class:`Projection`.
        batch_size: most events handled before a checkpoint (100).
        max_concurrency: most streams whose events are handled at once (16).
        retry_attempts: runs of a reaction after a StoreError or CallTimeout (5).
        retry_delay: seconds before the first retry, doubled at each (0.05).
    """

    _marker_attr: ClassVar[str] = _REACTS
    _kind: ClassVar[str] = _KIND

    batch_size: ClassVar[int] = 100
    max_concurrency: ClassVar[int] = 16
    retry_attempts: ClassVar[int] = 5
    retry_delay: ClassVar[float] = 0.05

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for fn, _ in cls._handlers.values():
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{cls.__name__}.{fn.__name__}: a reaction is an async def")
        if cls.max_concurrency < 1 or cls.retry_attempts < 0 or not cls.retry_delay >= 0:
            raise InvalidArgument(
                f"{cls.__name__}: max_concurrency >= 1, retry_attempts >= 0 and "
                f"retry_delay >= 0, not {cls.max_concurrency}, {cls.retry_attempts}, "
                f"{cls.retry_delay}"
            )

    async def _react(self, record: RecordedEvent) -> bool:
        """Run the reaction to ``record`` (with retries); return whether there was one.

        Raises:
            ProjectionFailed: it raised (after the retries, for a store error).
        """
        name = self.flow_name
        try:
            found = self._decode(record)
        except Exception as exc:
            raise ProjectionFailed(name, record, exc, kind=_KIND) from exc
        if found is None:
            return False
        event, handler, arity = found
        reaction: Callable[..., Any] = handler
        delay = self.retry_delay
        for attempt in range(self.retry_attempts + 1):
            try:
                if arity == 1:
                    await reaction(self, event)
                else:
                    await reaction(self, event, EventContext(record, None, name))
            except _RETRIED as exc:
                if attempt == self.retry_attempts:
                    raise ProjectionFailed(name, record, exc, kind=_KIND) from exc
            except Exception as exc:
                raise ProjectionFailed(name, record, exc, kind=_KIND) from exc
            else:
                return True
            await trio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _process_batch(
        self, checkpoints: _Checkpoints, batch: list[RecordedEvent]
    ) -> tuple[int, int]:
        by_stream: dict[str, list[RecordedEvent]] = {}
        for record in batch:
            by_stream.setdefault(record.stream, []).append(record)
        failures: list[ProjectionFailed] = []
        done: set[int] = set()
        handled = 0
        limiter = trio.CapacityLimiter(self.max_concurrency)

        async def run_stream(records: list[RecordedEvent]) -> None:
            nonlocal handled
            async with limiter:
                for record in records:
                    try:
                        if await self._react(record):
                            handled += 1
                    except ProjectionFailed as exc:
                        failures.append(exc)
                        return
                    done.add(record.position)

        if len(by_stream) == 1:
            await run_stream(batch)
        else:
            async with trio.open_nursery() as nursery:
                for records in by_stream.values():
                    nursery.start_soon(run_stream, records)
        # The checkpoint: the last position with every event up to it handled.
        position = 0
        for record in batch:
            if record.position not in done:
                break
            position = record.position
        if position:
            await checkpoints.save(self, position)
        if failures:
            first = min(failures, key=lambda f: f.position)
            raise first
        return position, handled
