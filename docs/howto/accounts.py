"""The domain of the how-to programs ``processes.py`` and ``scale.py``: a deposit-only account.

A module, not a program: the programs next to it import it (Python puts a
script's own directory on ``sys.path``).
"""

import attrs

from trio_aggregates import Aggregate, applies, event_type, handles


@attrs.frozen
class Deposit:
    amount: int


@event_type("howto.deposited")
@attrs.frozen
class Deposited:
    amount: int


@attrs.define
class Account(Aggregate):
    balance: int = 0

    @handles
    def deposit(self, command: Deposit) -> Deposited:
        return Deposited(command.amount)

    @applies
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount
