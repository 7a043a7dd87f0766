"""The testing kit, ``trio_aggregates.testing``: each helper passes what it should and
catches what it should (a wrong expectation fails the helper's assertion).

* ``scenario``: given/when/then on a small domain defined here (a counter with
  a limit), every way a decision can differ from the expectation;
* ``FaultyStore``: failures, latches, delays and counters on every operation;
* the pytest plugin (loaded by ``tests/conftest.py`` as a user's conftest
  would): the ``aggregates`` and ``memory_store`` fixtures, and, in a pytest
  subprocess, what happens without ``aggregate_types``;
* ``docs/howto/testing_example.py``, the how-to's code, run by pytest in a
  fresh directory, so that the page cannot rot.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_aggregates import (
    Aggregate,
    CommandRejected,
    ConcurrencyConflict,
    Decision,
    EventStore,
    InMemoryEventStore,
    InvalidArgument,
    NewEvent,
    Snapshot,
    StoreError,
    UnknownCommand,
    applies,
    handles,
)
from trio_aggregates.testing import (
    FaultyStore,
    Latch,
    Repositories,
    Scenario,
    open_repositories,
    scenario,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "howto" / "testing_example.py"
PAGE = ROOT / "docs" / "howto" / "testing.rst"

# -- a small domain: a counter that refuses to go past its limit ------------------


@attrs.frozen
class Start:
    limit: int


@attrs.frozen
class Add:
    n: int


@attrs.frozen
class Peek:
    pass


@attrs.frozen
class Sneak:
    """A command whose handler (wrongly) changes the state it decides on."""

    refuse: bool = False


@attrs.frozen
class Poison:
    pass


@attrs.frozen
class Started:
    limit: int


@attrs.frozen
class Added:
    n: int


@attrs.frozen
class Poisoned:
    pass


class OverLimit(CommandRejected):
    """The counter would pass its limit."""


class NotStarted(CommandRejected):
    """The counter has no limit yet."""


@attrs.define
class Counter(Aggregate):
    limit: int = 0
    total: int = 0

    @handles
    def start(self, command: Start) -> Started:
        return Started(command.limit)

    @handles
    def add(self, command: Add) -> list[Added]:
        if self.limit == 0:
            raise NotStarted("start the counter first")
        if self.total + command.n > self.limit:
            raise OverLimit(f"total {self.total} + {command.n} > limit {self.limit}")
        return [Added(1) for _ in range(command.n)]  # one event per unit

    @handles
    def peek(self, command: Peek) -> Decision:
        return Decision(reply=self.total)

    @handles
    def sneak(self, command: Sneak) -> None:
        self.total += 100
        if command.refuse:
            raise OverLimit("refused, after changing the state")

    @handles
    def poison(self, command: Poison) -> Poisoned:
        return Poisoned()

    @applies
    def started(self, event: Started) -> None:
        self.limit = event.limit

    @applies
    def added(self, event: Added) -> None:
        self.total += event.n

    @applies
    def poisoned(self, event: Poisoned) -> None:
        raise ZeroDivisionError("applier bug")


STARTED = scenario(Counter).given(Started(limit=3))


# -- scenario: what passes ----------------------------------------------------------


def test_then_passes_on_the_exact_events_and_returns_the_new_state() -> None:
    state = STARTED.given(Added(1)).when(Add(2)).then(Added(1), Added(1))
    assert state == Counter(limit=3, total=3)
    assert STARTED.when(Start(9)).then(Started(9)).limit == 9


def test_then_with_no_events_asserts_that_nothing_is_stored() -> None:
    assert STARTED.when(Peek()).then() == Counter(limit=3)
    assert STARTED.when(Add(0)).then(reply=1) == Counter(limit=3)


def test_then_checks_the_reply_execute_would_return() -> None:
    # The handler's own reply ...
    STARTED.given(Added(1), Added(1)).when(Peek()).then(reply=2)
    # ... or, if it chose none, the version after the command: 1 given + 2 new.
    STARTED.when(Add(2)).then(Added(1), Added(1), reply=3)


def test_then_rejects_returns_the_exception() -> None:
    error = STARTED.given(Added(1)).when(Add(3)).then_rejects(OverLimit, match=r"limit 3")
    assert isinstance(error, OverLimit)
    assert str(error) == "total 1 + 3 > limit 3"
    # By default any CommandRejected; match takes a compiled pattern too.
    assert isinstance(scenario(Counter).when(Add(1)).then_rejects(), NotStarted)
    STARTED.when(Add(4)).then_rejects(CommandRejected, match=re.compile(r"^total 0"))
    # An unknown command is a rejection of its own kind.
    STARTED.when("not a command").then_rejects(UnknownCommand, match="no handler for str")


def test_a_scenario_is_an_immutable_value() -> None:
    base = scenario(Counter)
    assert isinstance(base, Scenario)
    longer = base.given(Started(3)).given(Added(1), Added(1))
    assert base.history == ()
    assert longer.history == (Started(3), Added(1), Added(1))
    assert longer.state() == Counter(limit=3, total=2)
    assert longer.state() is not longer.state()  # a fresh state each time
    expectation = longer.when(Add(1))
    expectation.then(Added(1))
    expectation.then(Added(1))  # running it twice gives the same answer
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        longer.history = ()  # type: ignore[misc]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not an Aggregate subclass"):
        scenario(Start)  # type: ignore[type-var]
    with pytest.raises(InvalidArgument, match="exception class"):
        STARTED.when(Add(9)).then_rejects(OverLimit("x"))  # type: ignore[call-overload]
    with pytest.raises(InvalidArgument, match=r"given\(\*events\), not given\(\[Added"):
        STARTED.given([Added(1), Added(1)])
    with pytest.raises(InvalidArgument, match=r"then\(\*events\)"):
        STARTED.when(Add(1)).then((Added(1),))


# -- scenario: what fails, and how it says so -------------------------------------------


def failure(expectation: Any, *events: object, **kw: Any) -> str:
    """Run ``expectation.then(*events, **kw)``, which must fail; return the message."""
    with pytest.raises(AssertionError) as info:
        expectation.then(*events, **kw)
    return str(info.value)


def test_then_fails_on_other_events_showing_both_lists() -> None:
    message = failure(STARTED.given(Added(1)).when(Add(2)), Added(1), Added(2))
    assert message == textwrap.dedent("""\
        Counter given 2 events:
          1. Started(limit=3)
          2. Added(n=1)
        when Add(n=2):
        expected 2 events:
          1. Added(n=1)
          2. Added(n=2)
        but it decided 2 events:
          1. Added(n=1)
          2. Added(n=1)   <-- first difference""")


def test_then_fails_on_missing_or_extra_events() -> None:
    message = failure(STARTED.when(Add(2)), Added(1))
    assert "expected 1 event:" in message
    assert "but it decided 2 events:\n  1. Added(n=1)\n  2. Added(n=1)   <-- first" in message
    message = failure(STARTED.when(Add(1)), Added(1), Added(1))
    assert "but it decided 1 event:\n  1. Added(n=1)" in message
    assert "first difference" not in message  # nothing to point at: events are missing
    assert "expected no events" in failure(STARTED.when(Add(1)))
    assert "but it decided no events" in failure(STARTED.when(Peek()), Added(1))


def test_then_fails_on_a_rejection_with_the_rejection_as_cause() -> None:
    with pytest.raises(AssertionError, match=r"but the handler raised OverLimit") as info:
        STARTED.when(Add(4)).then(Added(1))
    assert isinstance(info.value.__cause__, OverLimit)
    with pytest.raises(AssertionError) as info:
        STARTED.when("not a command").then()
    assert isinstance(info.value.__cause__, UnknownCommand)


def test_then_fails_on_another_reply() -> None:
    message = failure(STARTED.given(Added(1)).when(Peek()), reply=2)
    assert message.endswith("expected the reply 2, but the handler replied 1")
    message = failure(STARTED.when(Add(1)), Added(1), reply=1)
    assert message.endswith(
        "expected the reply 1, but the handler chose no reply, so execute returns 2"
    )


def test_then_rejects_fails_when_the_command_is_accepted() -> None:
    with pytest.raises(AssertionError) as info:
        STARTED.when(Add(2)).then_rejects(OverLimit)
    assert str(info.value).endswith(
        "expected a rejection with OverLimit, but the command was accepted\n"
        "it decided 2 events:\n  1. Added(n=1)\n  2. Added(n=1)"
    )
    with pytest.raises(AssertionError, match=r"accepted\nit decided no events\nand replied 0"):
        STARTED.when(Peek()).then_rejects()


def test_then_rejects_fails_on_another_exception_or_message() -> None:
    with pytest.raises(AssertionError, match=r"with OverLimit, but the handler raised Not") as info:
        scenario(Counter).when(Add(1)).then_rejects(OverLimit)
    assert isinstance(info.value.__cause__, NotStarted)
    with pytest.raises(AssertionError, match=r"does not match 'limit 4'") as info:
        STARTED.when(Add(4)).then_rejects(OverLimit, match="limit 4")
    assert isinstance(info.value.__cause__, OverLimit)


def test_a_handler_that_changes_its_state_is_caught() -> None:
    for expectation in (STARTED.when(Sneak()).then, STARTED.when(Sneak(refuse=True)).then_rejects):
        with pytest.raises(AssertionError, match="the handler changed the state") as info:
            expectation()
        assert "before: Counter(limit=3, total=0)" in str(info.value)
        assert "after:  Counter(limit=3, total=100)" in str(info.value)


def test_an_applier_that_raises_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"applying decided event 2 \(Poisoned\(\)\)") as info:
        STARTED.when(Poison()).then(Poisoned())
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(AssertionError, match=r"applying given event 2 \(Poisoned\(\)\)") as info:
        STARTED.given(Poisoned()).when(Peek()).then()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(AssertionError, match=r"given event 1 \('junk'\).*TypeError"):
        scenario(Counter).given("junk").state()


def test_a_long_history_is_abbreviated_in_messages() -> None:
    message = failure(STARTED.given(*[Added(0)] * 20).when(Peek()), reply=99)
    assert "given 21 events:\n  ... (9 earlier)\n  10. Added(n=0)\n" in message
    assert "  21. Added(n=0)\nwhen Peek():" in message


# -- FaultyStore --------------------------------------------------------------------

ev = NewEvent("E", b"{}")


async def test_without_faults_it_is_the_memory_store_with_counters() -> None:
    store = FaultyStore()
    assert isinstance(store, InMemoryEventStore)
    assert isinstance(store, EventStore)
    assert await store.append("s-1", [ev, ev], expected_version=0, command_id="c") == 2
    assert await store.find_command("s-1", "c") == 2
    assert [e.version for e in await store.read("s-1")] == [1, 2]
    assert [e.version for e in await store.read("s-1", from_version=2)] == [2]
    assert await store.stream_version("s-1") == 2
    assert [e.position for e in await store.read_all(categories=["s"])] == [1, 2]
    assert await store.head_position() == 2
    await store.save_snapshot(Snapshot("s-1", 2, 1, "S", b"x"))
    assert await store.load_snapshot("s-1") == Snapshot("s-1", 2, 1, "S", b"x")
    await store.delete_stream("s-1")
    assert await store.read("s-1") == []
    with pytest.raises(ConcurrencyConflict):  # the store's own errors are untouched
        await store.append("s-2", [ev], expected_version=5)
    assert store.calls == {
        "append": 2,
        "find_command": 1,
        "read": 3,
        "stream_version": 1,
        "read_all": 1,
        "head_position": 1,
        "save_snapshot": 1,
        "load_snapshot": 1,
        "delete_stream": 1,
    }
    assert store.events_read == 3
    assert sum(store.in_flight.values()) == 0
    await store.aclose()


async def test_fail_the_next_append_only() -> None:
    store = FaultyStore()
    store.fail("append", times=1)
    with pytest.raises(StoreError, match=r"append of 's' failed \(injected by FaultyStore\)"):
        await store.append("s", [ev], expected_version=0)
    assert await store.stream_version("s") == 0  # nothing was appended
    assert await store.append("s", [ev], expected_version=0) == 1
    assert store.calls["append"] == 2


async def test_fail_until_healed_and_heal_one_operation() -> None:
    store = FaultyStore()
    store.fail("append")
    store.fail("read")
    for _ in range(3):
        with pytest.raises(StoreError):
            await store.append("s", [ev], expected_version=None)
    store.heal("append")
    assert await store.append("s", [ev], expected_version=0) == 1
    with pytest.raises(StoreError, match="read of 's'"):
        await store.read("s")
    store.heal()
    assert len(await store.read("s")) == 1


async def test_fail_with_my_error_raises_a_fresh_copy_each_time() -> None:
    store = FaultyStore()
    cause = OSError(28, "No space left on device")
    error = ConcurrencyConflict("s", 3, 4)
    error.__cause__ = cause
    store.fail("append", error, times=2)
    seen = []
    for _ in range(2):
        with pytest.raises(ConcurrencyConflict) as info:
            await store.append("s", [ev], expected_version=0)
        seen.append(info.value)
    assert seen[0] is not seen[1] and error not in seen
    for raised in seen:
        assert (raised.stream, raised.expected, raised.actual) == ("s", 3, 4)
        assert raised.__cause__ is cause
        assert str(raised) == str(error)
    store.fail("read", ConnectionResetError("reset"), times=1)  # any exception
    with pytest.raises(ConnectionResetError):
        await store.read("s")


async def test_fail_only_some_streams() -> None:
    store = FaultyStore()
    store.fail("append", streams="a-1")
    store.fail("read", streams=["b-1", "b-2"])
    with pytest.raises(StoreError):
        await store.append("a-1", [ev], expected_version=0)
    assert await store.append("a-2", [ev], expected_version=0) == 1
    assert await store.append("b-1", [ev], expected_version=0) == 1
    with pytest.raises(StoreError):
        await store.read("b-2")
    assert await store.read("a-1") == []
    # read_all names no stream: a fault for some streams leaves it alone
    assert len(await store.read_all()) == 2
    store.fail("read_all", times=1)
    with pytest.raises(StoreError, match=r"^read_all failed"):
        await store.read_all()


async def test_fail_after_commit_stores_then_raises() -> None:
    store = FaultyStore()
    store.fail("append", after_commit=True, times=1)
    with pytest.raises(StoreError, match="done, but the answer was lost"):
        await store.append("s", [ev], expected_version=0, command_id="c1")
    assert await store.stream_version("s") == 1
    assert await store.find_command("s", "c1") == 1


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("append", lambda s: s.append("s", [ev], expected_version=None)),
        ("find_command", lambda s: s.find_command("s", "c")),
        ("read", lambda s: s.read("s")),
        ("stream_version", lambda s: s.stream_version("s")),
        ("read_all", lambda s: s.read_all()),
        ("head_position", lambda s: s.head_position()),
        ("save_snapshot", lambda s: s.save_snapshot(Snapshot("s", 0, 1, "S", b""))),
        ("load_snapshot", lambda s: s.load_snapshot("s")),
        ("delete_stream", lambda s: s.delete_stream("s")),
    ],
)
async def test_every_operation_can_fail(operation: Any, call: Any) -> None:
    store = FaultyStore()
    store.fail(operation, times=1)
    with pytest.raises(StoreError, match=rf"^{operation}\b.*injected by FaultyStore"):
        await call(store)
    await call(store)
    assert store.calls == {operation: 2}


async def test_a_held_append_waits_for_the_latch() -> None:
    store = FaultyStore()
    latch = store.hold("append", streams="s")
    assert isinstance(latch, Latch)
    versions: list[int] = []

    async def append() -> None:
        versions.append(await store.append("s", [ev], expected_version=None))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(append)
            nursery.start_soon(append)
            await latch.wait_held(2)
            assert (latch.waiting, latch.held) == (2, 2)
            assert (store.in_flight["append"], store.max_in_flight["append"]) == (2, 2)
            assert await store.append("other", [ev], expected_version=0) == 1  # not held
            assert await store.stream_version("s") == 0
            assert "holding 2" in repr(latch)
            latch.release()
    assert sorted(versions) == [1, 2]
    assert latch.released and latch.waiting == 0
    assert await store.append("s", [ev], expected_version=2) == 3  # released: passes


async def test_a_held_call_cancelled_does_nothing_and_the_block_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    with trio.fail_after(5):
        with store.hold("append") as latch:
            with trio.move_on_after(1) as scope:
                await store.append("s", [ev], expected_version=0)
            assert scope.cancelled_caught
            assert latch.waiting == 0 and latch.held == 1
        assert latch.released
        assert await store.stream_version("s") == 0
        assert await store.append("s", [ev], expected_version=0) == 1


async def test_wait_held_returns_at_once_or_fails_once_released() -> None:
    store = FaultyStore()
    latch = store.hold("read")
    with trio.testing.assert_checkpoints():
        await latch.wait_held(0)

    async def release_soon() -> None:
        await trio.testing.wait_all_tasks_blocked()
        latch.release()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.read, "s")
            await latch.wait_held()
            nursery.start_soon(release_soon)
            with pytest.raises(RuntimeError, match="released before 2 calls were held"):
                await latch.wait_held(2)
    assert latch.held == 1


async def test_heal_releases_the_latches() -> None:
    store = FaultyStore()
    reads = store.hold("read")
    appends = store.hold("append")
    store.heal("read")
    assert reads.released and not appends.released
    store.heal()
    assert appends.released
    with trio.fail_after(5):
        await store.append("s", [ev], expected_version=0)


async def test_delay_takes_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    store = FaultyStore()
    store.delay("append", 10)
    store.delay("read", 2, streams="slow")
    start = trio.current_time()
    await store.append("s", [ev], expected_version=0)
    assert trio.current_time() - start == 10
    await store.read("s")
    await store.read("slow")
    assert trio.current_time() - start == 12
    store.heal("append")
    await store.append("s", [ev], expected_version=1)
    assert trio.current_time() - start == 12


async def test_a_failing_call_is_a_checkpoint() -> None:
    store = FaultyStore()
    store.fail("append")
    with trio.testing.assert_checkpoints(), pytest.raises(StoreError):
        await store.append("s", [ev], expected_version=0)


def test_bad_fault_arguments_are_refused() -> None:
    store = FaultyStore()
    with pytest.raises(InvalidArgument, match="unknown store operation 'apend'"):
        store.fail("apend")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.hold("nope")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.heal("nope")  # type: ignore[arg-type]
    for times in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgument, match="times"):
            store.fail("append", times=times)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="exception instance"):
        store.fail("append", StoreError)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="seconds"):
        store.delay("append", -1)
    with pytest.raises(InvalidArgument, match="streams"):
        store.fail("append", streams=[1])  # type: ignore[list-item]
    assert "0 fault(s)" in repr(store)


# -- open_repositories and the pytest plugin -----------------------------------------------


@attrs.define
class Other(Aggregate):
    count: int = 0

    @handles
    def add(self, command: Add) -> Added:
        return Added(command.n)

    @applies
    def added(self, event: Added) -> None:
        self.count += event.n


@pytest.fixture
def aggregate_types() -> list[type[Aggregate]]:
    return [Counter, Other]


async def test_the_aggregates_fixture_runs_each_type_on_memory_store(
    aggregates: Repositories, memory_store: FaultyStore
) -> None:
    counters = aggregates[Counter]
    assert counters.aggregate_type is Counter
    assert set(aggregates) == {Counter, Other} and len(aggregates) == 2
    assert aggregates.store is memory_store is counters.store is aggregates[Other].store
    assert await counters.create("c", Start(5)) == 1
    assert await counters.execute("c", Add(2)) == 3
    assert await aggregates[Other].execute("o", Add(7), create_if_missing=True) == 1
    assert memory_store.calls["append"] == 3
    memory_store.fail("append", times=1)
    with pytest.raises(StoreError, match="injected"):
        await counters.execute("c", Add(1))
    assert await counters.execute("c", Add(1)) == 4
    with pytest.raises(KeyError, match=r"no repository for 'Start' \(open: Counter, Other\)"):
        aggregates[Start]  # type: ignore[type-var]


@pytest.mark.parametrize("aggregate_types", [[Other]])
@pytest.mark.parametrize("aggregate_options", [{"idle_timeout": 5}])
async def test_the_fixtures_take_types_and_options_per_test(
    aggregates: Repositories, autojump_clock: trio.testing.MockClock
) -> None:
    assert list(aggregates) == [Other]
    others = aggregates[Other]
    await others.execute("o", Add(1), create_if_missing=True)
    assert "o" in others.registry
    await trio.sleep(5.1)  # the option reached open_aggregates
    assert "o" not in others.registry


async def test_open_repositories_without_pytest() -> None:
    async with open_repositories(Counter) as repositories:
        assert isinstance(repositories.store, FaultyStore)  # a fresh one by default
        await repositories[Counter].create("c", Start(1))
        registry = repositories[Counter].registry
        assert "Counter" in repr(repositories)
    assert registry.closed
    store = InMemoryEventStore()
    async with open_repositories(Counter, store=store, max_retries=0) as repositories:
        assert repositories.store is store
    assert await store.stream_version("Counter-c") == 0
    with pytest.raises(InvalidArgument, match="at least one"):
        async with open_repositories():
            pass  # pragma: no cover
    with pytest.raises(InvalidArgument, match="twice"):
        async with open_repositories(Counter, Counter):
            pass  # pragma: no cover
    with pytest.raises(InvalidArgument):
        async with open_repositories(Counter, max_retries=-1):
            pass  # pragma: no cover


# -- in a fresh pytest: the plugin as a user loads it, and the how-to's example -------


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest in ``directory`` (its own rootdir and config), bounded in time."""
    (directory / "pytest.ini").write_text(
        "[pytest]\ntrio_mode = true\nfilterwarnings = error\ntimeout = 60\n"
        "addopts = --strict-markers --strict-config -p no:cacheprovider\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_howto_example_passes_under_pytest(tmp_path: Path) -> None:
    # The conftest.py the page tells users to write.
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["trio_aggregates.testing"]\n')
    (tmp_path / "test_example.py").write_text(EXAMPLE.read_text())
    result = run_pytest(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^8 passed in ", output, re.MULTILINE), output


def test_the_howto_shows_the_message_a_wrong_expectation_gives() -> None:
    shown = re.search(r"\n    AssertionError: (.*?)\n\n", PAGE.read_text(), re.DOTALL)
    assert shown is not None
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        example: Any = __import__("testing_example")
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    wrong = scenario(example.Room).given(example.RoomOpened(capacity=2)).when(example.Book("ann"))
    with pytest.raises(AssertionError) as info:
        wrong.then(example.Booked("bob"))
    assert str(info.value) == textwrap.dedent("    " + shown.group(1))


def test_the_plugin_asks_for_the_aggregate_types(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["trio_aggregates.testing"]\n')
    (tmp_path / "test_forgot.py").write_text(
        "async def test_forgot(aggregates):\n    pass\n\n"
        "def test_store(memory_store):\n    assert memory_store.calls == {}\n"
    )
    result = run_pytest(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "define a fixture `aggregate_types`" in output, output
    assert "1 passed, 1 error" in output, output


def test_importing_the_kit_does_not_import_pytest() -> None:
    code = (
        "import sys, trio_aggregates.testing as t\n"
        "assert 'pytest' not in sys.modules, 'pytest imported'\n"
        "assert t.scenario.__module__ == 'trio_aggregates.testing'\n"
        "print(t.pytest_plugins)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['trio_aggregates.testing._pytest_plugin']"
