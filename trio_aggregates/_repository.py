"""Event-sourced aggregates at run time: one registry child per live aggregate.

:func:`open_aggregates` opens a registry whose children are aggregates of one
:class:`Aggregate` type, backed by an :class:`EventStore`. Each live aggregate
is one task with one mailbox and runs its commands one at a time, in arrival
order. For each command:

1. check the request (``create`` needs an empty stream, ``execute`` a
   non-empty one, an ``expected_version`` must match);
2. *decide*: the pure handler returns the events (or rejects the command);
3. *append* them to the store with the aggregate's version as the expected
   version: the store is the arbiter of concurrency;
4. *apply* them to the in-memory state, and answer the caller with the new
   version (or the reply the handler chose).

A command is acknowledged only after its events are in the store (with a
durable store: durable). If another writer appended first (another process,
say), the append fails with :class:`ConcurrencyConflict`; the aggregate reads
the events it missed, applies them and decides again, up to ``max_retries``
times, then answers the conflict.

Activation: the aggregate task loads its stream (latest usable snapshot, then
the later events, in pages) *before* it reports ready, inside its own task,
so no command sees a half-built state and a slow stream delays no other key.
At most ``max_concurrent_loads`` loads run at once. ``execute`` on a key with
no stream registers nothing and raises :class:`AggregateNotFound`.

Failure: a rejected command (a :class:`CommandRejected`) leaves the aggregate
alive and unchanged. A store error is the caller's answer and ends the
aggregate (its state may be behind the store); the next command rebuilds it.
Any other exception in a handler or applier ends the aggregate too (the caller
gets :class:`AggregateCrashed`); nothing acknowledged is ever lost, because
acknowledging comes last. Idle aggregates are passivated (``idle_timeout``,
300 s by default) and rebuilt from the store on their next command.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Any, Final, Generic, TypeVar, final

import attrs
import trio

from ._aggregate import NO_REPLY, Aggregate, Decision
from ._codec import type_name_of
from ._exceptions import (
    AggregateDeclined,
    AggregateNotFound,
    AggregateStartError,
    AlreadyExists,
    CommandRejected,
    ConcurrencyConflict,
    EventDecodeError,
    InvalidArgument,
    InvalidKey,
    StoreError,
    TrioAggregatesError,
    UnknownCommand,
    WrongExpectedVersion,
    _copy_error,
)
from ._registry import Call, Mailbox, Registry, open_registry
from ._store import EventStore, NewEvent, Snapshot, read_stream

__all__ = ["AggregateRepository", "StoredEvent", "open_aggregates"]

logger = logging.getLogger("trio_aggregates.repository")

# Command ids, when the caller gives none: unique without a uuid4 per command
# (2 µs): 64 random bits per process, then a counter.
_ID_PREFIX: Final = uuid.uuid4().hex[:16]
_id_counter = itertools.count()
_json_str: Final = json.encoder.encode_basestring_ascii

A = TypeVar("A", bound=Aggregate)

_ANY: Final = 0
_EXISTING: Final = 1
_NEW: Final = 2

#: Errors that answer one command and leave the aggregate as it was.
_REFUSALS: Final = (
    CommandRejected,
    UnknownCommand,
    WrongExpectedVersion,
    ConcurrencyConflict,
    AggregateNotFound,
    AlreadyExists,
)


@attrs.frozen
class _Command:
    command: object
    mode: int
    expected_version: int | None
    dry_run: bool
    verbose: bool
    #: The events' metadata as JSON, but for the time of the append:
    #: ``{"command_id": ..., ..., "at": `` (closed with the time and ``}``).
    metadata_head: str


@attrs.frozen
class _Inspect:
    """Ask a live aggregate for a copy of its state and its version."""


@attrs.frozen
class StoredEvent:
    """A decoded event with its place in the stream, from :meth:`AggregateRepository.history`.

    Attributes:
        version: its position in the stream, from 1.
        event: the event (an instance of its class, upcast if need be).
        metadata: timestamp, command id, correlation and causation ids, ...
        recorded_at: when the store wrote it (seconds since the epoch).
    """

    version: int
    event: object
    metadata: dict[str, Any]
    recorded_at: float


@attrs.define(eq=False)
class _Live(Generic[A]):
    state: A
    version: int
    snapshot_version: int


def _check_key(key: object) -> None:
    if isinstance(key, bool) or not isinstance(key, str | int | uuid.UUID):
        raise InvalidKey(
            f"event-sourced aggregate keys are str, int or uuid.UUID, not {type(key).__name__}"
        )


@final
class AggregateRepository(Generic[A]):
    """The live aggregates of one type, backed by an event store.

    Made by :func:`open_aggregates`. ``execute`` and ``create`` are the two
    entry points of the original's ``MessageHandler``: act on an existing
    aggregate, or create a new one.
    """

    def __init__(
        self,
        aggregate_type: type[A],
        store: EventStore,
        *,
        max_retries: int,
        max_concurrent_loads: int,
    ) -> None:
        if not (isinstance(aggregate_type, type) and issubclass(aggregate_type, Aggregate)):
            raise InvalidArgument(f"{aggregate_type!r} is not an Aggregate subclass")
        self._type = aggregate_type
        self._store = store
        self._codec = aggregate_type.codec()
        self._max_retries = max_retries
        self._loads = trio.CapacityLimiter(max_concurrent_loads)
        self._registry: Registry | None = None
        self._serve_existing = functools.partial(self._serve, must_exist=True)
        self._serve_any = functools.partial(self._serve, must_exist=False)

    @property
    def aggregate_type(self) -> type[A]:
        """The :class:`Aggregate` subclass this repository runs."""
        return self._type

    @property
    def store(self) -> EventStore:
        """The event store."""
        return self._store

    @property
    def registry(self) -> Registry:
        """The registry whose children the live aggregates are."""
        assert self._registry is not None
        return self._registry

    # -- the public entry points --

    async def execute(
        self,
        key: str | int | uuid.UUID,
        command: object,
        *,
        expected_version: int | None = None,
        dry_run: bool = False,
        verbose: bool = False,
        timeout: float | None = None,
        command_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Any:
        """Run ``command`` on the existing aggregate ``key``; return the new version.

        Args:
            key: the aggregate's key (str, int or UUID).
            command: a command the aggregate has a handler for.
            expected_version: refuse the command unless the aggregate is at
                this version.
            dry_run: decide and validate only; store nothing. Returns the
                current version, or with ``verbose`` the events that would be
                written.
            timeout: seconds to wait for the answer (:class:`CallTimeout`).
                A command whose caller gave up before the aggregate took it is
                skipped; one already being stored completes.
            command_id, correlation_id, causation_id: stored in each event's
                metadata (``command_id`` defaults to a fresh unique id).

        Returns:
            The version after the command, or the handler's own reply.

        Raises:
            AggregateNotFound: no stream for ``key`` (nothing is registered).
            CommandRejected: the handler refused (its own subclass).
            UnknownCommand: no handler for the command's type.
            WrongExpectedVersion: ``expected_version`` did not match.
            ConcurrencyConflict: other writers won ``max_retries + 1`` times.
            StoreError: the store failed (the aggregate reloads on next use).
            EventDecodeError: the stream holds an event that cannot be read.
            AggregateCrashed: a handler or applier raised unexpectedly.
            CallTimeout: no answer within ``timeout``.
            RegistryClosed: the block of :func:`open_aggregates` has ended.
            InvalidKey: ``key`` is not a str, int or UUID.
        """
        request = self._request(
            command, _EXISTING, expected_version, dry_run, verbose,
            command_id, correlation_id, causation_id,
        )  # fmt: skip
        return await self._send(key, request, timeout, self._serve_existing)

    async def create(
        self,
        key: str | int | uuid.UUID,
        command: object,
        *,
        dry_run: bool = False,
        verbose: bool = False,
        timeout: float | None = None,
        command_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Any:
        """Run ``command`` on a new aggregate ``key``; return its version.

        As :meth:`execute`, but the stream must be empty. Besides the errors
        of :meth:`execute` (but for :class:`AggregateNotFound`), it raises:

        Raises:
            AlreadyExists: the stream of ``key`` already has events.
        """
        request = self._request(
            command, _NEW, 0, dry_run, verbose, command_id, correlation_id, causation_id
        )
        return await self._send(key, request, timeout, self._serve_any)

    async def load(self, key: str | int | uuid.UUID, *, timeout: float | None = None) -> A:
        """Return a copy of the live aggregate's state (activating it if needed).

        Raises:
            AggregateNotFound: no stream for ``key``.
        """
        state, _ = await self._send(key, _Inspect(), timeout, self._serve_existing)
        return state  # type: ignore[no-any-return]

    async def version(self, key: str | int | uuid.UUID, *, timeout: float | None = None) -> int:
        """Return the live aggregate's version (activating it if needed).

        Raises:
            AggregateNotFound: no stream for ``key``.
        """
        _, version = await self._send(key, _Inspect(), timeout, self._serve_existing)
        return version  # type: ignore[no-any-return]

    async def replay(self, key: str | int | uuid.UUID) -> tuple[A, int]:
        """Rebuild ``key``'s state from its events in the store, ignoring snapshots.

        Does not touch the live aggregate: it is how tests and tools check
        that a live state equals a replay of its stream.
        """
        _check_key(key)
        state = self._type()
        version = 0
        stream = self._type.stream_name(key)
        async with aclosing(read_stream(self._store, stream)) as records:
            async for record in records:
                state.apply(self._codec.decode(record.type, record.data, where=_at(record)))
                version = record.version
        return state, version

    async def history(self, key: str | int | uuid.UUID) -> list[StoredEvent]:
        """Return every event of ``key``'s stream, decoded, with its metadata."""
        _check_key(key)
        stream = self._type.stream_name(key)
        result = []
        async with aclosing(read_stream(self._store, stream)) as records:
            async for record in records:
                event = self._codec.decode(record.type, record.data, where=_at(record))
                try:
                    metadata = json.loads(record.metadata)
                except ValueError as exc:
                    raise EventDecodeError(f"bad metadata at {_at(record)}") from exc
                result.append(StoredEvent(record.version, event, metadata, record.recorded_at))
        return result

    # -- plumbing --

    @staticmethod
    def _request(
        command: object,
        mode: int,
        expected_version: int | None,
        dry_run: bool,
        verbose: bool,
        command_id: str | None,
        correlation_id: str | None,
        causation_id: str | None,
    ) -> _Command:
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            raise InvalidArgument(f"expected_version must be an int >= 0, not {expected_version!r}")
        if command_id is None:
            command_id = f"{_ID_PREFIX}{next(_id_counter):016x}"
        head = f'{{"command_id":{_json_str(command_id)}'
        if correlation_id is not None:
            head += f',"correlation_id":{_json_str(correlation_id)}'
        if causation_id is not None:
            head += f',"causation_id":{_json_str(causation_id)}'
        head += f',"command":{_json_str(type_name_of(type(command)))},"at":'
        return _Command(command, mode, expected_version, dry_run, verbose, head)

    async def _send(self, key: Any, request: object, timeout: float | None, fn: Any) -> Any:
        _check_key(key)
        try:
            return await self.registry.call(key, request, timeout=timeout, aggregate=fn)
        except AggregateDeclined:
            raise AggregateNotFound(key) from None
        except AggregateStartError as exc:
            # Loading failed: say why (a StoreError, an EventDecodeError, ...).
            cause = exc.__cause__
            if isinstance(cause, TrioAggregatesError):
                raise _copy_error(cause) from exc
            raise

    async def _load(self, stream: str) -> _Live[A]:
        cls = self._type
        state: A | None = None
        version = 0
        if cls.snapshot_every:
            snapshot = await self._store.load_snapshot(stream)
            if (
                snapshot is not None
                and snapshot.schema == cls.snapshot_schema
                and snapshot.type == type_name_of(cls)
            ):
                try:
                    state = self._codec.decode_state(snapshot.data, cls)
                    version = snapshot.version
                except EventDecodeError as exc:
                    logger.warning("ignoring the snapshot of %r: %s", stream, exc)
        if state is None:
            state = cls()
        live = _Live(state, version, version)
        await self._catch_up(live, stream)
        return live

    async def _catch_up(self, live: _Live[A], stream: str) -> None:
        """Apply the events of ``stream`` after ``live.version``."""
        decode = self._codec.decode
        state = live.state
        async with aclosing(
            read_stream(self._store, stream, from_version=live.version + 1)
        ) as records:
            async for record in records:
                state.apply(decode(record.type, record.data, where=_at(record)))
                live.version = record.version

    async def _serve(
        self,
        key: Any,
        mailbox: Mailbox,
        *,
        task_status: trio.TaskStatus[None],
        must_exist: bool,
    ) -> None:
        """The aggregate task: load, report ready, run commands one at a time."""
        stream = self._type.stream_name(key)
        async with self._loads:
            live = await self._load(stream)
        if must_exist and live.version == 0:
            return  # declined: nothing is registered (AggregateNotFound for the caller)
        task_status.started()
        async for message in mailbox:
            if type(message) is not Call:
                logger.warning("aggregate %r ignored %r: send commands with a call", key, message)
                continue
            if message.abandoned:
                message.reply(None)  # the caller gave up before we took it: skip
                continue
            request = message.message
            try:
                if type(request) is _Command:
                    result = await self._execute(key, stream, live, request)
                elif type(request) is _Inspect:
                    if live.version == 0:
                        raise AggregateNotFound(key)
                    result = (copy.deepcopy(live.state), live.version)
                else:
                    raise UnknownCommand(f"not a command envelope: {request!r}")
            except _REFUSALS as exc:
                message.fail(exc)
                if live.version == 0:
                    return  # no stream (a refused create): do not stay registered
                continue
            except StoreError as exc:
                # Did the append land? Unknown: end, and reload on the next command.
                message.fail(exc)
                return
            message.reply(result)
            if live.version == 0:
                return  # no stream (a refused or dry-run create): do not stay registered
            every = self._type.snapshot_every
            if every and live.version // every > live.snapshot_version // every:
                await self._save_snapshot(live, stream)

    async def _execute(self, key: Any, stream: str, live: _Live[A], request: _Command) -> Any:
        if request.mode == _NEW and live.version > 0:
            raise AlreadyExists(key)
        if request.mode == _EXISTING and live.version == 0:
            raise AggregateNotFound(key)
        expected = request.expected_version
        if expected is not None and expected != live.version:
            raise WrongExpectedVersion(key, expected, live.version)
        codec = self._codec
        for attempt in range(self._max_retries + 1):
            decided = live.state._handle(request.command)
            if isinstance(decided, Decision):
                events, reply = decided.events, decided.reply
            else:
                events, reply = decided, NO_REPLY
            if request.dry_run:
                for event in events:
                    codec.encode(event)  # validates: every event can be stored
                return list(events) if request.verbose else live.version
            if not events:
                return live.version if reply is NO_REPLY else reply
            metadata = f"{request.metadata_head}{time.time()!r}}}".encode()
            new = [NewEvent(*codec.encode(event), metadata) for event in events]
            try:
                version = await self._store.append(stream, new, expected_version=live.version)
            except ConcurrencyConflict:
                # Another writer got there first: learn what it wrote, then
                # decide again (or give up). Always catch up, so that the next
                # command starts from the stream as it is.
                await self._catch_up(live, stream)
                if request.mode == _NEW and live.version > 0:
                    raise AlreadyExists(key) from None
                if expected is not None:
                    raise WrongExpectedVersion(key, expected, live.version) from None
                if attempt == self._max_retries:
                    raise
                continue
            state = live.state
            for event in events:
                state.apply(event)
            live.version = version
            return version if reply is NO_REPLY else reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _save_snapshot(self, live: _Live[A], stream: str) -> None:
        cls = self._type
        try:
            data = self._codec.encode_state(live.state)
            await self._store.save_snapshot(
                Snapshot(stream, live.version, cls.snapshot_schema, type_name_of(cls), data)
            )
        except Exception as exc:  # a snapshot is an optimisation: never crash for one
            logger.warning("could not snapshot %r at version %d: %r", stream, live.version, exc)
            return
        live.snapshot_version = live.version


def _at(record: Any) -> str:
    return f"{record.stream}@{record.version}"


@asynccontextmanager
async def open_aggregates(
    aggregate_type: type[A],
    store: EventStore | str = "memory://",
    *,
    idle_timeout: float | None = 300.0,
    mailbox_size: int = 64,
    max_retries: int = 3,
    max_concurrent_loads: int = 32,
    shutdown_timeout: float = 5.0,
) -> AsyncIterator[AggregateRepository[A]]:
    """Run the aggregates of ``aggregate_type`` on ``store`` for the block's duration.

    Args:
        aggregate_type: an :class:`Aggregate` subclass.
        store: an :class:`EventStore`, or a URL for :func:`open_store`
            (``memory://``, ``sqlite:///path.db``, ``postgresql://...``); a
            store opened from a URL is closed when the block ends.
        idle_timeout: passivate aggregates idle this long (``None``: never).
        mailbox_size: each aggregate's mailbox buffer.
        max_retries: re-decisions after a concurrency conflict.
        max_concurrent_loads: how many aggregates may load their streams at once.
        shutdown_timeout: the registry's grace period at exit.

    The repository's registry is a child of this block: leaving it ends every
    aggregate (commands still queued get :class:`RegistryClosed`).
    """
    if max_retries < 0 or max_concurrent_loads < 1:
        raise InvalidArgument("max_retries must be >= 0 and max_concurrent_loads >= 1")
    async with AsyncExitStack() as stack:
        if isinstance(store, str):
            from ._open_store import open_store

            store = await stack.enter_async_context(open_store(store))
        repository = AggregateRepository(
            aggregate_type,
            store,
            max_retries=max_retries,
            max_concurrent_loads=max_concurrent_loads,
        )
        registry = await stack.enter_async_context(
            open_registry(
                repository._serve_existing,
                mailbox_size=mailbox_size,
                idle_timeout=idle_timeout,
                shutdown_timeout=shutdown_timeout,
            )
        )
        repository._registry = registry
        yield repository
