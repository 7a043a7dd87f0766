"""Event-sourced aggregates: the pure domain half.

An aggregate's state is an attrs class deriving from :class:`Aggregate`. Its
*handlers* (marked ``@handles``) decide which events a command produces, or
reject it by raising a :class:`CommandRejected` subclass; its *appliers*
(marked ``@applies``) evolve the state by one event. Both are plain
synchronous methods with no I/O (the sans-IO split of h11): a domain is
unit-tested without Trio, a store or a registry::

    @attrs.define
    class Account(Aggregate):
        balance: int = 0

        @handles
        def deposit(self, command: Deposit) -> Deposited:
            if command.amount <= 0:
                raise InvalidAmount(command.amount)
            return Deposited(command.amount)

        @applies
        def deposited(self, event: Deposited) -> None:
            self.balance += event.amount

    account = Account.replay([Deposited(5)])
    assert account.decide(Deposit(3)).events == (Deposited(3),)

Rules, written down in one place:

* A handler returns ``None`` (no events), one event, a list of events, or a
  :class:`Decision` (events plus a custom reply for the caller). It must not
  change ``self``: the runtime applies the events itself, and re-runs the
  handler after a concurrency conflict.
* An applier changes ``self`` by one event and never fails for an event its
  own handlers produced. The runtime applies a command's events before it
  stores them: an applier that raises fails that command (nothing is stored)
  and the aggregate rebuilds its state from the store.
* One stream per (type, key): the stream of key ``k`` is
  ``f"{category}-{k}"`` with ``k`` in its one string form (``canonical_key``,
  ``str(k)``: ``1`` and ``"1"``, a UUID and its string, are the same key), and a category
  never contains ``"-"``, so a stream name splits at its first ``"-"``.
* Which command or event a method takes is read from the annotation of its
  parameter, or given explicitly: ``@handles(Deposit)``.
* Every event class an applier takes is registered with the aggregate's
  :class:`EventCodec` under its type name (see :func:`event_type`); events
  without an applier go in ``extra_events``.
"""

from __future__ import annotations

import typing
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Final, Protocol, TypeVar, final, overload

import attrs

from .._core._exceptions import InvalidArgument, InvalidKey, UnknownCommand
from ._codec import EventCodec, Upcaster

__all__ = ["Aggregate", "Decision", "applies", "handles"]

A = TypeVar("A", bound="Aggregate")
F = TypeVar("F", bound=Callable[..., Any])

_HANDLES: Final = "__trio_aggregates_handles__"
_APPLIES: Final = "__trio_aggregates_applies__"


class _NoReply:
    def __repr__(self) -> str:
        return "NO_REPLY"


#: The reply of a decision that chose none: the caller gets the new version.
NO_REPLY: Final = _NoReply()


def _as_tuple(events: Iterable[object]) -> tuple[object, ...]:
    return events if type(events) is tuple else tuple(events)


@final
@attrs.frozen
class Decision:
    """What a handler decided: the events to store and, optionally, the caller's reply.

    Attributes:
        events: the events, in order (empty: nothing to store).
        reply: what ``execute`` returns to the caller; by default the
            aggregate's version after the events are stored.
    """

    events: tuple[object, ...] = attrs.field(default=(), converter=_as_tuple)
    reply: Any = NO_REPLY

    @property
    def has_reply(self) -> bool:
        """Whether the handler chose a reply of its own."""
        return self.reply is not NO_REPLY


class Marker(Protocol):
    """The type of ``@handles``, ``@applies``, ``@projects`` and ``@reacts``.

    Used bare (``@handles``), it returns the method unchanged; with types
    (``@handles(Deposit, Withdraw)``), a decorator that does.
    """

    @overload
    def __call__(self, *types: type[Any]) -> Callable[[F], F]: ...
    @overload
    def __call__(self, fn: F, /) -> F: ...


def _mark(
    attr: str, what: str, *, doc: str | None = None, takes: str = "classes", example: str = "MyType"
) -> Marker:
    """A marking decorator: ``@what`` or ``@what(SomeType, ...)`` sets ``attr`` on a method.

    The marked methods are collected by their class (``_types_of`` here,
    ``_projection.py`` for projections and process managers).
    """

    @overload
    def decorator(*types: type[Any]) -> Callable[[F], F]: ...
    @overload
    def decorator(fn: F, /) -> F: ...

    def decorator(*args: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not isinstance(args[0], type):
            setattr(args[0], attr, None)  # read the type from the annotation
            return args[0]
        if not args or not all(isinstance(a, type) for a in args):
            raise TypeError(f"@{what} takes {takes}, e.g. @{what}({example}), not {args!r}")

        def mark(fn: F) -> F:
            setattr(fn, attr, args)
            return fn

        return mark

    decorator.__name__ = what
    if doc is None:
        role = {"handles": "command handler", "applies": "event applier"}[what]
        doc = (
            f"Mark a method of an :class:`Aggregate` as the {role} for a type.\n\n"
            f"Use ``@{what}`` (the type is the annotation of the method's parameter)\n"
            f"or ``@{what}(SomeType, OtherType)``."
        )
    decorator.__doc__ = doc
    return decorator


handles = _mark(_HANDLES, "handles")
applies = _mark(_APPLIES, "applies")


def _types_of(
    cls: type, fn: Callable[..., Any], given: tuple[type, ...] | None
) -> tuple[type, ...]:
    if given is not None:
        return given
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # e.g. a class defined inside a function
        raise TypeError(
            f"{cls.__name__}.{fn.__name__}: cannot resolve its parameter's annotation "
            f"({exc}); name the type explicitly, e.g. @handles(MyCommand)"
        ) from exc
    params = [p for p in fn.__code__.co_varnames[1 : fn.__code__.co_argcount]]
    if len(params) != 1 or params[0] not in hints:
        raise TypeError(
            f"{cls.__name__}.{fn.__name__} must take exactly one annotated parameter "
            f"(the command or event) besides self"
        )
    hint = hints[params[0]]
    if isinstance(hint, type):
        return (hint,)
    args = typing.get_args(hint)
    if args and all(isinstance(a, type) for a in args):
        return tuple(args)  # a Union of classes
    raise TypeError(f"{cls.__name__}.{fn.__name__}: {hint!r} is not a class")


def canonical_key(key: object) -> str:
    """The one string form of an event-sourced aggregate's key.

    ``1`` and ``"1"`` (a UUID and its string) name the same stream, so they
    are the same aggregate: this string is its stream name's suffix and its
    key in the registry. Subclasses of str and int count as their plain value.

    Raises:
        InvalidKey: ``key`` is not a str, int (bool excluded) or UUID.
    """
    cls = type(key)
    if cls is str:
        return key  # type: ignore[return-value]
    if cls is int:
        return int.__repr__(key)
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return int.__repr__(key)
    if isinstance(key, uuid.UUID):
        return uuid.UUID.__str__(key)
    raise InvalidKey(f"event-sourced aggregate keys are str, int or uuid.UUID, not {cls.__name__}")


def _category_of(cls: type[Aggregate]) -> str:
    category = cls.category
    if category is None or category == "":
        return cls.__name__
    if not isinstance(category, str) or "-" in category:
        raise InvalidArgument(
            f"{cls.__name__}.category must be a str without '-' (a stream name splits "
            f"at its first '-'), not {category!r}"
        )
    return category


class Aggregate:
    """Base class of event-sourced aggregate states (decorate subclasses with ``@attrs.define``).

    A subclass must be constructible with no arguments: that is the state
    before its first event.

    Attributes:
        category: the stream-name prefix (default: the class's name); the
            stream of key ``k`` is ``f"{category}-{k}"``. It must not contain
            ``"-"`` (:class:`InvalidArgument` when the class is defined or
            used), so that no two (type, key) pairs share a stream name.
        snapshot_every: save a snapshot every N events (``None``: never).
        snapshot_schema: bump it when the state's shape changes, so old
            snapshots are ignored (and the state rebuilt from events).
        extra_events: event classes the aggregate emits but has no applier for.
        upcasters: old type name → upcaster (see :class:`EventCodec`).
    """

    __slots__ = ()

    category: ClassVar[str | None] = None
    snapshot_every: ClassVar[int | None] = None
    snapshot_schema: ClassVar[int] = 1
    extra_events: ClassVar[tuple[type, ...]] = ()
    upcasters: ClassVar[Mapping[str, Upcaster]] = {}

    _handlers: ClassVar[dict[type, Callable[[Any, Any], Any]]] = {}
    _appliers: ClassVar[dict[type, Callable[[Any, Any], None]]] = {}
    _codec: ClassVar[EventCodec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _category_of(cls)  # refuse an ambiguous category now, not at the first command
        handlers: dict[type, Callable[[Any, Any], Any]] = {}
        appliers: dict[type, Callable[[Any, Any], None]] = {}
        for klass in reversed(cls.__mro__):
            for fn in vars(klass).values():
                if not callable(fn):
                    continue
                if hasattr(fn, _HANDLES):
                    for t in _types_of(cls, fn, getattr(fn, _HANDLES)):
                        handlers[t] = fn
                if hasattr(fn, _APPLIES):
                    for t in _types_of(cls, fn, getattr(fn, _APPLIES)):
                        appliers[t] = fn
        cls._handlers = handlers
        cls._appliers = appliers
        codec = EventCodec()
        for event_cls in (*appliers, *cls.extra_events):
            codec.register(event_cls)
        for old_name, upcaster in cls.upcasters.items():
            codec.add_upcaster(old_name, upcaster)
        cls._codec = codec

    @classmethod
    def codec(cls) -> EventCodec:
        """The aggregate type's event codec."""
        return cls._codec

    @classmethod
    def stream_name(cls, key: Any) -> str:
        """The name of the stream that holds the events of ``key``: ``f"{category}-{key}"``.

        ``key`` in its one string form, ``str(key)``, so ``1`` and ``"1"`` (a
        UUID and its string) name the same stream.

        Raises:
            InvalidKey: ``key`` is not a str, int or UUID.
            InvalidArgument: the class's ``category`` contains ``"-"``.
        """
        return f"{_category_of(cls)}-{canonical_key(key)}"

    @classmethod
    def replay(cls: type[A], events: Iterable[object]) -> A:
        """Build a state from nothing by applying ``events`` in order."""
        state = cls()
        for event in events:
            state.apply(event)
        return state

    def decide(self, command: object) -> Decision:
        """Run the handler for ``command``; return its :class:`Decision`. Pure: changes nothing.

        Raises:
            UnknownCommand: the aggregate has no handler for the command's type.
            CommandRejected: (a subclass) the handler refused the command.
        """
        result = self._handle(command)
        return result if isinstance(result, Decision) else Decision(events=result)

    def _handle(self, command: object) -> Decision | tuple[object, ...]:
        """Run the handler: a Decision, or just the events as a plain tuple
        (the runtime's fast path, which tells the two apart by exact type)."""
        handler = self._handlers.get(type(command))
        if handler is None:
            handler = self._lookup(self._handlers, type(command))
            if handler is None:
                raise UnknownCommand(
                    f"{type(self).__name__} has no handler for {type(command).__qualname__}"
                )
        result = handler(self, command)
        cls = type(result)
        if cls is tuple or cls is Decision:  # Decision is final
            return result  # type: ignore[no-any-return]
        if result is None:
            return ()
        if isinstance(result, (tuple, list)):
            return tuple(result)
        return (result,)

    def apply(self, event: object) -> None:
        """Evolve the state by one event (in place).

        Raises:
            TypeError: the event's type is not one this aggregate knows.
        """
        applier = self._appliers.get(type(event))
        if applier is None:
            applier = self._lookup(self._appliers, type(event))
            if applier is None:
                if type(event) in self.extra_events:
                    return
                raise TypeError(f"{type(self).__name__} has no applier for {event!r}")
        applier(self, event)

    @staticmethod
    def _lookup(table: dict[type, Any], cls: type) -> Any:
        for base in cls.__mro__[1:]:
            found = table.get(base)
            if found is not None:
                table[cls] = found
                return found
        return None
