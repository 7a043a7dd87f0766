"""Tutorial, step 7: an event-sourced domain, plain synchronous code.

Run it (``python docs/tutorial/account.py``) to check the domain without Trio or a store.
"""

import attrs

from trio_aggregates import Aggregate, CommandRejected, applies, event_type, handles


@attrs.frozen
class Deposit:
    amount: int


@event_type("tutorial.deposited")  # the stable name it is stored under
@attrs.frozen
class Deposited:
    amount: int


class InvalidAmount(CommandRejected):
    pass


@attrs.define
class Account(Aggregate):
    balance: int = 0

    @handles
    def deposit(self, command: Deposit) -> Deposited:
        if command.amount <= 0:
            raise InvalidAmount(command.amount)
        return Deposited(command.amount)

    @applies
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount


if __name__ == "__main__":
    account = Account.replay([Deposited(5)])
    assert account.balance == 5
    assert account.decide(Deposit(3)).events == (Deposited(3),)
    assert account.balance == 5  # deciding changed nothing
    try:
        account.decide(Deposit(-1))
    except InvalidAmount:
        pass
    else:
        raise AssertionError("a negative deposit must be rejected")
    print("the domain works: replay, decide, reject")
