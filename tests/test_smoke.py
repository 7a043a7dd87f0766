import trio

import trio_aggregates
from trio_aggregates import Call, Mailbox


async def echo(key: object, mailbox: Mailbox, *, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    async for message in mailbox:
        if isinstance(message, Call):
            message.reply((key, message.message))


async def test_call_round_trip() -> None:
    async with trio_aggregates.open_registry(echo) as registry:
        assert await registry.call("k", 1) == ("k", 1)
        assert "k" in registry
    assert len(registry) == 0
