"""Testing your aggregates: the code of the how-to page ``docs/howto/testing.rst``.

A small domain (a room that takes bookings up to its capacity) and its tests:
given/when/then tests of its decisions, tests of the running aggregates on
the in-memory store, and tests of what a failing or slow store does. Run it
with pytest and pytest-trio (``trio_mode = true``), next to a ``conftest.py``
holding ``pytest_plugins = ["trio_aggregates.testing"]``;
``tests/test_testing_kit.py`` does, so that the page cannot go stale.
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from trio_aggregates import (
    Aggregate,
    CallTimeout,
    CommandRejected,
    Decision,
    StoreError,
    applies,
    handles,
)
from trio_aggregates.testing import FaultyStore, Repositories, scenario

# -- the domain (in a project: in the package, not in the tests) --------------


@attrs.frozen
class OpenRoom:
    capacity: int


@attrs.frozen
class Book:
    guest: str


@attrs.frozen
class CancelBooking:
    guest: str


@attrs.frozen
class RoomOpened:
    capacity: int


@attrs.frozen
class Booked:
    guest: str


@attrs.frozen
class BookingCancelled:
    guest: str


class RoomFull(CommandRejected):
    """Every place is taken."""


class NotBooked(CommandRejected):
    """The guest has no booking to cancel."""


@attrs.define
class Room(Aggregate):
    capacity: int = 0
    guests: list[str] = attrs.Factory(list)

    @handles
    def open(self, command: OpenRoom) -> RoomOpened:
        return RoomOpened(command.capacity)

    @handles
    def book(self, command: Book) -> Decision | None:
        if command.guest in self.guests:
            return None  # booked already: nothing to store
        if len(self.guests) >= self.capacity:
            raise RoomFull(f"all {self.capacity} places are taken")
        places_left = self.capacity - len(self.guests) - 1
        return Decision([Booked(command.guest)], reply=places_left)

    @handles
    def cancel(self, command: CancelBooking) -> BookingCancelled:
        if command.guest not in self.guests:
            raise NotBooked(command.guest)
        return BookingCancelled(command.guest)

    @applies
    def opened(self, event: RoomOpened) -> None:
        self.capacity = event.capacity

    @applies
    def booked(self, event: Booked) -> None:
        self.guests.append(event.guest)

    @applies
    def cancelled(self, event: BookingCancelled) -> None:
        self.guests.remove(event.guest)


# -- given / when / then: the decisions, no Trio ----------------------------------

# [scenarios]
OPENED = scenario(Room).given(RoomOpened(capacity=2))


def test_booking_takes_a_place() -> None:
    OPENED.when(Book("ann")).then(Booked("ann"), reply=1)  # 1 place left


def test_booking_twice_stores_nothing() -> None:
    OPENED.given(Booked("ann")).when(Book("ann")).then()


def test_a_full_room_refuses_bookings() -> None:
    full = OPENED.given(Booked("ann"), Booked("bob"))
    full.when(Book("cat")).then_rejects(RoomFull, match="all 2 places")


def test_cancelling_frees_the_place() -> None:
    room = OPENED.given(Booked("ann")).when(CancelBooking("ann")).then(BookingCancelled("ann"))
    assert room.guests == []  # then() returns the state after the new events
    OPENED.when(CancelBooking("ann")).then_rejects(NotBooked)
    # [/scenarios] (the end of the part the how-to page shows)


# -- the running aggregates, on the in-memory store ---------------------------------


# [fixtures]
@pytest.fixture
def aggregate_types() -> list[type[Aggregate]]:
    return [Room]  # what the `aggregates` fixture runs


async def test_bookings_are_stored(
    aggregates: Repositories, autojump_clock: trio.testing.MockClock
) -> None:
    rooms = aggregates[Room]
    assert await rooms.create("r1", OpenRoom(capacity=1)) == 1
    assert await rooms.execute("r1", Book("ann")) == 0  # the handler's reply
    with pytest.raises(RoomFull):
        await rooms.execute("r1", Book("bob"))
    assert (await rooms.load("r1")).guests == ["ann"]
    assert await rooms.version("r1") == 2
    # [/fixtures] (the end of the part the how-to page shows)


# -- a store that fails, or takes its time ----------------------------------------


# [faults]
async def test_a_retry_after_a_lost_answer_is_applied_once(
    aggregates: Repositories, memory_store: FaultyStore
) -> None:
    rooms = aggregates[Room]
    await rooms.create("r1", OpenRoom(capacity=2))
    # The next append is stored, but its caller gets a StoreError.
    memory_store.fail("append", after_commit=True, times=1)
    with pytest.raises(StoreError):
        await rooms.execute("r1", Book("ann"), command_id="booking-17")
    # Retrying with the same command id does not book a second place.
    assert await rooms.execute("r1", Book("ann"), command_id="booking-17") == 2
    assert (await rooms.load("r1")).guests == ["ann"]


async def test_a_slow_store_times_the_caller_out(
    aggregates: Repositories, memory_store: FaultyStore, autojump_clock: trio.testing.MockClock
) -> None:
    rooms = aggregates[Room]
    await rooms.create("r1", OpenRoom(capacity=2))
    memory_store.delay("append", 10.0)  # seconds of Trio's clock: no real waiting
    with pytest.raises(CallTimeout):
        await rooms.execute("r1", Book("ann"), timeout=1.0)
    await trio.sleep(10)  # the command being stored completes all the same
    assert (await rooms.load("r1")).guests == ["ann"]


async def test_a_caller_that_gives_up_mid_append(
    aggregates: Repositories, memory_store: FaultyStore
) -> None:
    rooms = aggregates[Room]
    await rooms.create("r1", OpenRoom(capacity=2))
    with memory_store.hold("append") as latch:  # released when the block ends
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rooms.execute, "r1", Book("ann"))
            await latch.wait_held()  # ann's booking is in the store's hands
            nursery.cancel_scope.cancel()  # and her caller gives up
    # A command already being stored completes all the same.
    assert (await rooms.load("r1")).guests == ["ann"]
    # [/faults] (the end of the part the how-to page shows)
