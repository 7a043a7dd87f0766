"""Checked by mypy --strict (CI's ``mypy`` run lists this file), never run.

A user's aggregate, projection and process manager keep their methods' types
through ``@handles``, ``@applies``, ``@projects`` and ``@reacts``, bare or
with types: each ``assert_type`` fails the mypy run if a decorator erases them.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

import attrs

from trio_aggregates import (
    Aggregate,
    EventContext,
    ProcessManager,
    Projection,
    applies,
    handles,
    projects,
    reacts,
)


@attrs.frozen
class Deposit:
    amount: int


@attrs.frozen
class Deposited:
    amount: int


@attrs.define
class Account(Aggregate):
    balance: int = 0

    @handles
    def deposit(self, command: Deposit) -> list[object]:
        return [Deposited(command.amount)]

    @applies(Deposited)
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount


class Balances(Projection):
    reads = (Account,)

    @projects
    def on_deposited(self, event: Deposited, ctx: EventContext) -> None:
        pass


class Notifier(ProcessManager):
    reads = (Account,)

    @reacts(Deposited)
    async def on_deposited(self, event: Deposited, ctx: EventContext) -> None:
        pass


def check(account: Account, balances: Balances, notifier: Notifier, ctx: EventContext) -> None:
    assert_type(account.deposit(Deposit(1)), list[object])
    assert_type(account.deposited(Deposited(1)), None)
    assert_type(balances.on_deposited(Deposited(1), ctx), None)
    reaction = assert_type(notifier.on_deposited(Deposited(1), ctx), Coroutine[Any, Any, None])
    reaction.close()
