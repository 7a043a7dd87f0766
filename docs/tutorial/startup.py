"""Tutorial, step 3: a start-up that declines or fails, and a crash.

Run it: ``python docs/tutorial/startup.py``.
"""

import logging

import trio

import trio_aggregates
from trio_aggregates import AggregateCrashed, AggregateDeclined, AggregateStartError, Call


async def picky(key, mailbox, *, task_status=trio.TASK_STATUS_IGNORED):
    if key.startswith("tmp-"):
        return  # declined: the caller gets AggregateDeclined
    if key == "bad":
        raise ValueError("no such thing")  # failed: the caller gets AggregateStartError
    task_status.started()
    async for message in mailbox:
        if isinstance(message, Call):
            if message.message == "crash":
                raise RuntimeError(f"{key} was asked to crash")  # a crash: AggregateCrashed
            message.reply(f"{key} got {message.message!r}")


async def main():
    async with trio_aggregates.open_registry(picky) as registry:
        print(await registry.call("good", "hello"))
        try:
            await registry.call("tmp-1", "hello")
        except AggregateDeclined as exc:
            print("declined:", exc)
        try:
            await registry.call("bad", "hello")
        except AggregateStartError as exc:
            print("failed to start:", exc, "- cause:", repr(exc.__cause__))
        try:
            await registry.call("good", "crash")
        except AggregateCrashed as exc:
            print("crashed:", repr(exc.__cause__))
        print(await registry.call("good", "hello again"))  # a fresh activation
        stats = registry.statistics()
        print(f"activations={stats.activations} crashes={stats.crashes} declined={stats.declined}")


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # the crash is logged
    trio.run(main)
