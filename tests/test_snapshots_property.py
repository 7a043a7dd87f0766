"""Property: snapshot + later events, a full replay and the live state always agree.

Random command sequences on a bank account (deposits, withdrawals, rejected ones too,
restarts of the runtime in between, deposits by a second runtime on the same store,
and retries of earlier commands by their ``command_id``) run against one in-memory
store, with a snapshot every 3 events. Two runtimes on one store never refuse on
stale state, and a retried command id is answered with its first version and
stores nothing. At the end the live state, ``repo.replay`` (every event, no
snapshot) and a fresh ``open_aggregates`` on the same store (latest snapshot + the
events after it) must be equal. A sync ``@given`` test drives ``trio.run`` itself
(hypothesis-trio does not import on current Hypothesis).
"""

from collections.abc import Sequence
from typing import Any

import attrs
import trio
import trio.testing
from _examples import bank
from hypothesis import given, settings, strategies as st

from trio_aggregates import (
    CommandRejected,
    InMemoryEventStore,
    NewEvent,
    RecordedEvent,
    event_type,
    open_aggregates,
)


@event_type("prop-account")
@attrs.define
class PropAccount(bank.Account):
    category = "Prop"
    snapshot_every = 3


class CountingStore(InMemoryEventStore):
    def __init__(self) -> None:
        super().__init__()
        self.events_read = 0

    async def read(
        self, stream: str, *, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        page = await super().read(stream, from_version=from_version, limit=limit)
        self.events_read += len(page)
        return page

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, expected_version: int | None, **kw: Any
    ) -> int:
        return await super().append(stream, events, expected_version=expected_version, **kw)


amounts = st.one_of(st.integers(1, 300), st.sampled_from([0, -1]))  # 0, -1: InvalidAmount
operations = st.lists(
    st.one_of(
        st.tuples(st.just("deposit"), amounts),
        st.tuples(st.just("withdraw"), amounts),  # often InsufficientFunds
        st.tuples(st.just("restart"), st.just(0)),  # close the runtime, reopen on the store
        st.tuples(st.just("other"), st.integers(1, 300)),  # a deposit by a second runtime
        st.tuples(st.just("retry"), st.integers(0, 10**6)),  # an earlier accepted command again
    ),
    max_size=40,
)


async def run(ops: list[tuple[str, int]], overdraft: int) -> None:
    store = CountingStore()
    key = "acct"
    expected_balance = 0
    accepted = 1
    segments: list[list[tuple[str, int]]] = [[]]
    for op in ops:
        if op[0] == "restart":
            segments.append([])
        else:
            segments[-1].append(op)

    live: Any = None
    applied: list[tuple[str, int, bool]] = []  # (command id, its version, via the other)
    ids = iter(range(10**6))
    for n, segment in enumerate(segments):
        async with (
            open_aggregates(PropAccount, store) as repo,
            open_aggregates(PropAccount, store) as other,
        ):
            if n == 0:
                assert await repo.create(key, bank.OpenAccount("ann", overdraft)) == 1
            else:
                # activation after a restart: snapshot + later events == what it was
                assert await repo.load(key) == live
            for kind, amount in segment:
                if kind == "retry":
                    if applied:
                        command_id, first, via_other = applied[amount % len(applied)]
                        runtime = repo if via_other else other  # the one that did not store it
                        command = bank.Deposit(1)  # the id decides, not the command
                        assert await runtime.execute(key, command, command_id=command_id) == first
                    continue
                command_id = f"c{next(ids)}"
                runtime = other if kind == "other" else repo
                command = bank.Withdraw(amount) if kind == "withdraw" else bank.Deposit(amount)
                try:
                    version = await runtime.execute(key, command, command_id=command_id)
                except CommandRejected:
                    # decided on the store's state, whoever wrote last
                    assert kind == "withdraw" or amount <= 0
                    assert (
                        kind != "withdraw"
                        or amount <= 0
                        or (expected_balance - amount < -overdraft)
                    )
                    continue
                accepted += 1
                assert version == accepted
                applied.append((command_id, version, runtime is other))
                expected_balance += -amount if kind == "withdraw" else amount
            live = await repo.load(key)
            assert await other.load(key) == live
            replayed, version = await repo.replay(key)
            assert live == replayed
            assert version == accepted
            assert live.balance == expected_balance >= -overdraft

    stream = PropAccount.stream_name(key)
    snapshot = await store.load_snapshot(stream)
    if snapshot is not None:
        # A snapshot is taken on a multiple of 3 and reflects exactly the events up to it.
        assert snapshot.version <= accepted
        history = await store.read(stream, limit=snapshot.version)
        codec = PropAccount.codec()
        prefix = PropAccount.replay(codec.decode(r.type, r.data) for r in history)
        assert codec.decode_state(snapshot.data, PropAccount) == prefix

    store.events_read = 0
    async with open_aggregates(PropAccount, store) as repo:
        rebuilt = await repo.load(key)
        # the fresh activation read only the events after the snapshot
        after = accepted - (snapshot.version if snapshot is not None else 0)
        assert store.events_read == after
        assert await repo.version(key) == accepted
    assert rebuilt == live


@settings(max_examples=50, deadline=None)
@given(ops=operations, overdraft=st.sampled_from([0, 100]))
def test_snapshot_plus_later_events_equals_full_replay_equals_live_state(
    ops: list[tuple[str, int]], overdraft: int
) -> None:
    trio.run(run, ops, overdraft, clock=trio.testing.MockClock(autojump_threshold=0))
