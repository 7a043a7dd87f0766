"""A tour of the registry: one task and one mailbox per counter.

Run it with ``python examples/counters.py``. It starts a registry, sends calls
to a thousand counters from a hundred concurrent tasks, shows a crash being
contained and idle counters being passivated (each saves its total when its
loop ends, and picks it up again on its next activation), then prints the
statistics.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

import trio_aggregates
from trio_aggregates import Call, Mailbox

#: Where a counter keeps its total while it is passivated (a database, in real life).
saved: dict[Any, int] = {}


async def counter(
    key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """An aggregate function: start up, report ready, then serve the mailbox."""
    total = saved.pop(key, 0)  # start-up: load the state
    task_status.started()
    async for message in mailbox:
        if isinstance(message, Call):
            if message.message == "crash":
                raise RuntimeError(f"counter {key} was asked to crash")
            total += message.message
            message.reply(total)
    # The loop ended: the registry is shutting down, or we were idle too long.
    # Save the state (real code would await a write here). The key's next
    # activation waits until this task has returned, so it never starts from
    # a stale total.
    saved[key] = total


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    async with trio_aggregates.open_registry(counter, idle_timeout=0.5) as registry:

        async def client(n: int) -> None:
            for i in range(100):
                await registry.call(f"counter-{(n * 7 + i) % 1000}", 1)

        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(client, n)
        totals = [await registry.call(f"counter-{i}", 0) for i in range(1000)]
        print(f"{len(totals)} counters, {sum(totals)} increments in all")

        try:
            await registry.call("counter-1", "crash")
        except trio_aggregates.AggregateCrashed as exc:
            print(f"contained: {exc} (cause: {exc.__cause__!r})")
        print("counter-1 after the crash starts afresh at", await registry.call("counter-1", 0))

        await trio.sleep(1)  # longer than idle_timeout: every counter passivates
        print(f"after 1 s idle: {len(registry)} live counters")
        print(registry.statistics())


if __name__ == "__main__":
    trio.run(main)
