"""A model-based test of the registry: random interleavings, invariants after every step.

Hypothesis draws batches of operations (register / ensure / call / crash /
return / flush / churn / cancelled calls and ensures / raw sends) on a few
keys; each batch is started at once, each operation after a small random
delay, so the operations interleave and race idle deadlines; then the test
lets mock time pass (a short tick, or past the idle timeout so aggregates
passivate). Aggregates wind down (run code after their loop) on every other
activation; a "flush" call makes one leave its loop on its own and wind
down; a "churn" call shortens its idle timeout to almost nothing, so it is
passivated and re-activated under the calls that follow. After every step
it checks design.md's invariants:

1. never two tasks for one key: the aggregate tasks running per key (counted
   by the aggregate function, from its first line to its last, wind-down
   included) never exceed one, checked at every task's start and after every
   step; and at most one live aggregate per key (at every ``started()``);
2. a key is present exactly while its aggregate can take messages (the set of
   keys equals the set of open mailboxes, and ``get`` returns that mailbox's
   send end; an aggregate's loop never ends with its own key still present);
3. no aggregate task outlives the registry (checked after the block, by the
   aggregates' own ``finally`` and by walking Trio's task tree);
5. every request gets exactly one outcome, of an allowed kind (never
   :class:`AggregateGone` for a call the aggregate did not end on), every raw
   message accepted by a live send end is received exactly once, and a call
   is never handed to an aggregate after its caller withdrew it (a call
   cancelled at once never arrives at all).

Trio is driven from a synchronous ``@given`` test with ``trio.run`` and an
autojump clock (hypothesis-trio is broken on current Hypothesis). Trio's
scheduler randomness is seeded by Hypothesis (trio registers its ``Random``
with ``hypothesis.register_random``), so failing examples replay.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any

import attrs
import outcome
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings, strategies as st

from trio_aggregates import (
    AggregateCrashed,
    AggregateDeclined,
    AggregateGone,
    AggregateStartError,
    Call,
    CallTimeout,
    KeyAlreadyRegistered,
    Mailbox,
    Registry,
    open_registry,
)

KEYS = ["a", "b", "c"]
IDLE_TIMEOUT = 5.0
STARTUP_DELAY = 1.0  # mock seconds every start-up takes, so that start-ups race
SLOW = 2.0  # mock seconds a "slow" call takes to handle
WIND_DOWN = 1.5  # mock seconds an aggregate runs after its loop (every other activation)
CHURN_IDLE = 0.01  # the idle timeout a "churn" call sets
DELAYS = [0.0, 0.0, 0.005, 0.01, 0.02]  # before each operation of a batch


class Boom(Exception):
    """Raised by an aggregate told to crash."""


class Rejected(Exception):
    """Answered with ``call.fail`` by an aggregate told to fail the call."""


@attrs.define
class Model:
    """What the test knows and checks; the aggregates write into it."""

    registry: Registry | None = None
    started: Counter[str] = attrs.Factory(Counter)  # activations per key
    running: Counter[str] = attrs.Factory(Counter)  # tasks inside the aggregate function
    active: dict[str, list[Mailbox]] = attrs.Factory(dict)  # serving activations per key
    outcomes: dict[int, Any] = attrs.Factory(dict)  # op id -> its one outcome
    ops: dict[int, tuple[Any, ...]] = attrs.Factory(dict)  # op id -> what it was
    raw_accepted: set[int] = attrs.Factory(set)
    raw_received: Counter[int] = attrs.Factory(Counter)
    calls_received: Counter[int] = attrs.Factory(Counter)
    violations: list[str] = attrs.Factory(list)

    def record(self, op_id: int, result: Any) -> None:
        if op_id in self.outcomes:
            self.violations.append(f"op {op_id} got a second outcome {result!r}")
        self.outcomes[op_id] = result


def make_aggregate(model: Model, startup: str = "ok") -> Any:
    async def aggregate(
        key: str, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        model.running[key] += 1
        if model.running[key] > 1:
            model.violations.append(f"two tasks for {key!r}")
        try:
            await trio.sleep(STARTUP_DELAY)
            if startup == "decline":
                return
            if startup == "fail":
                raise Boom("start-up failed")
            task_status.started()
            model.started[key] += 1
            activation = model.started[key]
            mine = model.active.setdefault(key, [])
            if any(m.statistics().open_receive_channels for m in mine):
                model.violations.append(f"two live aggregates for {key!r}")
            mine.append(mailbox)
            left_on_its_own = False
            async for message in mailbox:
                if isinstance(message, Call) and message.abandoned:
                    model.violations.append(f"withdrawn call {message!r} was delivered")
                await handle(model, key, activation, mailbox, message)
                if isinstance(message, Call) and message.message[0] in ("return", "noanswer"):
                    return  # the key leaves as the task ends
                if isinstance(message, Call) and message.message[0] == "flush":
                    left_on_its_own = True
                    break
            registry = model.registry
            # The mailbox ended (passivation, shutdown): the key must already be gone.
            # (One that left its loop on its own stays open, and registered, until its
            # task ends: messages sent meanwhile go to the key's next activation.)
            if (
                not left_on_its_own
                and registry is not None
                and registry.get(key) is mailbox.send_channel
            ):
                model.violations.append(f"{key!r} still registered after its mailbox ended")
            if left_on_its_own or activation % 2 == 0:
                await trio.sleep(WIND_DOWN)  # code after the loop: the key's next task waits
        finally:
            model.running[key] -= 1
            if mailbox in model.active.get(key, []):
                model.active[key].remove(mailbox)

    return aggregate


async def handle(model: Model, key: str, activation: int, mailbox: Mailbox, message: Any) -> None:
    if not isinstance(message, Call):
        model.raw_received[message[1]] += 1
        return
    kind, op_id = message.message
    model.calls_received[op_id] += 1
    if model.calls_received[op_id] > 1:
        model.violations.append(f"call {op_id} was delivered twice")
    if kind in ("get", "return", "flush", "cancel-now"):
        message.reply((key, activation, op_id))
    elif kind == "churn":
        mailbox.idle_timeout = CHURN_IDLE
        message.reply((key, activation, op_id))
    elif kind == "slow":
        await trio.sleep(SLOW)
        message.reply((key, activation, op_id))
    elif kind == "crash":
        raise Boom(op_id)
    elif kind == "fail":
        message.fail(Rejected(op_id))
    # "noanswer": return without answering


# What each operation may end with. Start-up errors can reach any ensure/call that
# joined a start-up begun by a failing or declining `register`. AggregateGone
# reaches only the call an aggregate returned on without answering: a call that
# races a passivation, a crash or a return is re-routed until an aggregate takes it.
START_ERRORS = (AggregateDeclined, AggregateStartError)
ALLOWED: dict[str, tuple[type[BaseException], ...]] = {
    "register-ok": (KeyAlreadyRegistered,),
    "register-decline": (KeyAlreadyRegistered, AggregateDeclined),
    "register-fail": (KeyAlreadyRegistered, AggregateStartError),
    "ensure": START_ERRORS,
    "get": START_ERRORS,
    "churn": START_ERRORS,
    "flush": START_ERRORS,
    "return": START_ERRORS,
    "slow": (CallTimeout, *START_ERRORS),
    "crash": (AggregateCrashed, *START_ERRORS),
    "fail": (Rejected, *START_ERRORS),
    "noanswer": (AggregateGone, *START_ERRORS),
}


def check_outcome(model: Model, op_id: int) -> None:
    op = model.ops[op_id]
    result = model.outcomes[op_id]
    kind = op[0]
    if kind == "raw":
        if result not in ("sent", "stale", "no target"):
            model.violations.append(f"op {op} ended with {result!r}")
        return
    if kind == "cancel-now" and result == "cancelled" and model.calls_received[op_id]:
        model.violations.append(f"op {op} was cancelled at once, yet delivered")
    if kind in ("cancel-call", "cancel-ensure", "cancel-now"):
        if result == "cancelled":
            return
        kind = {"cancel-call": "slow", "cancel-ensure": "ensure", "cancel-now": "get"}[kind]
    if isinstance(result, outcome.Error):
        error = result.error
        if not isinstance(error, ALLOWED[kind]):
            model.violations.append(f"op {op} ended with {error!r}")
        if isinstance(error, AggregateCrashed) and not (
            isinstance(error.__cause__, Boom) and error.__cause__.args == (op_id,)
        ):
            model.violations.append(f"op {op}: crash cause is {error.__cause__!r}")
        if isinstance(error, Rejected) and error.args != (op_id,):
            model.violations.append(f"op {op}: got another call's error {error!r}")
        return
    value = result.value
    if kind.startswith("register") or kind == "ensure":
        if not isinstance(value, trio.MemorySendChannel):
            model.violations.append(f"op {op} returned {value!r}")
        if kind in ("register-decline", "register-fail"):
            model.violations.append(f"op {op} succeeded")
        return
    if kind in ("crash", "fail", "noanswer"):
        model.violations.append(f"op {op} got a reply {value!r}")
        return
    key = op[1]
    if value[0] != key or value[2] != op_id:
        model.violations.append(f"op {op} got the reply {value!r}")


def count_tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(count_tasks(child) for n in task.child_nurseries for child in n.child_tasks)


operation = st.one_of(
    st.tuples(
        st.just("register"), st.sampled_from(KEYS), st.sampled_from(["ok", "decline", "fail"])
    ),
    st.tuples(st.just("ensure"), st.sampled_from(KEYS)),
    st.tuples(
        st.just("call"),
        st.sampled_from(KEYS),
        st.sampled_from(
            ["get", "get", "get", "churn", "flush", "return", "slow", "crash", "fail", "noanswer"]
        ),
    ),
    st.tuples(st.just("cancel-call"), st.sampled_from(KEYS)),
    st.tuples(st.just("cancel-now"), st.sampled_from(KEYS)),
    st.tuples(st.just("cancel-ensure"), st.sampled_from(KEYS)),
    st.tuples(st.just("raw"), st.sampled_from(KEYS)),
)
step = st.one_of(
    st.tuples(
        st.just("batch"),
        st.lists(st.tuples(operation, st.sampled_from(DELAYS)), min_size=1, max_size=6),
    ),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 0.01, 0.5, 1.0, 3.0])),
    st.tuples(st.just("passivate")),
)


async def run_op(
    model: Model, registry: Registry, op_id: int, op: tuple[Any, ...], delay: float
) -> None:
    kind, key = op[0], op[1]
    model.ops[op_id] = op
    await trio.sleep(delay)
    if kind == "register":
        fn = make_aggregate(model, op[2])
        model.ops[op_id] = (f"register-{op[2]}", key)
        model.record(op_id, await outcome.acapture(registry.register, key, fn))
    elif kind == "ensure":
        model.ops[op_id] = ("ensure", key)
        model.record(op_id, await outcome.acapture(registry.ensure, key))
    elif kind == "call":
        model.ops[op_id] = (op[2], key)
        timeout = SLOW / 2 if op[2] == "slow" else None
        model.record(
            op_id, await outcome.acapture(registry.call, key, (op[2], op_id), timeout=timeout)
        )
    elif kind == "cancel-now":
        model.ops[op_id] = (kind, key)
        now: Any = "cancelled"
        with trio.move_on_after(0):
            try:  # cancelled at its first checkpoint: it must never reach the aggregate
                now = outcome.Value(await registry.call(key, ("cancel-now", op_id)))
            except Exception as exc:
                now = outcome.Error(exc)
        model.record(op_id, now)
    elif kind in ("cancel-call", "cancel-ensure"):
        model.ops[op_id] = (kind, key)
        result: Any = "cancelled"
        with trio.move_on_after(0.5):
            try:  # not outcome.acapture: Cancelled must reach the cancel scope
                if kind == "cancel-call":
                    result = outcome.Value(await registry.call(key, ("slow", op_id)))
                else:
                    result = outcome.Value(await registry.ensure(key))
            except Exception as exc:
                result = outcome.Error(exc)
        model.record(op_id, result)
    elif kind == "raw":
        # A raw message through a send end: the live one, or one just ensured (which may
        # have gone stale by the time ensure returns: that must fail, not vanish).
        model.ops[op_id] = ("raw", key)
        send = registry.get(key)
        if send is None:
            try:
                send = await registry.ensure(key)
            except (AggregateDeclined, AggregateStartError):
                model.record(op_id, "no target")
                return
        try:
            send.send_nowait(("raw", op_id))  # never full: the mailbox holds 64
        except trio.BrokenResourceError:
            model.record(op_id, "stale")
        else:
            model.raw_accepted.add(op_id)
            model.record(op_id, "sent")


def check_invariants(model: Model, registry: Registry, where: str) -> None:
    open_mailboxes = {
        key: [m for m in mailboxes if m.statistics().open_receive_channels]
        for key, mailboxes in model.active.items()
    }
    for key in KEYS:
        live = open_mailboxes.get(key, [])
        assert len(live) <= 1, f"{where}: {len(live)} live aggregates for {key!r}"
        if live:
            assert registry.get(key) is live[0].send_channel, f"{where}: {key!r} not registered"
        else:
            assert key not in registry, f"{where}: {key!r} registered without a live aggregate"
    for key, tasks in model.running.items():
        assert tasks <= 1, f"{where}: {tasks} tasks for {key!r}"
    stats = registry.statistics()
    assert stats.live == len(registry)
    assert stats.activations == (
        stats.live + stats.winding_down + stats.normal_ends + stats.crashes + stats.passivations
    )
    assert model.violations == [], f"{where}: {model.violations}"
    for op_id in model.outcomes:
        check_outcome(model, op_id)
    assert model.violations == [], f"{where}: {model.violations}"


async def scenario(data: st.DataObject) -> None:
    model = Model()
    ids = itertools.count()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    tasks_before = count_tasks(root)
    async with open_registry(make_aggregate(model), idle_timeout=IDLE_TIMEOUT) as registry:
        model.registry = registry
        async with trio.open_nursery() as requests:
            steps: list[tuple[Any, ...]] = data.draw(
                st.lists(step, min_size=1, max_size=30), label="steps"
            )
            for n, item in enumerate(steps):
                if item[0] == "batch":
                    for op, delay in item[1]:
                        requests.start_soon(run_op, model, registry, next(ids), op, delay)
                    await trio.sleep(0.25)
                elif item[0] == "tick":
                    await trio.sleep(item[1])
                else:
                    await trio.sleep(IDLE_TIMEOUT + 1)
                # Let every task woken at this instant run (a passivated aggregate's task
                # ends a moment after its key left; statistics count the end then).
                await trio.testing.wait_all_tasks_blocked()
                check_invariants(model, registry, f"after step {n} {item}")
            # Let everything settle: every request must have its one outcome.
            await trio.sleep(1000)
            await trio.testing.wait_all_tasks_blocked()
            unanswered = [model.ops.get(i, i) for i in range(next(ids)) if i not in model.outcomes]
            assert unanswered == [], f"requests without an outcome: {unanswered}"
            check_invariants(model, registry, "at the end")
            for op_id, result in model.outcomes.items():
                if isinstance(result, outcome.Error):
                    event(f"{model.ops[op_id][0]}: {type(result.error).__name__}")
                else:
                    shown = "ok" if isinstance(result, outcome.Value) else result
                    event(f"{model.ops[op_id][0]}: {shown}")
            stats = registry.statistics()
            event(f"passivations > 0: {stats.passivations > 0}, crashes > 0: {stats.crashes > 0}")
            lost = {i: model.raw_received[i] for i in model.raw_accepted}
            assert all(count == 1 for count in lost.values()), f"raw deliveries: {lost}"
            assert set(model.raw_received) <= model.raw_accepted
    assert all(n == 0 for n in model.running.values()), f"tasks left: {model.running}"
    assert count_tasks(root) == tasks_before  # no task outlives the registry
    assert len(registry) == 0
    assert registry.statistics().live == 0
    assert model.violations == []


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_registry_invariants_under_random_interleavings(data: st.DataObject) -> None:
    # Crashes are logged at WARNING by design; keep Hypothesis' many examples quiet.
    logging.getLogger("trio_aggregates.registry").setLevel(logging.CRITICAL)
    try:
        trio.run(scenario, data, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logging.getLogger("trio_aggregates.registry").setLevel(logging.NOTSET)
