"""CPython's cyclic garbage collector against many live aggregates, and what helps.

A live aggregate is a Trio task with its mailbox, its state and their
bookkeeping: a few dozen objects that the cyclic garbage collector tracks.
A *full* collection (generation 2) walks every tracked object in the
process, so its pause grows with the number of live aggregates, and every
task of the process stops while it runs. This script measures that pause,
and the effect of each remedy the scale guide (``docs/howto/scale.rst``)
describes:

* ``none``: no tuning (CPython's default thresholds, 700/10/10);
* ``freeze``: ``gc.collect(); gc.freeze()`` once the aggregates are warm:
  the frozen objects are never examined again;
* ``thresholds``: ``gc.set_threshold(100_000, 50, 100)`` before the warm-up:
  fewer collections, but a full one, when it comes, is as long;
* ``idle_timeout``: ``open_aggregates(..., idle_timeout=5.0)``: aggregates
  idle for 5 seconds are passivated, so only the hot ones stay live.

Each (size, option) point runs in a fresh process. It activates N
event-sourced aggregates (``create`` on the in-memory store; with
``--kind registry``, bare registry counters), one after the other (the
*warm-up*, timed, its collections recorded), applies the option, then runs a
steady command load (100 callers, random keys among the 10,000 *hot* ones,
2,000 with ``--quick``): a settling period (``idle_timeout + 1.5`` s), then
a measured one (3 s; 1 s with ``--quick``), recording every collection's
generation and duration (``gc.callbacks``) and every command's latency.
Last, it times two explicit full ``gc.collect()`` calls: the first also
frees the load's garbage, the second is the pause of a full collection over
what is live.

Figures per point: live aggregates, GC-tracked objects and RSS per live
aggregate, warm-up time and its longest full collection, under load: the
full collections, the longest pause of any collection, commands/s, p99 and
max latency, and the explicit full collections' pauses. For information; no
targets. Sizes: 100,000 and 300,000 (20,000 with ``--quick``; ``--sizes
1000000`` for a million: about 5 GiB and several minutes per option).

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_gc.py --quick
    .venv/bin/python benchmarks/bench_gc.py --json /tmp/gc.json
    .venv/bin/python benchmarks/bench_gc.py --sizes 1000000 --only none,freeze
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from typing import Any

import attrs
import trio
from _common import Report, metadata

import trio_aggregates
from trio_aggregates import Aggregate, Call, applies, handles

OPTIONS = ("none", "freeze", "thresholds", "idle_timeout")
KINDS = ("aggregates", "registry")

#: The thresholds of the ``thresholds`` option (CPython's default: 700, 10, 10).
RAISED_THRESHOLDS = (100_000, 50, 100)
#: The idle timeout of the ``idle_timeout`` option, in seconds.
IDLE_TIMEOUT = 5.0
#: Concurrent callers of the steady load.
CALLERS = 100


# -- the aggregates -----------------------------------------------------------


@attrs.frozen
class Deposit:
    amount: int


@attrs.frozen
class Deposited:
    amount: int


@attrs.define
class GcAccount(Aggregate):
    balance: int = 0

    @handles
    def deposit(self, command: Deposit) -> Deposited:
        return Deposited(command.amount)

    @applies
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount


async def counter(key: Any, mailbox: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    total = 0
    task_status.started()
    async for message in mailbox:
        if type(message) is Call:
            total += message.message
            message.reply(total)


# -- one point, in its own process ----------------------------------------------


def _rss() -> int:
    """This process's resident set size, in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Collections:
    """Every collection's generation and duration, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.records.append((info["generation"], time.perf_counter() - self._started))

    def take(self) -> list[tuple[int, float]]:
        records, self.records = self.records, []
        return records


def _summary(records: list[tuple[int, float]], prefix: str) -> dict[str, float]:
    full = [d for g, d in records if g == 2]
    return {
        f"{prefix}_collections": len(records),
        f"{prefix}_full_collections": len(full),
        f"{prefix}_full_max_s": max(full, default=0.0),
        f"{prefix}_pause_max_s": max((d for _, d in records), default=0.0),
        f"{prefix}_gc_total_s": sum(d for _, d in records),
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _point(kind: str, option: str, n: int, hot: int, load_s: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"kind": kind, "option": option, "n": n, "hot": min(hot, n)}
    hot = min(hot, n)
    collections = _Collections()
    if option == "thresholds":
        gc.set_threshold(*RAISED_THRESHOLDS)
    idle = IDLE_TIMEOUT if option == "idle_timeout" else None
    gc.collect()
    rss0, objects0 = _rss(), len(gc.get_objects())
    gc.callbacks.append(collections)

    if kind == "aggregates":
        opened: Any = trio_aggregates.open_aggregates(GcAccount, "memory://", idle_timeout=idle)
    else:
        opened = trio_aggregates.open_registry(counter, idle_timeout=idle)
    async with opened as target:
        registry = target.registry if kind == "aggregates" else target
        if kind == "aggregates":

            async def activate(key: int) -> None:
                await target.create(key, Deposit(1))

            async def command(key: int) -> None:
                await target.execute(key, Deposit(1))
        else:

            async def activate(key: int) -> None:
                await target.call(key, 1)

            command = activate

        # The warm-up: activate n aggregates, one after the other.
        started = time.perf_counter()
        most_live = 0
        for key in range(n):
            await activate(key)
            if key % 1000 == 0:
                most_live = max(most_live, len(registry))
        figures["warmup_s"] = time.perf_counter() - started
        figures.update(_summary(collections.take(), "warmup"))
        figures["live_after_warmup"] = len(registry)
        figures["most_live_warmup"] = max(most_live, len(registry))
        live = len(registry)
        figures["rss_bytes_per_live"] = (_rss() - rss0) / live if live else math.nan
        figures["gc_objects_per_live"] = (len(gc.get_objects()) - objects0) / live if live else 0

        if option == "freeze":
            gc.collect()
            gc.freeze()
        collections.take()

        # The steady load: a settling period, then the measured one.
        latencies: list[float] = []
        rng = random.Random(42)
        measuring = False
        settle_s = IDLE_TIMEOUT + 1.5

        async def caller(deadline: float) -> None:
            while time.perf_counter() < deadline:
                key = rng.randrange(hot)
                began = time.perf_counter()
                await command(key)
                if measuring:
                    latencies.append(time.perf_counter() - began)

        async with trio.open_nursery() as nursery:
            end = time.perf_counter() + settle_s + load_s
            for _ in range(CALLERS):
                nursery.start_soon(caller, end)
            await trio.sleep(settle_s)
            collections.take()
            measuring = True
            load_started = time.perf_counter()
        figures["load_s"] = time.perf_counter() - load_started
        figures.update(_summary(collections.take(), "load"))
        figures["load_commands_per_s"] = len(latencies) / figures["load_s"]
        figures["load_latency_p50_s"] = _percentile(latencies, 0.50)
        figures["load_latency_p99_s"] = _percentile(latencies, 0.99)
        figures["load_latency_max_s"] = max(latencies, default=math.nan)
        figures["live_under_load"] = len(registry)

        # Explicit full collections, with everything still live: the first also
        # frees the load's garbage; the second is the walk over what is live.
        gc.callbacks.remove(collections)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            gc.collect()
            times.append(time.perf_counter() - started)
        figures["first_collect_s"], figures["full_collect_s"] = times
        figures["rss_total_bytes"] = _rss()
        figures["frozen_objects"] = gc.get_freeze_count()
    return figures


def run_point(kind: str, option: str, n: int, hot: int, load_s: float) -> dict[str, Any]:
    """:func:`_point` in a fresh process (``--point KIND OPTION N HOT LOAD_S``)."""
    command = [sys.executable, os.path.abspath(__file__), "--point", kind, option, str(n)]
    result = subprocess.run(
        [*command, str(hot), str(load_s)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"point {kind} {option} {n} failed:\n{result.stderr}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


# -- the report -------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def print_table(points: list[dict[str, Any]]) -> None:
    header = (
        "N",
        "option",
        "live",
        "objs/live",
        "RSS/live",
        "warm-up max pause",
        "load: full GCs",
        "load: max pause",
        "cmds/s",
        "p99",
        "max latency",
        "gc.collect()",
    )
    rows = [header]
    for p in points:
        rows.append(
            (
                f"{p['n']:,}",
                p["option"],
                f"{p['live_under_load']:,}",
                "-" if p["option"] == "idle_timeout" else f"{p['gc_objects_per_live']:.1f}",
                "-" if p["option"] == "idle_timeout" else f"{p['rss_bytes_per_live']:,.0f} B",
                _ms(p["warmup_pause_max_s"]),
                str(p["load_full_collections"]),
                _ms(p["load_pause_max_s"]),
                f"{p['load_commands_per_s']:,.0f}",
                _ms(p["load_latency_p99_s"]),
                _ms(p["load_latency_max_s"]),
                _ms(p["full_collect_s"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for number, row in enumerate(rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if number == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "(live: aggregates live at the end of the load; objs/live, RSS/live: after the"
        " warm-up; warm-up max pause: the longest collection while activating;"
        " load: the measured steady load; gc.collect(): the second of two explicit full"
        " collections after it)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="20,000 aggregates, 1 s of load")
    parser.add_argument("--json", metavar="PATH", type=str, help="write every figure there")
    parser.add_argument("--sizes", help="comma-separated live aggregate counts")
    parser.add_argument("--only", default=",".join(OPTIONS), help="options to run")
    parser.add_argument("--kind", choices=KINDS, default="aggregates")
    parser.add_argument("--hot", type=int, help="keys the steady load touches")
    parser.add_argument("--load-seconds", type=float, help="the measured load's duration")
    parser.add_argument("--point", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.point:
        kind, option, n, hot, load_s = args.point
        figures = trio.run(_point, kind, option, int(n), int(hot), float(load_s))
        print(json.dumps(figures))
        return

    options = [o.strip() for o in args.only.split(",") if o.strip()]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        parser.error(f"unknown option(s) {unknown}; choose from {list(OPTIONS)}")
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [20_000] if args.quick else [100_000, 300_000]
    hot = args.hot or (2_000 if args.quick else 10_000)
    load_s = args.load_seconds or (1.0 if args.quick else 3.0)

    report = Report(
        "bench_gc",
        quick=args.quick,
        parameters={
            "kind": args.kind,
            "sizes": sizes,
            "options": options,
            "hot_keys": hot,
            "load_seconds": load_s,
            "callers": CALLERS,
            "raised_thresholds": list(RAISED_THRESHOLDS),
            "idle_timeout": IDLE_TIMEOUT,
        },
        baseline_label="no tuning",
    )
    points = []
    for n in sizes:
        for option in options:
            print(f"{args.kind}: {n:,} live aggregates, option {option} ...", file=sys.stderr)
            point = run_point(args.kind, option, n, hot, load_s)
            points.append(point)
            print(
                f"  {point['live_under_load']:,} live; gc.collect() {_ms(point['full_collect_s'])};"
                f" max pause under load {_ms(point['load_pause_max_s'])}",
                file=sys.stderr,
            )
    print_table(points)
    for p in points:
        report.add_context(
            f"gc_{p['option']}_{p['n']}",
            f"full gc.collect() after the load, {p['n']:,} aggregates, {p['option']}",
            "ns",
            "lower",
            [p["full_collect_s"] * 1e9],
            note=(
                f"{p['live_under_load']:,} live; longest pause under load"
                f" {_ms(p['load_pause_max_s'])}; max latency {_ms(p['load_latency_max_s'])}"
            ),
        )
    if args.json:
        data = report.as_json()
        data["points"] = points
        data["metadata"] = {**metadata(), **data["metadata"]}
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
