"""Events flowing out of the store: catch-up reads, live latency, projections,
against the Python ``eventsourcing`` library's notification log.

One process (plus a writer subprocess for the cross-process latency), one
run. The events are ``examples/bank.py``'s ``Deposited`` (``Account`` streams,
100 events per append), the same count on every side.

1. ``catchup``: events/s read in global order from position 1 to the end, on
   SQLite (a temporary file) and PostgreSQL: ``store.read_all(position,
   limit=1000)`` page after page, and ``open_subscription(store, 1)`` iterated
   until the last event (the same pages, through its bounded channel), against
   ``eventsourcing`` 9.x reading its notification log on the same kind of
   database holding the same number of events (its ``Deposited`` events,
   ``save`` of 100 events at a time), two ways: its
   ``NotificationLogReader`` (how its process applications follow the log;
   sections of 1000, the whole read in one worker thread), and the raw page
   read under it, ``app.notification_log.select(start, 1000)`` page after
   page, each in a worker thread as ours (its ``log_section_size`` raised
   from 10 to 1000). Both sides return stored records, not decoded domain
   events. Targets: ``read_all`` and the subscription at least 3x
   ``NotificationLogReader``, and ``read_all`` at least 200,000 events/s from
   SQLite (an absolute target: its row shows the target in the baseline
   column); for information, against the raw ``select`` and against
   ``NotificationLogReader`` with its own default section size (10), as a
   user gets it out of the box (ours reads pages of 1000 by default).
2. ``latency``: end-to-end latency from the start of ``append`` (one event,
   durable: the commit is included) to a live subscriber's ``async for``
   getting it, p50 and p99 over sequential appends. In one process on SQLite
   (in-process wake-up; the writer appends the next event once the
   subscriber got the previous one), and across processes on PostgreSQL (a
   writer subprocess appends one event every 5 ms; ``LISTEN/NOTIFY``
   wake-up; timestamps from ``time.monotonic_ns``, one clock for the whole
   machine). Targets (absolute): p50 at most 2 ms in-process, at most 10 ms
   across processes. Context: p99; the same in one process on memory and on
   PostgreSQL; and, in one process, the append (commit) alone and the
   subscriber's delay after the append returned (the wake-up and delivery,
   0 when the subscriber got the event before the writer got its answer).
3. ``projection``: events/s applied by a projection (``Balances``-like: an
   ``INSERT ... ON CONFLICT DO UPDATE`` per event into a table of the store's
   SQLite file, checkpoint in the same transaction, batches of 500) from
   position 1, through ``open_projections`` until ``wait_caught_up``, against
   a hand-written loop doing the same work (``read_all`` pages of 500, the
   same SQL and a checkpoint row in one transaction per page, with
   ``sqlite3`` in a worker thread).

PostgreSQL: ``--postgres-url URL`` uses that server; without it the script
starts a throwaway one with ``tests/_pgserver.py`` (as ``bench_stores.py``
does). Without PostgreSQL binaries its rows are skipped, with the reason.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_events.py --quick --json /tmp/events.json
"""

from __future__ import annotations

import functools
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from _common import Report, apply_reps, interleaved_async, package_version, parse_args
from bench_aggregates import EsAccount, EsBank, check_es_environment
from bench_stores import es_postgres_env, es_sqlite_env, postgres_backends

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from bank import Account, Deposited  # noqa: E402

from trio_aggregates import (  # noqa: E402
    EventContext,
    EventStore,
    NewEvent,
    Projection,
    open_projections,
    open_store,
    open_subscription,
    projects,
)

SECTIONS = ("catchup", "latency", "projection")
PAGE = 1000
PER_APPEND = 100
#: The issue's absolute targets.
CATCHUP_SQLITE_TARGET = 200_000.0  # events/s
P50_IN_PROCESS_TARGET = 0.002  # s
P50_CROSS_PROCESS_TARGET = 0.010  # s
WRITER_INTERVAL = 0.005  # s between the writer subprocess's appends

perf_counter = time.perf_counter


def deposit_events(count: int, reference: str = "bench") -> list[NewEvent]:
    name, data = Account.codec().encode(Deposited(5, reference))
    return [NewEvent(name, data) for _ in range(count)]


async def fill_ours(store: EventStore, events: int) -> None:
    """``events`` Deposited events, ``PER_APPEND`` per append, one stream per append."""
    batch = deposit_events(PER_APPEND)
    for n in range(events // PER_APPEND):
        await store.append(f"Account-fill{n}", batch, expected_version=0)


class EsLog(EsBank):
    """eventsourcing's application, with notification-log sections as large as our pages."""

    log_section_size = PAGE


def fill_es(env: dict[str, str], events: int) -> EsLog:
    app = EsLog(env=env)
    for _ in range(events // PER_APPEND):
        account = EsAccount("bench")
        for _ in range(PER_APPEND - 1):  # its first event is the creation
            account.deposit(5, "bench")
        app.save(account)
    assert app.recorder.max_notification_id() == events, app.recorder.max_notification_id()
    return app


# -- 1. catch-up ---------------------------------------------------------------------


async def page_rate(
    select: Callable[[int], Awaitable[Sequence[Any]]],
    position_of: Callable[[Any], int],
    events: int,
) -> float:
    """Events/s of reading ``select(start)`` pages from position 1 to the end."""
    seen = 0
    start = 1
    started = perf_counter()
    while True:
        page = await select(start)
        if not page:
            break
        seen += len(page)
        start = position_of(page[-1]) + 1
    elapsed = perf_counter() - started
    assert seen == events, (seen, events)
    return seen / elapsed


def read_all_rate(store: EventStore, events: int) -> Awaitable[float]:
    return page_rate(lambda start: store.read_all(start, limit=PAGE), lambda r: r.position, events)


async def subscription_rate(store: EventStore, events: int) -> float:
    seen = 0
    started = perf_counter()
    async with open_subscription(store, 1, buffer_size=PAGE) as subscription:
        async for _ in subscription:
            seen += 1
            if seen == events:
                break
    return seen / (perf_counter() - started)


def es_log_rate(app: EsLog, events: int) -> Awaitable[float]:
    """eventsourcing's log, each (synchronous) page in a worker thread, as ours."""
    log = app.notification_log
    return page_rate(
        lambda start: trio.to_thread.run_sync(log.select, start, PAGE), lambda n: n.id, events
    )


#: ``NotificationLogReader``'s own default section size (eventsourcing 9.x).
ES_DEFAULT_SECTION = 10


def es_reader_rate(app: EsLog, events: int, section_size: int = PAGE) -> Awaitable[float]:
    """eventsourcing's ``NotificationLogReader`` (how its process applications follow
    the log), sections as large as our pages unless told, the whole read in one
    worker thread."""
    from eventsourcing.system import NotificationLogReader

    def read() -> float:
        reader = NotificationLogReader(app.notification_log, section_size=section_size)
        seen = 0
        started = perf_counter()
        for _ in reader.read(start=1):
            seen += 1
        elapsed = perf_counter() - started
        assert seen == events, (seen, events)
        return seen / elapsed

    return trio.to_thread.run_sync(read)


def absolute(
    report: Report,
    id: str,
    title: str,
    unit: str,
    better: Any,
    samples: list[float],
    goal: float,
) -> None:
    """A figure against an absolute target: the baseline column holds the target."""
    report.compare(
        id, title, unit, better, [goal] * len(samples), samples, 1.0, note="absolute target"
    )


async def bench_catchup(
    report: Report, p: dict[str, Any], name: str, our_url: str, es_env: dict[str, str]
) -> None:
    events, reps = p["events"], p["reps_catchup"]
    async with open_store(our_url) as store:
        await fill_ours(store, events)
        app = await trio.to_thread.run_sync(fill_es, es_env, events)
        try:
            s = await interleaved_async(
                reps,
                {
                    "es": lambda: es_log_rate(app, events),
                    "es_reader": lambda: es_reader_rate(app, events),
                    "es_reader_default": lambda: es_reader_rate(app, events, ES_DEFAULT_SECTION),
                    "read_all": lambda: read_all_rate(store, events),
                    "subscription": lambda: subscription_rate(store, events),
                },
            )
        finally:
            app.close()
    low = name.lower()
    report.compare(
        f"catchup_{low}_read_all_vs_reader",
        f"catch-up {name}: read_all vs NotificationLogReader ({events:,} events)",
        "events/s",
        "higher",
        s["es_reader"],
        s["read_all"],
        3.0,
    )
    report.compare(
        f"catchup_{low}_subscription_vs_reader",
        f"catch-up {name}: subscription vs NotificationLogReader",
        "events/s",
        "higher",
        s["es_reader"],
        s["subscription"],
        3.0,
    )
    report.compare(
        f"catchup_{low}_read_all_vs_default_reader",
        f"catch-up {name}: read_all vs NotificationLogReader as it comes "
        f"(section_size={ES_DEFAULT_SECTION})",
        "events/s",
        "higher",
        s["es_reader_default"],
        s["read_all"],
        None,
    )
    report.compare(
        f"catchup_{low}_read_all",
        f"catch-up {name}: read_all vs notification_log.select (its raw page read)",
        "events/s",
        "higher",
        s["es"],
        s["read_all"],
        None,
    )
    if name == "SQLite":
        absolute(
            report,
            "catchup_sqlite_absolute",
            "catch-up SQLite: read_all vs the 200k events/s target",
            "events/s",
            "higher",
            s["read_all"],
            CATCHUP_SQLITE_TARGET,
        )


# -- 2. latency ------------------------------------------------------------------------


def stamped(payload: dict[str, Any]) -> list[NewEvent]:
    return [NewEvent("bench.ping", json.dumps(payload).encode())]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def in_process_latency(url: str, count: int) -> dict[str, list[float]]:
    """One event at a time: each one's latency from the start of its append to the
    subscriber (``latency``), the append's own duration (``append``), and the
    subscriber's delay after the append returned (``after``, 0 if it got it first)."""
    found: dict[str, list[float]] = {"latency": [], "append": [], "after": []}
    received: list[int] = []
    stream = f"Ping-{uuid.uuid4().hex[:8]}"
    async with open_store(url) as store:
        got = trio.Event()
        start = await store.head_position() + 1
        async with (
            open_subscription(store, start, event_types=["bench.ping"]) as subscription,
            trio.open_nursery() as nursery,
        ):

            async def listen() -> None:
                async for record in subscription:
                    received.append(time.monotonic_ns())
                    found["latency"].append((received[-1] - json.loads(record.data)["t"]) / 1e9)
                    got.set()
                    if len(received) == count:
                        return

            nursery.start_soon(listen)
            for n in range(count):
                got = trio.Event()
                t0 = time.monotonic_ns()
                await store.append(stream, stamped({"t": t0}), expected_version=n)
                t1 = time.monotonic_ns()
                found["append"].append((t1 - t0) / 1e9)
                with trio.fail_after(10):
                    await got.wait()
                found["after"].append(max(0, received[-1] - t1) / 1e9)
    return found


def writer_main(url: str, count: int, interval: float) -> None:
    """The writer subprocess: ``count`` appends, ``interval`` apart, each stamped."""

    async def write() -> None:
        stream = f"Ping-{uuid.uuid4().hex[:8]}"
        async with open_store(url) as store:
            print("ready", flush=True)
            sys.stdin.readline()  # go
            for n in range(count):
                t0 = time.monotonic_ns()
                await store.append(stream, stamped({"t": t0}), expected_version=n)
                await trio.sleep(interval)

    trio.run(write)


async def cross_process_latency(url: str, count: int) -> list[float]:
    latencies: list[float] = []
    async with open_store(url) as store:
        start = await store.head_position() + 1
        async with (
            open_subscription(store, start, event_types=["bench.ping"]) as subscription,
            trio.open_nursery() as nursery,
        ):
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, __file__, "--writer", url, str(count)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    check=False,
                )
            )
            try:
                with trio.fail_after(60):
                    line = b""
                    while not line.endswith(b"ready\n"):
                        chunk = await process.stdout.receive_some()
                        assert chunk, "the writer ended before it was ready"
                        line += chunk
                    await process.stdin.send_all(b"go\n")
                    async for record in subscription:
                        sent = json.loads(record.data)["t"]
                        latencies.append((time.monotonic_ns() - sent) / 1e9)
                        if len(latencies) == count:
                            break
            finally:
                if process.returncode is None:
                    process.kill()
    return latencies


def latency_rows(
    report: Report, id: str, title: str, latencies: list[float], p50_target: float | None
) -> None:
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    if p50_target is not None:
        absolute(report, f"{id}_p50", f"{title}, p50", "s", "lower", [p50], p50_target)
    else:
        report.add_context(f"{id}_p50", f"{title}, p50", "s", "lower", [p50])
    report.add_context(
        f"{id}_p99", f"{title}, p99", "s", "lower", [p99], note=f"{len(latencies)} events"
    )


async def in_process_rows(
    report: Report, name: str, url: str, count: int, p50_target: float | None
) -> None:
    found = await in_process_latency(url, count)
    id = f"latency_{name.lower()}_in_process"
    title = f"append -> subscriber, {name}, one process"
    latency_rows(report, id, title, found["latency"], p50_target)
    for key, what in (
        ("append", "the append alone (commit)"),
        ("after", "after the append returned"),
    ):
        report.add_context(
            f"{id}_{key}", f"  {what}, p50", "s", "lower", [percentile(found[key], 0.5)]
        )


async def bench_latency(
    report: Report, p: dict[str, Any], sqlite_url: str, pg_url: str | None
) -> None:
    count = p["latency_events"]
    await in_process_rows(report, "SQLite", sqlite_url, count, P50_IN_PROCESS_TARGET)
    await in_process_rows(report, "memory", "memory://", count, None)
    if pg_url is None:
        return
    crossing = await cross_process_latency(pg_url, count)
    latency_rows(
        report,
        "latency_postgres_cross_process",
        "append -> subscriber, PostgreSQL, writer subprocess",
        crossing,
        P50_CROSS_PROCESS_TARGET,
    )
    await in_process_rows(report, "PostgreSQL", pg_url, count, None)


# -- 3. projection -----------------------------------------------------------------------


class BenchBalances(Projection):
    """Balances per account in the store's SQLite file, checkpoint in the same transaction."""

    reads = (Account,)
    categories = ("Account",)
    name = "bench_balances"

    def setup(self, db: Any) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS bench_balances (account TEXT PRIMARY KEY, cents INT)"
        )
        db.execute("DELETE FROM bench_balances")  # each sample builds it afresh

    def clear(self, db: Any) -> None:
        db.execute("DELETE FROM bench_balances")

    @projects
    def deposited(self, event: Deposited, ctx: EventContext) -> None:
        ctx.db.execute(UPSERT, (ctx.key, event.amount))


UPSERT = (
    "INSERT INTO bench_balances (account, cents) VALUES (?, ?) "
    "ON CONFLICT (account) DO UPDATE SET cents = bench_balances.cents + excluded.cents"
)


_samples = iter(range(1_000_000))


async def library_projection(store: EventStore, events: int) -> float:
    # A new name each sample: a new checkpoint, so each starts from position 1.
    fresh = type("Fresh", (BenchBalances,), {"name": f"bench_balances_{next(_samples)}"})
    projection = fresh()
    started = perf_counter()
    async with open_projections(store, [projection]) as runner:
        with trio.fail_after(600):
            await runner.wait_caught_up()
        elapsed = perf_counter() - started
        stats = runner.statistics()[projection.flow_name]
    assert stats.state == "running" and stats.position >= events, stats
    return events / elapsed


async def bare_projection(store: EventStore, path: str, events: int) -> float:
    """The same read model by hand: read_all pages, one transaction per page."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    decode = Account.codec().decode
    try:
        db.execute("CREATE TABLE IF NOT EXISTS bare_balances (account TEXT PRIMARY KEY, cents INT)")
        db.execute("CREATE TABLE IF NOT EXISTS bare_checkpoint (position INT)")
        db.execute("DELETE FROM bare_balances")
        upsert = UPSERT.replace("bench_balances", "bare_balances")
        started = perf_counter()
        position, seen = 1, 0

        def apply(page: list[Any]) -> None:
            db.execute("BEGIN IMMEDIATE")
            for record in page:
                event = decode(record.type, record.data)
                db.execute(upsert, (record.stream.partition("-")[2], event.amount))
            db.execute("DELETE FROM bare_checkpoint")
            db.execute("INSERT INTO bare_checkpoint VALUES (?)", (page[-1].position,))
            db.execute("COMMIT")

        while True:
            page = await store.read_all(position, limit=500, categories=["Account"])
            if not page:
                break
            await trio.to_thread.run_sync(apply, page)
            seen += len(page)
            position = page[-1].position + 1
        elapsed = perf_counter() - started
    finally:
        db.close()
    assert seen == events, (seen, events)
    return events / elapsed


async def bench_projection(report: Report, p: dict[str, Any], tmp: str) -> None:
    events, reps = p["projection_events"], p["reps_projection"]
    path = f"{tmp}/projection.db"
    async with open_store(f"sqlite:///{path}") as store:
        batch = deposit_events(10)  # 10 events per account: many rows in the read model
        for n in range(events // 10):
            await store.append(f"Account-p{n}", batch, expected_version=0)
        s = await interleaved_async(
            reps,
            {
                "bare": lambda: bare_projection(store, path, events),
                "library": lambda: library_projection(store, events),
            },
        )
    report.compare(
        "projection_sqlite",
        f"projection into SQLite ({events:,} events, {events // 10:,} rows)",
        "events/s",
        "higher",
        s["bare"],
        s["library"],
        None,
        note="baseline: the same by hand (sqlite3, one transaction per 500 events)",
    )


# -- main -----------------------------------------------------------------------------------


def parameters(quick: bool, reps: int | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "events": 100_000 if not quick else 20_000,
        "page": PAGE,
        "events_per_append": PER_APPEND,
        "reps_catchup": 5 if not quick else 3,
        "latency_events": 1000 if not quick else 200,
        "writer_interval_s": WRITER_INTERVAL,
        "projection_events": 50_000 if not quick else 10_000,
        "reps_projection": 3 if not quick else 2,
        "eventsourcing": package_version("eventsourcing"),
        "sqlite": sqlite3.sqlite_version,
    }
    return apply_reps(p, reps)


def main(argv: list[str] | None = None) -> int:
    extra = list(argv if argv is not None else sys.argv[1:])
    if extra[:1] == ["--writer"]:
        writer_main(extra[1], int(extra[2]), WRITER_INTERVAL)
        return 0
    postgres_url = None
    if "--postgres-url" in extra:
        i = extra.index("--postgres-url")
        if i + 1 >= len(extra):
            raise SystemExit("--postgres-url needs a URL")
        postgres_url = extra[i + 1]
        del extra[i : i + 2]
    args = parse_args(
        (__doc__.splitlines()[0] if __doc__ else "")
        + " (also: --postgres-url URL, else a throwaway server)",
        SECTIONS,
        extra,
    )
    p = parameters(args.quick, args.reps)
    check_es_environment()
    report = Report("bench_events", quick=args.quick, parameters=p, baseline_label="baseline")

    with (
        tempfile.TemporaryDirectory(prefix="bench-events-") as tmp,
        postgres_backends(postgres_url) as (our_pg, es_pg, how),
    ):
        if our_pg is None or es_pg is None:
            print(f"PostgreSQL rows skipped: {how}")
        else:
            print(f"PostgreSQL: {how}")
        report.parameters["postgres"] = how if our_pg else f"skipped: {how}"
        backends: list[tuple[str, str, dict[str, str]]] = []
        if our_pg is not None and es_pg is not None:
            backends.append(("PostgreSQL", our_pg, es_postgres_env(es_pg)))
        backends.append(("SQLite", f"sqlite:///{tmp}/ours.db", es_sqlite_env(Path(tmp) / "es.db")))

        async def run() -> None:
            steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
            if "catchup" in args.only:
                for name, url, env in backends:
                    steps.append(
                        (
                            f"catch-up on {name}",
                            functools.partial(bench_catchup, report, p, name, url, env),
                        )
                    )
            if "latency" in args.only:
                steps.append(
                    (
                        "latency",
                        lambda: bench_latency(report, p, f"sqlite:///{tmp}/latency.db", our_pg),
                    )
                )
            if "projection" in args.only:
                steps.append(("projection", lambda: bench_projection(report, p, tmp)))
            for title, step in steps:
                print(f"{title} ...", flush=True)
                await step()

        trio.run(run)
        print(f"finished at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")

    report.sort(["catchup_sqlite", "catchup_postgres", "latency", "projection"])
    print()
    print(
        "Rows 'vs notification log': the baseline column holds eventsourcing's figure. "
        "Rows with an absolute target: the baseline column holds the target. "
        "ratio = trio_aggregates / baseline."
    )
    report.print_table()
    report.write_json(args.json)
    return 0  # a missed target shows in the table and the JSON, not in the exit status


if __name__ == "__main__":
    sys.exit(main())
