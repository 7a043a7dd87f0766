"""Tutorial, steps 1 and 2: a first aggregate, and a registry to run it in.

Run it: ``python docs/tutorial/counter.py`` (it keeps nothing: run it as often as you like).
"""

import trio

import trio_aggregates
from trio_aggregates import Call


async def counter(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
    total = 0  # start-up: load state, open files, ...
    task_status.started()  # ready: the key is registered now
    async for message in mailbox:  # one message at a time, in order
        if isinstance(message, Call):
            total += message.message
            message.reply(total)
    # the loop ended: the registry is shutting down, or we were idle


async def main():
    async with trio_aggregates.open_registry(counter) as registry:
        print(await registry.call("apples", 3))  # 3: activates "apples"
        print(await registry.call("apples", 2))  # 5: same aggregate
        print(await registry.call("pears", 1))  # 1: another one
        print("apples" in registry, len(registry))  # True 2
    # every aggregate has ended here
    print("after the block:", len(registry), "live")  # after the block: 0 live


if __name__ == "__main__":
    trio.run(main)
