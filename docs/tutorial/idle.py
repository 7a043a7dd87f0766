"""Tutorial, step 6: idle aggregates are passivated, and come back on the next message.

Run it: ``python docs/tutorial/idle.py``.
"""

import trio

import trio_aggregates
from trio_aggregates import Call

saved = {}  # stands in for a database: what passivated counters leave behind
wound_down = trio.Event()  # set when a counter has saved its total


async def counter(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
    total = saved.get(key, 0)  # start-up: load the state
    task_status.started()
    async for message in mailbox:
        if isinstance(message, Call):
            total += message.message
            message.reply(total)
    # winding down: the key's next activation waits until this returns
    saved[key] = total
    print(f"{key} wound down (passivated={mailbox.passivated}), saved {total}")
    wound_down.set()


async def main():
    async with trio_aggregates.open_registry(counter, idle_timeout=0.1) as registry:
        print("apples:", await registry.call("apples", 3))
        with trio.fail_after(10):  # after 0.1 s idle, it winds down
            await wound_down.wait()
        print("live:", len(registry))  # the key left when its mailbox closed
        print("apples:", await registry.call("apples", 2))  # a fresh activation: 5
    # at shutdown the counter winds down too (passivated=False)


if __name__ == "__main__":
    trio.run(main)
