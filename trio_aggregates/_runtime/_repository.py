"""Event-sourced aggregates at run time: one registry child per live aggregate.

:func:`open_aggregates` opens a registry whose children are aggregates of one
:class:`Aggregate` type, backed by an :class:`EventStore`. Each live aggregate
is one task with one mailbox and runs its commands one at a time, in arrival
order. The command step itself (checks, decide, encode, tentative apply, what
to do after a commit, a conflict, a duplicate or a failure) is the sans-IO
state machine of ``_command.py``; this module only does its I/O (load,
append, read, look up, save a snapshot) and answers the callers.

A command is acknowledged only after its events are in the store (with a
durable store: durable). If another writer appended first (another process,
say), the append fails with :class:`ConcurrencyConflict`; the aggregate
rebuilds its state from the store and decides again, up to ``max_retries``
times, then answers the conflict. A refusal (a rejection, a wrong expected
version, not found, already exists) is answered only after catching up with
the store. A command with the caller's ``command_id`` is applied at most once
per stream: a retry gets the version after its first application.

One stream, one aggregate: keys are canonical (``1`` and ``"1"``, a UUID and
its string, are one key: ``canonical_key``) and the registry's key is
that canonical string.

Activation: the aggregate task loads its stream (latest usable snapshot, then
the later events, in pages) *before* it reports ready, inside its own task,
so no command sees a half-built state and a slow stream delays no other key.
At most ``max_concurrent_loads`` loads run at once. A task on a key with no
stream serves what is queued (``create`` creates; ``execute``, ``load`` and
``version`` get :class:`AggregateNotFound`) and ends once it holds no stream
and nothing is queued.

Failure: a refused command leaves the aggregate alive and unchanged. A store
error is the caller's answer; the aggregate stays, and rebuilds its state from
the store before its next command (its state may be behind the store). An
applier that raises fails its command before anything is stored
(:class:`AggregateCrashed`); the aggregate rebuilds and keeps serving. Any
other exception in a handler ends the aggregate (the caller gets
:class:`AggregateCrashed`); nothing acknowledged is ever lost, because
acknowledging comes last. Idle aggregates are passivated (``idle_timeout``,
300 s by default) and rebuilt from the store on their next command.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Any, Final, Generic, TypeVar, final

import attrs
import outcome
import trio

from .._core._exceptions import (
    AggregateCrashed,
    AggregateDeclined,
    AggregateNotFound,
    AggregateStartError,
    AlreadyExists,
    CommandRejected,
    DuplicateCommand,
    EventDecodeError,
    InvalidArgument,
    StoreError,
    TrioAggregatesError,
    UnknownCommand,
    WrongExpectedVersion,
    _copy_error,
)
from .._core._registry import Answerable, Call, Mailbox, Registry, open_registry
from .._stores._store import EventStore, InMemoryEventStore, Snapshot, read_stream
from ._aggregate import Aggregate, canonical_key
from ._codec import encode_json, type_name_of
from ._command import (
    ANY,
    APPEND,
    CATCH_UP,
    DONE,
    EXISTING,
    FAIL,
    NEW,
    REBUILD,
    Command,
    Inspect,
    LiveAggregate,
)

__all__ = ["AggregateRepository", "StoredEvent", "open_aggregates"]

logger = logging.getLogger("trio_aggregates.repository")

#: A command class -> the end of its metadata head (its name, then "at"). A
#: plain dict: command classes live as long as their modules.
_command_tails: dict[type, bytes] = {}
_json_str: Final = json.encoder.encode_basestring_ascii

A = TypeVar("A", bound=Aggregate)

#: Errors that answer one command; the aggregate keeps serving.
_ANSWERS: Final = (
    CommandRejected,
    UnknownCommand,
    WrongExpectedVersion,
    AggregateNotFound,
    AlreadyExists,
    StoreError,  # ConcurrencyConflict, EventDecodeError, ... too
    AggregateCrashed,  # an applier raised: nothing was stored
)

#: Events read per page when loading or catching up.
_PAGE: Final = 1000

#: Metadata keys the runtime writes itself: not allowed in ``metadata=``.
RESERVED_METADATA: Final = frozenset(
    {"command_id", "correlation_id", "causation_id", "command", "at"}
)


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
        aggregate_type.stream_name("")  # InvalidArgument for a category with a "-"
        self._type = aggregate_type
        self._store = store
        self._codec = aggregate_type.codec()
        self._max_retries = max_retries
        self._loads = trio.CapacityLimiter(max_concurrent_loads)
        self._registry: Registry | None = None

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
        """The registry whose children the live aggregates are.

        Its keys are the aggregates' keys in their one string form,
        ``str(key)``: ``"7"`` for the key ``7``.
        """
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
        metadata: Mapping[str, Any] | None = None,
        create_if_missing: bool = False,
    ) -> Any:
        """Run ``command`` on the existing aggregate ``key``; return the new version.

        Args:
            key: the aggregate's key (str, int or UUID; ``1`` and ``"1"`` are
                the same aggregate, as are a UUID and its string).
            command: a command the aggregate has a handler for.
            expected_version: refuse the command unless the stream is at
                this version (checked against the store before refusing).
            dry_run: decide and validate only; store nothing. Returns the
                current version, or with ``verbose`` the events that would be
                written.
            timeout: seconds to wait for the answer (:class:`CallTimeout`).
                A command whose caller gave up before the aggregate took it is
                skipped; one already being stored completes.
            command_id: makes the command idempotent: a command whose
                ``command_id`` its stream already holds is not applied again,
                and the call returns the version right after its first
                application, after restarts and from other processes on the
                same store (the store checks it in the append's transaction).
                Retry with the same id after a :class:`CallTimeout`, a
                cancellation or a :class:`StoreError`. Without it, each call
                gets a fresh unique id and a retry is a new command.
            correlation_id, causation_id: stored in each event's metadata,
                with ``command_id``.
            metadata: more metadata stored with each event: a mapping of str
                keys to JSON values, merged into the runtime's own (its keys
                ``command_id``, ``correlation_id``, ``causation_id``,
                ``command`` and ``at`` are reserved: :class:`InvalidArgument`).
            create_if_missing: run the command whether or not the stream has
                events (the handler sees a fresh state on a new key), in one
                call: no ``execute``, ``create``, ``execute`` dance. Never
                :class:`AggregateNotFound`; ``expected_version`` still holds
                (``0`` for "only if new").

        Returns:
            The version after the command, or the handler's own reply (a
            retried ``command_id`` returns the version after its first
            application).

        Freshness: a refusal (:class:`CommandRejected`,
        :class:`WrongExpectedVersion`, :class:`AggregateNotFound`,
        :class:`AlreadyExists`) is answered only after the aggregate caught up
        with the store, so it reflects every event committed before the
        call, whoever wrote it; if there were newer events, the command is
        decided again on them. An accepted command needs no catch-up: the
        store's expected-version check vouches for the state it was decided
        on. A handler's own reply to a command that stores nothing (a query)
        comes from the live state; :meth:`load` reads fresh.

        Raises:
            AggregateNotFound: no stream for ``key``.
            CommandRejected: the handler refused (its own subclass).
            UnknownCommand: no handler for the command's type.
            WrongExpectedVersion: ``expected_version`` did not match.
            ConcurrencyConflict: other writers won ``max_retries + 1`` times.
            StoreError: the store failed (whether the events were stored is
                unknown: retry with the same ``command_id``); the aggregate
                rebuilds its state from the store before its next command.
            EventDecodeError: the stream holds an event that cannot be read.
            AggregateCrashed: a handler raised unexpectedly (the aggregate
                ends), or an applier raised (nothing was stored; the
                aggregate rebuilds its state and keeps serving).
            CallTimeout: no answer within ``timeout``.
            RegistryClosed: the block of :func:`open_aggregates` has ended.
            InvalidKey: ``key`` is not a str, int or UUID.
            InvalidArgument: a bad ``expected_version``, ``command_id`` or
                ``metadata``.
        """
        request = self._request(
            command, ANY if create_if_missing else EXISTING, expected_version, dry_run, verbose,
            command_id, correlation_id, causation_id, metadata,
        )  # fmt: skip
        return await self._send(key, request, timeout)

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
        metadata: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``command`` on a new aggregate ``key``; return its version.

        As :meth:`execute`, but the stream must be empty. It creates even
        while an ``execute``, ``load`` or ``version`` on the same new key is
        in flight (those may get :class:`AggregateNotFound`, if they come
        first). Besides the errors of :meth:`execute` (but for
        :class:`AggregateNotFound`), it raises:

        Raises:
            AlreadyExists: the stream of ``key`` already has events (but for
                a retry of the same ``command_id``: that returns its version).
        """
        request = self._request(
            command, NEW, 0, dry_run, verbose, command_id, correlation_id, causation_id, metadata
        )
        return await self._send(key, request, timeout)

    async def _execute_detailed(
        self,
        key: str | int | uuid.UUID,
        command: object,
        *,
        mode: int = EXISTING,
        expected_version: int | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
        command_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[int, Any]:
        """Run ``command``; return ``(version, reply)``: both, where :meth:`execute` gives one.

        The protocol server's entry point (internal). ``mode`` is
        ``_command.EXISTING`` (:meth:`execute`), ``NEW`` (:meth:`create`) or
        ``ANY`` (``execute(create_if_missing=True)``). ``reply`` is the
        handler's own reply, ``None`` if it chose none (and for a retried
        ``command_id``: the runtime keeps versions, not replies); for a
        ``dry_run``, ``version`` is the current version and ``reply`` the list
        of events that would be stored. Errors and cancellation as
        :meth:`execute`.
        """
        request = self._detailed_request(
            command, mode, expected_version, dry_run, command_id, correlation_id, causation_id,
            metadata,
        )  # fmt: skip
        return await self._send(key, request, timeout)  # type: ignore[no-any-return]

    def _execute_soon(
        self,
        key: str | int | uuid.UUID,
        command: object,
        callback: Callable[[outcome.Outcome[Any]], None],
        *,
        mode: int = EXISTING,
        expected_version: int | None = None,
        dry_run: bool = False,
        command_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Call | None:
        """:meth:`_execute_detailed` without waiting, if ``key`` is live with mailbox room.

        The protocol server's hot path (internal): ``callback`` gets the
        outcome of ``(version, reply)`` (as :meth:`_execute_detailed` would
        return or raise it), from the aggregate's task. Returns the call
        (set its ``_abandoned`` to withdraw it), or ``None`` when the key
        needs activating or its mailbox is full: then use
        :meth:`_execute_detailed`.

        Raises:
            InvalidKey, InvalidArgument: as :meth:`execute`, at once.
        """
        request = self._detailed_request(
            command, mode, expected_version, dry_run, command_id, correlation_id, causation_id,
            metadata,
        )  # fmt: skip
        return self._submit_soon(key, request, callback)

    def _submit_soon(
        self,
        key: str | int | uuid.UUID,
        request: Command,
        callback: Callable[[outcome.Outcome[Any]], None],
        *,
        run_here: bool = True,
    ) -> Call | None:
        """:meth:`_execute_soon` of a request made already (:meth:`_detailed_request`).

        ``run_here=False``: only queue it (the caller has just tried
        ``Registry._ran_here``).
        """
        return self.registry._call_soon(canonical_key(key), request, callback, run_here=run_here)

    async def _submit(self, key: str | int | uuid.UUID, request: Command) -> tuple[int, Any]:
        """:meth:`_execute_detailed` of a request made already (:meth:`_detailed_request`)."""
        return await self._send(key, request, None)  # type: ignore[no-any-return]

    def _detailed_request(
        self,
        command: object,
        mode: int,
        expected_version: int | None,
        dry_run: bool,
        command_id: str | None,
        correlation_id: str | None,
        causation_id: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> Command:
        if mode == NEW:
            expected_version = 0
        elif (
            expected_version is None
            and command_id is None
            and correlation_id is None
            and causation_id is None
            and metadata is None
        ):
            # The commonest request: nothing to check, its metadata head made.
            tail = _command_tails.get(type(command))
            if tail is not None:
                return Command(command, mode, None, dry_run, dry_run, None, tail, True)
        return self._request(
            command, mode, expected_version, dry_run, dry_run,
            command_id, correlation_id, causation_id, metadata, detailed=True,
        )  # fmt: skip

    async def load(
        self, key: str | int | uuid.UUID, *, timeout: float | None = None, fresh: bool = True
    ) -> A:
        """Return a copy of the aggregate's state (activating it if needed).

        Args:
            fresh: catch up with the store first (one read of the events
                after the live version), so that the state reflects every
                event committed before the call, by any process. ``False``
                answers from memory: every event this runtime committed or
                read, but maybe not another process's latest.

        Raises:
            AggregateNotFound: no stream for ``key``.
        """
        state, _ = await self._send(key, Inspect(fresh), timeout)
        return state  # type: ignore[no-any-return]

    async def version(
        self, key: str | int | uuid.UUID, *, timeout: float | None = None, fresh: bool = True
    ) -> int:
        """Return the aggregate's version (activating it if needed).

        Args:
            fresh: as for :meth:`load`.

        Raises:
            AggregateNotFound: no stream for ``key``.
        """
        _, version = await self._send(key, Inspect(fresh), timeout)
        return version  # type: ignore[no-any-return]

    async def replay(self, key: str | int | uuid.UUID) -> tuple[A, int]:
        """Rebuild ``key``'s state from its events in the store, ignoring snapshots.

        Does not touch the live aggregate: it is how tests and tools check
        that a live state equals a replay of its stream.
        """
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
        metadata: Mapping[str, Any] | None = None,
        *,
        detailed: bool = False,
    ) -> Command:
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            raise InvalidArgument(f"expected_version must be an int >= 0, not {expected_version!r}")
        if command_id is None:
            head = ""  # the id is made with the events (see LiveAggregate._decide)
        elif isinstance(command_id, str) and command_id:
            head = f'{{"command_id":{_json_str(command_id)}'
        else:
            raise InvalidArgument(f"command_id must be a non-empty str, not {command_id!r}")
        if correlation_id is not None:
            head += f',"correlation_id":{_json_str(correlation_id)}'
        if causation_id is not None:
            head += f',"causation_id":{_json_str(causation_id)}'
        if metadata is not None:
            head += _extra_metadata(metadata)
        cls = type(command)
        tail = _command_tails.get(cls)
        if tail is None:
            name = _json_str(type_name_of(cls))
            tail = _command_tails[cls] = f',"command":{name},"at":'.encode()
        # The commonest request (no id, no metadata) makes no string at all.
        metadata_head = head.encode() + tail if head else tail
        return Command(
            command, mode, expected_version, dry_run, verbose, command_id, metadata_head, detailed
        )

    async def _send(self, key: Any, request: object, timeout: float | None) -> Any:
        canonical = canonical_key(key)
        try:
            return await self.registry.call(
                canonical, request, timeout=timeout, aggregate=self._serve
            )
        except AggregateDeclined:  # pragma: no cover (the runtime never declines)
            raise AggregateNotFound(key) from None
        except AggregateStartError as exc:
            # Loading failed: say why (a StoreError, an EventDecodeError, ...).
            cause = exc.__cause__
            if isinstance(cause, TrioAggregatesError):
                raise _copy_error(cause) from exc
            raise
        except TrioAggregatesError as exc:
            _name_key_as_given(exc, key, canonical)
            raise

    async def _serve(
        self, key: str, mailbox: Mailbox, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """The aggregate task: load, report ready, run requests one at a time.

        It starts even on a key with no stream (a ``create`` may be queued
        behind an ``execute``), and ends once it holds no stream and nothing
        is queued. Only a handler's unexpected exception ends it otherwise.
        """
        stream = self._type.stream_name(key)
        live = LiveAggregate(self._type, key, self._codec, self._max_retries)
        async with self._loads:
            await self._rebuild(live, stream)
        task_status.started()
        del task_status
        if type(self._store) is InMemoryEventStore:
            # A store that never waits: while this task waits for a message
            # with nothing queued, the registry may run a call in its
            # caller's task instead (see _run_now).
            mailbox._runner = functools.partial(self._run_now, live, stream)
        try:
            async for message in mailbox:
                if type(message) is not Call:
                    logger.warning(
                        "aggregate %r ignored %r: send commands with a call", key, message
                    )
                    continue
                try:
                    result = await self._step(live, stream, message.message)
                except _ANSWERS as exc:
                    message.fail(exc)
                else:
                    message.reply(result)
                    if live.snapshot_due():
                        await self._save_snapshot(live, stream)
                if live.version == 0 and live.should_end(mailbox.statistics().current_buffer_used):
                    return  # no stream and nothing queued: do not stay registered
        finally:
            mailbox._runner = None

    async def _step(self, live: LiveAggregate[A], stream: str, request: object) -> Any:
        """Drive the command step of ``_command.py``: do the I/O it asks for."""
        if type(request) is Command:
            action = live.start(request)
        elif type(request) is Inspect:
            action = live.inspect(request)
        else:
            raise UnknownCommand(f"not a command envelope: {request!r}")
        store = self._store
        while True:
            if action is APPEND:
                command_id = live.append_id
                try:
                    if command_id is None:  # an id of ours: unique, nothing to check
                        version = await store.append(
                            stream, live.new_events, expected_version=live.expected
                        )
                    else:
                        version = await store.append(
                            stream,
                            live.new_events,
                            expected_version=live.expected,
                            command_id=command_id,
                        )
                except (DuplicateCommand, StoreError) as exc:
                    action = live.append_failed(exc)
                else:
                    action = live.committed(version)
            elif action is DONE:
                result = live.result
                live.result = None
                return result
            elif action is FAIL:
                error = live.error
                live.error = None
                assert error is not None
                raise error
            else:
                try:
                    if action is CATCH_UP:
                        await self._catch_up(live, stream)
                        action = live.caught_up()
                    elif action is REBUILD:
                        await self._rebuild(live, stream)
                        action = live.rebuilt()
                    else:  # FIND
                        assert live.request is not None and live.request.command_id is not None
                        found = await store.find_command(stream, live.request.command_id)
                        action = live.found(found)
                except StoreError as exc:
                    action = live.failed(exc)

    def _run_now(self, live: LiveAggregate[A], stream: str, call: Answerable) -> bool:
        """Run ``call`` to its answer in the calling task; ``False``: not here, queue it.

        The registry calls this (``Mailbox._runner``) instead of queueing a
        call, when this aggregate's task waits for a message with nothing
        queued and its store is exactly :class:`InMemoryEventStore`, whose
        calls never wait. It drives the same transitions as :meth:`_step`,
        with the store's synchronous bodies and no checkpoint: no other task
        runs until the call is answered, so to every other task it is as if
        the aggregate's task had run it (the mailbox order is kept: there was
        nothing queued). The answer goes to the call's callback, at once.

        Returns ``False``, having answered nothing and left the state as the
        store's, when the aggregate's own task must run it: a request that is
        not a command, a state not loaded or with no stream (the task may have
        to end), or a handler that raised something unexpected (the task runs
        the command again and crashes as it always does; handlers are pure,
        so running one twice changes nothing).
        """
        request = call.message
        if type(request) is not Command or live.stale or live.version == 0:
            return False
        store = self._store
        assert type(store) is InMemoryEventStore
        try:
            action = live.start(request)
            while action is not DONE and action is not FAIL:
                if action is APPEND:
                    try:
                        version = store._append_now(
                            stream, live.new_events, live.expected, live.append_id
                        )
                    except (DuplicateCommand, StoreError) as exc:
                        action = live.append_failed(exc)
                    else:
                        action = live.committed(version)
                else:
                    try:
                        if action is CATCH_UP:
                            self._catch_up_now(live, stream, store)
                            action = live.caught_up()
                        elif action is REBUILD:
                            self._rebuild_now(live, stream, store)
                            action = live.rebuilt()
                        else:  # FIND
                            assert live.request is not None
                            assert live.request.command_id is not None
                            found = store._find_command_now(stream, live.request.command_id)
                            action = live.found(found)
                    except StoreError as exc:
                        action = live.failed(exc)
        except _ANSWERS as exc:
            call.fail(exc)
            return True
        except Exception:
            # Only a handler gets here, before anything was stored (an
            # applier's error is an AggregateCrashed answer).
            return False
        if action is FAIL:
            error = live.error
            live.error = None
            assert error is not None
            call.fail(error)
            return True
        result = live.result
        live.result = None
        call.reply(result)
        if self._type.snapshot_every and live.snapshot_due():
            snapshot = self._snapshot_of(live, stream)
            if snapshot is not None:
                try:
                    store._save_snapshot_now(snapshot)
                except Exception as exc:  # as _save_snapshot
                    _snapshot_failed(stream, snapshot.version, exc)
                else:
                    live.snapshot_saved(snapshot.version)
        return True

    def _catch_up_now(self, live: LiveAggregate[A], stream: str, store: InMemoryEventStore) -> None:
        """:meth:`_catch_up`, for :meth:`_run_now`."""
        while True:
            page = store._read_now(stream, live.version + 1, _PAGE)
            live.advance(page)
            if len(page) < _PAGE:
                return

    def _rebuild_now(self, live: LiveAggregate[A], stream: str, store: InMemoryEventStore) -> None:
        """:meth:`_rebuild`, for :meth:`_run_now`."""
        snapshot = store._load_snapshot_now(stream) if self._type.snapshot_every else None
        unusable = live.reset(snapshot)
        if unusable is not None:
            logger.warning("ignoring the snapshot of %r: %s", stream, unusable)
        self._catch_up_now(live, stream, store)
        live.loaded()

    async def _rebuild(self, live: LiveAggregate[A], stream: str) -> None:
        """Load ``live`` from the store: the latest usable snapshot, then the later events."""
        snapshot = None
        if self._type.snapshot_every:
            snapshot = await self._store.load_snapshot(stream)
        unusable = live.reset(snapshot)
        if unusable is not None:
            logger.warning("ignoring the snapshot of %r: %s", stream, unusable)
        await self._catch_up(live, stream)
        live.loaded()

    async def _catch_up(self, live: LiveAggregate[A], stream: str) -> None:
        """Apply the events of ``stream`` after ``live.version``, page by page."""
        read = self._store.read
        while True:
            page = await read(stream, from_version=live.version + 1, limit=_PAGE)
            live.advance(page)
            if len(page) < _PAGE:
                return

    async def _save_snapshot(self, live: LiveAggregate[A], stream: str) -> None:
        snapshot = self._snapshot_of(live, stream)
        if snapshot is None:
            return
        try:
            await self._store.save_snapshot(snapshot)
        except Exception as exc:  # a snapshot is an optimisation: never crash for one
            _snapshot_failed(stream, snapshot.version, exc)
            return
        live.snapshot_saved(snapshot.version)

    def _snapshot_of(self, live: LiveAggregate[A], stream: str) -> Snapshot | None:
        """``live``'s state as a snapshot; ``None`` (logged) if it cannot be encoded."""
        cls = self._type
        try:
            data = self._codec.encode_state(live.state)
        except Exception as exc:  # a snapshot is an optimisation: never crash for one
            _snapshot_failed(stream, live.version, exc)
            return None
        return Snapshot(stream, live.version, cls.snapshot_schema, type_name_of(cls), data)


def _snapshot_failed(stream: str, version: int, exc: Exception) -> None:
    logger.warning("could not snapshot %r at version %d: %r", stream, version, exc)


def _name_key_as_given(exc: BaseException, key: object, canonical: str) -> None:
    """Make ``exc`` name the key as the caller gave it.

    The aggregate task knows its key in the canonical (str) form; an error it
    raised names that form, the caller's error the caller's (``1``, not ``"1"``).
    """
    if canonical is not key and getattr(exc, "key", None) == canonical:
        exc.key = key  # type: ignore[attr-defined]


def _at(record: Any) -> str:
    return f"{record.stream}@{record.version}"


def _extra_metadata(metadata: Mapping[str, Any]) -> str:
    """The caller's ``metadata`` as JSON members to splice into the runtime's: ``,"k":v...``.

    Raises:
        InvalidArgument: not a mapping, a key not a str or reserved, or a
            value JSON cannot encode.
    """
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(f"metadata must be a mapping, not {type(metadata).__name__}")
    for name in metadata:
        if not isinstance(name, str):
            raise InvalidArgument(f"metadata keys must be str, not {name!r}")
        if name in RESERVED_METADATA:
            raise InvalidArgument(f"metadata key {name!r} is reserved (the runtime writes it)")
    try:
        text = encode_json(dict(metadata)).decode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"metadata must be JSON-encodable: {exc}") from None
    return "" if text == "{}" else "," + text[1:-1]


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

    Raises:
        InvalidArgument: a bad setting, or ``aggregate_type`` is not an
            :class:`Aggregate` subclass (or its ``category`` contains ``"-"``).
    """
    if max_retries < 0 or max_concurrent_loads < 1:
        raise InvalidArgument("max_retries must be >= 0 and max_concurrent_loads >= 1")
    async with AsyncExitStack() as stack:
        if isinstance(store, str):
            from .._stores._open_store import open_store

            store = await stack.enter_async_context(open_store(store))
        repository = AggregateRepository(
            aggregate_type,
            store,
            max_retries=max_retries,
            max_concurrent_loads=max_concurrent_loads,
        )
        registry = await stack.enter_async_context(
            open_registry(
                repository._serve,
                mailbox_size=mailbox_size,
                idle_timeout=idle_timeout,
                shutdown_timeout=shutdown_timeout,
            )
        )
        repository._registry = registry
        yield repository
