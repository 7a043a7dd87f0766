"""The sans-IO command step (``_command.py``): its transitions, without Trio or a store.

Each test plays the repository's part by hand: it does what the action asks (or
pretends the store answered so) and feeds the outcome back, as h11's tests drive
its state machine with bytes.
"""

from typing import Any

import attrs
import pytest
from _examples import bank

from trio_aggregates import (
    AggregateCrashed,
    AggregateNotFound,
    AlreadyExists,
    ConcurrencyConflict,
    Decision,
    RecordedEvent,
    Snapshot,
    StoreError,
    UnknownCommand,
    WrongExpectedVersion,
    applies,
    handles,
)
from trio_aggregates._runtime._command import (
    ANY,
    APPEND,
    CATCH_UP,
    DONE,
    EXISTING,
    FAIL,
    FIND,
    NEW,
    REBUILD,
    Command,
    Inspect,
    LiveAggregate,
)

Account, Deposit, Withdraw = bank.Account, bank.Deposit, bank.Withdraw
OpenAccount = bank.OpenAccount
Deposited, AccountOpened = bank.Deposited, bank.AccountOpened


@attrs.frozen
class Poison:
    pass


@attrs.frozen
class Poisoned:
    pass


@attrs.define
class Touchy(bank.Account):
    """An account whose applier for Poisoned raises (after changing the state)."""

    snapshot_every = 2

    @handles
    def poison(self, command: Poison) -> Poisoned:
        return Poisoned()

    @applies
    def poisoned(self, event: Poisoned) -> None:
        self.balance = -999  # a half-done change, then the bug
        raise ZeroDivisionError("applier bug")


def record(version: int, event: object, cls: Any = Account) -> RecordedEvent:
    name, data = cls.codec().encode(event)
    return RecordedEvent(f"{cls.__name__}-k", version, name, data, b"{}", 0.0)


def command(
    cmd: object,
    *,
    mode: int = EXISTING,
    expected: int | None = None,
    command_id: str | None = None,
    dry_run: bool = False,
    verbose: bool = False,
    detailed: bool = False,
) -> Command:
    return Command(cmd, mode, expected, dry_run, verbose, command_id, b'{"at":', detailed)


def live_at(*events: object, cls: Any = Account, retries: int = 3) -> LiveAggregate[Any]:
    """A loaded live aggregate whose stream holds ``events``."""
    live: LiveAggregate[Any] = LiveAggregate(cls, "k", cls.codec(), retries)
    assert live.reset(None) is None
    live.advance([record(v, e, cls) for v, e in enumerate(events, 1)])
    live.loaded()
    return live


OPENED = AccountOpened("ann", 0)


def test_happy_path_appends_at_the_live_version_and_answers_the_new_version() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(5))) is APPEND
    assert live.expected == 1
    assert live.append_id is None  # an id of the runtime's own: no idempotency check
    assert [e.type for e in live.new_events] == ["account.deposited"]
    assert live.state.balance == 5  # applied tentatively, before the append
    assert live.stale  # ... so not the store's state until committed
    assert live.committed(2) is DONE
    assert (live.result, live.version, live.stale) == (2, 2, False)


def test_a_raising_applier_fails_the_command_before_anything_is_appended() -> None:
    live = live_at(OPENED, cls=Touchy)
    assert live.start(command(Poison())) is FAIL
    assert isinstance(live.error, AggregateCrashed)
    assert isinstance(live.error.__cause__, ZeroDivisionError)
    assert live.stale and live.version == 1
    # the next command rebuilds the state from the store first
    assert live.start(command(Deposit(1))) is REBUILD
    live.reset(None)
    live.advance([record(1, OPENED, Touchy)])
    live.loaded()
    assert live.rebuilt() is APPEND
    assert live.state.balance == 1


def test_a_rejection_is_answered_only_after_catching_up() -> None:
    live = live_at(OPENED)
    assert live.start(command(Withdraw(50))) is CATCH_UP  # insufficient funds, at version 1
    live.advance([record(2, Deposited(100))])  # another process had deposited
    assert live.caught_up() is APPEND  # decided again, on the newer state
    assert live.committed(3) is DONE and live.result == 3
    # nothing newer in the store: the refusal stands
    assert live.start(command(Withdraw(500))) is CATCH_UP
    live.advance([])
    assert live.caught_up() is FAIL
    assert isinstance(live.error, bank.InsufficientFunds)
    assert not live.stale and live.state.balance == 50


def test_unknown_commands_need_no_catch_up() -> None:
    live = live_at(OPENED)
    assert live.start(command(bank.RegisterUser("x", "x@y"))) is FAIL
    assert isinstance(live.error, UnknownCommand)


def test_wrong_expected_version_is_checked_against_the_store() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(1), expected=2)) is CATCH_UP
    live.advance([record(2, Deposited(7))])
    assert live.caught_up() is APPEND  # the caller was right: the stream is at 2
    assert live.expected == 2
    live.committed(3)
    assert live.start(command(Deposit(1), expected=9)) is CATCH_UP
    live.advance([record(4, Deposited(1))])
    assert live.caught_up() is FAIL
    error = live.error
    assert isinstance(error, WrongExpectedVersion)
    assert (error.expected, error.actual) == (9, 4)  # the actual version, not a stale one


def test_not_found_and_already_exists_are_checked_against_the_store() -> None:
    empty = live_at()
    assert empty.start(command(Deposit(1))) is CATCH_UP
    empty.advance([])
    assert empty.caught_up() is FAIL and isinstance(empty.error, AggregateNotFound)
    assert empty.start(command(Deposit(1))) is CATCH_UP
    empty.advance([record(1, OPENED)])  # created meanwhile, elsewhere
    assert empty.caught_up() is APPEND
    live = live_at(OPENED)
    assert live.start(command(OpenAccount("bob"), mode=NEW, expected=0)) is CATCH_UP
    live.advance([])
    assert live.caught_up() is FAIL and isinstance(live.error, AlreadyExists)


def test_a_conflict_rebuilds_and_decides_again_then_gives_up() -> None:
    live = live_at(OPENED, retries=1)
    assert live.start(command(Deposit(5))) is APPEND
    conflict = ConcurrencyConflict("Account-k", 1, 2)
    assert live.conflicted(conflict) is REBUILD
    live.reset(None)
    live.advance([record(1, OPENED), record(2, Deposited(10))])
    live.loaded()
    assert live.rebuilt() is APPEND
    assert live.expected == 2 and live.state.balance == 15
    assert live.conflicted(conflict) is REBUILD  # the second conflict: no retry left
    live.reset(None)
    live.advance([record(1, OPENED), record(2, Deposited(10)), record(3, Deposited(1))])
    live.loaded()
    assert live.rebuilt() is FAIL
    assert live.error is conflict
    assert (live.state.balance, live.version, live.stale) == (11, 3, False)


def test_a_conflict_for_a_create_is_already_exists() -> None:
    live = live_at()
    assert live.start(command(OpenAccount("ann"), mode=NEW, expected=0)) is APPEND
    assert live.conflicted(ConcurrencyConflict("Account-k", 0, 1)) is REBUILD
    live.reset(None)
    live.advance([record(1, OPENED)])
    live.loaded()
    assert live.rebuilt() is FAIL and isinstance(live.error, AlreadyExists)


def test_a_duplicate_answers_the_first_outcome_and_is_remembered() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(5), command_id="c1")) is APPEND
    assert live.append_id == "c1"
    assert live.duplicate(2) is REBUILD  # the tentative state is dropped
    live.reset(None)
    live.advance([record(1, OPENED), record(2, Deposited(5)), record(3, Deposited(1))])
    live.loaded()
    assert live.rebuilt() is DONE and live.result == 2
    assert live.state.balance == 6
    # a later retry is answered from memory, without deciding or appending
    assert live.start(command(Deposit(5), command_id="c1")) is DONE and live.result == 2


def test_a_refused_retry_looks_its_command_id_up() -> None:
    live = live_at(OPENED, Deposited(50), bank.Withdrawn(50))  # w1 was applied: balance 0
    assert live.start(command(Withdraw(50), command_id="w1")) is CATCH_UP
    live.advance([])
    assert live.caught_up() is FIND  # refused now; was it applied before?
    assert live.found(3) is DONE and live.result == 3
    assert live.start(command(Withdraw(50), command_id="w2")) is CATCH_UP
    live.advance([])
    assert live.caught_up() is FIND
    assert live.found(None) is FAIL and isinstance(live.error, bank.InsufficientFunds)
    # a create retried after it succeeded: its version, not AlreadyExists
    assert live.start(command(OpenAccount("ann"), mode=NEW, expected=0, command_id="o")) is (
        CATCH_UP
    )
    live.advance([])
    assert live.caught_up() is FIND
    assert live.found(1) is DONE and live.result == 1


def test_committed_explicit_ids_are_remembered_boundedly() -> None:
    live = live_at(OPENED)
    for i in range(100):
        assert live.start(command(Deposit(1), command_id=f"id{i}")) is APPEND
        live.committed(i + 2)
    assert live.start(command(Deposit(1), command_id="id99")) is DONE and live.result == 101
    assert live.start(command(Deposit(1), command_id="id0")) is APPEND  # forgotten: ask the store


def test_a_store_failure_answers_and_leaves_the_state_to_rebuild() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(5))) is APPEND
    error = StoreError("connection lost")
    assert live.failed(error) is FAIL and live.error is error
    assert live.stale
    assert live.start(command(Deposit(1))) is REBUILD


def test_dry_run_decides_and_encodes_only() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(5), dry_run=True)) is DONE and live.result == 1
    assert live.start(command(Deposit(5), dry_run=True, verbose=True)) is DONE
    assert live.result == [Deposited(5)]
    assert live.state.balance == 0 and not live.stale


def test_a_handler_reply_is_the_answer() -> None:
    live = live_at(OPENED, Deposited(4))
    assert live.start(command(bank.GetBalance())) is DONE and live.result == 4


def test_inspect_catches_up_unless_told_not_to() -> None:
    live = live_at(OPENED)
    assert live.inspect(Inspect(fresh=True)) is CATCH_UP
    live.advance([record(2, Deposited(3))])
    assert live.caught_up() is DONE
    state, version = live.result
    assert (state.balance, version) == (3, 2)
    assert state is not live.state  # a copy
    assert live.inspect(Inspect(fresh=False)) is DONE and live.result[1] == 2
    empty = live_at()
    assert empty.inspect(Inspect(fresh=False)) is FAIL
    assert isinstance(empty.error, AggregateNotFound)


def test_a_raising_applier_while_catching_up_is_a_crash_that_leaves_the_state_stale() -> None:
    live = live_at(OPENED, cls=Touchy)
    with pytest.raises(AggregateCrashed) as info:
        live.advance([record(2, Poisoned(), Touchy)])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert live.stale and live.version == 1


def test_snapshots_are_due_when_the_version_crosses_a_multiple() -> None:
    live = live_at(OPENED, cls=Touchy)
    assert not live.snapshot_due()
    live.start(command(Deposit(1)))
    live.committed(2)
    assert live.snapshot_due()
    live.snapshot_saved(2)
    assert not live.snapshot_due()
    assert not live_at(OPENED).snapshot_due()  # Account: every 50


def test_a_usable_snapshot_is_the_starting_point() -> None:
    live: LiveAggregate[Any] = LiveAggregate(Touchy, "k", Touchy.codec(), 3)
    state = Touchy("ann", 70)
    snap = Snapshot("Touchy-k", 5, 1, "Touchy", Touchy.codec().encode_state(state))
    assert live.reset(snap) is None
    assert (live.state, live.version, live.snapshot_version) == (state, 5, 5)
    bad = Snapshot("Touchy-k", 5, 1, "Touchy", b"{nope")
    assert live.reset(bad) is not None  # unusable: from nothing, and say why
    assert (live.state, live.version) == (Touchy(), 0)
    other_schema = Snapshot("Touchy-k", 5, 2, "Touchy", b"{}")
    assert live.reset(other_schema) is None and live.version == 0


def test_the_task_ends_only_holding_no_stream_and_nothing_queued() -> None:
    empty = live_at()
    assert empty.should_end(0)
    assert not empty.should_end(1)  # a create may be queued
    assert not live_at(OPENED).should_end(0)
    empty.failed(StoreError("connection lost"))
    assert not empty.should_end(0)  # version 0 is not known now


# -- create-if-missing (mode ANY) and detailed answers (the server's) -----------------


def test_mode_any_runs_on_a_new_stream_and_on_an_existing_one() -> None:
    new = live_at()
    assert new.start(command(OpenAccount("ann"), mode=ANY)) is APPEND
    assert new.expected == 0
    assert new.committed(1) is DONE and new.result == 1
    existing = live_at(OPENED)
    assert existing.start(command(Deposit(3), mode=ANY)) is APPEND
    assert existing.expected == 1


def test_mode_any_still_honours_the_expected_version() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(3), mode=ANY, expected=0)) is CATCH_UP
    assert live.caught_up() is FAIL
    assert isinstance(live.error, WrongExpectedVersion)
    fresh = live_at()
    assert fresh.start(command(OpenAccount("ann"), mode=ANY, expected=0)) is APPEND


def test_mode_any_refuses_as_the_handler_does_on_a_new_stream() -> None:
    live = live_at()
    assert live.start(command(Withdraw(5), mode=ANY)) is CATCH_UP  # fresh state first
    assert live.caught_up() is FAIL
    assert isinstance(live.error, bank.InsufficientFunds)


def test_detailed_answers_carry_the_version_and_the_reply() -> None:
    live = live_at(OPENED, Deposited(4))
    assert live.start(command(Deposit(1), detailed=True)) is APPEND
    assert live.committed(3) is DONE and live.result == (3, None)
    # a query: its reply, and the version it was answered at
    assert live.start(command(bank.GetBalance(), detailed=True)) is DONE
    assert live.result == (3, 5)
    # a dry run: the current version and the events that would be stored
    assert live.start(command(Deposit(2), dry_run=True, verbose=True, detailed=True)) is DONE
    assert live.result == (3, [Deposited(2)])
    assert live.start(command(Deposit(2), dry_run=True, detailed=True)) is DONE
    assert live.result == (3, None)


def test_detailed_answers_of_a_retried_command_id_carry_no_reply() -> None:
    live = live_at(OPENED)
    assert live.start(command(Deposit(1), command_id="c", detailed=True)) is APPEND
    assert live.committed(2) is DONE and live.result == (2, None)
    assert live.start(command(Deposit(1), command_id="c", detailed=True)) is DONE
    assert live.result == (2, None)  # remembered: the first outcome
    other = live_at(OPENED, Deposited(1))
    assert other.start(command(Deposit(1), command_id="c", detailed=True)) is APPEND
    assert other.duplicate(2) is REBUILD
    other.reset(None)
    other.advance([record(1, OPENED), record(2, Deposited(1))])
    assert other.rebuilt() is DONE and other.result == (2, None)


@attrs.define
class Replying(bank.Account):
    """An account whose deposit also replies (the balance after it)."""

    @handles
    def deposit(self, command: Deposit) -> Any:
        return Decision([Deposited(command.amount)], reply=self.balance + command.amount)


def test_detailed_answer_of_a_stored_command_with_a_reply() -> None:
    live = live_at(OPENED, cls=Replying)
    assert live.start(command(Deposit(7), detailed=True)) is APPEND
    assert live.committed(2) is DONE and live.result == (2, 7)
    assert live.start(command(Deposit(1))) is APPEND
    assert live.committed(3) is DONE and live.result == 8  # not detailed: the reply only
