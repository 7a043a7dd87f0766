"""Durable event stores: commands/s on SQLite and PostgreSQL, and rehydration,
against the Python ``eventsourcing`` library.

One process, one run. The domain is ``examples/bank.py``'s ``Account``; every
command is a ``Deposit`` (one ``Deposited`` event), acknowledged only once
durable.

1. ``commands``: durable commands/s with 1 caller (one aggregate at a time:
   100 aggregates, 10 rounds of one deposit to each in turn) and with 100
   concurrent callers (each with its own 5 aggregates, 10 rounds over them:
   100 aggregates busy at once), on SQLite (a temporary file) and on
   PostgreSQL: ``open_aggregates(Account, url)`` + ``execute``. Every sample
   starts from fresh aggregates on both sides (opened outside the timing), so
   streams stay short (1 to 11 events) and equal for both sides. Against
   ``eventsourcing`` 9.x on the same kind of database doing the same work
   per command: ``repository.get(id)``, one command, ``save``, with its
   **default ``Application`` settings** (only the persistence module and the
   database set: no aggregate cache, so every ``get`` reads the aggregate's
   stream from the database and replays it). Its API is synchronous, so with
   100 callers it runs 100 threads (a ``ThreadPoolExecutor`` with 100
   workers, each on its own aggregates). Target: at least 10x
   ``eventsourcing`` on SQLite with 100 concurrent aggregates. A tuned
   ``eventsourcing`` (aggregate cache, no fast-forward query: ``get`` does
   not read the database, ``save`` still checks the version) is shown as
   context, with the ratio to it.

   Durability is the same on both sides, and the script checks it on the
   connections themselves: SQLite in WAL mode with ``synchronous=FULL`` (2)
   on both (ours sets it; ``eventsourcing`` sets WAL and leaves
   ``synchronous`` at SQLite's compiled default, FULL here; the script stops
   if they differ); PostgreSQL is one server with ``fsync=on`` and
   ``synchronous_commit=on`` for both.

2. ``rehydrate``: events/s replayed from a 10,000-event stream (no snapshot)
   in each backend (memory, SQLite, PostgreSQL): activation of a cold key
   (a fresh repository on the same store, ``execute(key, GetBalance())``)
   and ``repo.replay(key)``; ``eventsourcing``'s ``repository.get(id)`` (no
   cache, no snapshot: its default) on SQLite and PostgreSQL for comparison.

PostgreSQL: ``--postgres-url URL`` uses that server (both sides in that
database: our tables are ``trio_aggregates_*``, eventsourcing's
``stored_events``); without it the script starts a throwaway server with
``tests/_pgserver.py`` (``initdb`` in a temporary directory, run as the
``postgres`` user when root), one database per side, and removes it at the
end. Without PostgreSQL binaries the PostgreSQL rows are skipped, with the
reason printed.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_stores.py --quick --json /tmp/stores.json
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import trio
from _common import Report, apply_reps, interleaved_async, package_version, parse_args
from bench_aggregates import ColdAccount, EsAccount, EsBank, check_es_environment, es_settings

from trio_aggregates import AggregateRepository, EventStore, NewEvent, open_aggregates, open_store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from bank import (  # noqa: E402
    Account,
    AccountOpened,
    Deposit,
    Deposited,
    GetBalance,
    OpenAccount,
)

SECTIONS = ("commands", "rehydrate")
CONCURRENT = 100

perf_counter = time.perf_counter


# -- eventsourcing ---------------------------------------------------------------


def es_env(target: dict[str, str], config: str = "es_default") -> dict[str, str]:
    """eventsourcing's env: the database settings, plus the cache for ``es_cache``."""
    env = dict(target)
    if config == "es_cache":
        env["AGGREGATE_CACHE_MAXSIZE"] = "100000"
        env["AGGREGATE_CACHE_FASTFORWARD"] = "n"
    return env


def es_sqlite_env(path: Path) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}


def es_postgres_env(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        # enough connections for 100 threads (it serialises writers anyway)
        "POSTGRES_POOL_SIZE": "10",
        "POSTGRES_MAX_OVERFLOW": "90",
    }


def es_sqlite_durability(app: EsBank) -> tuple[str, int]:
    """(journal_mode, synchronous) of an eventsourcing SQLite writer connection."""
    pool = app.recorder.datastore.pool  # type: ignore[attr-defined]
    conn = pool.get_connection(is_writer=True)
    try:
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode")
        mode = str(cursor.fetchone()[0])
        cursor.execute("PRAGMA synchronous")
        sync = int(cursor.fetchone()[0])
    finally:
        pool.put_connection(conn)
    return mode, sync


def our_sqlite_durability(store: Any) -> tuple[str, int]:
    """(journal_mode, synchronous) of our SQLite store's writer connection."""
    conn = store._writer  # private, for this check only
    with conn.lock:
        (mode,) = conn.db.execute("PRAGMA journal_mode").fetchone()
        (sync,) = conn.db.execute("PRAGMA synchronous").fetchone()
    return str(mode), int(sync)


SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


# -- the backends -------------------------------------------------------------------


class Backend:
    """A database for both sides: our store URL and eventsourcing's env."""

    def __init__(self, name: str, our_url: str, es_target: dict[str, str]) -> None:
        self.name = name
        self.our_url = our_url
        self.es_target = es_target
        self.durability = ""


@contextlib.contextmanager
def postgres_backends(url: str | None) -> Iterator[tuple[str | None, str | None, str]]:
    """Yield (our URL, eventsourcing's URL, how) or (None, None, reason to skip)."""
    if url is not None:
        yield url, url, f"--postgres-url {_redact(url)}"
        return
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from _pgserver import PostgresNotFound, PostgresServer
    except ImportError as exc:  # pragma: no cover
        yield None, None, f"tests/_pgserver.py could not be imported: {exc}"
        return
    try:
        server = PostgresServer.create()
    except PostgresNotFound as exc:
        yield None, None, str(exc)
        return
    try:
        import psycopg

        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench_ours")
            conn.execute("CREATE DATABASE bench_es")
        yield (
            server.url_for("bench_ours"),
            server.url_for("bench_es"),
            f"throwaway server (tests/_pgserver.py) on port {server.port}",
        )
    finally:
        server.destroy()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def postgres_durability(url: str) -> str:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        fsync = conn.execute("SHOW fsync").fetchone()[0]  # type: ignore[index]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
        wal_sync = conn.execute("SHOW wal_sync_method").fetchone()[0]  # type: ignore[index]
    return f"fsync={fsync}, synchronous_commit={sync}, wal_sync_method={wal_sync}"


# -- 1: durable commands --------------------------------------------------------------


#: eventsourcing configurations on each database: ``es_default`` (the target's
#: baseline) is ``Application`` with its default settings, only the
#: persistence module and the database set (no aggregate cache: every ``get``
#: reads and replays the aggregate's stream); ``es_cache`` is a tuned
#: configuration shown for context (a warm cache trusted like our live
#: aggregates: ``get`` does not read the database, ``save`` still checks the
#: version).
ES_CONFIGS = ("es_default", "es_cache")
ES_TITLES = {
    "es_default": "eventsourcing, default Application (no cache: get reads + replays the stream)",
    "es_cache": "eventsourcing tuned: warm cache, no fast-forward",
}


def command_lists(p: dict[str, Any], callers: int) -> list[list[int]]:
    """Each caller's aggregates (numbers), in the order it sends them a deposit.

    ``callers`` callers, each with its own ``aggregates_per_caller`` aggregates
    (so at most ``callers`` aggregates are busy at once), each given
    ``rounds`` deposits in turn.
    """
    per, rounds = p[f"aggregates_per_caller_{callers}"], p["rounds"]
    return [[c * per + k for _ in range(rounds) for k in range(per)] for c in range(callers)]


def workload_text(p: dict[str, Any], callers: int) -> str:
    per, rounds = p[f"aggregates_per_caller_{callers}"], p["rounds"]
    who = "1 caller" if callers == 1 else f"{callers} concurrent callers"
    return (
        f"{who}, each with its own {per} fresh aggregates (opened, 1 event), sending them "
        f"{rounds} deposits each in turn: {callers * per * rounds:,} commands a sample, "
        f"streams grow from 1 to {1 + rounds} events"
    )


def es_commands(
    app: EsBank, lists: list[list[int]], expected: int
) -> Callable[[], Awaitable[float]]:
    """One sample: fresh accounts opened (not timed), then each list's deposits,
    sequential with one list, one thread per list with many."""

    def one(ids: list[uuid.UUID]) -> None:
        deposit = app.deposit
        for account_id in ids:
            deposit(account_id, 1)

    async def run() -> float:
        n = max(max(keys) for keys in lists) + 1
        accounts = [app.open_account(f"owner {i}") for i in range(n)]
        id_lists = [[accounts[k] for k in keys] for keys in lists]
        total = sum(len(ids) for ids in id_lists)
        start = perf_counter()
        if len(id_lists) == 1:
            one(id_lists[0])
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(id_lists)) as pool:
                for future in [pool.submit(one, ids) for ids in id_lists]:
                    future.result()
        rate = total / (perf_counter() - start)
        for account_id in (accounts[0], accounts[-1]):
            assert app.repository.get(account_id).version == expected
        return rate

    return run


# -- trio_aggregates --------------------------------------------------------------


def our_commands(
    repo: AggregateRepository[Account], lists: list[list[int]], expected: int
) -> Callable[[], Awaitable[float]]:
    """One sample: fresh aggregates created (not timed; they stay live), then
    one task per list sending its deposits."""
    command = Deposit(1)

    async def one(keys: list[str]) -> None:
        execute = repo.execute
        for key in keys:
            await execute(key, command)

    async def run() -> float:
        n = max(max(keys) for keys in lists) + 1
        run_id = uuid.uuid4().hex[:8]
        names = [f"{run_id}-{i}" for i in range(n)]
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(repo.create, name, OpenAccount(f"owner of {name}"))
        key_lists = [[names[k] for k in keys] for keys in lists]
        total = sum(len(keys) for keys in key_lists)
        start = perf_counter()
        if len(key_lists) == 1:
            await one(key_lists[0])
        else:
            async with trio.open_nursery() as nursery:
                for keys in key_lists:
                    nursery.start_soon(one, keys)
        rate = total / (perf_counter() - start)
        for name in (names[0], names[-1]):
            assert await repo.version(name) == expected
        return rate

    return run


async def bench_commands(report: Report, p: dict[str, Any], backend: Backend) -> None:
    apps = {config: EsBank(env=es_env(backend.es_target, config)) for config in ES_CONFIGS}
    report.parameters[f"eventsourcing_settings_{backend.name.lower()}"] = {
        config: es_settings(app) for config, app in apps.items()
    }
    async with (
        open_store(backend.our_url) as store,
        open_aggregates(Account, store, idle_timeout=None) as repo,
    ):
        if backend.name == "SQLite":
            ours = our_sqlite_durability(store)
            theirs = {config: es_sqlite_durability(app) for config, app in apps.items()}
            backend.durability = (
                f"ours: journal_mode={ours[0]}, synchronous={SYNC_NAMES.get(ours[1], ours[1])}; "
                f"eventsourcing: journal_mode={theirs['es_default'][0]}, "
                f"synchronous={SYNC_NAMES.get(theirs['es_default'][1], theirs['es_default'][1])}"
            )
            if any(ours != t for t in theirs.values()):
                raise SystemExit(f"SQLite durability differs: {backend.durability} ({theirs})")
        print(f"  durability on {backend.name}: {backend.durability}", flush=True)

        for n in (1, CONCURRENT):
            lists = command_lists(p, n)
            expected = 1 + p["rounds"]
            text = workload_text(p, n)
            report.parameters[f"workload_{n}"] = text
            print(f"  {backend.name}: {text} ...", flush=True)
            variants: dict[str, Callable[[], Awaitable[float]]] = {
                config: es_commands(app, lists, expected) for config, app in apps.items()
            }
            variants["library"] = our_commands(repo, lists, expected)
            statistics = getattr(store, "statistics", None)
            before = statistics() if statistics is not None else None
            s = await interleaved_async(p["reps_commands"], variants)
            if statistics is not None and before is not None:
                after = statistics()
                appends = after.appends - before.appends
                commits = max(after.transactions - before.transactions, 1)
                group = f"{appends:,} appends in {commits:,} transactions"
                print(
                    f"  {backend.name}, {n} caller(s): {group} ({appends / commits:.1f} per commit)"
                )
                report.parameters[f"group_commit_{backend.name.lower()}_{n}"] = (
                    f"{group}, creates included"
                )
            per = p[f"aggregates_per_caller_{n}"]
            if n == 1:
                how = f"1 caller, {per} aggregates x {p['rounds']} deposits, rotating"
            else:
                how = f"{n} callers, {n} concurrent aggregates ({n * per} x {p['rounds']} deposits)"
            es_how = "" if n == 1 else f"; eventsourcing: {n} threads"
            report.compare(
                f"commands_{backend.name.lower()}_{n}",
                f"vs eventsourcing (default Application): {backend.name}, {how} "
                "(durable commands/s)",
                "ops/s",
                "higher",
                s["es_default"],
                s["library"],
                target=10.0 if backend.name == "SQLite" and n == CONCURRENT else None,
                note=f"{backend.durability}{es_how}; {text}",
            )
            report.add_context(
                f"commands_{backend.name.lower()}_{n}_es_cache",
                f"{backend.name}, {'1 caller' if n == 1 else f'{n} callers'}: "
                f"{ES_TITLES['es_cache']}",
                "ops/s",
                "higher",
                s["es_cache"],
                relative_to=("library", max(s["library"])),
            )
    for app in apps.values():
        app.close()


# -- 2: rehydration --------------------------------------------------------------------


def _records(events: int) -> list[NewEvent]:
    codec = Account.codec()
    meta = b'{"command_id": "0123456789abcdef0123456789abcdef", "at": 1700000000.0}'
    out = [NewEvent(*codec.encode(AccountOpened("owner", 0)), meta)]
    out += [NewEvent(*codec.encode(Deposited(1)), meta) for _ in range(events - 1)]
    return out


@contextlib.asynccontextmanager
async def filled_store(url: str, key: str, events: int) -> AsyncIterator[EventStore]:
    async with open_store(url) as store:
        records = _records(events)
        stream = ColdAccount.stream_name(key)
        for start in range(0, len(records), 1000):
            await store.append(stream, records[start : start + 1000], expected_version=start)
        yield store


async def bench_rehydrate(report: Report, p: dict[str, Any], backends: list[Backend]) -> None:
    n_events: int = p["stream_events"]
    key = f"rehydrate-{uuid.uuid4().hex[:8]}"
    for backend in backends:
        print(f"  {backend.name}: writing a {n_events:,}-event stream ...", flush=True)
        es_app = None
        es_id = None
        if backend.es_target:
            es_app = EsBank(env=es_env(backend.es_target))
            account = EsAccount("owner")
            for _ in range(n_events - 1):
                account.deposit(1)
            es_app.save(account)
            es_id = account.id
        async with filled_store(backend.our_url, key, n_events) as store:

            async def activation(store: EventStore = store) -> float:
                async with open_aggregates(ColdAccount, store, idle_timeout=None) as repo:
                    start = perf_counter()
                    balance = await repo.execute(key, GetBalance())
                    elapsed = perf_counter() - start
                assert balance == n_events - 1
                return n_events / elapsed

            async def replay(store: EventStore = store) -> float:
                async with open_aggregates(ColdAccount, store, idle_timeout=None) as repo:
                    start = perf_counter()
                    state, version = await repo.replay(key)
                    elapsed = perf_counter() - start
                assert version == n_events and state.balance == n_events - 1
                return n_events / elapsed

            variants: dict[str, Callable[[], Awaitable[float]]] = {
                "activation": activation,
                "replay": replay,
            }
            if es_app is not None:
                get = es_app.repository.get

                async def es_get(get: Any = get, es_id: Any = es_id) -> float:
                    start = perf_counter()
                    account = get(es_id)
                    elapsed = perf_counter() - start
                    assert account.balance == n_events - 1
                    return n_events / elapsed

                variants["es"] = es_get
            s = await interleaved_async(p["reps_rehydrate"], variants)
        where = backend.name.lower()
        if es_app is not None:
            es_app.close()
            report.compare(
                f"rehydrate_{where}_activation",
                f"vs eventsourcing: rehydrate {n_events:,} events, {backend.name}, "
                "activation (events/s)",
                "ops/s",
                "higher",
                s["es"],
                s["activation"],
                target=None,
                note="cold key, fresh repository: execute(key, GetBalance()) vs "
                "repository.get(id), no cache, no snapshot",
            )
            report.compare(
                f"rehydrate_{where}_replay",
                f"vs eventsourcing: rehydrate {n_events:,} events, {backend.name}, "
                "repo.replay (events/s)",
                "ops/s",
                "higher",
                s["es"],
                s["replay"],
                target=None,
            )
        else:
            report.add_context(
                f"rehydrate_{where}_activation",
                f"rehydrate {n_events:,} events, {backend.name}, activation",
                "ops/s",
                "higher",
                s["activation"],
                note="cold key, fresh repository: execute(key, GetBalance())",
            )
            report.add_context(
                f"rehydrate_{where}_replay",
                f"rehydrate {n_events:,} events, {backend.name}, repo.replay",
                "ops/s",
                "higher",
                s["replay"],
            )


# -- main ---------------------------------------------------------------------------


def parameters(quick: bool, reps: int | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "aggregates_per_caller_1": 100 if not quick else 50,
        f"aggregates_per_caller_{CONCURRENT}": 5 if not quick else 2,
        "rounds": 10 if not quick else 5,
        "stream_events": 10_000,
        "reps_commands": 5 if not quick else 3,
        "reps_rehydrate": 5 if not quick else 3,
        "eventsourcing": package_version("eventsourcing"),
        "eventsourcing_configs": {
            "es_default": "Application defaults; only PERSISTENCE_MODULE and the database",
            "es_cache": "AGGREGATE_CACHE_MAXSIZE=100000, AGGREGATE_CACHE_FASTFORWARD=n",
        },
        "sqlite": sqlite3.sqlite_version,
    }
    return apply_reps(p, reps)


def main(argv: list[str] | None = None) -> int:
    extra = list(argv if argv is not None else sys.argv[1:])
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
    report = Report("bench_stores", quick=args.quick, parameters=p, baseline_label="eventsourcing")
    random.seed(0)

    with (
        tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp,
        postgres_backends(postgres_url) as (our_pg, es_pg, how),
    ):
        sqlite_backend = Backend(
            "SQLite", f"sqlite:///{tmp}/ours.db", es_sqlite_env(Path(tmp) / "eventsourcing.db")
        )
        # PostgreSQL first: the SQLite rows are measured last (the SQLite writer
        # is the part most likely to change between runs).
        durable = []
        if our_pg is None or es_pg is None:
            print(f"PostgreSQL rows skipped: {how}")
            report.parameters["postgres"] = f"skipped: {how}"
        else:
            pg_backend = Backend("PostgreSQL", our_pg, es_postgres_env(es_pg))
            pg_backend.durability = postgres_durability(our_pg)
            es_durability = postgres_durability(es_pg)
            if es_durability != pg_backend.durability:  # pragma: no cover - one server
                pg_backend.durability += f"; eventsourcing: {es_durability}"
            durable.append(pg_backend)
            print(f"PostgreSQL: {how}")
            report.parameters["postgres"] = how
        durable.append(sqlite_backend)

        async def run() -> None:
            if "commands" in args.only:
                for backend in durable:
                    print(f"durable commands on {backend.name} ...", flush=True)
                    await bench_commands(report, p, backend)
                    report.parameters[f"durability_{backend.name.lower()}"] = backend.durability
            if "rehydrate" in args.only:
                print("rehydration ...", flush=True)
                memory = Backend("memory", "memory://", {})
                await bench_rehydrate(report, p, [memory, *durable])

        trio.run(run)
        print(f"finished at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")

    report.sort(["commands_sqlite", "commands_postgres", "rehydrate"])
    print()
    print(
        "Rows 'vs eventsourcing': the eventsourcing column holds its default Application's "
        "figure; ratio = trio_aggregates / eventsourcing. Context: a tuned eventsourcing, "
        "'library vs this' = trio_aggregates / that figure."
    )
    report.print_table()
    report.write_json(args.json)
    return 0  # a missed target shows in the table and the JSON, not in the exit status


if __name__ == "__main__":
    sys.exit(main())
