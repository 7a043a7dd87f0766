"""How-to: several processes on one database (an SQLite file, ``processes.db``).

Two worker processes deposit into the same five accounts at the same time,
each command with its own ``command_id``; then a third process retries the
first worker's commands. Run it: ``python docs/howto/processes.py`` (run it
again: each run adds its own deposits to the same file).
"""

import subprocess
import sys
import uuid

import trio
from accounts import Account, Deposit  # the domain: a deposit-only account

from trio_aggregates import ConcurrencyConflict, StoreError, open_aggregates

STORE = "sqlite:///processes.db"  # this program's own database file
WORKERS = 2
DEPOSITS = 100  # per worker
ACCOUNTS = [f"acc-{n}" for n in range(5)]


async def execute_with_retry(accounts, key, command, command_id):
    """Run a command until it has an answer; safe, because of its command_id."""
    for attempt in range(10):
        try:
            return await accounts.execute(
                key, command, command_id=command_id, create_if_missing=True, timeout=30
            )
        except (ConcurrencyConflict, StoreError):  # lost races, or a busy database
            await trio.sleep(0.01 * 2**attempt)
    raise RuntimeError(f"no answer for {command_id}")


async def worker(run, number):
    async with open_aggregates(Account, STORE) as accounts:
        for n in range(DEPOSITS):
            key = ACCOUNTS[n % len(ACCOUNTS)]  # every worker writes every account
            await execute_with_retry(accounts, key, Deposit(1), f"{run}-{number}-{n}")


async def total():
    async with open_aggregates(Account, STORE) as accounts:
        balances = []
        for key in ACCOUNTS:
            state, _ = await accounts.replay(key)  # from the events in the file
            balances.append(state.balance)
        return sum(balances)


def start_worker(run, number):
    return subprocess.Popen([sys.executable, __file__, "worker", run, str(number)])


def main():
    run = uuid.uuid4().hex[:8]  # this run's command ids are its own
    before = trio.run(total)
    workers = [start_worker(run, number) for number in range(WORKERS)]
    try:
        codes = [p.wait(timeout=300) for p in workers]
    finally:
        for p in workers:
            p.kill()
    assert codes == [0] * WORKERS, codes
    grown = trio.run(total) - before
    print(f"{WORKERS} processes, {DEPOSITS} deposits each: the balances grew by {grown}")

    retry = start_worker(run, 0)  # worker 0 again: the same commands, the same ids
    assert retry.wait(timeout=300) == 0
    grown = trio.run(total) - before
    print(f"worker 0 retried all its commands from a new process: grown by {grown}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        trio.run(worker, sys.argv[2], int(sys.argv[3]))
    else:
        main()
