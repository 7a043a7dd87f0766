"""A writer process for the multi-process tests (run as a script, not collected).

    python tests/_writer.py STORE_URL --keys 100 --commands 2000 --tasks 20 --seed 1

It executes ``Add`` commands on ``Tally`` aggregates ``0..keys-1`` (the streams
must exist: the test creates them) from many concurrent tasks, and prints one
line per outcome, flushed at once, so that a parent that kills it knows what
was acknowledged before the kill:

    ACK <key> <command_id> <amount>       the command's events are durable
    CONFLICT <key> <command_id>           ConcurrencyConflict after the retries
    ERROR <key> <command_id> <exception>  any other error (the test fails on it)
    DONE
"""

from __future__ import annotations

import argparse
import random
import sys
import uuid

import attrs
import trio

from trio_aggregates import (
    Aggregate,
    ConcurrencyConflict,
    applies,
    event_type,
    handles,
    open_aggregates,
)


@attrs.frozen
class Open:
    pass


@attrs.frozen
class Add:
    amount: int
    parts: int = 3


@event_type("tally.opened")
@attrs.frozen
class Opened:
    pass


@event_type("tally.added")
@attrs.frozen
class Added:
    amount: int
    part: int
    parts: int


@attrs.define
class Tally(Aggregate):
    """Each Add is stored as ``parts`` events: a half-written batch would show."""

    total: int = 0
    parts_seen: int = 0

    @handles
    def open(self, command: Open) -> Opened:
        return Opened()

    @handles
    def add(self, command: Add) -> list[Added]:
        share, rest = divmod(command.amount, command.parts)
        amounts = [share + (1 if i < rest else 0) for i in range(command.parts)]
        return [Added(a, i, command.parts) for i, a in enumerate(amounts)]

    @applies
    def opened(self, event: Opened) -> None:
        pass

    @applies
    def added(self, event: Added) -> None:
        self.total += event.amount
        self.parts_seen += 1


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def hammer(url: str, keys: int, commands: int, tasks: int, seed: int) -> None:
    rng = random.Random(seed)
    plan = [(rng.randrange(keys), rng.randrange(1, 1000)) for _ in range(commands)]
    async with open_aggregates(Tally, url, max_retries=10) as tallies:

        async def worker(part: list[tuple[int, int]]) -> None:
            for key, amount in part:
                command_id = uuid.uuid4().hex
                try:
                    await tallies.execute(key, Add(amount), command_id=command_id)
                except ConcurrencyConflict:
                    emit(f"CONFLICT {key} {command_id}")
                except Exception as exc:
                    emit(f"ERROR {key} {command_id} {exc!r}")
                else:
                    emit(f"ACK {key} {command_id} {amount}")

        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(worker, plan[n::tasks])
    emit("DONE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trio.run(hammer, args.url, args.keys, args.commands, args.tasks, args.seed)


if __name__ == "__main__":
    main()
