"""Tutorial, step 5: a full mailbox, and what its callers see.

Run it: ``python docs/tutorial/backpressure.py``.
"""

import trio
import trio.testing

import trio_aggregates
from trio_aggregates import Call, CallTimeout

gate = trio.Event()  # the aggregate is stuck until this is set


async def stuck_counter(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
    total = 0
    task_status.started()
    async for message in mailbox:
        if isinstance(message, Call):
            await gate.wait()  # a slow aggregate: it falls behind its callers
            total += message.message
            message.reply(total)


async def main():
    async with trio_aggregates.open_registry(stuck_counter, mailbox_size=2) as registry:
        async with trio.open_nursery() as nursery:
            for _ in range(4):  # four callers, each adding 1
                nursery.start_soon(registry.call, "apples", 1)
            await trio.testing.wait_all_tasks_blocked()  # let them all get as far as they can
            # One call is in the aggregate's hands, two fill the mailbox, and
            # the fourth caller waits in `call` for space.
            print("queued:", registry.statistics().mailbox_backlog)  # queued: 2

            try:  # a plain send that must not wait
                registry.get("apples").send_nowait("hello")
            except trio.WouldBlock:
                print("send_nowait: the mailbox is full (trio.WouldBlock)")

            try:  # the time spent waiting for space counts toward the timeout
                await registry.call("apples", 100, timeout=0.2)
            except CallTimeout:
                print("+100 timed out waiting for space: it was never queued")

            gate.set()  # the aggregate catches up; every waiting caller gets its answer
        print("apples:", await registry.call("apples", 0))  # apples: 4


if __name__ == "__main__":
    trio.run(main)
