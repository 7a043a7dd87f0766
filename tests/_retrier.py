"""A process that sends the same commands, with the same command ids, as its twin.

    python tests/_retrier.py STORE_URL --keys 10 --commands 300 --tasks 20 --seed 1

It executes ``Add(i + 1)`` with ``command_id=f"c{i}"`` on ``Tally`` aggregate
``i % keys`` for every ``i`` below ``--commands``, in an order shuffled by
``--seed``, from many concurrent tasks, each command twice over (a retry; and
again after a :class:`ConcurrencyConflict`, as a client with an idempotent id
may), and prints one line per answer:

    ACK <key> <command_id> <version>      the version returned
    ERROR <key> <command_id> <exception>  any error (the test fails on it)
    DONE

Run beside a twin with another seed on the same store: each command must be
applied once, and every answer for a command id must be the same version.
"""

from __future__ import annotations

import argparse
import random
import sys

import trio
from _writer import Add, Tally

from trio_aggregates import ConcurrencyConflict, open_aggregates


async def main(url: str, keys: int, commands: int, tasks: int, seed: int) -> None:
    plan = [i for i in range(commands) for _ in range(2)]
    random.Random(seed).shuffle(plan)
    queue = iter(plan)

    async def worker(repo: object) -> None:
        for i in queue:
            key, command_id = i % keys, f"c{i}"
            while True:
                try:
                    version = await repo.execute(  # type: ignore[attr-defined]
                        key, Add(i + 1), command_id=command_id, timeout=60
                    )
                except ConcurrencyConflict:
                    continue  # the other process kept winning: safe to retry, same id
                except Exception as exc:
                    print(f"ERROR {key} {command_id} {exc!r}", flush=True)
                else:
                    print(f"ACK {key} {command_id} {version}", flush=True)
                break

    async with open_aggregates(Tally, url) as repo, trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker, repo)
    print("DONE", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--commands", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sys.exit(trio.run(main, args.url, args.keys, args.commands, args.tasks, args.seed))
