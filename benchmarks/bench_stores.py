"""Durable event stores: commands/s on SQLite and PostgreSQL, and rehydration,
against the Python ``eventsourcing`` library.

One process, one run. The domain is ``examples/bank.py``'s ``Account``; every
command is a ``Deposit`` (one ``Deposited`` event), acknowledged only once
durable.

1. ``commands``: durable commands/s with 1 aggregate (one caller, sequential
   deposits) and with 100 aggregates (100 concurrent callers, one per
   aggregate, each doing sequential deposits), on SQLite (a temporary file)
   and on PostgreSQL: ``open_aggregates(Account, url)`` + ``execute``, against
   ``eventsourcing`` 9.x on the same kind of database doing the same work per
   command: ``repository.get(id)``, one command, ``save``. Its API is
   synchronous, so with 100 aggregates it runs 100 threads (a
   ``ThreadPoolExecutor`` with 100 workers, one aggregate each). Its
   repository uses the aggregate cache (``AGGREGATE_CACHE_MAXSIZE``, no
   fast-forward query), as warm as our live aggregates: ``get`` does not read
   the database, ``save`` writes (and checks the version) in one transaction.
   Target: at least 10x ``eventsourcing`` on SQLite with 100 aggregates.

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
   cache, no snapshot) on SQLite and PostgreSQL for comparison.

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
from _common import Report, interleaved_async, parse_args
from bench_aggregates import ColdAccount, EsAccount, EsBank

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


def es_env(target: dict[str, str], *, cache: bool) -> dict[str, str]:
    env = dict(target)
    if cache:
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


def es_commands(app: EsBank, ids: list[uuid.UUID], per_aggregate: int) -> Callable[[], Any]:
    """Deposits on ``ids``: sequential with one, one thread per aggregate with many."""

    def one(account_id: uuid.UUID) -> None:
        for _ in range(per_aggregate):
            app.deposit(account_id, 1)

    async def run() -> float:
        start = perf_counter()
        if len(ids) == 1:
            one(ids[0])
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(ids)) as pool:
                for future in [pool.submit(one, account_id) for account_id in ids]:
                    future.result()
        return len(ids) * per_aggregate / (perf_counter() - start)

    return run


# -- trio_aggregates --------------------------------------------------------------


def our_commands(
    repo: AggregateRepository[Account], keys: list[str], per_aggregate: int
) -> Callable[[], Awaitable[float]]:
    command = Deposit(1)

    async def one(key: str) -> None:
        for _ in range(per_aggregate):
            await repo.execute(key, command)

    async def run() -> float:
        start = perf_counter()
        if len(keys) == 1:
            await one(keys[0])
        else:
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(one, key)
        return len(keys) * per_aggregate / (perf_counter() - start)

    return run


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


async def bench_commands(report: Report, p: dict[str, Any], backend: Backend) -> None:
    run_id = uuid.uuid4().hex[:8]
    keys = [f"{run_id}-{i}" for i in range(CONCURRENT)]
    app = EsBank(env=es_env(backend.es_target, cache=True))
    es_ids = [app.open_account(f"owner {i}") for i in range(CONCURRENT)]

    async with (
        open_store(backend.our_url) as store,
        open_aggregates(Account, store, idle_timeout=None) as repo,
    ):
        if backend.name == "SQLite":
            ours = our_sqlite_durability(store)
            theirs = es_sqlite_durability(app)
            backend.durability = (
                f"ours: journal_mode={ours[0]}, synchronous={SYNC_NAMES.get(ours[1], ours[1])}; "
                f"eventsourcing: journal_mode={theirs[0]}, "
                f"synchronous={SYNC_NAMES.get(theirs[1], theirs[1])}"
            )
            if ours != theirs:
                raise SystemExit(f"SQLite durability differs: {backend.durability}")
        print(f"  durability on {backend.name}: {backend.durability}", flush=True)
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(repo.create, key, OpenAccount(f"owner of {key}"))
        # One command each outside the timing: warms both sides.
        await our_commands(repo, keys, 1)()
        await es_commands(app, es_ids, 1)()

        for n in (1, CONCURRENT):
            per = p[f"commands_{n}"] // n
            print(f"  {backend.name}, {n} aggregate(s), {n * per:,} commands a sample ...")
            s = await interleaved_async(
                p["reps_commands"],
                {
                    "es": es_commands(app, es_ids[:n], per),
                    "library": our_commands(repo, keys[:n], per),
                },
            )
            how = "1 aggregate, sequential" if n == 1 else f"{n} aggregates, {n} callers"
            es_how = "" if n == 1 else f"; eventsourcing: {n} threads"
            report.compare(
                f"commands_{backend.name.lower()}_{n}",
                f"vs eventsourcing: {backend.name}, {how} (durable commands/s)",
                "ops/s",
                "higher",
                s["es"],
                s["library"],
                target=10.0 if backend.name == "SQLite" and n == CONCURRENT else None,
                note=f"{backend.durability}{es_how}",
            )
        if hasattr(store, "statistics"):
            stats = store.statistics()
            print(
                f"  {backend.name}: {stats.appends:,} appends in {stats.transactions:,} "
                f"transactions ({stats.appends / max(stats.transactions, 1):.1f} per commit)"
            )
        # Every acknowledged deposit is there.
        version = await repo.version(keys[0])
        expected = 2 + p["commands_1"] * p["reps_commands"]
        expected += p[f"commands_{CONCURRENT}"] // CONCURRENT * p["reps_commands"]
        assert version == expected, (version, expected)
    assert app.repository.get(es_ids[0]).version == expected
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
            es_app = EsBank(env=es_env(backend.es_target, cache=False))
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
        "commands_1": 1_000 if not quick else 250,
        f"commands_{CONCURRENT}": 5_000 if not quick else 1_000,
        "stream_events": 10_000,
        "reps_commands": 5 if not quick else 3,
        "reps_rehydrate": 5 if not quick else 3,
        "eventsourcing": _version("eventsourcing"),
        "eventsourcing_cache": "AGGREGATE_CACHE_MAXSIZE=100000, AGGREGATE_CACHE_FASTFORWARD=n",
        "sqlite": sqlite3.sqlite_version,
    }
    if reps is not None:
        for name in list(p):
            if name.startswith("reps_"):
                p[name] = reps
    return p


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


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
    report = Report("bench_stores", quick=args.quick, parameters=p)
    random.seed(0)

    with (
        tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp,
        postgres_backends(postgres_url) as (our_pg, es_pg, how),
    ):
        sqlite_backend = Backend(
            "SQLite", f"sqlite:///{tmp}/ours.db", es_sqlite_env(Path(tmp) / "eventsourcing.db")
        )
        durable = [sqlite_backend]
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

    report.sort(["commands_sqlite", "commands_postgres", "rehydrate"])
    print()
    print(
        "Rows 'vs eventsourcing': the 'bare Trio' column holds eventsourcing's figure; "
        "ratio = trio_aggregates / eventsourcing."
    )
    report.print_table()
    report.write_json(args.json)
    return 0 if report.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
