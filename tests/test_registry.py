"""The registry's behaviour, one test per rule of issue 3 and design.md's invariants.

Every aggregate here is made by :func:`make_aggregate`, which records what its
tasks do in a :class:`Tracker` owned by the test: how many tasks entered the
function, how many are serving, what each activation received, when and how
its loop ended, and whether its ``finally`` ran. Messages are small tuples that
tell the aggregate what to do (see :func:`_handle`). Time is Trio's autojump
clock; nothing sleeps for real.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing

import trio_aggregates
from trio_aggregates import (
    AggregateCrashed,
    AggregateDeclined,
    AggregateFunction,
    AggregateGone,
    AggregateNotFound,
    AggregateStartError,
    Call,
    CallAlreadyAnswered,
    CallTimeout,
    InvalidKey,
    KeyAlreadyRegistered,
    Mailbox,
    Registry,
    RegistryClosed,
    RegistryStatistics,
    TrioAggregatesError,
    open_registry,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

LOGGER = "trio_aggregates.registry"
Send = trio.MemorySendChannel[Any]


class Boom(Exception):
    """What the test aggregates raise."""


@attrs.frozen
class LoopEnd:
    """How one activation's ``async for`` loop ended."""

    key: Any
    activation: int
    time: float
    passivated: bool
    key_present: bool


class Tracker:
    """What the aggregate tasks of one test did, counted by the test itself."""

    def __init__(self) -> None:
        self.registry: Registry | None = None
        self.entered: Counter[Any] = Counter()  # calls of the aggregate function
        self.activated: Counter[Any] = Counter()  # reached started()
        self.running: Counter[Any] = Counter()  # inside the function now
        self.serving: Counter[Any] = Counter()  # between started() and the loop's end
        # Most activations of one key able to take messages at once (design.md invariant 1),
        # measured at each started(): the mailboxes of earlier activations still running must
        # be closed by then.
        self.max_live: Counter[Any] = Counter()
        self.active_mailboxes: dict[Any, list[Mailbox]] = {}
        self.finished: list[Any] = []  # keys whose function's finally ran
        self.received: list[tuple[Any, int, Any]] = []  # (key, activation, message)
        self.loop_ends: list[LoopEnd] = []
        self.held: list[Call] = []  # calls kept unanswered by a "hold" message
        self.notes: list[Any] = []  # anything a handler wants to report

    def messages(self, key: Any, activation: int) -> list[Any]:
        return [m for k, n, m in self.received if k == key and n == activation]


def make_aggregate(
    tracker: Tracker,
    *,
    tag: str = "default",
    startup: str = "ok",
    startup_delay: float = 0.0,
    startup_error: BaseException | None = None,
    set_idle_timeout: float | None = None,
    stubborn: bool = False,
    startup_started: trio.Event | None = None,
) -> AggregateFunction:
    """An aggregate function driven by the messages it receives.

    ``startup`` is ``"ok"``, ``"decline"`` (return before ``started()``) or
    ``"fail"`` (raise ``startup_error`` before ``started()``). ``stubborn``
    aggregates ignore the end of their mailbox and sleep forever.
    """

    async def aggregate(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tracker.entered[key] += 1
        tracker.running[key] += 1
        try:
            if startup_started is not None:
                startup_started.set()
            if startup_delay:
                await trio.sleep(startup_delay)
            if startup == "decline":
                return
            if startup == "fail":
                assert startup_error is not None
                raise startup_error
            if set_idle_timeout is not None:
                mailbox.idle_timeout = set_idle_timeout
            task_status.started()
            tracker.activated[key] += 1
            activation = tracker.activated[key]
            tracker.serving[key] += 1
            others = tracker.active_mailboxes.setdefault(key, [])
            still_open = [m for m in others if m.statistics().open_receive_channels]
            tracker.max_live[key] = max(tracker.max_live[key], 1 + len(still_open))
            others.append(mailbox)
            try:
                async for message in mailbox:
                    body = message.message if isinstance(message, Call) else message
                    tracker.received.append((key, activation, body))
                    call = message if isinstance(message, Call) else None
                    if await _handle(tracker, key, activation, mailbox, call, body):
                        break
            finally:
                tracker.serving[key] -= 1
                tracker.active_mailboxes[key].remove(mailbox)
            registry = tracker.registry
            tracker.loop_ends.append(
                LoopEnd(
                    key,
                    activation,
                    trio.current_time(),
                    mailbox.passivated,
                    registry is not None and key in registry,
                )
            )
            if stubborn:
                await trio.sleep_forever()
        finally:
            tracker.running[key] -= 1
            tracker.finished.append(key)

    return aggregate


async def _handle(
    tracker: Tracker, key: Any, activation: int, mailbox: Mailbox, call: Call | None, body: Any
) -> bool:
    """Act on one message; return True to stop serving (return from the aggregate)."""

    def answer(value: Any) -> None:
        if call is not None:
            call.reply(value)

    if not isinstance(body, tuple) or not body or not isinstance(body[0], str):
        answer(body)
        return False
    op, *args = body
    if op == "reply":
        answer(args[0])
    elif op == "whoami":
        answer((key, activation))
    elif op == "sleep":
        await trio.sleep(args[0])
        tracker.notes.append(("handled", key, args[1], trio.current_time()))
        answer(args[1])
    elif op == "wait":  # ("wait", event, then-body): wait for the event, then act on then-body
        await args[0].wait()
        return await _handle(tracker, key, activation, mailbox, call, args[1])
    elif op == "crash":  # ("crash", exc[, event to set right before raising])
        if len(args) > 1:
            args[1].set()
        raise args[0]
    elif op == "return":  # ("return", value[, event to set right before returning])
        answer(args[0])
        if len(args) > 1:
            args[1].set()
        return True
    elif op == "noanswer":
        return True
    elif op == "aclose":
        answer(args[0])
        await mailbox.aclose()
    elif op == "aclose-then-reply":
        await mailbox.aclose()
        answer(args[0])
    elif op == "fail":
        assert call is not None
        call.fail(args[0])
    elif op == "hold":
        assert call is not None
        tracker.held.append(call)
    else:
        answer(body)
    return False


async def capture(
    results: list[outcome.Outcome[Any]], fn: Callable[..., Awaitable[Any]], *args: Any
) -> None:
    results.append(await outcome.acapture(fn, *args))


def no_tasks_left(tracker: Tracker) -> bool:
    return all(n == 0 for n in tracker.running.values()) and all(
        n == 0 for n in tracker.serving.values()
    )


def warnings_from_registry(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# -- register, get, has_key, in, len, iteration -----------------------------------------


async def test_register_then_get_returns_the_send_end() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        assert registry.get("a") is None
        assert not registry.has_key("a")
        assert "a" not in registry
        assert len(registry) == 0

        send = await registry.register("a")

        assert isinstance(send, trio.MemorySendChannel)
        assert tracker.activated["a"] == 1  # ready: start-up finished before register returned
        assert registry.get("a") is send
        assert registry.has_key("a")
        assert "a" in registry
        assert len(registry) == 1
        assert list(registry) == ["a"]
        assert registry.keys() == ["a"]
        assert await registry.call("a", ("whoami",)) == ("a", 1)

        await registry.register(("b", 2))
        assert sorted(map(repr, registry)) == sorted([repr("a"), repr(("b", 2))])
        assert len(registry) == 2
        assert registry.statistics().live == 2


async def test_iteration_is_a_snapshot_of_live_keys() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        for key in range(3):
            await registry.register(key)
        seen = []
        for key in registry:
            seen.append(key)
            await registry.register(key + 100)  # checkpoints and grows the registry
        assert sorted(seen) == [0, 1, 2]
        assert len(registry) == 6


async def test_lookups_never_checkpoint() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        send = await registry.register("a")
        with trio.testing.assert_no_checkpoints():
            assert registry.get("a") is send
            assert registry.get("missing") is None
            assert registry.has_key("a")
            assert not registry.has_key("missing")
            assert "a" in registry
            assert "missing" not in registry
            assert len(registry) == 1
            assert list(registry) == ["a"]
            assert registry.statistics().live == 1


async def test_register_of_a_taken_key_raises_and_starts_no_second_task() -> None:
    tracker = Tracker()
    other = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        send = await registry.register("a")

        with pytest.raises(KeyAlreadyRegistered) as excinfo:
            await registry.register("a")
        assert excinfo.value.key == "a"
        assert excinfo.value.existing is send
        assert isinstance(excinfo.value, TrioAggregatesError)

        with pytest.raises(KeyAlreadyRegistered) as excinfo:
            await registry.register("a", make_aggregate(other))
        assert excinfo.value.existing is send

        await trio.testing.wait_all_tasks_blocked()
        assert tracker.entered["a"] == 1  # one task ever ran for "a"
        assert tracker.running["a"] == 1
        assert other.entered["a"] == 0  # the other function never ran
        assert registry.get("a") is send  # the live one is untouched
        assert await registry.call("a", ("whoami",)) == ("a", 1)
        assert registry.statistics().activations == 1


async def test_register_with_an_explicit_function_or_the_default() -> None:
    default = Tracker()
    explicit = Tracker()
    async with open_registry(make_aggregate(default, tag="default")) as registry:
        await registry.register("d")
        await registry.register("e", make_aggregate(explicit, tag="explicit"))
        await registry.call("d", "to d")
        await registry.call("e", "to e")
    assert default.received == [("d", 1, "to d")]
    assert explicit.received == [("e", 1, "to e")]
    assert default.entered == Counter({"d": 1})
    assert explicit.entered == Counter({"e": 1})


async def test_without_any_aggregate_function() -> None:
    tracker = Tracker()
    async with open_registry() as registry:
        with pytest.raises(TypeError):
            await registry.register("a")
        with pytest.raises(AggregateNotFound) as excinfo:
            await registry.ensure("a")
        assert excinfo.value.key == "a"
        with pytest.raises(AggregateNotFound):
            await registry.call("a", "hello")
        assert len(registry) == 0
        assert registry.statistics().starting == 0

        # An explicit function works, and then ensure and call find it.
        send = await registry.register("a", make_aggregate(tracker))
        assert await registry.ensure("a") is send
        assert await registry.call("a", ("reply", 7)) == 7
        assert tracker.entered["a"] == 1


# -- start-up outcomes ------------------------------------------------------------------


async def test_declined_startup(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker, startup="decline")) as registry:
        with pytest.raises(AggregateDeclined) as excinfo:
            await registry.register("a")
        assert excinfo.value.key == "a"
        assert isinstance(excinfo.value, TrioAggregatesError)
        assert "a" not in registry
        assert registry.get("a") is None
        assert len(registry) == 0

        with pytest.raises(AggregateDeclined):
            await registry.ensure("a")
        with pytest.raises(AggregateDeclined):
            await registry.call("a", "hello")

        stats = registry.statistics()
        assert stats.declined == 3
        assert stats.activations == 0
        assert stats.live == stats.starting == 0
        assert tracker.entered["a"] == 3
        assert tracker.running["a"] == 0  # each declining task has ended
    assert caplog.records == []  # declining is not an error: nothing logged


async def test_startup_raises(caplog: pytest.LogCaptureFixture) -> None:
    good = Tracker()
    bad = Tracker()
    original = Boom("cannot load state")
    async with open_registry(make_aggregate(good)) as registry:
        sibling = await registry.register("sibling")

        with pytest.raises(AggregateStartError) as excinfo:
            await registry.register(
                "a", make_aggregate(bad, startup="fail", startup_error=original)
            )
        assert excinfo.value.__cause__ is original
        assert excinfo.value.key == "a"
        assert isinstance(excinfo.value, TrioAggregatesError)
        assert not isinstance(excinfo.value, BaseExceptionGroup)

        # Nothing registered, the task is gone, the registry and its siblings carry on.
        assert "a" not in registry
        assert bad.running["a"] == 0
        assert not registry.closed
        assert registry.get("sibling") is sibling
        assert await registry.call("sibling", ("whoami",)) == ("sibling", 1)
        assert await registry.call("a", ("whoami",)) == ("a", 1)  # the default starts fine
        stats = registry.statistics()
        assert stats.start_failures == 1
        assert stats.activations == 2
        assert stats.crashes == 0
    assert good.entered == Counter({"sibling": 1, "a": 1})


@pytest.mark.parametrize("operation", ["register", "ensure", "call"])
async def test_cancelled_during_slow_startup_leaves_nothing(
    operation: str, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker, startup_delay=10)) as registry:
        start = trio.current_time()
        with trio.move_on_after(3) as scope:
            if operation == "register":
                await registry.register("a")
            elif operation == "ensure":
                await registry.ensure("a")
            else:
                await registry.call("a", "hello")
        assert scope.cancelled_caught
        assert trio.current_time() == start + 3
        assert "a" not in registry
        assert tracker.entered["a"] == 1
        assert tracker.running["a"] == 0  # the aggregate's finally ran: no task left
        assert tracker.finished == ["a"]
        assert tracker.activated["a"] == 0
        stats = registry.statistics()
        assert (stats.live, stats.starting, stats.activations) == (0, 0, 0)

        # The key is free: a new start-up succeeds.
        await registry.register("a")
        assert trio.current_time() == start + 13
        assert tracker.activated["a"] == 1


# -- ensure -------------------------------------------------------------------------------


async def test_many_concurrent_ensures_make_one_activation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(make_aggregate(tracker, startup_delay=1)) as registry:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(capture, results, registry.ensure, "k")
            await trio.testing.wait_all_tasks_blocked()
            assert registry.statistics().starting == 1
            assert "k" not in registry  # not before the start-up finished
        sends = [r.unwrap() for r in results]
        assert len(sends) == 50
        assert all(s is sends[0] for s in sends)
        assert registry.get("k") is sends[0]
        assert tracker.entered["k"] == 1
        assert tracker.max_live["k"] == 1
        assert registry.statistics().activations == 1


@pytest.mark.parametrize("first", ["ensure", "register"])
async def test_concurrent_ensure_and_register_on_one_key(
    first: str, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker, startup_delay=1)) as registry:
        ensured: list[outcome.Outcome[Any]] = []
        registered: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            if first == "ensure":
                nursery.start_soon(capture, ensured, registry.ensure, "k")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(capture, registered, registry.register, "k")
            else:
                nursery.start_soon(capture, registered, registry.register, "k")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(capture, ensured, registry.ensure, "k")
        assert tracker.entered["k"] == 1
        send = registry.get("k")
        assert send is not None
        assert ensured[0].unwrap() is send
        if first == "ensure":
            with pytest.raises(KeyAlreadyRegistered) as excinfo:
                registered[0].unwrap()
            assert excinfo.value.existing is send
        else:
            assert registered[0].unwrap() is send


@pytest.mark.parametrize("startup", ["fail", "decline"])
async def test_ensure_waiters_all_get_the_startup_error(
    startup: str, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = Tracker()
    original = Boom("no")
    aggregate = make_aggregate(tracker, startup=startup, startup_delay=1, startup_error=original)
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(aggregate) as registry:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(capture, results, registry.ensure, "k")
        assert len(results) == 10
        expected = AggregateStartError if startup == "fail" else AggregateDeclined
        for result in results:
            assert isinstance(result, outcome.Error)
            assert type(result.error) is expected
            assert result.error.key == "k"
            if startup == "fail":
                assert result.error.__cause__ is original
        assert tracker.entered["k"] == 1  # one start-up, shared by every waiter
        assert "k" not in registry
        assert registry.statistics().starting == 0


async def test_cancelled_starter_does_not_disturb_the_other_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    startup_began = trio.Event()
    aggregate = make_aggregate(tracker, startup_delay=5, startup_started=startup_began)
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(aggregate) as registry:
        async with trio.open_nursery() as nursery:
            starter = trio.CancelScope()

            async def first() -> None:
                with starter:
                    await registry.ensure("k")

            nursery.start_soon(first)
            await startup_began.wait()
            for _ in range(10):
                nursery.start_soon(capture, results, registry.ensure, "k")
            await trio.testing.wait_all_tasks_blocked()
            t_cancel = trio.current_time()
            starter.cancel()
        assert starter.cancelled_caught
        assert len(results) == 10
        sends = [r.unwrap() for r in results]
        assert all(s is sends[0] for s in sends)
        assert registry.get("k") is sends[0]
        assert tracker.entered["k"] == 2  # the cancelled start-up, then one more
        assert tracker.activated["k"] == 1
        assert tracker.running["k"] == 1
        assert trio.current_time() == t_cancel + 5


# -- call ---------------------------------------------------------------------------------


async def test_call_returns_the_reply() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        assert await registry.call("a", ("reply", {"x": 1})) == {"x": 1}
        assert await registry.call("a", ("reply", None)) is None
        assert tracker.entered["a"] == 1  # call activated it once, then reused it


async def test_call_fail_raises_the_exception_in_the_caller() -> None:
    tracker = Tracker()
    error = KeyError("nope")
    async with open_registry(make_aggregate(tracker)) as registry:
        with pytest.raises(KeyError) as excinfo:
            await registry.call("a", ("fail", error))
        assert excinfo.value is error
        # The aggregate is still alive and serving.
        assert await registry.call("a", ("whoami",)) == ("a", 1)
        assert registry.statistics().crashes == 0


async def test_call_timeout_at_the_exact_deadline(autojump_clock: trio.testing.MockClock) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        await registry.ensure("a")
        start = trio.current_time()
        with pytest.raises(CallTimeout) as excinfo:
            await registry.call("a", ("sleep", 10, "late"), timeout=3)
        assert trio.current_time() == start + 3
        assert isinstance(excinfo.value, trio.TooSlowError)
        assert isinstance(excinfo.value, TrioAggregatesError)
        # The late answer is dropped without harm; the aggregate carries on.
        assert await registry.call("a", ("whoami",)) == ("a", 1)
        assert trio.current_time() == start + 10
        assert ("handled", "a", "late", start + 10) in tracker.notes
        assert registry.statistics().crashes == 0
        # An answer within the timeout is returned.
        assert await registry.call("a", ("sleep", 2, "quick"), timeout=3) == "quick"


async def test_call_timeout_counts_the_activation(autojump_clock: trio.testing.MockClock) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker, startup_delay=10)) as registry:
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await registry.call("a", "hello", timeout=4)
        assert trio.current_time() == start + 4
        assert "a" not in registry
        assert tracker.running["a"] == 0


async def test_cancelled_caller_is_withdrawn(autojump_clock: trio.testing.MockClock) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        with trio.move_on_after(2) as scope:
            await registry.call("a", ("hold",))
        assert scope.cancelled_caught
        [held] = tracker.held
        assert held.abandoned
        assert not held.answered
        held.reply("too late")  # no error: the answer is dropped
        assert held.answered
        assert await registry.call("a", ("whoami",)) == ("a", 1)
        assert registry.statistics().crashes == 0


async def test_answering_twice_raises_call_already_answered() -> None:
    call = Call("m")
    assert call.message == "m"
    assert not call.answered
    call.reply(1)
    assert call.answered
    with pytest.raises(CallAlreadyAnswered):
        call.reply(2)
    with pytest.raises(CallAlreadyAnswered):
        call.fail(Boom())

    failed = Call("n")
    failed.fail(Boom())
    with pytest.raises(CallAlreadyAnswered):
        failed.reply(1)
    with pytest.raises(TypeError):
        Call("o").fail("not an exception")


async def test_answering_twice_inside_an_aggregate() -> None:
    seen: list[BaseException] = []

    async def twice(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        async for call in mailbox:
            call.reply("first")
            try:
                call.reply("second")
            except CallAlreadyAnswered as exc:
                seen.append(exc)

    async with open_registry(twice) as registry:
        assert await registry.call("a", None) == "first"
    assert len(seen) == 1
    assert isinstance(seen[0], TrioAggregatesError)


async def test_reply_and_fail_never_checkpoint() -> None:
    proved: list[str] = []

    async def answerer(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        async for call in mailbox:
            with trio.testing.assert_no_checkpoints():
                if call.message == "fail":
                    call.fail(Boom("failed"))
                else:
                    call.reply("ok")
            proved.append(call.message)

    async with open_registry(answerer) as registry:
        assert await registry.call("a", "reply") == "ok"
        with pytest.raises(Boom):
            await registry.call("a", "fail")
    assert proved == ["reply", "fail"]


async def test_call_wait_on_a_call_put_in_by_hand() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        send = await registry.ensure("a")
        call = Call(("reply", 5))
        await send.send(call)
        assert await call.wait() == 5


# -- re-routing ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["return", "aclose"])
async def test_calls_queued_behind_an_ending_aggregate_go_to_a_fresh_activation(how: str) -> None:
    tracker = Tracker()
    release = trio.Event()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(make_aggregate(tracker)) as registry:
        await registry.ensure("k")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                capture, results, registry.call, "k", ("wait", release, (how, "bye"))
            )
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(5):
                nursery.start_soon(capture, results, registry.call, "k", ("whoami",))
            await trio.testing.wait_all_tasks_blocked()
            assert registry.statistics().mailbox_backlog == 5
            release.set()
        assert results[0].unwrap() == "bye"
        assert [r.unwrap() for r in results[1:]] == [("k", 2)] * 5
        assert tracker.entered["k"] == 2
        assert tracker.max_live["k"] == 1
        stats = registry.statistics()
        assert (stats.activations, stats.normal_ends, stats.crashes) == (2, 1, 0)


async def test_a_stale_send_end_fails_fast(autojump_clock: trio.testing.MockClock) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        send = await registry.ensure("k")
        assert await registry.call("k", ("return", "bye")) == "bye"
        assert "k" not in registry
        with pytest.raises(trio.BrokenResourceError):
            send.send_nowait("hello")
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            await send.send("hello")
        assert trio.current_time() == start
        # The registry's own call helper goes to a fresh activation.
        assert await registry.call("k", ("whoami",)) == ("k", 2)
        assert registry.get("k") is not send


async def test_raw_messages_queued_at_a_crash_are_redelivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = Tracker()
    release = trio.Event()
    async with open_registry(make_aggregate(tracker)) as registry:
        send = await registry.ensure("k")
        async with trio.open_nursery() as nursery:
            crashed: list[outcome.Outcome[Any]] = []
            nursery.start_soon(
                capture, crashed, registry.call, "k", ("wait", release, ("crash", Boom("x")))
            )
            await trio.testing.wait_all_tasks_blocked()
            send.send_nowait("r1")
            send.send_nowait(("reply", "r2"))
            send.send_nowait("r3")
            release.set()
        with pytest.raises(AggregateCrashed):
            crashed[0].unwrap()
        await trio.testing.wait_all_tasks_blocked()
        assert len(tracker.messages("k", 1)) == 1  # the crashing message only
        assert tracker.messages("k", 2) == ["r1", ("reply", "r2"), "r3"]
        assert registry.get("k") is not send


async def test_leftovers_go_to_a_fresh_activation_of_the_same_function(
    caplog: pytest.LogCaptureFixture,
) -> None:
    default = Tracker()
    explicit = Tracker()
    release = trio.Event()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(make_aggregate(default)) as registry:
        send = await registry.register("k", make_aggregate(explicit))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                capture, results, registry.call, "k", ("wait", release, ("crash", Boom()))
            )
            await trio.testing.wait_all_tasks_blocked()
            send.send_nowait("raw")
            nursery.start_soon(capture, results, registry.call, "k", ("whoami",))
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(AggregateCrashed):
            results[0].unwrap()
        assert results[1].unwrap() == ("k", 2)
        assert explicit.messages("k", 2) == ["raw", ("whoami",)]
        assert default.entered["k"] == 0  # not the registry's default function


# -- crashes -------------------------------------------------------------------------------


async def test_crash_answers_the_caller_and_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker()
    original = Boom("kaput")
    async with open_registry(make_aggregate(tracker)) as registry:
        sibling = await registry.ensure("sibling")
        await registry.ensure("victim")

        with pytest.raises(AggregateCrashed) as excinfo:
            await registry.call("victim", ("crash", original))
        assert excinfo.value.__cause__ is original
        assert excinfo.value.key == "victim"
        assert isinstance(excinfo.value, TrioAggregatesError)

        assert "victim" not in registry
        assert not registry.closed
        assert registry.get("sibling") is sibling
        assert await registry.call("sibling", ("whoami",)) == ("sibling", 1)
        assert await registry.call("victim", ("whoami",)) == ("victim", 2)
        assert registry.statistics().crashes == 1

    [record] = warnings_from_registry(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "'victim'" in message
    assert "kaput" in message
    assert record.exc_info is not None and record.exc_info[1] is original


@pytest.mark.parametrize("how", ["crash", "return"])
async def test_key_is_gone_before_any_other_task_runs(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker()
    ending = trio.Event()
    seen_by_watcher: list[tuple[bool, Any]] = []
    async with open_registry(make_aggregate(tracker)) as registry:
        tracker.registry = registry
        send = await registry.ensure("k")

        async def watcher() -> None:
            await ending.wait()
            # The first thing this task does once it runs again.
            seen_by_watcher.append(("k" in registry, registry.get("k")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            await trio.testing.wait_all_tasks_blocked()
            # The aggregate wakes the watcher, then ends without a checkpoint.
            message = ("crash", Boom("x"), ending) if how == "crash" else ("return", 1, ending)
            send.send_nowait(message)
        assert seen_by_watcher == [(False, None)]
        assert tracker.running["k"] == 0


async def test_calls_queued_behind_a_crash_are_rerouted(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker()
    release = trio.Event()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(make_aggregate(tracker)) as registry:
        await registry.ensure("k")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                capture, results, registry.call, "k", ("wait", release, ("crash", Boom("x")))
            )
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(4):
                nursery.start_soon(capture, results, registry.call, "k", ("whoami",))
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        with pytest.raises(AggregateCrashed):
            results[0].unwrap()
        assert [r.unwrap() for r in results[1:]] == [("k", 2)] * 4
        assert tracker.entered["k"] == 2
        assert tracker.max_live["k"] == 1


async def test_returning_without_answering_gives_aggregate_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        with pytest.raises(AggregateGone) as excinfo:
            await registry.call("k", ("noanswer",))
        assert excinfo.value.key == "k"
        assert "k" not in registry
        stats = registry.statistics()
        assert (stats.normal_ends, stats.crashes) == (1, 0)
    assert warnings_from_registry(caplog) == []  # a normal end is not a warning


async def test_crash_with_an_exception_group_is_wrapped(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker()
    group = ExceptionGroup("inner nursery", [Boom("a"), Boom("b")])
    async with open_registry(make_aggregate(tracker)) as registry:
        with pytest.raises(AggregateCrashed) as excinfo:
            await registry.call("k", ("crash", group))
        assert excinfo.value.__cause__ is group
        assert await registry.call("k", ("whoami",)) == ("k", 2)


# -- idle timeout and passivation -------------------------------------------------------


async def test_registry_idle_timeout_passivates_at_the_exact_time(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker), idle_timeout=10) as registry:
        tracker.registry = registry
        await registry.ensure("k")
        await trio.sleep(4)
        await registry.call("k", ("reply", 1))
        last = trio.current_time()
        await trio.sleep_until(last + 10 - 0.001)
        assert "k" in registry
        await trio.sleep_until(last + 10 + 0.001)
        assert "k" not in registry
        [end] = tracker.loop_ends
        assert end.time == last + 10
        assert end.passivated  # the loop ended for idleness ...
        assert not end.key_present  # ... with the key already gone
        assert tracker.running["k"] == 0  # the idle hook ran and the aggregate returned
        assert registry.statistics().passivations == 1
        # The next message activates a fresh one.
        assert await registry.call("k", ("whoami",)) == ("k", 2)
    assert warnings_from_registry(caplog) == []


async def test_register_overrides_the_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker), idle_timeout=100) as registry:
        start = trio.current_time()
        await registry.register("short", idle_timeout=5)
        await registry.register("never", idle_timeout=None)
        await registry.register("default")
        await trio.sleep(1000)
        ends = {e.key: e.time for e in tracker.loop_ends}
        assert ends == {"short": start + 5, "default": start + 100}
        assert list(registry) == ["never"]


async def test_register_idle_timeout_without_registry_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        start = trio.current_time()
        await registry.register("short", idle_timeout=5)
        await registry.ensure("forever")
        await trio.sleep(1000)
        assert [(e.key, e.time, e.passivated) for e in tracker.loop_ends] == [
            ("short", start + 5, True)
        ]
        assert list(registry) == ["forever"]


async def test_aggregate_sets_its_idle_timeout_in_startup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker, set_idle_timeout=3)) as registry:
        start = trio.current_time()
        await registry.ensure("k")
        assert registry.get("k") is not None
        await trio.sleep(100)
        assert [(e.time, e.passivated) for e in tracker.loop_ends] == [(start + 3, True)]
        assert "k" not in registry


async def test_aggregate_shortens_its_idle_timeout_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def shortener(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        async for call in mailbox:
            mailbox.idle_timeout = call.message
            call.reply(None)
        ended.append(trio.current_time())

    ended: list[float] = []
    async with open_registry(shortener, idle_timeout=100) as registry:
        await registry.call("k", 1)
        start = trio.current_time()
        await trio.sleep(200)
    assert ended == [start + 1]


@pytest.mark.parametrize("kind", ["call", "raw"])
async def test_every_message_rearms_the_idle_timer(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker), idle_timeout=8) as registry:
        send = await registry.ensure("k")
        start = trio.current_time()
        for at in (5, 10, 15):
            await trio.sleep_until(start + at)
            if kind == "call":
                await registry.call("k", ("reply", at))
            else:
                await send.send(("raw", at))
        await trio.sleep_until(start + 23 - 0.001)
        assert registry.get("k") is send
        await trio.sleep_until(start + 23 + 0.001)
        assert "k" not in registry
        assert [e.time for e in tracker.loop_ends] == [start + 23]
        assert len(tracker.messages("k", 1)) == 3


async def test_busy_aggregate_is_not_passivated_mid_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker), idle_timeout=5) as registry:
        await registry.ensure("k")
        start = trio.current_time()
        assert await registry.call("k", ("sleep", 20, "done")) == "done"
        assert trio.current_time() == start + 20
        assert "k" in registry
        await trio.sleep(100)
        [end] = tracker.loop_ends
        assert (end.time, end.passivated) == (start + 25, True)


async def test_calls_racing_with_passivation_get_exactly_one_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Callers wake at the very instant the idle deadline falls.

    Trio runs the reaper and the callers of one instant in varying orders, so over
    the rounds some calls land just before the passivation (no passivation) and some
    just after it (a fresh activation takes them). Rounds alternate between one caller
    (an even race) and twenty.
    """
    tracker = Tracker()
    answers: list[outcome.Outcome[Any]] = []
    expected: list[int] = []
    rounds = 40
    async with open_registry(make_aggregate(tracker), idle_timeout=10) as registry:
        for round_ in range(rounds):
            await registry.ensure("k")
            deadline = trio.current_time() + 10

            async def at_deadline(n: int, deadline: float = deadline) -> None:
                await trio.sleep_until(deadline)
                answers.append(await outcome.acapture(registry.call, "k", ("reply", n)))

            async with trio.open_nursery() as nursery:
                for n in range(1 if round_ % 2 == 0 else 20):
                    expected.append(round_ * 100 + n)
                    nursery.start_soon(at_deadline, round_ * 100 + n)
            assert trio.current_time() == deadline
        assert len(answers) == len(expected)
        assert sorted(a.unwrap() for a in answers) == expected
        assert tracker.max_live["k"] == 1
        stats = registry.statistics()
        assert stats.crashes == 0
        # Every message received was answered once: none was taken by a passivating aggregate.
        assert len(tracker.received) == len(expected)
    # Both orders happened: sometimes the reaper ran first (a passivation, then a fresh
    # activation took the calls), sometimes the callers did (no passivation that round).
    assert 0 < stats.passivations < rounds
    assert stats.activations == stats.passivations + 1


# -- shutdown ----------------------------------------------------------------------------


async def test_leaving_the_block_ends_every_aggregate() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        for key in range(10):
            await registry.ensure(key)
        assert tracker.running.total() == 10
    assert sorted(tracker.finished) == list(range(10))
    assert no_tasks_left(tracker)
    assert len(registry) == 0
    stats = registry.statistics()
    assert (stats.live, stats.normal_ends, stats.closed) == (0, 10, True)
    assert registry.closed


async def test_shutdown_finishes_the_message_in_hand_and_closes_queued_calls(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker()
    queued: list[outcome.Outcome[Any]] = []
    async with trio.open_nursery() as outer:
        async with open_registry(make_aggregate(tracker)) as registry:
            send = await registry.ensure("k")
            send.send_nowait(("sleep", 3, "in hand"))  # a raw message: no caller to answer
            await trio.testing.wait_all_tasks_blocked()
            for n in range(3):
                outer.start_soon(capture, queued, registry.call, "k", ("reply", n))
            await trio.testing.wait_all_tasks_blocked()
            assert registry.statistics().mailbox_backlog == 3
            start = trio.current_time()
        assert trio.current_time() == start + 3  # the block waited for the message in hand
    assert ("handled", "k", "in hand", start + 3) in tracker.notes
    assert len(queued) == 3
    for result in queued:
        with pytest.raises(RegistryClosed):
            result.unwrap()
    assert no_tasks_left(tracker)
    assert warnings_from_registry(caplog) == []


async def test_shutdown_lets_the_call_in_hand_be_answered(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker()
    in_hand: list[outcome.Outcome[Any]] = []
    queued: list[outcome.Outcome[Any]] = []
    async with trio.open_nursery() as outer:
        async with open_registry(make_aggregate(tracker)) as registry:
            await registry.ensure("k")
            outer.start_soon(capture, in_hand, registry.call, "k", ("sleep", 3, "in hand"))
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(capture, queued, registry.call, "k", ("reply", "queued"))
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
        assert trio.current_time() == start + 3
    assert in_hand[0].unwrap() == "in hand"  # the caller gets the aggregate's own answer
    with pytest.raises(RegistryClosed):
        queued[0].unwrap()
    assert warnings_from_registry(caplog) == []
    stats = registry.statistics()
    assert (stats.crashes, stats.normal_ends) == (0, 1)
    assert no_tasks_left(tracker)


async def test_aclose_lets_the_call_in_hand_be_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        assert await registry.call("k", ("aclose-then-reply", "bye")) == "bye"
        assert registry.statistics().crashes == 0


@pytest.mark.parametrize("shutdown_timeout", [None, 7.0])
async def test_stubborn_aggregate_is_cancelled_after_the_grace_period(
    shutdown_timeout: float | None, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = Tracker()
    kwargs: dict[str, Any] = {}
    if shutdown_timeout is not None:
        kwargs["shutdown_timeout"] = shutdown_timeout
    grace = 5.0 if shutdown_timeout is None else shutdown_timeout  # 5 s is the default
    async with open_registry(make_aggregate(tracker, stubborn=True), **kwargs) as registry:
        await registry.ensure("stubborn")
        start = trio.current_time()
    assert trio.current_time() == start + grace
    assert tracker.finished == ["stubborn"]
    assert no_tasks_left(tracker)


async def test_startup_in_flight_at_shutdown_is_bounded_by_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    results: list[outcome.Outcome[Any]] = []
    async with trio.open_nursery() as outer:
        async with open_registry(
            make_aggregate(tracker, startup_delay=100), shutdown_timeout=5
        ) as registry:
            outer.start_soon(capture, results, registry.ensure, "k")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
        assert trio.current_time() == start + 5
    with pytest.raises(RegistryClosed):
        results[0].unwrap()


async def test_calls_after_the_block_raise_registry_closed() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        send = await registry.ensure("k")
    assert registry.closed
    with pytest.raises(RegistryClosed):
        await registry.call("k", "hello")
    with pytest.raises(RegistryClosed):
        await registry.ensure("k")
    with pytest.raises(RegistryClosed):
        await registry.register("k")
    assert registry.get("k") is None
    assert len(registry) == 0
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait("hello")
    assert tracker.entered["k"] == 1


async def test_an_exception_in_the_body_propagates_unchanged() -> None:
    tracker = Tracker()
    error = ValueError("from the body")
    with pytest.raises(ValueError) as excinfo:
        async with open_registry(make_aggregate(tracker)) as registry:
            await registry.ensure("k")
            raise error
    assert excinfo.value is error
    assert no_tasks_left(tracker)
    assert tracker.finished == ["k"]


async def test_body_exception_while_an_aggregate_crashes(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker()
    error = ValueError("from the body")
    with pytest.raises(ValueError) as excinfo:
        async with open_registry(make_aggregate(tracker)) as registry:
            send = await registry.ensure("k")
            send.send_nowait(("crash", Boom("at the same time")))
            raise error
    assert excinfo.value is error


async def test_cancelling_the_block_from_outside(autojump_clock: trio.testing.MockClock) -> None:
    tracker = Tracker()
    with trio.move_on_after(5) as scope:
        async with open_registry(make_aggregate(tracker)) as registry:
            await registry.ensure("k")
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == 5  # cancelled at once, no grace period
    assert no_tasks_left(tracker)
    assert tracker.finished == ["k"]


async def test_cancelling_the_block_from_outside_with_no_aggregates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.move_on_after(5) as scope:
        async with open_registry() as registry:
            assert len(registry) == 0
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == 5


# -- backpressure ---------------------------------------------------------------------------


async def test_a_full_mailbox_makes_senders_wait() -> None:
    tracker = Tracker()
    release = trio.Event()
    async with open_registry(make_aggregate(tracker), mailbox_size=1) as registry:
        send = await registry.ensure("k")
        send.send_nowait(("wait", release, "first"))  # taken at once: the aggregate is busy
        await trio.testing.wait_all_tasks_blocked()
        send.send_nowait("second")  # fills the one slot
        with pytest.raises(trio.WouldBlock):
            send.send_nowait("third")
        assert registry.statistics().mailbox_backlog == 1

        done: list[str] = []
        answers: list[outcome.Outcome[Any]] = []

        async def sender() -> None:
            await send.send("third")
            done.append("sent")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(capture, answers, registry.call, "k", ("reply", "called"))
            await trio.testing.wait_all_tasks_blocked()
            assert done == []  # both are waiting for space
            assert answers == []
            assert send.statistics().tasks_waiting_send == 2
            release.set()
        assert done == ["sent"]
        assert answers[0].unwrap() == "called"
        received = tracker.messages("k", 1)
        assert received[1] == "second"  # FIFO: the queued one first, then the waiting senders
        assert sorted(map(repr, received[2:])) == sorted([repr("third"), repr(("reply", "called"))])


async def test_unbuffered_and_unbounded_mailboxes() -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker), mailbox_size=0) as registry:
        assert await registry.call("k", ("reply", 1)) == 1
    async with open_registry(make_aggregate(tracker), mailbox_size=math.inf) as registry:
        send = await registry.ensure("k")
        for n in range(1000):
            send.send_nowait(n)
        assert await registry.call("k", ("reply", "last")) == "last"


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [[1], {}, {1}], ids=["list", "dict", "set"])
async def test_unhashable_keys_raise_invalid_key(key: Any) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        await registry.ensure("ok")
        before = registry.statistics()
        operations: list[Callable[[], Any]] = [
            lambda: registry.get(key),
            lambda: registry.has_key(key),
            lambda: key in registry,
        ]
        for operation in operations:
            with pytest.raises(InvalidKey) as excinfo:
                operation()
            assert isinstance(excinfo.value, TypeError)
            assert isinstance(excinfo.value, TrioAggregatesError)
        async_operations: list[Callable[[], Awaitable[Any]]] = [
            lambda: registry.register(key),
            lambda: registry.ensure(key),
            lambda: registry.call(key, "hello"),
            lambda: registry.call(key, "hello", timeout=1),
        ]
        for async_operation in async_operations:
            with pytest.raises(InvalidKey):
                await async_operation()
        assert registry.statistics() == before
        assert list(registry) == ["ok"]
        assert tracker.entered == Counter({"ok": 1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mailbox_size": -1},
        {"mailbox_size": 1.5},
        {"mailbox_size": math.nan},
        {"idle_timeout": 0},
        {"idle_timeout": -1},
        {"idle_timeout": math.nan},
    ],
)
async def test_bad_registry_arguments_raise_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        async with open_registry(**kwargs):
            pytest.fail("the block must not run")  # pragma: no cover


@pytest.mark.parametrize("idle_timeout", [0, -5, math.nan])
async def test_bad_idle_timeout_per_aggregate_raises_value_error(idle_timeout: float) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        with pytest.raises(ValueError):
            await registry.register("k", idle_timeout=idle_timeout)
        assert tracker.entered["k"] == 0

        errors: list[BaseException] = []

        async def setter(
            key: Any,
            mailbox: Mailbox,
            *,
            task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            try:
                mailbox.idle_timeout = idle_timeout
            except ValueError as exc:
                errors.append(exc)
            task_status.started()

        await registry.register("s", setter)
        assert len(errors) == 1


# -- statistics ---------------------------------------------------------------------------


async def test_statistics_count_every_outcome(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker()
    release = trio.Event()
    async with open_registry(make_aggregate(tracker)) as registry:
        stats = registry.statistics()
        assert isinstance(stats, RegistryStatistics)
        assert stats == RegistryStatistics(
            live=0,
            starting=0,
            winding_down=0,
            activations=0,
            normal_ends=0,
            crashes=0,
            passivations=0,
            declined=0,
            start_failures=0,
            mailbox_backlog=0,
            closed=False,
        )
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            stats.live = 5  # type: ignore[misc]

        with pytest.raises(AggregateDeclined):
            await registry.register("declines", make_aggregate(tracker, startup="decline"))
        with pytest.raises(AggregateStartError):
            await registry.register(
                "fails", make_aggregate(tracker, startup="fail", startup_error=Boom())
            )
        with pytest.raises(AggregateCrashed):
            await registry.call("crashes", ("crash", Boom()))
        await registry.call("returns", ("return", None))
        await registry.register("idles", idle_timeout=1)
        await trio.sleep(2)
        send = await registry.ensure("busy")
        send.send_nowait(("wait", release, "x"))
        send.send_nowait("queued 1")
        send.send_nowait("queued 2")
        await registry.ensure("quiet")
        await trio.testing.wait_all_tasks_blocked()

        stats = registry.statistics()
        assert stats == RegistryStatistics(
            live=2,
            starting=0,
            winding_down=0,
            activations=5,
            normal_ends=1,
            crashes=1,
            passivations=1,
            declined=1,
            start_failures=1,
            mailbox_backlog=2,
            closed=False,
        )
        assert stats.activations == (
            stats.live + stats.winding_down + stats.normal_ends + stats.crashes + stats.passivations
        )
        release.set()
    stats = registry.statistics()
    assert (stats.live, stats.normal_ends, stats.mailbox_backlog, stats.closed) == (0, 3, 0, True)


def test_public_names_are_exported() -> None:
    for name in ["Registry", "Call", "Mailbox", "RegistryStatistics", "AggregateFunction"]:
        assert hasattr(trio_aggregates, name)
    # Functions and exceptions show as trio_aggregates.X, as trio's do.
    assert open_registry.__module__ == "trio_aggregates"
    for error in [
        TrioAggregatesError,
        KeyAlreadyRegistered,
        AggregateDeclined,
        AggregateStartError,
        AggregateCrashed,
        AggregateGone,
        RegistryClosed,
        CallTimeout,
        InvalidKey,
        CallAlreadyAnswered,
        AggregateNotFound,
    ]:
        assert error.__module__ == "trio_aggregates"
        assert issubclass(error, TrioAggregatesError)
    assert issubclass(InvalidKey, TypeError)
    assert issubclass(CallTimeout, trio.TooSlowError)


async def test_leftovers_of_a_crash_go_before_later_callers() -> None:
    """The fresh start-up for the leftovers is reserved at once: a caller who
    arrives right after the crash queues behind them, whichever task Trio
    happens to run first (Trio randomises the order, hence 20 rounds)."""
    for _ in range(20):
        order, answers = await _crash_with_leftovers_and_a_late_caller()
        assert order == ["q0", "q1", "q2", "late"]
        assert sorted(map(str, answers)) == ["late", "q0", "q1", "q2"]


async def _crash_with_leftovers_and_a_late_caller() -> tuple[list[str], list[object]]:
    order: list[str] = []
    answers: list[object] = []

    async def recorder(
        key: object, mailbox: Mailbox, *, task_status: trio.TaskStatus[None]
    ) -> None:
        task_status.started()
        async for message in mailbox:
            assert isinstance(message, Call)
            if message.message == "crash":
                raise RuntimeError("crash")
            order.append(message.message)
            message.reply(message.message)

    async with open_registry(recorder) as registry:
        send = await registry.ensure("k")
        calls = [Call(name) for name in ("crash", "q0", "q1", "q2")]
        for call in calls:
            send.send_nowait(call)

        async def late_caller() -> None:
            with pytest.raises(AggregateCrashed):
                await calls[0].wait()
            # Woken by the crash itself: before the re-delivery has run.
            answers.append(await registry.call("k", "late"))

        async def queued(call: Call) -> None:
            answers.append(await call.wait())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_caller)
            for call in calls[1:]:
                nursery.start_soon(queued, call)
    return order, answers


# -- issue 8: one task per key, every call answered once, withdrawn calls, Ctrl-C, bad keys --


class OneTaskPerKey:
    """Counts the aggregate tasks running per key, and the most ever at once."""

    def __init__(self) -> None:
        self.running: Counter[Any] = Counter()
        self.most: Counter[Any] = Counter()
        self.returned: list[tuple[Any, float]] = []

    def enter(self, key: Any) -> None:
        self.running[key] += 1
        self.most[key] = max(self.most[key], self.running[key])

    def leave(self, key: Any) -> None:
        self.running[key] -= 1
        self.returned.append((key, trio.current_time()))


def flushing_aggregate(tasks: OneTaskPerKey, flush: float) -> AggregateFunction:
    """The issue's reproduction: replies "ok", and flushes for ``flush`` seconds after its loop.

    A call ``"return"`` makes it leave its loop on its own (and flush too); a call
    ``"close"`` makes it close its mailbox first (the key leaves at once).
    """

    async def aggregate(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tasks.enter(key)
        try:
            task_status.started()
            async for message in mailbox:
                message.reply(("ok", message.message))
                if message.message == "close":
                    await mailbox.aclose()
                if message.message in ("return", "close"):
                    break
            await trio.sleep(flush)  # flush after the loop
        finally:
            tasks.leave(key)

    return aggregate


async def test_next_activation_waits_until_the_previous_task_has_returned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks = OneTaskPerKey()
    async with open_registry(flushing_aggregate(tasks, flush=5), idle_timeout=10) as registry:
        start = trio.current_time()
        assert await registry.call("k", 1) == ("ok", 1)
        await trio.sleep(12)  # passivated at +10, flushing until +15
        assert "k" not in registry
        assert await registry.call("k", 2) == ("ok", 2)
        assert trio.current_time() == start + 15  # the call waited for the flush
        assert tasks.returned == [("k", start + 15)]
        assert tasks.most["k"] == 1
        stats = registry.statistics()
        assert (stats.live, stats.winding_down, stats.passivations, stats.activations) == (
            1,
            0,
            1,
            2,
        )


@pytest.mark.parametrize("operation", ["call", "ensure", "register"])
async def test_every_way_in_waits_for_a_winding_down_aggregate(
    operation: str, autojump_clock: trio.testing.MockClock
) -> None:
    tasks = OneTaskPerKey()
    async with open_registry(flushing_aggregate(tasks, flush=5)) as registry:
        start = trio.current_time()
        assert await registry.call("k", "close") == ("ok", "close")  # leaves its loop, flushes
        assert "k" not in registry
        if operation == "call":
            assert await registry.call("k", 2) == ("ok", 2)
        elif operation == "ensure":
            await registry.ensure("k")
        else:
            await registry.register("k")
        assert trio.current_time() == start + 5
        assert tasks.most["k"] == 1
        assert registry.statistics().winding_down == 0


async def test_statistics_count_the_aggregates_winding_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks = OneTaskPerKey()
    async with open_registry(flushing_aggregate(tasks, flush=5), idle_timeout=10) as registry:
        for key in range(3):
            await registry.call(key, "hello")
        await registry.call("closes", "close")
        stats = registry.statistics()
        assert (stats.live, stats.winding_down, stats.activations) == (3, 1, 4)
        await trio.sleep(12)  # the three passivated at +10, flushing until +15
        stats = registry.statistics()
        assert (stats.live, stats.winding_down, stats.passivations) == (0, 3, 0)
        assert stats.activations == (
            stats.live + stats.winding_down + stats.normal_ends + stats.crashes + stats.passivations
        )
        await trio.sleep(5)
        stats = registry.statistics()
        assert (stats.live, stats.winding_down, stats.passivations, stats.normal_ends) == (
            0,
            0,
            3,
            1,
        )


async def test_a_call_timeout_counts_the_wait_for_a_winding_down_aggregate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks = OneTaskPerKey()
    async with open_registry(flushing_aggregate(tasks, flush=5)) as registry:
        await registry.call("k", "close")
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await registry.call("k", "late", timeout=2)
        assert trio.current_time() == start + 2
        assert tasks.most["k"] == 1
        # The withdrawn call never reaches the next activation.
        assert await registry.call("k", "next") == ("ok", "next")
        assert trio.current_time() == start + 5


async def test_calls_queued_behind_a_task_that_left_its_loop_wait_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks = OneTaskPerKey()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(flushing_aggregate(tasks, flush=5)) as registry:
        send = await registry.ensure("k")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture, results, registry.call, "k", "return")
            await trio.testing.wait_all_tasks_blocked()
            for n in range(3):
                nursery.start_soon(capture, results, registry.call, "k", n)
            await trio.testing.wait_all_tasks_blocked()
            assert registry.get("k") is None or registry.get("k") is send
        answers = [r.unwrap() for r in results]
        assert answers[0] == ("ok", "return")
        assert sorted(answers[1:]) == [("ok", 0), ("ok", 1), ("ok", 2)]  # queued in any order
        assert trio.current_time() == start + 5
        assert tasks.most["k"] == 1


async def test_healthy_calls_never_fail_under_passivation_churn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Many keys, a tiny idle timeout, and a machine that is slow at the worst moments.

    Right after ``started()`` an aggregate sometimes jumps the mock clock past its
    idle timeout before any other task runs: the reaper and the callers about to
    use the fresh aggregate then wake together, as on a loaded machine where the
    caller is scheduled late (the issue saw 178 of 1M calls fail so). Handlers and
    wind-downs take random times too. Every call must get its own answer: never
    AggregateGone, never a second task for a key.
    """
    rng = random.Random(8)
    idle = 0.01
    tasks = OneTaskPerKey()

    async def aggregate(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tasks.enter(key)
        try:
            if rng.random() < 0.3:
                await trio.sleep(rng.choice([idle / 2, idle]))
            task_status.started()
            if rng.random() < 0.5:
                autojump_clock.jump(2 * idle)  # slow: time passes before anyone else runs
            async for call in mailbox:
                if rng.random() < 0.2:
                    await trio.sleep(rng.choice([idle / 2, idle]))
                call.reply((key, call.message))
            if rng.random() < 0.5:
                await trio.sleep(rng.choice([idle / 2, idle, 2 * idle]))  # wind-down
        finally:
            tasks.leave(key)

    failures: list[BaseException] = []
    answered = 0

    async def client(n: int) -> None:
        nonlocal answered
        for i in range(100):
            key = rng.randrange(50)
            await trio.sleep(rng.choice([0, idle / 2, idle, 1.5 * idle, 3 * idle]))
            try:
                answer = await registry.call(key, (n, i))
            except Exception as exc:
                failures.append(exc)
            else:
                assert answer == (key, (n, i))
                answered += 1

    async with open_registry(aggregate, idle_timeout=idle) as registry:
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(client, n)
        stats = registry.statistics()
    assert failures == []
    assert answered == 40 * 100
    assert max(tasks.most.values()) == 1
    assert stats.passivations > 500  # plenty of churn
    assert stats.crashes == 0


async def test_a_cancelled_call_is_never_handed_to_the_aggregate() -> None:
    seen: list[Any] = []

    async def counter(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        total = 0
        task_status.started()
        async for message in mailbox:
            seen.append((message.message, message.abandoned))
            total += message.message
            message.reply(total)

    async with open_registry(counter) as registry:
        await registry.ensure("apples")
        with trio.move_on_after(0):
            await registry.call("apples", 5)
        assert await registry.call("apples", 0) == 0
        # The same while the call waits for an activation.
        with trio.move_on_after(0):
            await registry.call("pears", 5)
        assert await registry.call("pears", 0) == 0
        assert seen == [(0, False), (0, False)]
        assert registry.statistics().crashes == 0


async def test_cancelled_calls_queued_behind_a_busy_aggregate_are_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    release = trio.Event()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(make_aggregate(tracker)) as registry:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture, results, registry.call, "k", ("wait", release, "first"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(capture, results, registry.call, "k", ("reply", "kept"))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(CallTimeout):
                await registry.call("k", ("reply", "timed out"), timeout=1)
            with trio.move_on_after(1):
                await registry.call("k", ("reply", "cancelled"))
            assert registry.statistics().mailbox_backlog == 3  # still queued, but withdrawn
            release.set()
        assert [r.unwrap() for r in results] == ["first", "kept"]
        assert await registry.call("k", ("reply", "after")) == "after"
        assert tracker.messages("k", 1) == [
            ("wait", release, "first"),
            ("reply", "kept"),
            ("reply", "after"),
        ]


async def test_withdrawn_calls_are_skipped_by_receive_nowait_and_receive() -> None:
    async with open_registry() as registry:
        got: list[Any] = []
        release = trio.Event()

        async def manual(
            key: Any,
            mailbox: Mailbox,
            *,
            task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            task_status.started()
            await release.wait()
            message = mailbox.receive_nowait()
            got.append(message.message)
            message.reply(None)
            message = await mailbox.receive()
            got.append(message.message)
            message.reply(None)
            with pytest.raises(trio.WouldBlock):
                mailbox.receive_nowait()

        send = await registry.register("k", manual)
        calls = [Call(n) for n in range(4)]
        for call in calls:
            send.send_nowait(call)
        for n in (0, 2):  # withdraw these two: their waits are cancelled
            with trio.move_on_after(0):
                await calls[n].wait()
            assert calls[n].abandoned
        release.set()
        assert await calls[1].wait() is None
        assert await calls[3].wait() is None
        assert got == [1, 3]
        assert not calls[0].answered and not calls[2].answered


async def test_leftovers_withdrawn_before_the_next_activation_are_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    release = trio.Event()
    results: list[outcome.Outcome[Any]] = []
    async with open_registry(make_aggregate(tracker, startup_delay=1)) as registry:
        await registry.ensure("k")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                capture, results, registry.call, "k", ("wait", release, ("return", "bye"))
            )
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(capture, results, registry.call, "k", ("reply", "kept"))
            await trio.testing.wait_all_tasks_blocked()
            withdrawn = trio.CancelScope()

            async def withdrawn_call() -> None:
                with withdrawn:
                    await registry.call("k", ("reply", "withdrawn"))

            nursery.start_soon(withdrawn_call)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
            await trio.sleep(0.5)  # the next activation is starting, with the leftovers
            withdrawn.cancel()
        assert [r.unwrap() for r in results] == ["bye", "kept"]
        assert tracker.messages("k", 2) == [("reply", "kept")]


# Ctrl-C: a real process under a call load gets SIGINT, many times.

SIGINT_LOAD = """
import trio
import trio_aggregates


async def counter(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
    total = 0
    task_status.started()
    async for message in mailbox:
        total += message.message
        message.reply(total)
    await trio.sleep(0)  # a wind-down


async def main():
    async with trio_aggregates.open_registry(counter, idle_timeout=0.002) as registry:

        async def client(n):
            i = 0
            while True:
                i += 1
                await registry.call((n * 7 + i) % 64, 1)

        async with trio.open_nursery() as nursery:
            for n in range(32):
                nursery.start_soon(client, n)
            await trio.sleep(0.02)
            print("loaded", flush=True)
            await trio.sleep_forever()


trio.run(main)
"""


def _interrupt_once(script: Path, delay: float) -> str:
    """Run the load, send SIGINT ``delay`` seconds into it; return "ok" or what went wrong."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "loaded":
            process.kill()
            return f"did not start: {process.communicate()[1][-2000:]}"
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return "hang"
    if "TrioInternalError" in err:
        return f"TrioInternalError: {err[-3000:]}"
    if "trio.Cancelled" in err:
        return f"Cancelled leaked: {err[-3000:]}"
    if process.returncode == 0 or "KeyboardInterrupt" not in err:
        return f"exit {process.returncode}: {err[-3000:]}"
    for name in ("AggregateGone", "AggregateCrashed", "RegistryClosed", "TrioAggregatesError"):
        if name in err:
            return f"{name}: {err[-3000:]}"
    return "ok"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_during_a_call_load_ends_in_a_keyboard_interrupt_only(tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    script.write_text(SIGINT_LOAD)
    delays = [random.Random(n).uniform(0, 0.05) for n in range(40)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda delay: _interrupt_once(script, delay), delays))
    bad = [o for o in outcomes if o != "ok"]
    assert bad == [], f"{len(bad)} of {len(outcomes)} runs went wrong; the first: {bad[0]}"


# Bad keys.


class HashRaises:
    def __hash__(self) -> int:
        raise ValueError("no hash for you")


class NeverEqual:
    """Hashable, but not equal even to itself."""

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return False


async def test_a_key_whose_hash_raises_is_an_invalid_key() -> None:
    tracker = Tracker()
    key = HashRaises()
    async with open_registry(make_aggregate(tracker)) as registry:
        await registry.ensure("ok")
        before = registry.statistics()
        lookups: list[Callable[[], Any]] = [
            lambda: registry.get(key),
            lambda: registry.has_key(key),
            lambda: key in registry,
        ]
        for lookup in lookups:
            with pytest.raises(InvalidKey) as excinfo:
                lookup()
            assert isinstance(excinfo.value.__cause__, ValueError)
        operations: list[Callable[[], Awaitable[Any]]] = [
            lambda: registry.register(key),
            lambda: registry.ensure(key),
            lambda: registry.call(key, "hello"),
            lambda: registry.call(key, "hello", timeout=1),
        ]
        for operation in operations:
            with pytest.raises(InvalidKey) as excinfo:
                await operation()
            assert isinstance(excinfo.value.__cause__, ValueError)
        assert registry.statistics() == before
        assert tracker.entered == Counter({"ok": 1})


@pytest.mark.parametrize("key", [math.nan, NeverEqual()], ids=["nan", "never-equal"])
async def test_a_key_not_equal_to_itself_is_refused(key: Any) -> None:
    tracker = Tracker()
    async with open_registry(make_aggregate(tracker)) as registry:
        before = registry.statistics()
        assert registry.get(key) is None  # a lookup stays a plain dict lookup
        assert key not in registry
        operations: list[Callable[[], Awaitable[Any]]] = [
            lambda: registry.register(key),
            lambda: registry.ensure(key),
            lambda: registry.call(key, "hello"),
        ]
        for operation in operations:
            with pytest.raises(InvalidKey):
                await operation()
        assert registry.statistics() == before
        assert tracker.entered == Counter()
        assert len(registry) == 0


@pytest.mark.parametrize("mailbox_size", [0, 1, 64])
async def test_an_aggregate_that_never_reads_answers_calls_with_aggregate_gone(
    mailbox_size: int,
) -> None:
    """Re-routing needs progress: an activation that ends without taking anything ends it."""
    starts = 0

    async def quitter(
        key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal starts
        starts += 1
        task_status.started()

    async with open_registry(quitter, mailbox_size=mailbox_size) as registry:
        with pytest.raises(AggregateGone):
            await registry.call("k", "hello")
        assert starts <= 2
        assert registry.statistics().winding_down == 0


async def test_a_call_held_by_an_aggregate_cancelled_with_the_block_gets_registry_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = Tracker()
    results: list[outcome.Outcome[Any]] = []
    async with trio.open_nursery() as outer:
        with trio.move_on_after(5):
            async with open_registry(make_aggregate(tracker)) as registry:
                await registry.ensure("k")
                outer.start_soon(capture, results, registry.call, "k", ("sleep", 100, "late"))
                await trio.sleep_forever()
    with pytest.raises(RegistryClosed):
        results[0].unwrap()
    assert no_tasks_left(tracker)
