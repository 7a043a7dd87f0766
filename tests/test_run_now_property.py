"""Random programs of commands through both paths: the inline runner and the task.

Hypothesis draws a program of steps on a few bank accounts of the in-memory
store: commands sent as the protocol server sends them (``run_here``, run
at once by an idle aggregate, else ``_execute_soon``, queued; the server's
fallback, a task, when the key is not live), commands from tasks of their own after a
random delay (``_execute_detailed``), a command sent right after a task's
(its aggregate is often busy with it: the call queues), deposits appended by
"another writer" straight into the store (the live state is then behind: the
next command conflicts, rebuilds and decides again), retries of a
``command_id``, a few checkpoints (the other tasks take some steps), and mock
time passing, past the idle timeout too (aggregates passivate and reactivate
under the commands that follow). Each command carries a unique reference,
stored in its event. At the end, for every account:

* every command got exactly one answer, an acknowledgement or a refusal
  (``InsufficientFunds``), nothing else;
* the stored events are exactly the acknowledged commands' (each once, at the
  version its answer gave, every answer of a retried ``command_id`` the same)
  and the other writer's;
* the balance never goes below zero along the stream: each withdrawal was
  decided on the state the store had when it was appended;
* a refusal given to a callback names the balance the store held when it was
  given (it was decided on fresh state);
* the commands that reached the aggregate's mailbox (run at once or queued)
  were applied in the order they reached it;
* the live state equals a replay of the stream.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import attrs
import outcome
import trio
import trio.testing
from _examples import bank
from hypothesis import HealthCheck, event, given, settings, strategies as st

from trio_aggregates import AggregateRepository, InMemoryEventStore, NewEvent, open_aggregates
from trio_aggregates._core._registry import Call
from trio_aggregates._runtime._aggregate import canonical_key
from trio_aggregates._runtime._command import EXISTING

KEYS = ("a", "b", "c")
IDLE = 10.0  # the idle timeout: a "tick" of 15 passivates every idle account


@attrs.frozen
class Step:
    kind: str  # soon | busy | task | external | retry | tick | yield
    key: str
    amount: int
    withdraw: bool
    with_id: bool
    delay: float


steps = st.lists(
    st.builds(
        Step,
        kind=st.sampled_from(
            ["soon", "soon", "busy", "task", "task", "external", "retry", "tick", "yield"]
        ),
        key=st.sampled_from(KEYS),
        amount=st.integers(1, 5),
        withdraw=st.booleans(),
        with_id=st.booleans(),
        delay=st.sampled_from([0.0, 0.0, 0.5, 15.0]),
    ),
    min_size=1,
    max_size=40,
)


@attrs.define
class Sent:
    """A command sent, and every answer it got (a retry adds a second send)."""

    key: str
    command: Any
    command_id: str | None
    answers: list[outcome.Outcome[Any]] = attrs.field(factory=list)
    sends: int = 0
    #: For a refusal given to a callback: its index in ``answers``, and the
    #: stream's balance right then.
    balances_at_refusal: dict[int, int] = attrs.field(factory=dict)
    #: For a command that reached the aggregate's mailbox (run at once or
    #: queued) when first sent: its place among all such sends.
    mailbox_order: int | None = None


def balance_now(store: InMemoryEventStore, key: str) -> int:
    """The balance the store holds now (synchronously: no other task runs)."""
    codec = bank.Account.codec()
    balance = 0
    for record in store._read_now(bank.Account.stream_name(key), 1, None)[1:]:
        event_ = codec.decode(record.type, record.data)
        balance += -event_.amount if isinstance(event_, bank.Withdrawn) else event_.amount
    return balance


def run_here(repo: AggregateRepository[Any], key: str, ran: Ran) -> bool:
    """Run ``ran.message`` at once if the aggregate is live and idle, as the
    protocol server does (``_Connection._start_fast``)."""
    return repo.registry._ran_here(canonical_key(key), ran)


class Ran:
    """What ``run_here`` answers (as the server's ``_Ran``): to a callback, as an outcome."""

    def __init__(self, message: Any, answered: Callable[[outcome.Outcome[Any]], None]) -> None:
        self.message = message
        self._answered = answered

    def reply(self, value: Any = None) -> None:
        self._answered(outcome.Value(value))

    def fail(self, exception: BaseException) -> None:
        self._answered(outcome.Error(exception))


async def run_program(program: list[Step]) -> None:
    store = InMemoryEventStore()
    sent: dict[str, Sent] = {}
    external: dict[str, list[tuple[str, int]]] = defaultdict(list)

    mailbox_order = itertools.count()

    async with open_aggregates(bank.Account, store, idle_timeout=IDLE) as repo:
        for key in KEYS:
            await repo.create(key, bank.OpenAccount("owner"))

        async def via_task(tag: str, delay: float) -> None:
            await trio.sleep(delay)
            entry = sent[tag]
            try:
                value = await repo._execute_detailed(
                    entry.key, entry.command, command_id=entry.command_id
                )
            except Exception as exc:
                entry.answers.append(outcome.Error(exc))
            else:
                entry.answers.append(outcome.Value(value))

        def send_soon(tag: str, here: bool = True) -> None:
            entry = sent[tag]
            entry.sends += 1
            before = len(entry.answers)

            def answered(result: outcome.Outcome[Any]) -> None:
                if isinstance(result, outcome.Error):
                    entry.balances_at_refusal[len(entry.answers)] = balance_now(store, entry.key)
                entry.answers.append(result)

            # As the server runs a request: at once in this task if the
            # aggregate is idle (run_here), else through a callback. Without
            # ``here``, straight through the callback path (which runs an
            # idle aggregate's command inline too).
            request = repo._detailed_request(
                entry.command, EXISTING, None, False, entry.command_id, None, None, None
            )
            if here and run_here(repo, entry.key, Ran(request, answered)):
                assert len(entry.answers) == before + 1
                event("here: answered at once")
                reached_mailbox(entry)
                return
            call = repo._execute_soon(
                entry.key, entry.command, answered, command_id=entry.command_id
            )
            if call is None:  # not live: the server's fallback, a task
                event("soon: not live, a task")
                nursery.start_soon(via_task, tag, 0.0)
                return
            if len(entry.answers) > before:
                event("soon: answered inline")
            else:
                event("soon: queued")
            reached_mailbox(entry)

        def reached_mailbox(entry: Sent) -> None:
            if entry.mailbox_order is None:
                entry.mailbox_order = next(mailbox_order)

        async with trio.open_nursery() as nursery:
            for i, step in enumerate(program):
                tag = f"c{i}"
                command_cls = bank.Withdraw if step.withdraw else bank.Deposit
                if step.kind == "busy":
                    # A deposit from a task, and this command once the task
                    # had a few steps: its aggregate is often mid-command.
                    sent[f"{tag}-busy"] = Sent(
                        step.key, bank.Deposit(1, f"{tag}-busy"), None, sends=1
                    )
                    nursery.start_soon(via_task, f"{tag}-busy", 0.0)
                    for _ in range(step.amount % 3 + 1):
                        await trio.lowlevel.checkpoint()
                if step.kind in ("soon", "busy", "task"):
                    sent[tag] = Sent(
                        step.key, command_cls(step.amount, tag), tag if step.with_id else None
                    )
                    if step.kind != "task":
                        send_soon(tag, here=step.delay != 15.0)  # a quarter: the callback path
                    else:
                        sent[tag].sends += 1
                        nursery.start_soon(via_task, tag, step.delay)
                elif step.kind == "external":
                    stream = bank.Account.stream_name(step.key)
                    version = await store.stream_version(stream)
                    data = b'{"amount":%d,"reference":"%s"}' % (step.amount, tag.encode())
                    await store.append(
                        stream, [NewEvent("account.deposited", data)], expected_version=version
                    )
                    external[step.key].append((tag, step.amount))
                elif step.kind == "retry":
                    with_id = [t for t, s in sent.items() if s.command_id is not None]
                    if with_id:
                        send_soon(with_id[step.amount % len(with_id)])
                elif step.kind == "yield":  # let the other tasks take a few steps
                    for _ in range(step.amount):
                        await trio.lowlevel.checkpoint()
                else:
                    await trio.sleep(step.delay)

        # The calls still queued in mailboxes: answered once every aggregate
        # waits again (the in-memory store never blocks).
        await trio.testing.wait_all_tasks_blocked()
        for key in KEYS:
            await check_account(repo, store, key, sent, dict(external[key]))


async def check_account(
    repo: Any,
    store: InMemoryEventStore,
    key: str,
    sent: dict[str, Sent],
    external: dict[str, int],
) -> None:
    acknowledged: dict[str, int] = {}  # tag -> the version its answers gave
    for tag, entry in sent.items():
        if entry.key != key:
            continue
        assert len(entry.answers) == entry.sends, (tag, entry)
        for answer in entry.answers:
            if isinstance(answer, outcome.Value):
                version, _ = answer.value
                assert acknowledged.setdefault(tag, version) == version, (tag, entry.answers)
            else:
                assert isinstance(answer, outcome.Error)
                assert isinstance(answer.error, bank.InsufficientFunds), (tag, answer.error)
        # A refusal is decided on the store's latest state: the balance it
        # gives is the stream's when the answer was given.
        for index, balance_then in entry.balances_at_refusal.items():
            refusal = entry.answers[index]
            assert isinstance(refusal, outcome.Error)
            assert f"balance {balance_then}," in str(refusal.error), (tag, balance_then, refusal)

    records = await store.read(bank.Account.stream_name(key))
    assert [r.version for r in records] == list(range(1, len(records) + 1))
    assert records[0].type == "account.opened"
    balance = 0
    stored: dict[str, int] = {}
    for record in records[1:]:
        event_ = bank.Account.codec().decode(record.type, record.data)
        tag = event_.reference
        assert tag not in stored, f"{tag} stored twice"
        stored[tag] = record.version
        if tag in external:
            assert isinstance(event_, bank.Deposited)
            assert event_.amount == external[tag]
        else:
            command = sent[tag].command
            expected_type = bank.Withdrawn if isinstance(command, bank.Withdraw) else bank.Deposited
            assert type(event_) is expected_type and event_.amount == command.amount
        balance += -event_.amount if isinstance(event_, bank.Withdrawn) else event_.amount
        assert balance >= 0, f"{key} went below zero at version {record.version}"
    assert {t: v for t, v in stored.items() if t not in external} == acknowledged
    # The mailbox order: commands that reached the aggregate's mailbox (run
    # at once or queued) are applied in the order they reached it (those sent
    # once: a retry's answer may be another send's).
    in_mailbox_order = sorted(
        (entry.mailbox_order, acknowledged[tag])
        for tag, entry in sent.items()
        if entry.key == key
        and entry.mailbox_order is not None
        and entry.sends == 1
        and tag in acknowledged
    )
    versions = [version for _, version in in_mailbox_order]
    assert versions == sorted(versions), f"{key}: applied out of mailbox order"
    assert set(external) <= set(stored)

    live = await repo.load(key)
    replayed, version = await repo.replay(key)
    assert live == replayed and version == len(records)
    assert live.balance == balance


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(program=steps)
def test_random_programs_through_the_inline_runner_and_the_task(program: list[Step]) -> None:
    trio.run(run_program, program, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_run_here_never_overtakes_a_call_in_the_mailbox() -> None:
    """``run_here`` runs a command at once only while the aggregate waits with
    nothing queued: a call handed to its task (not yet run), or queued
    behind one, makes it decline (nothing done), and the mailbox order holds."""
    store = InMemoryEventStore()
    async with open_aggregates(bank.Account, store) as repo:
        await repo.create("a", bank.OpenAccount("owner"))
        answers: list[outcome.Outcome[Any]] = []

        def request(amount: int, reference: str) -> Any:
            command = bank.Deposit(amount, reference)
            return repo._detailed_request(command, EXISTING, None, False, None, None, None, None)

        assert run_here(repo, "a", Ran(request(1, "at once"), answers.append))
        assert answers == [outcome.Value((2, None))]
        # A call handed to the aggregate's task, which has not run yet.
        handed = Call(request(2, "handed"))
        repo.registry._live["a"].send_nowait(handed)
        assert not run_here(repo, "a", Ran(request(3, "declined"), answers.append))
        queued = repo._execute_soon("a", bank.Deposit(4, "queued"), answers.append)
        assert queued is not None
        assert not run_here(repo, "a", Ran(request(5, "declined"), answers.append))
        assert len(answers) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert handed.answered and len(answers) == 2
        assert run_here(repo, "a", Ran(request(6, "after"), answers.append))
        records = await store.read(bank.Account.stream_name("a"))
        codec = bank.Account.codec()
        references = [codec.decode(r.type, r.data).reference for r in records[1:]]
        assert references == ["at once", "handed", "queued", "after"]
