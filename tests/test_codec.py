"""The event codec keeps its promise: every field type its docs list round-trips.

``_codec.py``'s docstring lists the field types events may use. A Hypothesis
property draws events with a field of each listed type (nested, optional, in
containers) and checks that they come back equal through ``encode``/``decode``,
through a real store (the in-memory one, which keeps the bytes as a durable
store would), and as snapshot state. A fixed example goes through SQLite and the
whole runtime (``open_aggregates``): a UUID field used to fail with ``TypeError:
Object of type UUID is not JSON serializable``.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import uuid
from pathlib import Path
from typing import Any, Optional

import attrs
import trio
from hypothesis import given, settings, strategies as st

from trio_aggregates import (
    Aggregate,
    EventCodec,
    InMemoryEventStore,
    NewEvent,
    applies,
    handles,
    open_aggregates,
)
from trio_aggregates._runtime import _codec
from trio_aggregates._runtime._codec import encode_json


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.frozen
class Inner:
    name: str
    when: datetime.date
    tags: frozenset[str] = frozenset()


@attrs.frozen
class Everything:
    """One field of each type the codec's docstring lists."""

    s: str
    i: int
    f: float
    b: bool
    opt: Optional[int]  # noqa: UP045 (the spelling the docs list)
    opt_uuid: uuid.UUID | None
    raw: bytes
    items: list[int]
    pair: tuple[int, str]
    many: tuple[decimal.Decimal, ...]
    set_: set[int]
    fset: frozenset[uuid.UUID]
    by_str: dict[str, Inner]
    by_int: dict[int, str]
    by_uuid: dict[uuid.UUID, int]
    inner: Inner
    maybe_inner: Inner | None
    colour: Colour
    level: Level
    at: datetime.datetime
    on: datetime.date
    clock: datetime.time
    amount: decimal.Decimal
    ident: uuid.UUID


texts = st.text(max_size=8)
uuids = st.uuids()
# Finite and infinite; NaN is stored but is not equal to itself, so not drawn here.
floats = st.floats(allow_nan=False)
decimals = st.decimals(allow_nan=False)  # infinities included
datetimes = st.one_of(
    st.datetimes(),
    st.datetimes(timezones=st.just(datetime.timezone.utc)),
    st.datetimes(
        timezones=st.builds(
            datetime.timezone,
            st.timedeltas(
                min_value=datetime.timedelta(hours=-23), max_value=datetime.timedelta(hours=23)
            ).map(lambda d: datetime.timedelta(minutes=d // datetime.timedelta(minutes=1))),
        )
    ),
)
inners = st.builds(Inner, texts, st.dates(), st.frozensets(texts, max_size=3))

everything = st.builds(
    Everything,
    s=texts,
    i=st.integers(),
    f=floats,
    b=st.booleans(),
    opt=st.none() | st.integers(),
    opt_uuid=st.none() | uuids,
    raw=st.binary(max_size=16),
    items=st.lists(st.integers(), max_size=4),
    pair=st.tuples(st.integers(), texts),
    many=st.lists(decimals, max_size=3).map(tuple),
    set_=st.sets(st.integers(), max_size=4),
    fset=st.frozensets(uuids, max_size=3),
    by_str=st.dictionaries(texts, inners, max_size=3),
    by_int=st.dictionaries(st.integers(), texts, max_size=3),
    by_uuid=st.dictionaries(uuids, st.integers(), max_size=3),
    inner=inners,
    maybe_inner=st.none() | inners,
    colour=st.sampled_from(Colour),
    level=st.sampled_from(Level),
    at=datetimes,
    on=st.dates(),
    clock=st.times(),
    amount=decimals,
    ident=uuids,
)


def codec() -> EventCodec:
    c = EventCodec()
    c.register(Everything)
    return c


def same(a: Everything, b: Everything) -> bool:
    """Equal, and the values keep their types (a Decimal stays a Decimal, ...)."""
    if a != b:
        return False
    for field in attrs.fields(Everything):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if type(x) is not type(y):
            return False
    # an aware datetime keeps its offset, not only its instant
    return a.at.utcoffset() == b.at.utcoffset() and a.amount.as_tuple() == b.amount.as_tuple()


@settings(max_examples=150, deadline=None)
@given(event=everything)
def test_every_listed_type_round_trips_through_the_codec_and_a_store(event: Everything) -> None:
    c = codec()
    name, data = c.encode(event)
    assert name == "Everything"
    assert same(c.decode(name, data), event)

    async def through_a_store() -> Everything:
        store = InMemoryEventStore()
        await store.append("s-1", [NewEvent(name, data)], expected_version=0)
        (record,) = await store.read("s-1")
        return c.decode(record.type, record.data)  # type: ignore[no-any-return]

    assert same(trio.run(through_a_store), event)
    # as snapshot state too
    assert same(c.decode_state(c.encode_state(event), Everything), event)


def test_uuid_and_decimal_are_stored_as_their_canonical_strings() -> None:
    @attrs.frozen
    class Paid:
        id: uuid.UUID
        amount: decimal.Decimal

    c = EventCodec()
    c.register(Paid)
    _, data = c.encode(Paid(uuid.UUID(int=1), decimal.Decimal("10.50")))
    assert data == b'{"id":"00000000-0000-0000-0000-000000000001","amount":"10.50"}'


# -- encode_json: msgspec for flat objects, the same bytes as the standard library ------

_SCALARS = (
    st.text()  # lone surrogates included: both raise UnicodeEncodeError
    | st.integers()
    | st.integers(min_value=2**63 - 3, max_value=2**64 + 3).map(lambda n: n * (-1) ** (n % 2))
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=True, allow_infinity=True)  # the standard library's way
    | st.sampled_from([Level.LOW, Colour.RED])  # subclasses: its way too (or TypeError)
)


@settings(max_examples=500)
@given(
    value=st.dictionaries(st.text() | st.integers() | st.booleans(), _SCALARS, max_size=5)
    | st.lists(_SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=3), st.dictionaries(st.text(max_size=3), _SCALARS))
)
def test_encode_json_writes_what_the_standard_library_writes(value: object) -> None:
    """Events are stored as ``json.dumps`` (compact, UTF-8, NaN allowed) writes them,
    whichever encoder ran: the bytes of a stream do not depend on the version
    that wrote them."""
    try:
        expected: bytes | type[Exception] = json.dumps(
            value, ensure_ascii=False, separators=(",", ":")
        ).encode()
    except (UnicodeEncodeError, TypeError) as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = encode_json(value)
    except (UnicodeEncodeError, TypeError) as exc:
        got = type(exc)
    assert got == expected


def test_encode_json_takes_msgspecs_way_for_flat_objects_only(monkeypatch: Any) -> None:
    """The fast path runs for a flat object of plain values, and only for it."""
    calls: list[object] = []
    real = _codec._msgspec_encode

    def spy(value: object) -> bytes:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(_codec, "_msgspec_encode", spy)
    assert encode_json({"amount": 5, "note": "é", "ok": True, "x": None}) == (
        '{"amount":5,"note":"é","ok":true,"x":null}'.encode()
    )
    assert len(calls) == 1
    assert encode_json({"x": float("nan")}) == b'{"x":NaN}'
    assert encode_json({"x": 1e16}) == b'{"x":1e+16}'
    assert encode_json({1: 2}) == b'{"1":2}'
    assert encode_json({"x": [1]}) == b'{"x":[1]}'
    assert len(calls) == 1


# -- a UUID field through the whole runtime, on SQLite -------------------------


@attrs.frozen
class Open:
    owner: uuid.UUID


@attrs.frozen
class Opened:
    owner: uuid.UUID
    at: datetime.datetime
    fee: decimal.Decimal


@attrs.define
class Wallet(Aggregate):
    owner: uuid.UUID | None = None
    fee: decimal.Decimal = decimal.Decimal(0)

    @handles
    def open(self, command: Open) -> Opened:
        when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        return Opened(command.owner, when, decimal.Decimal("0.10"))

    @applies
    def opened(self, event: Opened) -> None:
        self.owner = event.owner
        self.fee = event.fee


async def test_uuid_fields_are_stored_and_read_back_on_sqlite(tmp_path: Path) -> None:
    owner = uuid.UUID("12345678-1234-5678-1234-567812345678")
    url = f"sqlite:///{tmp_path}/w.db"
    async with open_aggregates(Wallet, url) as repo:
        assert await repo.create(owner, Open(owner)) == 1
        assert (await repo.load(owner)).owner == owner
    async with open_aggregates(Wallet, url) as repo:  # from the file, in a fresh runtime
        state = await repo.load(owner)
        assert (state.owner, state.fee) == (owner, decimal.Decimal("0.10"))
        (stored,) = await repo.history(owner)
        assert stored.event == Opened(
            owner,
            datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
            decimal.Decimal("0.10"),
        )
