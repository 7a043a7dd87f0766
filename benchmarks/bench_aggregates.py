"""Event-sourced aggregates in memory: warm commands/s and rehydration, against
bare Trio and the Python ``eventsourcing`` library.

One process, one run. The domain is ``examples/bank.py``'s ``Account``; every
command is a ``Deposit`` (one ``Deposited`` event).

1. ``warm``: commands/s on warm (live) aggregates with the in-memory store,
   ``open_aggregates(Account, "memory://")`` + ``await repo.execute(key,
   Deposit(1))``,

   (a) one caller, one aggregate, sequential;
   (b) many concurrent callers (1,000; 200 with ``--quick``) over many
       aggregates (10,000; 2,000), each caller on a random key list;

   reported twice: as a ratio to the bare-Trio round trip (a hand-written
   task per key holding a balance, its memory channel, a fresh 1-slot reply
   channel per request; information) and against ``eventsourcing`` 9.x
   (``Application`` + ``Aggregate``, default in-memory ``POPO`` persistence)
   doing the same work per command: ``repository.get(id)``, one command
   (``deposit``, one event), ``save``. Target: at least 5x.

   ``eventsourcing``'s repository replays the whole stream on every ``get``
   unless its aggregate cache is on, so a warm comparison needs the cache:
   the target row uses ``AGGREGATE_CACHE_MAXSIZE`` with
   ``AGGREGATE_CACHE_FASTFORWARD=n`` (it trusts the cached state, as our live
   aggregate does; ``save`` still checks the version) and its default
   ``DEEPCOPY_FROM_AGGREGATE_CACHE=y`` (``get`` returns a deep copy). The
   cache without the copy, the cache with fast-forward (its default cache),
   and no cache at all (in (b), where streams are short) are shown for
   context. Its API is synchronous and in-memory work holds the
   GIL, so in (b) it runs the very same key lists one command at a time.

2. ``rehydrate``: events/s replayed from a 1,001-event stream (an
   ``AccountOpened`` and 1,000 ``Deposited``, no snapshot), in memory:
   trio_aggregates *activation* (a cold key in a fresh repository on the same
   store: ``execute(key, GetBalance())`` loads the stream in the aggregate's
   task before it reports ready; the command appends nothing) and
   ``repo.replay(key)`` (read + decode + apply, no task), against
   ``eventsourcing``'s ``app.repository.get(id)`` (no cache, no snapshot).
   A floor (``json.loads`` + ``balance +=`` per stored record) is shown too.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_aggregates.py --quick --json /tmp/aggregates.json
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import Report, interleaved_async, parse_args

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
from eventsourcing.domain import Aggregate as EsAggregate
from eventsourcing.domain import event

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


class EsBank(Application):
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
#: ``es_cache`` is the target's baseline: the aggregate cache, trusted like our
#: live aggregates (no fast-forward query per get; ``save`` still checks the
#: version), and its default deep copy of the cached aggregate on every get.
_POPO = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
_CACHE = {**_POPO, "AGGREGATE_CACHE_MAXSIZE": "100000"}
ES_CONFIGS: dict[str, dict[str, str]] = {
    "es_cache": {**_CACHE, "AGGREGATE_CACHE_FASTFORWARD": "n"},
    "es_cache_nocopy": {
        **_CACHE,
        "AGGREGATE_CACHE_FASTFORWARD": "n",
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
    },
    "es_cache_ff": _CACHE,
    "es_nocache": _POPO,
}
ES_TITLES = {
    "es_cache_nocopy": "eventsourcing, cache, no deepcopy (its fastest)",
    "es_cache_ff": "eventsourcing, cache + fast-forward (default; POPO scans the stream)",
    "es_nocache": "eventsourcing, no cache (get replays the stream)",
}


def es_app(config: str) -> EsBank:
    return EsBank(env=ES_CONFIGS[config])


def es_runner(app: EsBank, ids: list[uuid.UUID], key_lists: list[list[int]]) -> Callable[[], Any]:
    """Time the same commands as the callers would send, one at a time (round robin)."""
    order = _round_robin(key_lists)
    deposit = app.deposit
    targets = [ids[k] for k in order]

    async def run() -> float:
        start = perf_counter()
        for account_id in targets:
            deposit(account_id, 1)
        return len(targets) / (perf_counter() - start)

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
        open_channel = trio.open_memory_channel
        for key in keys:
            reply_send, reply_receive = open_channel[Any](1)
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


async def bench_warm(report: Report, p: dict[str, Any]) -> None:
    n_keys: int = p["aggregates"]
    callers: int = p["concurrent_callers"]
    per_caller: int = p["concurrent_commands"] // callers
    rng = random.Random(1)
    concurrent_lists = [[rng.randrange(n_keys) for _ in range(per_caller)] for _ in range(callers)]
    sequential_list = [[0] * p["sequential_commands"]]
    names = [f"acct-{i}" for i in range(n_keys)]

    apps = {name: es_app(name) for name in ES_CONFIGS}
    es_ids = {
        name: [app.open_account(f"owner {i}") for i in range(n_keys)] for name, app in apps.items()
    }

    async with (
        open_aggregates(Account, "memory://", idle_timeout=None) as repo,
        trio.open_nursery() as nursery,
    ):
        for name in names:
            await repo.create(name, OpenAccount(f"owner of {name}"))
        bare = [await nursery.start(bare_account) for _ in range(n_keys)]
        lib = library_caller(repo, names)
        bare_call = bare_caller(bare)
        # One command each outside the timing: checks, and warms every aggregate.
        for key in range(n_keys):
            assert await lib([key]) == 2
            assert await bare_call([key]) == 1
        for name, app in apps.items():
            for account_id in es_ids[name]:
                assert app.deposit(account_id, 1) == 2

        for section, key_lists, es_names in [
            ("sequential", sequential_list, ["es_cache", "es_cache_nocopy", "es_cache_ff"]),
            ("concurrent", concurrent_lists, list(ES_CONFIGS)),
        ]:
            print(f"  warm, {section} ...", flush=True)
            variants: dict[str, Callable[[], Awaitable[float]]] = {
                "bare": lambda kl=key_lists: time_callers(bare_call, kl),
                "library": lambda kl=key_lists: time_callers(lib, kl),
            }
            for es_name in es_names:
                variants[es_name] = es_runner(apps[es_name], es_ids[es_name], key_lists)
            s = await interleaved_async(p["reps_warm"], variants)
            if section == "sequential":
                what = "1 caller, 1 aggregate, sequential"
            else:
                what = f"{callers:,} callers over {n_keys:,} aggregates"
            report.compare(
                f"warm_{section}_es",
                f"vs eventsourcing: deposit, {what} (commands/s)",
                "ops/s",
                "higher",
                s["es_cache"],
                s["library"],
                target=5.0,
                note="baseline column: eventsourcing POPO + aggregate cache (no fast-forward, "
                "deepcopy on), get + deposit + save per command",
            )
            report.compare(
                f"warm_{section}_bare",
                f"vs bare Trio: deposit, {what} (commands/s)",
                "ops/s",
                "higher",
                s["bare"],
                s["library"],
                target=None,
                note="baseline column: task + memory channel + fresh 1-slot reply channel",
            )
            best_lib = max(s["library"])
            for es_name in es_names[1:]:
                report.add_context(
                    f"warm_{section}_{es_name}",
                    f"  {section}: {ES_TITLES[es_name]}",
                    "ops/s",
                    "higher",
                    s[es_name],
                    relative_to=("library", best_lib),
                )
        for send in bare:
            send.close()
    # Every deposit happened: the balances agree with the commands sent.
    for name, app in apps.items():
        assert app.balance(es_ids[name][0]) >= 2


# -- 2: rehydration -------------------------------------------------------------------


@attrs.define
class ColdAccount(Account):
    """``Account`` on the same streams, without snapshots: activation replays every event.

    (``Account`` snapshots every 50 events: its first activation would save
    one, and every later one would start from it.)
    """

    category = "Account"
    snapshot_every = None


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
    app = es_app("es_nocache")
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
            account = get(account_id)
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
        "aggregates": 10_000 if not quick else 2_000,
        "concurrent_callers": 1_000 if not quick else 200,
        "concurrent_commands": 50_000 if not quick else 10_000,
        "sequential_commands": 20_000 if not quick else 5_000,
        "stream_events": 1_001,
        "rehydrate_streams": 10 if not quick else 5,
        "reps_warm": 5 if not quick else 3,
        "reps_rehydrate": 7 if not quick else 5,
        "eventsourcing": _version("eventsourcing"),
        "eventsourcing_configs": ES_CONFIGS,
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
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", SECTIONS, argv)
    p = parameters(args.quick, args.reps)
    report = Report("bench_aggregates", quick=args.quick, parameters=p)

    async def run() -> None:
        if "warm" in args.only:
            print("warm commands (memory store) ...", flush=True)
            await bench_warm(report, p)
        if "rehydrate" in args.only:
            print("rehydration (memory store) ...", flush=True)
            await bench_rehydrate(report, p)

    trio.run(run)
    report.sort(["warm_sequential", "warm_concurrent", "rehydrate"])
    print()
    print(
        "Rows 'vs X': the 'bare Trio' column holds baseline X (eventsourcing or bare Trio); "
        "ratio = trio_aggregates / X."
    )
    report.print_table()
    report.write_json(args.json)
    return 0 if report.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
