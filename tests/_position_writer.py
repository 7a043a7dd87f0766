"""A writer process for the global-order test (run as a script, not collected).

    python tests/_position_writer.py STORE_URL --seed 1 --appends 300 --tasks 8 --streams 40

Appends ``appends`` times (1 to 3 events each, to random streams of its own,
``expected_version=None``) from ``tasks`` concurrent tasks through one store,
so that its batches interleave with other processes' transactions, then prints
``DONE <events appended>``. Any error is printed (``ERROR ...``) and exits 1.
"""

from __future__ import annotations

import argparse
import random
import sys

import trio

from trio_aggregates import NewEvent, open_store


async def write(url: str, seed: int, appends: int, tasks: int, streams: int) -> int:
    rng = random.Random(seed)
    plan = [
        (rng.randrange(streams), rng.randint(1, 3), rng.randint(0, 2000)) for _ in range(appends)
    ]
    total = sum(count for _, count, _ in plan)
    async with open_store(url) as store:

        async def worker(part: list[tuple[int, int, int]]) -> None:
            for stream, count, size in part:
                events = [NewEvent("Written", b"x" * size) for _ in range(count)]
                await store.append(f"w{seed}-{stream}", events, expected_version=None)

        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(worker, plan[n::tasks])
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--streams", type=int, default=40)
    args = parser.parse_args()
    try:
        total = trio.run(write, args.url, args.seed, args.appends, args.tasks, args.streams)
    except Exception as exc:
        print(f"ERROR {exc!r}", flush=True)
        sys.exit(1)
    print(f"DONE {total}", flush=True)


if __name__ == "__main__":
    main()
