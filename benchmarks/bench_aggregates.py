"""Event-sourced aggregates in memory: warm commands/s and rehydration, against
bare Trio and the Python ``eventsourcing`` library.

One process, one run. The domain is ``examples/bank.py``'s ``Account``; every
command is a ``Deposit`` (one ``Deposited`` event).

1. ``warm``: commands/s on warm (live) aggregates with the in-memory store,
   ``open_aggregates(Account, "memory://")`` + ``await repo.execute(key,
   Deposit(1))``, on three workloads. Every sample starts from fresh
   aggregates on both sides (opened outside the timing; ours stay live), so
   streams stay short and equal for both sides:

   (a) ``sequential``: 1 caller, 1,000 aggregates (500 with ``--quick``),
       10 rounds of one deposit to each in turn (streams: 1 to 11 events);
   (b) ``concurrent``: 1,000 callers (200) over 10,000 aggregates (2,000),
       each aggregate given exactly 5 deposits (5 shuffled rounds over all
       keys, dealt round-robin to the callers; streams: 1 to 6 events);
   (c) ``single``: 1 caller, 1 aggregate, 20,000 deposits (5,000): a long
       stream, for the bare-Trio ratio and eventsourcing's warm cache only.

   The target rows compare against ``eventsourcing`` 9.x as a user gets it:
   ``Application`` + ``Aggregate`` with its **default settings** (only
   ``PERSISTENCE_MODULE=eventsourcing.popo``, its in-memory store: no
   aggregate cache, so every ``repository.get`` replays the aggregate's
   stream; no snapshots), doing the same work per command:
   ``repository.get(id)``, one command (``deposit``, one event), ``save``.
   Target: at least 5x, on (a) and (b). Its API is synchronous and in-memory
   work holds the GIL, so in (b) it runs the very same commands one at a
   time, in the order the callers interleave them.

   Tuned ``eventsourcing`` configurations are shown as context rows, with
   trio_aggregates' ratio to each: its aggregate cache trusted like our live
   aggregates (``AGGREGATE_CACHE_MAXSIZE``, ``AGGREGATE_CACHE_FASTFORWARD=n``;
   ``save`` still checks the version) with its default deep copy on every
   ``get``, the same without the copy (its fastest), and the cache with its
   default fast-forward (a stream query per ``get``). Every workload is also
   compared with bare Trio (a hand-written task per key holding a balance,
   its memory channel, a fresh 1-slot reply channel per request;
   information).

2. ``rehydrate``: events/s replayed from a 1,001-event stream (an
   ``AccountOpened`` and 1,000 ``Deposited``, no snapshot), in memory:
   trio_aggregates *activation* (a cold key in a fresh repository on the same
   store: ``execute(key, GetBalance())`` loads the stream in the aggregate's
   task before it reports ready; the command appends nothing) and
   ``repo.replay(key)`` (read + decode + apply, no task), against
   ``eventsourcing``'s ``app.repository.get(id)`` (default settings: no
   cache, no snapshot).
   A floor (``json.loads`` + ``balance +=`` per stored record) is shown too.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_aggregates.py --quick --json /tmp/aggregates.json
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import Report, apply_reps, interleaved_async, package_version, parse_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from bank import (
    Account,
    AccountOpened,
    Deposit,
    Deposited,
    GetBalance,
    OpenAccount,
)
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate as EsAggregate, event

from trio_aggregates import (
    AggregateRepository,
    InMemoryEventStore,
    NewEvent,
    open_aggregates,
)

SECTIONS = ("warm", "rehydrate")
MAILBOX_SIZE = 64  # open_aggregates' default; the bare channels get the same buffer

perf_counter = time.perf_counter


# -- the eventsourcing side -----------------------------------------------------
#
# The same Account: opened with an owner, deposits checked (open, positive int)
# and recorded as one event each.


class EsAccount(EsAggregate):
    @event("Opened")
    def __init__(self, owner: str, overdraft_limit: int = 0) -> None:
        self.owner = owner
        self.overdraft_limit = overdraft_limit
        self.balance = 0
        self.closed = False

    def deposit(self, amount: int, reference: str | None = None) -> None:
        if self.closed:
            raise ValueError("the account is closed")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise ValueError(f"amount must be a positive int, not {amount!r}")
        self._deposited(amount, reference)

    @event("Deposited")
    def _deposited(self, amount: int, reference: str | None = None) -> None:
        self.balance += amount


class EsBank(Application[uuid.UUID]):
    def open_account(self, owner: str) -> uuid.UUID:
        account = EsAccount(owner)
        self.save(account)
        return account.id

    def deposit(self, account_id: uuid.UUID, amount: int) -> int:
        """The measured work: get, one command, save."""
        account: EsAccount = self.repository.get(account_id)
        account.deposit(amount)
        self.save(account)
        return account.version

    def balance(self, account_id: uuid.UUID) -> int:
        account: EsAccount = self.repository.get(account_id)
        return account.balance


#: eventsourcing configurations (``env`` of the Application); POPO is its in-memory store.
#: ``es_default`` is the target's baseline: ``Application`` as a user gets it,
#: only the persistence module set (no aggregate cache: every ``get`` replays
#: the aggregate's stream; no snapshots). The others are tuned configurations,
#: shown as context: the aggregate cache trusted like our live aggregates (no
#: fast-forward query per get; ``save`` still checks the version) with its
#: default deep copy of the cached aggregate on every get, the same without
#: the copy (its fastest), and the cache with its default fast-forward.
_POPO = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
_CACHE = {**_POPO, "AGGREGATE_CACHE_MAXSIZE": "100000"}
ES_CONFIGS: dict[str, dict[str, str]] = {
    "es_default": _POPO,
    "es_cache": {**_CACHE, "AGGREGATE_CACHE_FASTFORWARD": "n"},
    "es_cache_nocopy": {
        **_CACHE,
        "AGGREGATE_CACHE_FASTFORWARD": "n",
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
    },
    "es_cache_ff": _CACHE,
}
ES_TITLES = {
    "es_default": "eventsourcing, default Application (no cache: get replays the stream)",
    "es_cache": "eventsourcing tuned: warm cache, no fast-forward, deepcopy on",
    "es_cache_nocopy": "eventsourcing tuned: warm cache, no fast-forward, no deepcopy",
    "es_cache_ff": "eventsourcing tuned: cache + fast-forward (POPO scans the stream per get)",
}
#: Environment variables ``Application`` reads (it merges ``os.environ`` into its env).
ES_ENV_VARS = (
    "PERSISTENCE_MODULE",
    "AGGREGATE_CACHE_MAXSIZE",
    "AGGREGATE_CACHE_FASTFORWARD",
    "AGGREGATE_CACHE_FASTFORWARD_SKIPPING",
    "DEEPCOPY_FROM_AGGREGATE_CACHE",
    "IS_SNAPSHOTTING_ENABLED",
)


def check_es_environment() -> None:
    """Stop if the process environment would change eventsourcing's defaults."""
    found = {name: os.environ[name] for name in ES_ENV_VARS if name in os.environ}
    if found:
        raise SystemExit(
            f"eventsourcing reads these from the environment, unset them first: {found}"
        )


def es_settings(app: Application[Any]) -> dict[str, Any]:
    """The settings an eventsourcing Application actually runs with."""
    repo = app.repository
    return {
        "persistence_module": app.env.get("PERSISTENCE_MODULE", "eventsourcing.popo"),
        "recorder": type(app.recorder).__name__,
        "aggregate_cache": None if repo.cache is None else type(repo.cache).__name__,
        "cache_maxsize": getattr(repo.cache, "maxsize", None),
        "fastforward": repo.fastforward,
        "deepcopy_from_cache": repo.deepcopy_from_cache,
        "snapshotting": app.snapshots is not None,
    }


def es_app(config: str) -> EsBank:
    return EsBank(env=ES_CONFIGS[config])


def es_runner(config: str, workload: Workload) -> Callable[[], Awaitable[float]]:
    """One sample of eventsourcing: a fresh Application, its accounts opened
    (not timed), then the same commands as the callers would send, one at a
    time, in the order concurrent callers would interleave them."""
    order = _round_robin(workload.key_lists)
    expected = workload.finalpackage_version(0)

    async def run() -> float:
        app = es_app(config)
        ids = [app.open_account(f"owner {i}") for i in range(workload.aggregates)]
        deposit = app.deposit
        targets = [ids[k] for k in order]
        start = perf_counter()
        for account_id in targets:
            deposit(account_id, 1)
        rate = len(targets) / (perf_counter() - start)
        assert app.repository.get(ids[0]).version == expected
        app.close()
        return rate

    return run


def _round_robin(key_lists: list[list[int]]) -> list[int]:
    """The callers' keys in the order concurrent callers would interleave them."""
    out: list[int] = []
    for i in range(max(len(k) for k in key_lists)):
        out.extend(keys[i] for keys in key_lists if i < len(keys))
    return out


# -- the bare-Trio side ---------------------------------------------------------


async def bare_account(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """A hand-written aggregate: its balance and version, requests ``(amount, reply)``."""
    send, receive = trio.open_memory_channel[Any](MAILBOX_SIZE)
    task_status.started(send)
    balance = version = 0
    async for amount, reply in receive:
        balance += amount
        version += 1
        reply.send_nowait(version)


def bare_caller(table: list[trio.MemorySendChannel[Any]]) -> Callable[[list[int]], Awaitable[Any]]:
    async def run(keys: list[int]) -> Any:
        answer = None
        for key in keys:
            reply_send, reply_receive = trio.open_memory_channel[Any](1)
            await table[key].send((1, reply_send))
            answer = await reply_receive.receive()
        return answer

    return run


def library_caller(
    repo: AggregateRepository[Account], names: list[str]
) -> Callable[[list[int]], Awaitable[Any]]:
    async def run(keys: list[int]) -> Any:
        answer = None
        execute = repo.execute
        command = Deposit(1)
        for key in keys:
            answer = await execute(names[key], command)
        return answer

    return run


def library_runner(workload: Workload) -> Callable[[], Awaitable[float]]:
    """One sample of trio_aggregates: a fresh repository on a fresh in-memory
    store, its accounts created (not timed: they stay live, i.e. warm), then
    the workload's callers."""
    names = [f"acct-{i}" for i in range(workload.aggregates)]
    expected = workload.finalpackage_version(0)

    async def run() -> float:
        async with open_aggregates(Account, "memory://", idle_timeout=None) as repo:
            for name in names:
                await repo.create(name, OpenAccount(f"owner of {name}"))
            rate = await time_callers(library_caller(repo, names), workload.key_lists)
            assert await repo.version(names[0]) == expected
        return rate

    return run


async def time_callers(
    caller: Callable[[list[int]], Awaitable[Any]], key_lists: list[list[int]]
) -> float:
    """Commands per second of ``len(key_lists)`` concurrent callers."""
    total = sum(len(keys) for keys in key_lists)
    start = perf_counter()
    if len(key_lists) == 1:
        await caller(key_lists[0])
    else:
        async with trio.open_nursery() as nursery:
            for keys in key_lists:
                nursery.start_soon(caller, keys)
    return total / (perf_counter() - start)


# -- 1: warm commands -------------------------------------------------------------


@attrs.define
class Workload:
    """Who sends which deposits to which aggregates, in one sample."""

    id: str
    #: for the row titles, e.g. "1 caller, 1,000 aggregates x 10 deposits"
    title: str
    #: stream lengths etc., printed and stored in the JSON file
    description: str
    aggregates: int
    #: one list of aggregate numbers per concurrent caller
    key_lists: list[list[int]]
    #: eventsourcing configurations run on it; the first is the row's baseline
    es_configs: list[str]
    #: the baseline column of the comparison row: "es_default" or "bare"
    baseline: str
    target: float | None

    def finalpackage_version(self, key: int) -> int:
        """The version of aggregate ``key`` after a sample (opened + its deposits)."""
        return 1 + sum(keys.count(key) for keys in self.key_lists)

    @property
    def commands(self) -> int:
        return sum(len(keys) for keys in self.key_lists)


def workloads(p: dict[str, Any]) -> list[Workload]:
    n_seq, r_seq = p["sequential_aggregates"], p["sequential_rounds"]
    n_conc, r_conc = p["concurrent_aggregates"], p["concurrent_rounds"]
    callers = p["concurrent_callers"]
    rng = random.Random(1)
    order: list[int] = []
    for _ in range(r_conc):  # every key exactly r_conc times, in a random order per round
        perm = list(range(n_conc))
        rng.shuffle(perm)
        order += perm
    n_single = p["single_commands"]
    return [
        Workload(
            id="sequential",
            title=f"1 caller, {n_seq:,} aggregates x {r_seq} deposits, rotating",
            description=(
                f"1 caller; {n_seq:,} fresh aggregates each opened (1 event), then "
                f"{r_seq} rounds of one deposit to each in turn: {n_seq * r_seq:,} commands "
                f"a sample, streams grow from 1 to {1 + r_seq} events (eventsourcing's get "
                f"replays 1 to {r_seq}, {1 + (r_seq - 1) / 2:.1f} on average)"
            ),
            aggregates=n_seq,
            key_lists=[[k for _ in range(r_seq) for k in range(n_seq)]],
            es_configs=list(ES_CONFIGS),
            baseline="es_default",
            target=5.0,
        ),
        Workload(
            id="concurrent",
            title=f"{callers:,} callers over {n_conc:,} aggregates x {r_conc} deposits",
            description=(
                f"{callers:,} concurrent callers; {n_conc:,} fresh aggregates each opened "
                f"(1 event), then each given exactly {r_conc} deposits ({r_conc} rounds over "
                f"all keys, each round shuffled, dealt round-robin to the callers): "
                f"{n_conc * r_conc:,} commands a sample, streams grow from 1 to {1 + r_conc} "
                f"events; eventsourcing runs the same commands one at a time, in the order "
                f"the callers interleave them"
            ),
            aggregates=n_conc,
            key_lists=[order[c::callers] for c in range(callers)],
            es_configs=list(ES_CONFIGS),
            baseline="es_default",
            target=5.0,
        ),
        Workload(
            id="single",
            title=f"1 caller, 1 aggregate, {n_single:,} deposits",
            description=(
                f"1 caller, 1 aggregate, {n_single:,} sequential deposits a sample (the "
                f"stream grows to {1 + n_single:,} events: only a warm eventsourcing cache "
                "can do this, its default configuration would replay the whole stream on "
                "every get)"
            ),
            aggregates=1,
            key_lists=[[0] * n_single],
            es_configs=["es_cache", "es_cache_nocopy"],
            baseline="bare",
            target=None,
        ),
    ]


async def bench_warm(report: Report, p: dict[str, Any]) -> None:
    loads = workloads(p)
    report.parameters["workloads"] = {w.id: w.description for w in loads}
    async with trio.open_nursery() as nursery:
        bare = [await nursery.start(bare_account) for _ in range(max(w.aggregates for w in loads))]
        bare_call = bare_caller(bare)
        for w in loads:
            print(f"  warm, {w.id}: {w.description} ...", flush=True)
            variants: dict[str, Callable[[], Awaitable[float]]] = {
                "bare": functools.partial(time_callers, bare_call, w.key_lists),
                "library": library_runner(w),
            }
            for config in w.es_configs:
                variants[config] = es_runner(config, w)
            s = await interleaved_async(p["reps_warm"], variants)
            best_lib = max(s["library"])
            if w.baseline == "es_default":
                report.compare(
                    f"warm_{w.id}_es",
                    f"vs eventsourcing (default Application): deposit, {w.title} (commands/s)",
                    "ops/s",
                    "higher",
                    s["es_default"],
                    s["library"],
                    target=w.target,
                    note="baseline column: eventsourcing Application, default settings "
                    "(POPO, no aggregate cache, no snapshots), get + deposit + save per command; "
                    + w.description,
                )
            report.compare(
                f"warm_{w.id}_bare",
                f"vs bare Trio: deposit, {w.title} (commands/s)",
                "ops/s",
                "higher",
                s["bare"],
                s["library"],
                target=None,
                note="baseline column: task + memory channel + fresh 1-slot reply channel; "
                + w.description,
            )
            for config in w.es_configs:
                if config == w.baseline:
                    continue
                report.add_context(
                    f"warm_{w.id}_{config}",
                    f"{w.id}: {ES_TITLES[config]}",
                    "ops/s",
                    "higher",
                    s[config],
                    relative_to=("library", best_lib),
                )
        for send in bare:
            send.close()


# -- 2: rehydration -------------------------------------------------------------------


@attrs.define
class ColdAccount(Account):
    """``Account`` on the same streams, without snapshots: activation replays every event.

    (``Account`` snapshots every 50 events: its first activation would save
    one, and every later one would start from it.)
    """

    category = "Account"
    snapshot_every = None  # type: ignore[assignment]  # never (bank.Account says 50, an int)


def _stream_records(events: int) -> list[NewEvent]:
    codec = Account.codec()
    meta = json.dumps({"command_id": uuid.uuid4().hex, "at": time.time()}).encode()
    records = [NewEvent(*codec.encode(AccountOpened("owner", 0)), meta)]
    records += [NewEvent(*codec.encode(Deposited(1)), meta) for _ in range(events - 1)]
    return records


async def bench_rehydrate(report: Report, p: dict[str, Any]) -> None:
    n_events: int = p["stream_events"]
    n_streams: int = p["rehydrate_streams"]
    total = n_events * n_streams

    # trio_aggregates: the streams written straight to the store (no snapshot).
    store = InMemoryEventStore()
    names = [f"cold-{i}" for i in range(n_streams)]
    records = _stream_records(n_events)
    for name in names:
        stream = Account.stream_name(name)
        for start in range(0, len(records), 500):
            await store.append(stream, records[start : start + 500], expected_version=start)

    # eventsourcing: the same number of events per aggregate, no cache, no snapshot.
    app = es_app("es_default")
    es_ids = []
    for i in range(n_streams):
        account = EsAccount(f"owner {i}")
        for _ in range(n_events - 1):
            account.deposit(1)
        app.save(account)
        es_ids.append(account.id)
    assert app.repository.get(es_ids[0]).version == n_events

    async def activation() -> float:
        async with open_aggregates(ColdAccount, store, idle_timeout=None) as repo:
            start = perf_counter()
            for name in names:
                balance = await repo.execute(name, GetBalance())
            elapsed = perf_counter() - start
        assert balance == n_events - 1
        return total / elapsed

    async def replay() -> float:
        async with open_aggregates(ColdAccount, store, idle_timeout=None) as repo:
            start = perf_counter()
            for name in names:
                state, version = await repo.replay(name)
            elapsed = perf_counter() - start
        assert version == n_events and state.balance == n_events - 1
        return total / elapsed

    async def eventsourcing_get() -> float:
        get = app.repository.get
        start = perf_counter()
        for account_id in es_ids:
            account: EsAccount = get(account_id)
        elapsed = perf_counter() - start
        assert account.balance == n_events - 1
        return total / elapsed

    stored = [await store.read(Account.stream_name(name)) for name in names]

    async def floor() -> float:
        loads = json.loads
        start = perf_counter()
        for stream_records in stored:
            balance = 0
            for record in stream_records:
                balance += loads(record.data).get("amount", 0)
        elapsed = perf_counter() - start
        assert balance == n_events - 1
        return total / elapsed

    s = await interleaved_async(
        p["reps_rehydrate"],
        {
            "es": eventsourcing_get,
            "activation": activation,
            "replay": replay,
            "floor": floor,
        },
    )
    report.compare(
        "rehydrate_activation_es",
        f"vs eventsourcing: rehydrate {n_events:,} events, activation (events/s)",
        "ops/s",
        "higher",
        s["es"],
        s["activation"],
        target=None,
        note="cold key in a fresh repository: execute(key, GetBalance()) vs "
        "app.repository.get(id), no cache, no snapshot",
    )
    report.compare(
        "rehydrate_replay_es",
        f"vs eventsourcing: rehydrate {n_events:,} events, repo.replay(key) (events/s)",
        "ops/s",
        "higher",
        s["es"],
        s["replay"],
        target=None,
        note="replay: read pages + decode + apply, no task, no registry",
    )
    report.add_context(
        "rehydrate_floor",
        "  floor: json.loads + balance += per stored record",
        "ops/s",
        "higher",
        s["floor"],
        relative_to=("activation", max(s["activation"])),
    )


# -- main ---------------------------------------------------------------------------


def parameters(quick: bool, reps: int | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "sequential_aggregates": 1_000 if not quick else 500,
        "sequential_rounds": 10,
        "concurrent_aggregates": 10_000 if not quick else 2_000,
        "concurrent_callers": 1_000 if not quick else 200,
        "concurrent_rounds": 5,
        "single_commands": 20_000 if not quick else 5_000,
        "stream_events": 1_001,
        "rehydrate_streams": 10 if not quick else 5,
        "reps_warm": 5 if not quick else 3,
        "reps_rehydrate": 7 if not quick else 5,
        "eventsourcing": package_version("eventsourcing"),
        "eventsourcing_configs": ES_CONFIGS,
    }
    return apply_reps(p, reps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", SECTIONS, argv)
    p = parameters(args.quick, args.reps)
    check_es_environment()
    settings = {}
    for config in ES_CONFIGS:
        app = es_app(config)
        settings[config] = es_settings(app)
        app.close()
    p["eventsourcing_settings"] = settings
    print(f"eventsourcing {p['eventsourcing']}, default Application: {settings['es_default']}")
    report = Report(
        "bench_aggregates", quick=args.quick, parameters=p, baseline_label="baseline (vs X)"
    )

    async def run() -> None:
        if "warm" in args.only:
            print("warm commands (memory store) ...", flush=True)
            await bench_warm(report, p)
        if "rehydrate" in args.only:
            print("rehydration (memory store) ...", flush=True)
            await bench_rehydrate(report, p)

    trio.run(run)
    report.sort(["warm_sequential", "warm_concurrent", "warm_single", "rehydrate"])
    print()
    print(
        "Rows 'vs X': the baseline column holds X (eventsourcing's default Application, or "
        "bare Trio); ratio = trio_aggregates / X. Context: tuned eventsourcing configurations, "
        "'library vs this' = trio_aggregates / that figure."
    )
    report.print_table()
    report.write_json(args.json)
    return 0  # a missed target shows in the table and the JSON, not in the exit status


if __name__ == "__main__":
    sys.exit(main())
