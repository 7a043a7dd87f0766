"""How-to: snapshots, and upcasting an event whose shape changed.

Two versions of one program share a store: version 1 stores deposits in
whole units and snapshots every 3 events; version 2 counts cents, reads the
old events through an upcaster, and ignores version 1's snapshots (its state
has another shape). Run it: ``python docs/howto/snapshots.py`` (in memory:
run it as often as you like).
"""

from typing import ClassVar

import attrs
import trio

from trio_aggregates import (
    Aggregate,
    InMemoryEventStore,
    applies,
    event_type,
    handles,
    open_aggregates,
)

# -- version 1 of the program ---------------------------------------------------


@attrs.frozen
class Deposit:
    amount: int


@event_type("wallet.deposited")
@attrs.frozen
class Deposited:
    amount: int


@event_type("Wallet")  # the state's type name, stored with each snapshot
@attrs.define
class WalletV1(Aggregate):
    category = "Wallet"  # the streams are "Wallet-<key>"
    snapshot_every = 3  # a snapshot at versions 3, 6, 9, ...

    balance: int = 0

    @handles
    def deposit(self, command: Deposit) -> Deposited:
        return Deposited(command.amount)

    @applies
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount


# -- version 2: cents, and an upcaster for the old events ------------------------


@attrs.frozen
class DepositCents:
    cents: int


@event_type("wallet.deposited.v2")
@attrs.frozen
class DepositedCents:
    cents: int


def deposited_v1_to_v2(old: dict) -> tuple[str, dict]:
    """An old ``wallet.deposited`` event, as today's ``wallet.deposited.v2``."""
    return "wallet.deposited.v2", {"cents": old["amount"] * 100}


@event_type("Wallet")
@attrs.define
class WalletV2(Aggregate):
    category = "Wallet"
    snapshot_every = 3
    snapshot_schema = 2  # the state's shape changed: version 1's snapshots are ignored
    upcasters: ClassVar = {"wallet.deposited": deposited_v1_to_v2}  # old name -> upcaster

    cents: int = 0

    @handles
    def deposit(self, command: DepositCents) -> DepositedCents:
        return DepositedCents(command.cents)

    @applies
    def deposited(self, event: DepositedCents) -> None:
        self.cents += event.cents


async def main():
    store = InMemoryEventStore()  # one store, shared by both versions of the program

    async with open_aggregates(WalletV1, store) as wallets:
        await wallets.execute("ann", Deposit(10), create_if_missing=True)
        for amount in (20, 30, 40):
            await wallets.execute("ann", Deposit(amount))
        print("version 1: balance", (await wallets.load("ann")).balance)
    snapshot = await store.load_snapshot("Wallet-ann")
    print(f"snapshot: version {snapshot.version}, schema {snapshot.schema}, {snapshot.data!r}")

    async with open_aggregates(WalletV2, store) as wallets:  # the program, upgraded
        print("version 2: cents", (await wallets.load("ann")).cents)  # rebuilt from events
        await wallets.execute("ann", DepositCents(50))
        await wallets.execute("ann", DepositCents(60))
        print("version 2: cents", (await wallets.load("ann")).cents)
        state, version = await wallets.replay("ann")  # ignores snapshots: a check
        print(f"replay: {state.cents} cents at version {version}")
    snapshot = await store.load_snapshot("Wallet-ann")
    print(f"snapshot: version {snapshot.version}, schema {snapshot.schema}, {snapshot.data!r}")


if __name__ == "__main__":
    trio.run(main)
