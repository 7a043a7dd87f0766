"""The registry against bare Trio: lookups, calls, activations, memory.

One process; every figure of trio_aggregates is measured beside the same work
done by hand with bare Trio (a task per key, its memory channel, a dict of send
ends), and reported as ``trio_aggregates / bare``:

1. ``get``: ``registry.get(key)`` vs ``d.get(key)`` over 10,000 live keys
   (ns per lookup; target: at most 2x).
2. ``call``: ``await registry.call(key, msg)`` vs the obvious hand-written
   request/reply (a fresh 1-slot memory channel per request), (a) one caller
   and one aggregate, sequential; (b) 1,000 concurrent callers over 10,000
   aggregates (round trips/s; target: at least 0.8x). The design's other
   floors (``trio.Event`` + slot; ``wait_task_rescheduled``/``reschedule``)
   are shown for context.
3. ``activate``: ``registry.register(key)`` of N aggregates vs ``nursery.start``
   of a task with its own memory channel, recording the send end in a dict
   (activations/s, GC on; target: at least 0.8x). GC off is shown for context.
4. ``memory``: bytes per idle aggregate, 100,000 of them (20,000 with
   ``--quick``), measured with ``tracemalloc`` (target: at most 1.15x).
5. ``scale``: how memory and the garbage collector grow with the number of
   live aggregates (1,000 to 1,000,000; 1,000 to 50,000 with ``--quick``;
   ``--scale-sizes 1000,50000`` to choose). Each point runs in a fresh
   process (so no point inherits another's freed memory) and measures, for
   bare Trio, the registry (``echo_aggregate``) and event-sourced
   ``Account`` aggregates of ``examples/bank.py`` (``open_aggregates(Account,
   "memory://", idle_timeout=None)`` + ``create``, their events in the
   in-memory store): the resident memory (RSS) added per aggregate, the
   objects the cyclic garbage collector tracks per aggregate, and how long a
   full ``gc.collect()`` takes with all of them live, before and after
   ``gc.freeze()``. For information; no target.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_registry.py --quick --json /tmp/registry.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio
from _common import (
    Report,
    apply_reps,
    gc_disabled,
    interleaved,
    interleaved_async,
    parse_args,
    run_json_process,
)

import trio_aggregates
from trio_aggregates import Mailbox

SECTIONS = ("get", "call", "activate", "memory", "scale")

#: The registry's default mailbox size; the bare channels get the same buffer.
MAILBOX_SIZE = 64

perf_counter = time.perf_counter

# The bare code opens its channels untyped (``open_memory_channel(n)``, not
# ``open_memory_channel[Any](n)``): the subscript makes every call go through
# ``typing``, a cost the obvious hand-written code need not pay.
Send = trio.MemorySendChannel[Any]
Receive = trio.MemoryReceiveChannel[Any]


# -- the aggregate, both ways -------------------------------------------------
#
# Both sides do the same work: start-up (nothing), report ready, then serve the
# mailbox, answering each request with what it carried.


async def echo_aggregate(
    key: Any, mailbox: Mailbox, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """The registry side: answers every Call with its message."""
    task_status.started()
    async for message in mailbox:
        message.reply(message.message)


async def bare_server(
    key: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """The bare side, the obvious way: requests are ``(message, reply_send)``."""
    send: Send
    receive: Receive
    send, receive = trio.open_memory_channel(MAILBOX_SIZE)
    task_status.started(send)
    async for message, reply in receive:
        reply.send_nowait(message)


async def bare_server_lean(
    key: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """:func:`bare_server` with ``del task_status`` (the design's memory floor)."""
    send: Send
    receive: Receive
    send, receive = trio.open_memory_channel(MAILBOX_SIZE)
    task_status.started(send)
    del task_status
    async for message, reply in receive:
        reply.send_nowait(message)


async def event_server(
    key: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """Floor: requests are ``(message, event, slot)``; the answer goes in the slot."""
    send: Send
    receive: Receive
    send, receive = trio.open_memory_channel(math.inf)
    task_status.started(send)
    async for message, event, slot in receive:
        slot.append(message)
        event.set()


async def lowlevel_server(
    key: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """Floor: requests are ``(message, task)``; the answer reschedules the task."""
    send: Send
    receive: Receive
    send, receive = trio.open_memory_channel(math.inf)
    task_status.started(send)
    reschedule = trio.lowlevel.reschedule
    Value = outcome.Value
    async for message, task in receive:
        reschedule(task, Value(message))


def _abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


# -- the callers ----------------------------------------------------------------
#
# A caller does one round trip per key in ``keys``, in order, and returns the
# last answer (checked once, outside the timed loops).

Caller = Callable[[list[Any]], Awaitable[Any]]


def registry_caller(registry: trio_aggregates.Registry) -> Caller:
    async def run(keys: list[Any]) -> Any:
        call = registry.call
        answer = None
        for key in keys:
            answer = await call(key, key)
        return answer

    return run


def bare_channel_caller(table: dict[Any, trio.MemorySendChannel[Any]]) -> Caller:
    """The obvious hand-written way: ``await send(...)``, ``await receive()``."""

    async def run(keys: list[Any]) -> Any:
        answer = None
        open_channel = trio.open_memory_channel
        for key in keys:
            reply_send: Send
            reply_receive: Receive
            reply_send, reply_receive = open_channel(1)
            await table[key].send((key, reply_send))
            answer = await reply_receive.receive()
        return answer

    return run


def bare_channel_nowait_caller(table: dict[Any, trio.MemorySendChannel[Any]]) -> Caller:
    """As :func:`bare_channel_caller`, but the request goes with ``send_nowait`` first
    (no checkpoint when the mailbox has room), as ``registry.call`` does."""

    async def run(keys: list[Any]) -> Any:
        answer = None
        open_channel = trio.open_memory_channel
        WouldBlock = trio.WouldBlock
        for key in keys:
            reply_send: Send
            reply_receive: Receive
            reply_send, reply_receive = open_channel(1)
            send = table[key]
            request = (key, reply_send)
            try:
                send.send_nowait(request)
            except WouldBlock:
                await send.send(request)
            answer = await reply_receive.receive()
        return answer

    return run


def event_caller(table: dict[Any, trio.MemorySendChannel[Any]]) -> Caller:
    async def run(keys: list[Any]) -> Any:
        answer = None
        Event = trio.Event
        for key in keys:
            event = Event()
            slot: list[Any] = []
            table[key].send_nowait((key, event, slot))
            await event.wait()
            answer = slot[0]
        return answer

    return run


def lowlevel_caller(table: dict[Any, trio.MemorySendChannel[Any]]) -> Caller:
    async def run(keys: list[Any]) -> Any:
        answer = None
        current_task = trio.lowlevel.current_task
        wait = trio.lowlevel.wait_task_rescheduled
        for key in keys:
            table[key].send_nowait((key, current_task()))
            answer = await wait(_abort)
        return answer

    return run


async def check_answers(caller_factory: Callable[[Any], Caller], target: Any, key: Any) -> None:
    """One round trip outside the timing, to prove the variant really answers."""
    answer = await caller_factory(target)([key])
    if answer != key:
        raise AssertionError(f"{caller_factory.__name__} answered {answer!r}, not {key!r}")


async def time_callers(caller: Caller, key_lists: list[list[Any]]) -> float:
    """Round trips per second of ``len(key_lists)`` concurrent callers."""
    total = sum(len(keys) for keys in key_lists)
    start = perf_counter()
    if len(key_lists) == 1:
        await caller(key_lists[0])
    else:
        async with trio.open_nursery() as nursery:
            for keys in key_lists:
                nursery.start_soon(caller, keys)
    return total / (perf_counter() - start)


async def start_servers(
    nursery: trio.Nursery, server: Callable[..., Awaitable[None]], keys: list[Any]
) -> dict[Any, trio.MemorySendChannel[Any]]:
    table: dict[Any, trio.MemorySendChannel[Any]] = {}
    for key in keys:
        table[key] = await nursery.start(server, key)
    return table


def close_all(table: dict[Any, trio.MemorySendChannel[Any]]) -> None:
    for send in table.values():
        send.close()


# -- 1 and 2b: get, and many callers over many aggregates ----------------------


async def bench_many(report: Report, args: Any, p: dict[str, Any]) -> None:
    n_keys: int = p["live_keys"]
    keys = list(range(n_keys))
    async with (
        trio_aggregates.open_registry(echo_aggregate, mailbox_size=MAILBOX_SIZE) as registry,
        trio.open_nursery() as nursery,
    ):
        for key in keys:
            await registry.register(key)
        bare = await start_servers(nursery, bare_server, keys)
        floor = await start_servers(nursery, lowlevel_server, keys)
        assert len(registry) == n_keys

        if "get" in args.only:
            bench_get(report, p, registry, bare, keys)

        if "call" in args.only:
            callers: int = p["concurrent_callers"]
            per_caller: int = p["concurrent_calls"] // callers
            rng = random.Random(1)
            key_lists = [[rng.randrange(n_keys) for _ in range(per_caller)] for _ in range(callers)]
            await check_answers(registry_caller, registry, 0)
            await check_answers(bare_channel_caller, bare, 0)
            await check_answers(lowlevel_caller, floor, 0)
            variants = {
                "bare": lambda: time_callers(bare_channel_caller(bare), key_lists),
                "library": lambda: time_callers(registry_caller(registry), key_lists),
                "lowlevel": lambda: time_callers(lowlevel_caller(floor), key_lists),
            }
            s = await interleaved_async(p["reps_call"], variants)
            report.compare(
                "call_concurrent",
                f"call, {callers:,} callers over {n_keys:,} aggregates (round trips/s)",
                "ops/s",
                "higher",
                s["bare"],
                s["library"],
                target=0.8,
                note="bare: fresh 1-slot reply channel per request, await send/receive",
            )
            report.add_context(
                "call_concurrent_floor_lowlevel",
                f"  floor: wait_task_rescheduled/reschedule, {callers:,} callers",
                "ops/s",
                "higher",
                s["lowlevel"],
                relative_to=("library", max(s["library"])),
            )
        close_all(bare)
        close_all(floor)


def bench_get(
    report: Report,
    p: dict[str, Any],
    registry: trio_aggregates.Registry,
    bare: dict[Any, trio.MemorySendChannel[Any]],
    keys: list[Any],
) -> None:
    order = keys[:]
    random.Random(0).shuffle(order)
    loops: int = p["get_loops"]
    lookups = loops * len(order)

    def timed(get: Callable[[Any], Any]) -> Callable[[], float]:
        def run() -> float:
            start = perf_counter()
            for _ in range(loops):
                for key in order:
                    get(key)
            return (perf_counter() - start) * 1e9 / lookups

        return run

    def empty() -> float:
        start = perf_counter()
        for _ in range(loops):
            for _key in order:
                pass
        return (perf_counter() - start) * 1e9 / lookups

    assert all(registry.get(k) is not None for k in keys)
    s = interleaved(
        p["reps_get"],
        {"bare": timed(bare.get), "library": timed(registry.get), "loop": empty},
    )
    report.compare(
        "get",
        f"get(key), {len(keys):,} live keys (ns/lookup)",
        "ns",
        "lower",
        s["bare"],
        s["library"],
        target=2.0,
        note="bare: d.get(key), both called through a bound method in the same loop",
    )
    report.add_context(
        "get_loop_overhead",
        "  loop overhead alone (ns/iteration, included above)",
        "ns",
        "lower",
        s["loop"],
    )


# -- 2a: one caller, one aggregate ------------------------------------------------


async def bench_call_sequential(report: Report, p: dict[str, Any]) -> None:
    n: int = p["sequential_calls"]
    key_list = [0] * n
    async with (
        trio_aggregates.open_registry(echo_aggregate, mailbox_size=MAILBOX_SIZE) as registry,
        trio.open_nursery() as nursery,
    ):
        await registry.register(0)
        bare = await start_servers(nursery, bare_server, [0])
        event = await start_servers(nursery, event_server, [0])
        floor = await start_servers(nursery, lowlevel_server, [0])
        await check_answers(registry_caller, registry, 0)
        await check_answers(bare_channel_caller, bare, 0)
        await check_answers(bare_channel_nowait_caller, bare, 0)
        await check_answers(event_caller, event, 0)
        await check_answers(lowlevel_caller, floor, 0)
        variants = {
            "bare": lambda: time_callers(bare_channel_caller(bare), [key_list]),
            "library": lambda: time_callers(registry_caller(registry), [key_list]),
            "bare_nowait": lambda: time_callers(bare_channel_nowait_caller(bare), [key_list]),
            "event": lambda: time_callers(event_caller(event), [key_list]),
            "lowlevel": lambda: time_callers(lowlevel_caller(floor), [key_list]),
        }
        s = await interleaved_async(p["reps_call"], variants)
        close_all(bare)
        close_all(event)
        close_all(floor)
    report.compare(
        "call_sequential",
        "call, 1 caller, 1 aggregate, sequential (round trips/s)",
        "ops/s",
        "higher",
        s["bare"],
        s["library"],
        target=0.8,
        note="bare: fresh 1-slot reply channel per request, await send/receive",
    )
    lib = max(s["library"])
    for name, title in [
        ("bare_nowait", "  bare: reply channel, request by send_nowait"),
        ("event", "  floor: trio.Event + slot"),
        ("lowlevel", "  floor: wait_task_rescheduled/reschedule"),
    ]:
        report.add_context(
            f"call_sequential_{name}",
            title,
            "ops/s",
            "higher",
            s[name],
            relative_to=("library", lib),
            note=f"{1e6 / max(s[name]):.1f} µs",
        )


# -- 3: activations -------------------------------------------------------------


async def activate_bare(keys: list[Any], no_gc: bool) -> float:
    async with trio.open_nursery() as nursery:
        table: dict[Any, trio.MemorySendChannel[Any]] = {}
        start_task = nursery.start
        with gc_disabled() if no_gc else _nothing():
            start = perf_counter()
            for key in keys:
                table[key] = await start_task(bare_server, key)
            elapsed = perf_counter() - start
        assert len(table) == len(keys)
        close_all(table)
    return len(keys) / elapsed


async def activate_registry(keys: list[Any], no_gc: bool, how: str = "register") -> float:
    async with trio_aggregates.open_registry(echo_aggregate, mailbox_size=MAILBOX_SIZE) as registry:
        activate = registry.register if how == "register" else registry.ensure
        with gc_disabled() if no_gc else _nothing():
            start = perf_counter()
            for key in keys:
                await activate(key)
            elapsed = perf_counter() - start
        assert len(registry) == len(keys)
    return len(keys) / elapsed


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def bench_activate(report: Report, p: dict[str, Any]) -> None:
    n: int = p["activations"]
    keys = list(range(n))
    s = await interleaved_async(
        p["reps_activate"],
        {
            "bare": lambda: activate_bare(keys, False),
            "library": lambda: activate_registry(keys, False),
            "library_ensure": lambda: activate_registry(keys, False, "ensure"),
            "bare_nogc": lambda: activate_bare(keys, True),
            "library_nogc": lambda: activate_registry(keys, True),
        },
    )
    report.compare(
        "activate",
        f"activations, {n:,} sequential, GC on (activations/s)",
        "ops/s",
        "higher",
        s["bare"],
        s["library"],
        target=0.8,
        note="register(key) vs nursery.start(task with its channel) + dict insert",
    )
    report.compare(
        "activate_ensure",
        "activations by ensure(key), GC on (activations/s)",
        "ops/s",
        "higher",
        s["bare"],
        s["library_ensure"],
        target=None,
    )
    report.compare(
        "activate_nogc",
        "activations, GC off during the burst (activations/s)",
        "ops/s",
        "higher",
        s["bare_nogc"],
        s["library_nogc"],
        target=None,
    )


# -- 4: memory --------------------------------------------------------------------


async def memory_bare(keys: list[Any], server: Callable[..., Awaitable[None]]) -> float:
    async with trio.open_nursery() as nursery:
        table: dict[Any, trio.MemorySendChannel[Any]] = {}
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for key in keys:
                table[key] = await nursery.start(server, key)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        close_all(table)
    return (after - before) / len(keys)


async def memory_registry(keys: list[Any]) -> float:
    async with trio_aggregates.open_registry(echo_aggregate, mailbox_size=MAILBOX_SIZE) as registry:
        register = registry.register
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for key in keys:
                await register(key)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    return (after - before) / len(keys)


async def bench_memory(report: Report, p: dict[str, Any]) -> None:
    n: int = p["idle_aggregates"]
    keys = list(range(n))  # created before tracing: both sides share them
    s = await interleaved_async(
        p["reps_memory"],
        {
            "bare": lambda: memory_bare(keys, bare_server),
            "library": lambda: memory_registry(keys),
            "bare_lean": lambda: memory_bare(keys, bare_server_lean),
        },
    )
    report.compare(
        "memory",
        f"memory per idle aggregate, {n:,} of them (bytes)",
        "bytes",
        "lower",
        s["bare"],
        s["library"],
        target=1.15,
        note="tracemalloc, after gc.collect(); bare: task + its channel + dict entry",
    )
    report.add_context(
        "memory_bare_lean",
        "  bare with `del task_status` after started()",
        "bytes",
        "lower",
        s["bare_lean"],
        relative_to=("library", min(s["library"])),
    )


# -- 5: scale: memory and GC pauses against the number of live aggregates ----------

#: The sides of a scale point: what a live aggregate is.
SCALE_SIDES = ("bare", "registry", "aggregates")

#: ``examples/``, for ``bank.py``'s ``Account``.
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def _rss() -> int:
    """This process's resident set size, in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gc_pauses() -> dict[str, float]:
    """A full collection's duration (s) with everything live, then after ``gc.freeze()``."""
    times = []
    for _ in range(2):
        started = perf_counter()
        gc.collect()
        times.append(perf_counter() - started)
    gc.freeze()
    started = perf_counter()
    gc.collect()
    frozen = perf_counter() - started
    gc.unfreeze()
    return {"gc_full_s": min(times), "gc_full_frozen_s": frozen}


async def _scale_point(side: str, n: int) -> dict[str, Any]:
    """Hold ``n`` live aggregates of ``side``; measure what they cost (see ``scale``)."""
    figures: dict[str, Any] = {"side": side, "n": n}

    async def measure(activate: Callable[[int], Awaitable[Any]]) -> None:
        gc.collect()
        rss, objects = _rss(), len(gc.get_objects())
        started = perf_counter()
        for key in range(n):
            await activate(key)
        figures["activations_per_s"] = n / (perf_counter() - started)
        gc.collect()
        figures["rss_bytes_per_aggregate"] = (_rss() - rss) / n
        figures["gc_objects_per_aggregate"] = (len(gc.get_objects()) - objects) / n
        figures.update(_gc_pauses())
        figures["rss_total_bytes"] = _rss()

    if side == "bare":
        async with trio.open_nursery() as nursery:
            table: dict[Any, trio.MemorySendChannel[Any]] = {}

            async def start(key: int) -> None:
                table[key] = await nursery.start(bare_server, key)

            await measure(start)
            close_all(table)
    elif side == "registry":
        async with trio_aggregates.open_registry(
            echo_aggregate, mailbox_size=MAILBOX_SIZE, idle_timeout=None
        ) as registry:
            await measure(registry.register)
    else:
        sys.path.insert(0, EXAMPLES)
        from bank import Account, OpenAccount

        async with trio_aggregates.open_aggregates(Account, "memory://", idle_timeout=None) as repo:
            command = OpenAccount("bench")
            await repo.create("warm-up", command)  # the first command's one-off imports

            async def create(key: int) -> None:
                await repo.create(key, command)

            await measure(create)
    return figures


def run_scale_point(side: str, n: int) -> dict[str, Any]:
    """:func:`_scale_point` in a fresh process (``--scale-point SIDE N``)."""
    return run_json_process(__file__, "--scale-point", side, str(n))


def bench_scale(report: Report, p: dict[str, Any]) -> list[dict[str, Any]]:
    points = []
    for n in p["scale_sizes"]:
        by_side = {}
        for side in SCALE_SIDES:
            progress(f"scale: {n:,} live aggregates, {side}")
            by_side[side] = run_scale_point(side, n)
            points.append(by_side[side])
        report.compare(
            f"scale_rss_{n}",
            f"RSS per live aggregate, {n:,} of them (bytes)",
            "bytes",
            "lower",
            [by_side["bare"]["rss_bytes_per_aggregate"]],
            [by_side["registry"]["rss_bytes_per_aggregate"]],
            target=None,
            note="each side in a fresh process",
        )
        report.add_context(
            f"scale_rss_aggregates_{n}",
            f"  event-sourced Account + its events in memory, {n:,}",
            "bytes",
            "lower",
            [by_side["aggregates"]["rss_bytes_per_aggregate"]],
            note=(
                f"{by_side['aggregates']['gc_objects_per_aggregate']:.1f} GC-tracked objects"
                f" each; full gc.collect() {by_side['aggregates']['gc_full_s']:.3f} s"
                f" ({by_side['aggregates']['gc_full_frozen_s']:.3f} s after gc.freeze())"
            ),
        )
    return points


# -- main ---------------------------------------------------------------------------


def parameters(quick: bool, reps: int | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "live_keys": 10_000,
        "get_loops": 100 if not quick else 30,
        "concurrent_callers": 1_000,
        "concurrent_calls": 60_000 if not quick else 20_000,
        "sequential_calls": 50_000 if not quick else 10_000,
        "activations": 20_000 if not quick else 5_000,
        "idle_aggregates": 100_000 if not quick else 20_000,
        "reps_get": 7 if not quick else 5,
        "reps_call": 5 if not quick else 3,
        "reps_activate": 4 if not quick else 3,
        "reps_memory": 1,
        "mailbox_size": MAILBOX_SIZE,
        "scale_sizes": [1_000, 10_000, 100_000, 1_000_000]
        if not quick
        else [1_000, 10_000, 50_000],
    }
    return apply_reps(p, reps)


def progress(what: str, _start: list[float] = []) -> None:  # noqa: B006 - the start time
    if not _start:
        _start.append(perf_counter())
    print(f"[{perf_counter() - _start[0]:6.1f} s] {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    # Options of this script only: ``--scale-sizes`` and the internal ``--scale-point``.
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--scale-sizes", default=None)
    own.add_argument("--scale-point", nargs=2, metavar=("SIDE", "N"), default=None)
    extra, rest = own.parse_known_args(argv)
    if extra.scale_point is not None:
        side, n = extra.scale_point
        if side not in SCALE_SIDES:
            own.error(f"--scale-point: side must be one of {SCALE_SIDES}")
        print(json.dumps(trio.run(_scale_point, side, int(n))))
        return 0
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", SECTIONS, rest)
    p = parameters(args.quick, args.reps)
    if extra.scale_sizes:
        p["scale_sizes"] = [int(x.replace("_", "")) for x in extra.scale_sizes.split(",")]
    report = Report("bench_registry", quick=args.quick, parameters=p)

    async def run() -> None:
        if "get" in args.only or "call" in args.only:
            progress("get + call (many callers)")
            await bench_many(report, args, p)
        if "call" in args.only:
            progress("call (one caller)")
            await bench_call_sequential(report, p)
        if "activate" in args.only:
            progress("activate")
            await bench_activate(report, p)
        if "memory" in args.only:
            progress("memory")
            await bench_memory(report, p)

    trio.run(run)
    scaling = bench_scale(report, p) if "scale" in args.only else []
    progress("done")
    report.sort(["get", "call_sequential", "call_concurrent", "activate", "memory", "scale"])
    print()
    report.print_table()
    if args.json:
        data = report.as_json()
        data["scaling"] = scaling
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
