"""Tutorial, step 4: what a cancelled or timed-out call does.

Run it: ``python docs/tutorial/cancellation.py`` (about 3 s: the aggregate is slow on purpose).
"""

import trio

import trio_aggregates
from trio_aggregates import Call, CallTimeout


async def slow_counter(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
    total = 0
    task_status.started()
    async for message in mailbox:
        if isinstance(message, Call):
            await trio.sleep(1)  # slow work: a second per message
            total += message.message
            message.reply(total)


async def main():
    async with trio_aggregates.open_registry(slow_counter) as registry:
        print("apples:", await registry.call("apples", 1))  # 1

        # The aggregate is idle, so it takes this call at once; the caller
        # gives up after 0.25 s, but the aggregate finishes what it took.
        try:
            await registry.call("apples", 5, timeout=0.25)
        except CallTimeout:
            print("+5 timed out (the aggregate had already taken it)")

        # The aggregate is still busy with the +5, so this call is queued;
        # the caller gives up while it waits in the mailbox: it is withdrawn.
        with trio.move_on_after(0.1):
            await registry.call("apples", 7)
        print("+7 cancelled (it was still queued)")

        # 6: the +5 was applied, the +7 never reached the aggregate.
        print("apples:", await registry.call("apples", 0))


if __name__ == "__main__":
    trio.run(main)
