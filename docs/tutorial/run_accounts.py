"""Tutorial, step 8: the accounts on an event store (``tutorial.db`` in the current directory).

Run it twice: ``python docs/tutorial/run_accounts.py``. The second run finds
the events of the first.
"""

import trio
from account import Account, Deposit, InvalidAmount

from trio_aggregates import AlreadyExists, open_aggregates


async def main():
    async with open_aggregates(Account, "sqlite:///tutorial.db") as accounts:
        # create: a new stream, or AlreadyExists if the stream has events.
        try:
            version = await accounts.create("alice", Deposit(100))
            print(f"created alice: version {version}")
        except AlreadyExists:
            print("alice exists already (an earlier run created her)")

        # execute: an existing stream; returns its version after the command.
        version = await accounts.execute("alice", Deposit(50))
        print(f"deposited 50: version {version}")

        # create_if_missing: either, in one call.
        version = await accounts.execute("bob", Deposit(10), create_if_missing=True)
        print(f"deposited 10 for bob: version {version}")

        try:
            await accounts.execute("alice", Deposit(-5))
        except InvalidAmount as exc:
            print(f"rejected: {exc!r}")

        alice = await accounts.load("alice")
        print(f"alice's balance: {alice.balance}")


if __name__ == "__main__":
    trio.run(main)
