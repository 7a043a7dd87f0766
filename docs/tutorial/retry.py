"""Tutorial, step 9: a command whose caller gave up, and a safe retry with ``command_id``.

Run it: ``python docs/tutorial/retry.py`` (about 1 s: the store is slow on purpose).
"""

import trio
from account import Account, Deposit

from trio_aggregates import CallTimeout, InMemoryEventStore, open_aggregates


class SlowStore(InMemoryEventStore):
    """An in-memory store whose appends take half a second, like a distant database."""

    async def append(self, *args, **kwargs):
        await trio.sleep(0.5)
        return await super().append(*args, **kwargs)


async def main():
    async with open_aggregates(Account, SlowStore()) as accounts:
        await accounts.create("alice", Deposit(100), command_id="open-alice")

        try:  # the aggregate takes the command at once; its append takes 0.5 s
            await accounts.execute("alice", Deposit(50), command_id="deposit-1", timeout=0.1)
        except CallTimeout:
            print("the deposit timed out: was it stored? the caller cannot tell")

        # Retry with the same command_id: applied at most once, whatever happened.
        version = await accounts.execute("alice", Deposit(50), command_id="deposit-1")
        print(f"the retry answers version {version}")

        alice = await accounts.load("alice")
        print(f"alice's balance: {alice.balance}")  # 150: the deposit counted once
        print(f"events in her stream: {len(await accounts.history('alice'))}")  # 2


if __name__ == "__main__":
    trio.run(main)
