"""Events and snapshots as data: JSON under a stable type name, never pickle.

The store may be shared between processes and programs, and loading from it
must never run code; so events are attrs classes turned into JSON by a
`cattrs <https://catt.rs>`_ converter and stored under a *type name*: by
default the class's ``__name__``, or the name given with :func:`event_type`.
Renaming a class in the code then never breaks a stored stream.

**Field types.** These round-trip through encode and decode (and so through
every store), nested at will; a property test holds the codec to this list:
``str``, ``int``, ``float`` (infinities too), ``bool``, ``Optional[...]``
(``None``), ``bytes``, ``list``, ``tuple`` (``tuple[int, str]`` and
``tuple[int, ...]``), ``set``, ``frozenset``, ``dict`` with ``str``, ``int``
or ``UUID`` keys, nested attrs classes, enums (stored by value),
``datetime.datetime`` (naive or aware: the offset is kept),
``datetime.date``, ``datetime.time``, ``decimal.Decimal`` (stored as a
string, exactly) and ``uuid.UUID`` (stored as its canonical string). For any
other type, register hooks on :attr:`EventCodec.converter`.

**Upcasting.** When an event's shape changes, give the new shape a new type
name and register an *upcaster* from the old name: a function from the old
JSON object to ``(new_type_name, new_object)``. Upcasters chain, so a stream
written three shapes ago still reads as today's classes::

    codec.add_upcaster("Deposited", lambda d: ("Deposited.v2", {"cents": d["amount"] * 100}))

Errors: a type name with neither a class nor an upcaster raises
:class:`UnknownEventType`; data that does not decode or fit its class raises
:class:`EventDecodeError`. Both name the stream and version, and carry the
underlying exception as ``__cause__``.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, final

import attrs
import cattrs
import msgspec
from cattrs.preconf.json import make_converter

from .._core._exceptions import EventDecodeError, UnknownEventType

__all__ = ["EventCodec", "Upcaster", "event_type", "type_name_of"]

T = TypeVar("T")

#: An upcaster: old JSON object → (newer type name, newer JSON object).
Upcaster = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]

_TYPE_ATTR: Final = "__event_type__"
_MAX_UPCASTS: Final = 64

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.JSONEncoder.encode builds a C encoder on every call (about 1 µs); build
# it once. Same output as _encoder: compact, UTF-8 text, NaN allowed.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode: Callable[[Any, int], list[str]] | None = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None, _not_serializable, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
)


def _structure_uuid(value: Any, _: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


def _structure_decimal(value: Any, _: Any) -> decimal.Decimal:
    # From its string (exact); a number written by hand goes through str too.
    return value if isinstance(value, decimal.Decimal) else decimal.Decimal(str(value))


def _structure_time(value: Any, _: Any) -> datetime.time:
    return value if isinstance(value, datetime.time) else datetime.time.fromisoformat(value)


def make_event_converter() -> cattrs.Converter:
    """The default converter: cattrs' JSON preset; time, UUID and Decimal as strings."""
    converter = make_converter()
    converter.register_unstructure_hook(datetime.time, datetime.time.isoformat)
    converter.register_structure_hook(datetime.time, _structure_time)
    converter.register_unstructure_hook(uuid.UUID, str)
    converter.register_structure_hook(uuid.UUID, _structure_uuid)
    converter.register_unstructure_hook(decimal.Decimal, str)
    converter.register_structure_hook(decimal.Decimal, _structure_decimal)
    return converter


def event_type(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the stable type name an event (or state) class is stored under.

    Use it above or below ``@attrs.frozen``::

        @event_type("account.deposited")
        @attrs.frozen
        class Deposited:
            amount: int
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"an event type name is a non-empty str, not {name!r}")

    def decorate(cls: type[T]) -> type[T]:
        setattr(cls, _TYPE_ATTR, name)
        return cls

    return decorate


def type_name_of(cls: type[Any]) -> str:
    """The type name ``cls`` is stored under (its own, not inherited)."""
    name = cls.__dict__.get(_TYPE_ATTR)
    return name if isinstance(name, str) else cls.__name__


_msgspec_encode: Final = msgspec.json.Encoder().encode
#: The value types msgspec writes exactly as the standard library does. Not
#: float: msgspec writes NaN and the infinities as null, and 1e16 as 1e16.
_PLAIN: Final = frozenset({str, int, bool, type(None)})


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, NaN and the infinities as the standard library writes them.

    A flat object of strings, integers, booleans and nulls (most events) is
    written by msgspec, in C; anything else by the standard library's C
    encoder. Both write the same bytes for such an object.

    Raises:
        TypeError: a value JSON cannot hold.
        UnicodeEncodeError: a string with a lone surrogate.
    """
    if type(value) is dict:
        for name, field in value.items():
            if type(name) is not str or type(field) not in _PLAIN:
                break
        else:
            return _msgspec_encode(value)
    if _c_encode is not None:
        return "".join(_c_encode(value, 0)).encode()
    return _encoder.encode(value).encode()  # pragma: no cover (no C accelerator)


@final
class EventCodec:
    """Turns events (attrs instances) into ``(type name, bytes)`` and back.

    One codec per aggregate type; :class:`Aggregate` builds it from the event
    types its appliers take. Encoding an unregistered type raises
    :class:`TypeError` (a programming error, found at the first command).
    """

    __slots__ = ("_by_name", "_by_type", "_converter", "_upcasters")

    def __init__(self, converter: cattrs.Converter | None = None) -> None:
        self._converter = converter if converter is not None else make_event_converter()
        self._by_name: dict[str, type[Any]] = {}
        self._by_type: dict[type[Any], str] = {}
        self._upcasters: dict[str, Upcaster] = {}

    @property
    def converter(self) -> cattrs.Converter:
        """The cattrs converter (register hooks on it for unusual field types)."""
        return self._converter

    @property
    def types(self) -> Mapping[str, type[Any]]:
        """Registered type names and their classes."""
        return dict(self._by_name)

    def register(self, cls: type[Any], name: str | None = None) -> str:
        """Register ``cls`` under ``name`` (default: :func:`type_name_of`); return the name."""
        name = name if name is not None else type_name_of(cls)
        known = self._by_name.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"type name {name!r} is taken by {known!r}, cannot register {cls!r}")
        self._by_name[name] = cls
        self._by_type[cls] = name
        return name

    def add_upcaster(self, old_name: str, upcaster: Upcaster) -> None:
        """Read events stored under ``old_name`` through ``upcaster``."""
        if old_name in self._upcasters:
            raise ValueError(f"an upcaster for {old_name!r} is already registered")
        self._upcasters[old_name] = upcaster

    def name_for(self, event: object) -> str:
        """The type name of ``event``'s class.

        Raises:
            TypeError: the class is not registered.
        """
        try:
            return self._by_type[type(event)]
        except KeyError:
            raise TypeError(
                f"{type(event).__qualname__} is not a registered event type "
                f"(give the aggregate an applier for it, or list it in extra_events)"
            ) from None

    def encode(self, event: object) -> tuple[str, bytes]:
        """Return ``(type name, JSON bytes)`` for ``event``."""
        name = self._by_type.get(type(event))
        if name is None:
            name = self.name_for(event)  # raises TypeError
        return name, encode_json(self._converter.unstructure(event))

    def decode(self, name: str, data: bytes, *, where: str = "") -> Any:
        """Decode stored ``data`` of type ``name`` (upcasting it first if needed).

        Raises:
            UnknownEventType: neither a class nor an upcaster knows ``name``.
            EventDecodeError: the bytes are not JSON, or do not fit the class.
        """
        at = f" at {where}" if where else ""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventDecodeError(f"event {name!r}{at} is not valid JSON: {exc}") from exc
        cls = self._by_name.get(name)
        hops = 0
        while cls is None:
            upcaster = self._upcasters.get(name)
            if upcaster is None:
                raise UnknownEventType(f"unknown event type {name!r}{at}")
            hops += 1
            if hops > _MAX_UPCASTS:
                raise EventDecodeError(f"upcasters for {name!r}{at} loop")
            try:
                name, raw = upcaster(raw)
            except Exception as exc:
                raise EventDecodeError(f"upcasting {name!r}{at} failed: {exc!r}") from exc
            cls = self._by_name.get(name)
        try:
            return self._converter.structure(raw, cls)
        except Exception as exc:
            raise EventDecodeError(
                f"event {name!r}{at} does not fit {cls.__qualname__}: {exc!r}"
            ) from exc

    def encode_state(self, state: object) -> bytes:
        """JSON bytes of an aggregate's state, for a snapshot."""
        return encode_json(self._converter.unstructure(state))

    def decode_state(self, data: bytes, cls: type[T]) -> T:
        """Rebuild a state of class ``cls`` from snapshot bytes.

        Raises:
            EventDecodeError: the bytes do not decode into ``cls``.
        """
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise EventDecodeError(f"snapshot does not fit {cls.__qualname__}: {exc!r}") from exc
        if isinstance(raw, dict) and attrs.has(cls):
            # A state of another shape (a field renamed, added or dropped, and
            # snapshot_schema not bumped) would structure with defaults for
            # what is missing and drop what is unknown: silently wrong. Refuse
            # it: the runtime then rebuilds the state from the events.
            fields = {a.name for a in attrs.fields(cls)}
            if raw.keys() != fields:
                missing, unknown = sorted(fields - raw.keys()), sorted(raw.keys() - fields)
                raise EventDecodeError(
                    f"snapshot does not fit {cls.__qualname__}: its fields differ "
                    f"(missing {missing}, unknown {unknown}); bump snapshot_schema "
                    f"when the state's shape changes"
                )
        try:
            return self._converter.structure(raw, cls)
        except Exception as exc:
            raise EventDecodeError(f"snapshot does not fit {cls.__qualname__}: {exc!r}") from exc
