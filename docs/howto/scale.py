"""How-to: many live aggregates, and the pauses of the cyclic garbage collector.

Warms up 10,000 event-sourced aggregates, then freezes them out of the
collector's reach with ``gc.freeze()``. Run it: ``python docs/howto/scale.py``
(in memory: run it as often as you like).
"""

import gc
import time

import trio
from accounts import Account, Deposit  # the domain: a deposit-only account

from trio_aggregates import open_aggregates

WARM = 10_000


def full_collection():
    """A full collection: how many objects it examined, and how long it took."""
    examined = len(gc.get_objects())  # every tracked object but the frozen ones
    started = time.perf_counter()
    gc.collect()
    return examined, time.perf_counter() - started


async def main():
    # idle_timeout keeps the live set bounded: an account idle for 10 minutes
    # is passivated (its objects freed), and rebuilt from its events when needed.
    async with open_aggregates(Account, "memory://", idle_timeout=600) as accounts:
        for key in range(WARM):  # the warm-up: activate the accounts we will serve
            await accounts.execute(key, Deposit(1), create_if_missing=True)
        print(f"{len(accounts.registry):,} live aggregates")

        examined, took = full_collection()
        print(f"a full collection examined {examined:,} objects in {took * 1e3:.0f} ms")

        gc.freeze()  # after the warm-up: what is live now is never examined again
        examined_frozen, took = full_collection()
        print(f"after gc.freeze(): {examined_frozen:,} objects in {took * 1e3:.0f} ms")
        assert examined_frozen < examined / 10

        for key in range(WARM):  # the aggregates work on, frozen or not
            await accounts.execute(key, Deposit(1))
        print("balance of account 7:", (await accounts.load(7)).balance)


if __name__ == "__main__":
    trio.run(main)
