"""The library's exception hierarchy.

Every error a public call raises is a :class:`TrioAggregatesError`. Where the
meaning matches a builtin or a Trio exception, the class subclasses that too
(:class:`InvalidKey` is a :class:`TypeError`, :class:`CallTimeout` is a
:class:`trio.TooSlowError`), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

from typing import Any

import trio

__all__ = [
    "AggregateCrashed",
    "AggregateDeclined",
    "AggregateGone",
    "AggregateNotFound",
    "AggregateStartError",
    "AlreadyExists",
    "CallAlreadyAnswered",
    "CallTimeout",
    "CommandRejected",
    "ConcurrencyConflict",
    "DuplicateCommand",
    "EventDecodeError",
    "InvalidArgument",
    "InvalidKey",
    "KeyAlreadyRegistered",
    "NotOwner",
    "RegistryClosed",
    "StoreError",
    "StreamDeleted",
    "TrioAggregatesError",
    "UnknownCommand",
    "UnknownEventType",
    "WrongExpectedVersion",
]


class TrioAggregatesError(Exception):
    """The root of every error raised by trio_aggregates."""


class InvalidArgument(TrioAggregatesError, ValueError, TypeError):
    """Raised by public calls given an argument of the wrong type or value.

    A :class:`ValueError` and a :class:`TypeError` too, so that code catching
    either keeps working: a bad ``mailbox_size`` or ``idle_timeout``, a
    ``register`` with no aggregate function to run, a malformed store URL.
    """


class InvalidKey(TrioAggregatesError, TypeError):
    """Raised by every registry call given a key that cannot be a dict key.

    Keys must be hashable and equal to themselves. An unhashable key (a list,
    a dict), or one whose ``__hash__`` or ``__eq__`` raises (the error is the
    ``__cause__``), is refused before anything else happens, and the registry
    is unchanged. A key not equal to itself (a float NaN) could never be
    looked up again: ``register``, ``ensure`` and ``call`` refuse it.
    """


class KeyAlreadyRegistered(TrioAggregatesError):
    """Raised by :meth:`Registry.register` when the key already has a live aggregate.

    Attributes:
        key: the key that was asked for.
        existing: the send end of the aggregate already registered under it.
    """

    def __init__(self, key: Any, existing: trio.MemorySendChannel[Any]) -> None:
        super().__init__(f"key {key!r} is already registered")
        self.key = key
        self.existing = existing


class AggregateDeclined(TrioAggregatesError):
    """Raised when the aggregate function returned without calling ``task_status.started()``.

    This is the Trio form of ``init/1`` returning ``:ignore``: nothing was
    registered and nothing was logged. ``key`` is the key asked for.
    """

    def __init__(self, key: Any) -> None:
        super().__init__(f"aggregate {key!r} declined to start")
        self.key = key


class AggregateStartError(TrioAggregatesError):
    """Raised when an aggregate's start-up raised (``init/1`` returning ``{:stop, reason}``).

    The exception raised by the start-up is the ``__cause__``. Nothing was
    registered; the registry and its other aggregates carry on.
    """

    def __init__(self, key: Any, reason: BaseException | None = None) -> None:
        super().__init__(f"aggregate {key!r} failed to start: {reason!r}")
        self.key = key
        self.reason = reason


class AggregateCrashed(TrioAggregatesError):
    """The answer to a call whose aggregate raised while the call was in its hands.

    The exception the aggregate raised is the ``__cause__``. The aggregate has
    ended; the next message to its key activates a fresh one. (The
    event-sourced runtime also answers with it when an applier raised on a
    command's new events: then nothing was stored, and the aggregate carries
    on with its state rebuilt from the store.)
    """

    def __init__(self, key: Any, reason: BaseException | None = None) -> None:
        super().__init__(f"aggregate {key!r} crashed: {reason!r}")
        self.key = key
        self.reason = reason


class AggregateGone(TrioAggregatesError):
    """The aggregate ended before it answered the call.

    The aggregate took the call and returned without answering it, or it
    ended on its own before taking any message at all. (A call the aggregate
    did not take before it ended, a passivation for instance, goes to the
    key's next activation instead, however often that happens.)
    """

    def __init__(self, key: Any, detail: str = "ended before answering") -> None:
        super().__init__(f"aggregate {key!r} {detail}")
        self.key = key


class RegistryClosed(TrioAggregatesError):
    """The registry is shutting down or has shut down.

    Raised by calls made after the registry's ``async with`` block ended, and
    the answer to every call still queued in a mailbox at shutdown.
    """


class CallTimeout(TrioAggregatesError, trio.TooSlowError):
    """Raised by :meth:`Registry.call` when no answer came within ``timeout``."""


class CallAlreadyAnswered(TrioAggregatesError, RuntimeError):
    """Raised by :meth:`Call.reply` / :meth:`Call.fail` on a call already answered."""


# -- event sourcing ---------------------------------------------------------


class AggregateNotFound(TrioAggregatesError, LookupError):
    """An existing aggregate was asked for, but its stream has no events."""

    def __init__(self, key: Any) -> None:
        super().__init__(f"aggregate {key!r} does not exist")
        self.key = key


class AlreadyExists(TrioAggregatesError):
    """A new aggregate was asked for, but its stream already has events."""

    def __init__(self, key: Any) -> None:
        super().__init__(f"aggregate {key!r} already exists")
        self.key = key


class UnknownCommand(TrioAggregatesError):
    """The aggregate has no handler for this command (or the server no route for it)."""


class CommandRejected(TrioAggregatesError):
    """Base class for domain errors: a command handler refused the command.

    Subclass it for your domain's errors. A rejected command leaves the
    aggregate alive and unchanged; the caller gets the error itself.
    """


class WrongExpectedVersion(TrioAggregatesError):
    """A command carried an expected version that the aggregate is not at."""

    def __init__(self, key: Any, expected: int, actual: int) -> None:
        super().__init__(f"aggregate {key!r} is at version {actual}, not {expected}")
        self.key = key
        self.expected = expected
        self.actual = actual


class StoreError(TrioAggregatesError):
    """The event store failed (connection lost, disk error, ...).

    The driver's own exception is the ``__cause__``.
    """


class ConcurrencyConflict(StoreError):
    """An append's expected version did not match the stream's version.

    Raised by stores when another writer appended first; the aggregate runtime
    retries a bounded number of times before answering with it.
    """

    def __init__(self, stream: str, expected: int, actual: int | None = None) -> None:
        detail = "" if actual is None else f", stream is at {actual}"
        super().__init__(f"stream {stream!r}: expected version {expected}{detail}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class DuplicateCommand(TrioAggregatesError):
    """An append carried a ``command_id`` that its stream already holds.

    Raised by a store's ``append`` (checked in the append's own transaction,
    before the expected version): the command was applied before, so nothing
    is appended. The event-sourced runtime turns it into the first outcome
    (the stream's version right after that first append); users of the
    repository never see it.

    Attributes:
        stream: the stream's name.
        command_id: the command id already held.
        version: the stream's version right after the original append.
    """

    def __init__(self, stream: str, command_id: str, version: int) -> None:
        super().__init__(
            f"stream {stream!r} already holds command {command_id!r} (applied at version {version})"
        )
        self.stream = stream
        self.command_id = command_id
        self.version = version


class StreamDeleted(StoreError):
    """The stream was hard-deleted (a tombstone is left): it can be neither read nor appended to."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream!r} is deleted")
        self.stream = stream


class NotOwner(StoreError):
    """A write for a stream whose shard this cluster node holds no valid lease on.

    Nothing was written. Raised by the store of a cluster node (see
    :func:`~trio_aggregates.open_cluster`): by the node itself when it knows
    its lease is gone or too close to its expiry to be trusted (self-fencing),
    or by the database, in the write's own transaction, when the write's
    fencing token is not the shard's current, unexpired one (another node
    took the shard over, while this one was paused, say). Send the command
    to the shard's owner, with the same ``command_id``.

    Attributes:
        stream: the stream written to.
        shard: its shard.
        node: the node that tried to write.
        by_database: ``True`` if the database refused the write (its token
            was stale), ``False`` if the node refused it itself.
    """

    def __init__(self, stream: str, shard: int, node: str, *, by_database: bool) -> None:
        who = "the database" if by_database else "the node itself"
        super().__init__(
            f"{who} refused a write to stream {stream!r}: node {node!r} holds no valid lease "
            f"on shard {shard}"
        )
        self.stream = stream
        self.shard = shard
        self.node = node
        self.by_database = by_database


class EventDecodeError(StoreError):
    """A stored event could not be decoded (bad data, wrong shape)."""


class UnknownEventType(EventDecodeError):
    """A stored event names a type that no event class is registered under."""


def _copy_error(error: TrioAggregatesError) -> TrioAggregatesError:
    """A fresh instance of ``error``, for each task that gets the same failure.

    Raising one exception object in several tasks would chain their
    tracebacks together; each waiter raises its own copy (same class,
    attributes, args and cause).
    """
    copy = error.__class__.__new__(error.__class__)
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    copy.__cause__ = error.__cause__
    return copy
