"""100,000 aggregates end (half crash, half return) and the registry is left empty."""

from __future__ import annotations

import gc
import logging
from typing import Any

import pytest
import trio

from trio_aggregates import AggregateCrashed, Call, Mailbox, open_registry

N = 100_000
WORKERS = 100


class Boom(Exception):
    """Raised by the aggregates told to crash."""


async def test_a_hundred_thousand_aggregates_end_and_every_caller_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 50,000 crash warnings are expected; keep the logging machinery out of the timing.
    caplog.set_level(logging.CRITICAL, logger="trio_aggregates.registry")
    finished = 0

    async def aggregate(
        key: int, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal finished
        try:
            task_status.started()
            async for call in mailbox:
                assert isinstance(call, Call)
                if call.message == "crash":
                    raise Boom(key)
                call.reply(key)
                return
        finally:
            finished += 1

    replies = 0
    crashes = 0

    async def worker(keys: range) -> None:
        nonlocal replies, crashes
        for key in keys:
            try:
                value = await registry.call(key, "crash" if key % 2 else "return")
            except AggregateCrashed as exc:
                assert exc.key == key
                assert isinstance(exc.__cause__, Boom)
                assert exc.__cause__.args == (key,)
                crashes += 1
            else:
                assert value == key
                replies += 1

    async with open_registry(aggregate) as registry:
        # The cyclic garbage collector is half the cost of a burst of spawns (design.md):
        # keep it out of the start-ups, and on for the crashes (tracebacks make cycles).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for key in range(N):
                await registry.register(key)
        finally:
            if gc_was_enabled:
                gc.enable()
        assert len(registry) == N
        assert registry.statistics().activations == N

        async with trio.open_nursery() as nursery:
            for w in range(WORKERS):
                nursery.start_soon(worker, range(w, N, WORKERS))

        assert replies + crashes == N  # every caller answered, once
        assert replies == crashes == N // 2
        assert len(registry) == 0
        assert list(registry) == []
        assert finished == N
        stats = registry.statistics()
        assert stats.live == 0
        assert stats.starting == 0
        assert stats.activations == N  # no call needed a fresh activation
        assert stats.normal_ends == N // 2
        assert stats.crashes == N // 2
        assert stats.passivations == 0
        assert stats.mailbox_backlog == 0
    assert registry.statistics().closed
