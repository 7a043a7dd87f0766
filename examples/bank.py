"""Bank accounts and users: the example domain of trio_aggregates.

The domain half is pure (no Trio, no store): commands and events are attrs
classes, ``Account`` and ``User`` decide and evolve. The run half,
:func:`main`, opens the aggregates on an event store (SQLite by default, a
file ``bank.db`` next to where you run it), opens accounts, moves money
between them from many concurrent tasks, and checks that no money appeared or
vanished and that every live state equals a replay of its stream.

    python examples/bank.py                        # SQLite, ./bank.db
    python examples/bank.py --store memory://      # in memory
    python examples/bank.py --store postgresql://user@host/db

The same domain served over TCP, loaded, and checked from outside::

    trio-aggregates load --serve examples/bank.py:app
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import attrs
import trio

from trio_aggregates import (
    Aggregate,
    AggregateRepository,
    CommandRejected,
    Decision,
    applies,
    event_type,
    handles,
    open_aggregates,
)

# -- accounts: commands ------------------------------------------------------


@attrs.frozen
class OpenAccount:
    owner: str
    overdraft_limit: int = 0


@attrs.frozen
class Deposit:
    amount: int
    reference: str | None = None


@attrs.frozen
class Withdraw:
    amount: int
    reference: str | None = None


@attrs.frozen
class CloseAccount:
    pass


@attrs.frozen
class GetBalance:
    pass


# -- accounts: events --------------------------------------------------------


@event_type("account.opened")
@attrs.frozen
class AccountOpened:
    owner: str
    overdraft_limit: int


@event_type("account.deposited")
@attrs.frozen
class Deposited:
    amount: int
    reference: str | None = None


@event_type("account.withdrawn")
@attrs.frozen
class Withdrawn:
    amount: int
    reference: str | None = None


@event_type("account.closed")
@attrs.frozen
class AccountClosed:
    pass


# -- accounts: domain errors -------------------------------------------------


class InvalidAmount(CommandRejected):
    """Amounts are positive whole cents."""


class InsufficientFunds(CommandRejected):
    """The withdrawal would take the balance below the overdraft limit."""


class AccountIsClosed(CommandRejected):
    """The account is closed: no more movements."""


class BalanceNotZero(CommandRejected):
    """Only an account with a zero balance can be closed."""


@attrs.define
class Account(Aggregate):
    """A bank account. Amounts are in cents."""

    snapshot_every = 50

    owner: str = ""
    balance: int = 0
    overdraft_limit: int = 0
    closed: bool = False

    @handles
    def open(self, command: OpenAccount) -> AccountOpened:
        if command.overdraft_limit < 0:
            raise InvalidAmount(f"overdraft limit {command.overdraft_limit} < 0")
        return AccountOpened(command.owner, command.overdraft_limit)

    @handles
    def deposit(self, command: Deposit) -> Deposited:
        self._check_movement(command.amount)
        return Deposited(command.amount, command.reference)

    @handles
    def withdraw(self, command: Withdraw) -> Withdrawn:
        self._check_movement(command.amount)
        if self.balance - command.amount < -self.overdraft_limit:
            raise InsufficientFunds(
                f"balance {self.balance}, overdraft {self.overdraft_limit}, asked {command.amount}"
            )
        return Withdrawn(command.amount, command.reference)

    @handles
    def close(self, command: CloseAccount) -> AccountClosed:
        if self.closed:
            raise AccountIsClosed("already closed")
        if self.balance != 0:
            raise BalanceNotZero(f"balance is {self.balance}")
        return AccountClosed()

    @handles
    def get_balance(self, command: GetBalance) -> Decision:
        return Decision(reply=self.balance)

    def _check_movement(self, amount: int) -> None:
        if self.closed:
            raise AccountIsClosed("the account is closed")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise InvalidAmount(f"amount must be a positive int, not {amount!r}")

    @applies
    def opened(self, event: AccountOpened) -> None:
        self.owner = event.owner
        self.overdraft_limit = event.overdraft_limit

    @applies
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount

    @applies
    def withdrawn(self, event: Withdrawn) -> None:
        self.balance -= event.amount

    @applies
    def was_closed(self, event: AccountClosed) -> None:
        self.closed = True


async def transfer(
    accounts: AggregateRepository[Account], source: str, target: str, amount: int
) -> bool:
    """Move ``amount`` from ``source`` to ``target``; return whether it happened.

    Two commands on two aggregates, not one transaction: the withdrawal comes
    first, and if the deposit is refused the money goes back (a compensating
    deposit). Both carry the transfer's id, so the streams tell the story.
    """
    reference = f"transfer:{uuid.uuid4().hex}"
    try:
        await accounts.execute(source, Withdraw(amount, reference), correlation_id=reference)
    except CommandRejected:
        return False
    try:
        await accounts.execute(target, Deposit(amount, reference), correlation_id=reference)
    except CommandRejected:
        await accounts.execute(source, Deposit(amount, f"refund:{reference}"))
        return False
    return True


# -- users (the original's example app) --------------------------------------


@attrs.frozen
class RegisterUser:
    name: str
    email: str


@attrs.frozen
class ChangeEmail:
    email: str


@attrs.frozen
class DeactivateUser:
    reason: str = ""


@event_type("user.registered")
@attrs.frozen
class UserRegistered:
    name: str
    email: str


@event_type("user.email_changed")
@attrs.frozen
class EmailChanged:
    old: str
    new: str


@event_type("user.deactivated")
@attrs.frozen
class UserDeactivated:
    reason: str


class InvalidEmail(CommandRejected):
    """The e-mail address does not look like one."""


class UserInactive(CommandRejected):
    """The user was deactivated."""


@attrs.define
class User(Aggregate):
    name: str = ""
    email: str = ""
    active: bool = False

    @handles
    def register(self, command: RegisterUser) -> UserRegistered:
        _check_email(command.email)
        return UserRegistered(command.name, command.email)

    @handles
    def change_email(self, command: ChangeEmail) -> list[EmailChanged]:
        if not self.active:
            raise UserInactive(self.name)
        _check_email(command.email)
        if command.email == self.email:
            return []  # nothing to do: no event, the version stays
        return [EmailChanged(self.email, command.email)]

    @handles
    def deactivate(self, command: DeactivateUser) -> UserDeactivated:
        if not self.active:
            raise UserInactive(self.name)
        return UserDeactivated(command.reason)

    @applies
    def registered(self, event: UserRegistered) -> None:
        self.name, self.email, self.active = event.name, event.email, True

    @applies
    def email_changed(self, event: EmailChanged) -> None:
        self.email = event.new

    @applies
    def deactivated(self, event: UserDeactivated) -> None:
        self.active = False


def _check_email(email: str) -> None:
    local, at, domain = email.partition("@")
    if not (local and at and "." in domain):
        raise InvalidEmail(f"{email!r} is not an e-mail address")


#: The app: what ``trio-aggregates serve examples/bank.py:app`` serves over TCP (wire type
#: names ``Account`` and ``User``, command names the command classes' names).
app = [Account, User]


# -- the run -----------------------------------------------------------------


async def run_bank(
    store: str, *, accounts_count: int = 100, transfers: int = 2000, tasks: int = 50
) -> dict[str, Any]:
    """Open accounts, run concurrent transfers, check the books; return a summary."""
    run = uuid.uuid4().hex[:8]
    keys = [f"{run}-{i}" for i in range(accounts_count)]
    started = time.perf_counter()
    async with open_aggregates(Account, store) as accounts:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(accounts.create, key, OpenAccount(f"owner of {key}"))
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(accounts.execute, key, Deposit(1000, "initial"))

        done = 0

        async def worker(n: int) -> None:
            nonlocal done
            for i in range(transfers // tasks):
                source = keys[(n * 31 + i * 7) % len(keys)]
                target = keys[(n * 17 + i * 13 + 1) % len(keys)]
                if source != target and await transfer(accounts, source, target, 1 + i % 400):
                    done += 1

        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(worker, n)

        balances = [await accounts.execute(key, GetBalance()) for key in keys]
        for key in keys:
            live = await accounts.load(key)
            replayed, _ = await accounts.replay(key)
            assert live == replayed, f"{key}: live {live} != replay {replayed}"
        statistics = accounts.registry.statistics()
    elapsed = time.perf_counter() - started
    return {
        "accounts": len(keys),
        "transfers_done": done,
        "total_balance": sum(balances),
        "expected_total": 1000 * len(keys),
        "seconds": elapsed,
        "activations": statistics.activations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///bank.db", help="event store URL")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--transfers", type=int, default=2000)
    args = parser.parse_args()
    summary = trio.run(
        lambda: run_bank(args.store, accounts_count=args.accounts, transfers=args.transfers)
    )
    print(
        f"{summary['accounts']} accounts, {summary['transfers_done']} transfers "
        f"in {summary['seconds']:.2f} s on {args.store}; total balance "
        f"{summary['total_balance']} (expected {summary['expected_total']})"
    )
    if summary["total_balance"] != summary["expected_total"]:
        raise SystemExit("the books do not balance!")
    print("every live account equals a replay of its stream")


if __name__ == "__main__":
    main()
