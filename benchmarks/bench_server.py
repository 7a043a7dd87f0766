"""The protocol server: requests/s and latency over TCP, against a bare Trio
NDJSON echo server with the same framing, in the same run.

Every server runs in its own subprocess (so it has one core and the load
client the other); the load client (``_load_client.py``) is another process,
the same for every server, with 100 connections, each keeping ``depth``
requests in flight (a closed loop: a new request for each answer; depth 1 and
16). A figure is requests/s answered ``ok`` in a fixed window after a
warm-up, with the latency percentiles (p50/p90/p99, from the ``send_all``
carrying a request to the receive bringing its answer).

Servers:

* ``echo`` (the baseline): ``trio.serve_tcp``; per connection, read a chunk
  (64 KiB, as the library's server), split the lines, ``json.loads`` each,
  build ``{"id": .., "ok": true, "version": 1, "result": null}``,
  ``json.dumps`` it, and write the chunk's replies in one ``send_all``. It
  does no work for the request beyond parsing it: every figure against it
  measures what the library adds.
* ``bare`` (a context row, run with ``memory``): the same domain work
  hand-written with no runtime (:func:`bare_connection`): the echo server's
  framing, ``json.loads``, ``cattrs`` structures the command, the bank's own
  ``Account`` handler and applier, the event's JSON appended to a list. No
  validation beyond the workloads' needs, no idempotency, no limits. The
  library against it is what the runtime costs beyond the domain work; it
  against the echo server, what the domain work itself costs.
* ``memory``: ``open_aggregate_server(app, "memory://", port=0)`` serving
  ``examples/bank.py``'s app (its ``Account``).
* ``sqlite``: the same on ``sqlite:///<temporary directory>/bench.db``.

Workloads (sections for ``--only``):

* ``deposit``: ``execute`` ``Deposit(amount=1)`` on 1,000 accounts created
  beforehand (``create`` ``OpenAccount``, not timed); each connection walks
  the keys with a stride of 7 from its own start. A write: on SQLite, an
  acknowledged deposit is durable.
* ``balance``: ``execute`` ``GetBalance`` (the handler answers from the live
  state; no event is written).
* ``ping``: ``{"op": "ping"}`` (the server's framing and dispatch alone; not
  run on SQLite, where it is the same as in memory).

After each library server's session the script reads every balance back and
checks that their sum equals the deposits the client saw acknowledged.

The target (the issue's): at least 0.5x the echo server's requests/s with
the memory store, for ``deposit`` at both depths. The other rows are for
information. A repetition runs every server once (each a fresh process and a
fresh store), in an order that rotates; a figure is the best repetition.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_server.py --quick          # < 30 s
    .venv/bin/python benchmarks/bench_server.py --json out/server.json
    .venv/bin/python benchmarks/bench_server.py --profile py-spy  # where the time goes

Beside requests/s and latency, every cell records the server's CPU (from
``/proc/PID/stat``) and its CPU time per answer, the share of the window its
garbage collector ran (``gc.callbacks`` in the server, read back through
``SIGUSR2``), the client's CPU (near 100%: the client is the limit, and the
script says so) and the CPU every other process used (above a quarter of a
core the script warns that the figures are unreliable). Context rows give
the floor: the same deposits through ``_execute_detailed`` in a fresh
process without network, with as many concurrent callers as the server has
requests in flight.

Extra options: ``--clients N`` (split the connections over N client
processes), ``--client-impl epoll|trio`` (the client's timed loop: raw
sockets on ``select.epoll``, the default, or Trio streams), ``--pin`` (pin the
server to CPU 0 and the clients to CPU 1), ``--stores memory,sqlite``,
``--depths 1,16``, ``--connections 100``, ``--duration S``,
``--server-gc-threshold N`` (the library's server applies
``trio-aggregates serve``'s garbage-collector setting once listening:
``gc.freeze()`` and a young-generation threshold of 50,000; ``N`` replaces
the threshold, ``0`` keeps Python's default and does not freeze),
``--profile py-spy|cprofile`` (after the figures, profile the memory server
under ``deposit`` during the measured window and print its top functions).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import importlib.util
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = ("deposit", "balance", "ping")
STORES = ("memory", "sqlite")
ACCOUNTS = 1000
#: The workloads each server kind runs (ping is store-independent).
STORE_WORKLOADS = {
    "echo": WORKLOADS,
    "bare": ("deposit", "balance"),
    "memory": WORKLOADS,
    "sqlite": ("deposit", "balance"),
}
TARGET = 0.5
nan = float("nan")
_RECEIVE_SIZE = 65536


# == the servers (run as ``bench_server.py _serve KIND STORE``) ==================


def load_bank_app() -> tuple[Any, str]:
    """``examples/bank.py``'s ``app`` (or ``[Account]``) and Account's wire name."""
    spec = importlib.util.spec_from_file_location("bank", ROOT / "examples" / "bank.py")
    assert spec is not None and spec.loader is not None
    bank = importlib.util.module_from_spec(spec)
    sys.modules["bank"] = bank
    spec.loader.exec_module(bank)
    app = getattr(bank, "app", None) or [bank.Account]
    if isinstance(app, Mapping):
        wire = next(name for name, cls in app.items() if cls is bank.Account)
    else:
        wire = "Account"
    return app, wire


def serve_main(argv: Sequence[str]) -> None:
    import trio

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["echo", "bare", "aggregates"])
    parser.add_argument("store")
    parser.add_argument("--cprofile", metavar="PATH")
    parser.add_argument("--gc-log", metavar="PATH")
    parser.add_argument("--gc-threshold", type=int, default=None)
    args = parser.parse_args(argv)

    # Every garbage collection's start (time.monotonic_ns) and duration (ns):
    # on SIGUSR2 the list so far goes to --gc-log (and is emptied), so that the
    # parent can tell how much of a window the collector took.
    collections_done: list[tuple[int, int, int]] = []
    started = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.monotonic_ns()
        else:
            collections_done.append(
                (started[0], time.monotonic_ns() - started[0], info["generation"])
            )

    gc.callbacks.append(on_gc)

    def announce(port: int, wire: str) -> None:
        print(json.dumps({"port": port, "type": wire, "pid": os.getpid()}), flush=True)

    async def until_signalled() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                return

    async def echo_main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, echo_connection, 0, host="127.0.0.1")
            )
            announce(listeners[0].socket.getsockname()[1], "Account")
            await until_signalled()
            nursery.cancel_scope.cancel()

    async def bare_main() -> None:
        from trio_aggregates._wire._cli import SERVE_GC_THRESHOLD, tune_gc

        _, wire = load_bank_app()
        handler = functools.partial(bare_connection, BareBank(sys.modules["bank"]))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            # The library's server's garbage-collector setting (as below).
            tune_gc(SERVE_GC_THRESHOLD if args.gc_threshold is None else args.gc_threshold)
            announce(listeners[0].socket.getsockname()[1], wire)
            await until_signalled()
            nursery.cancel_scope.cancel()

    async def aggregates_main() -> None:
        from trio_aggregates import open_aggregate_server
        from trio_aggregates._wire._cli import SERVE_GC_THRESHOLD, tune_gc

        app, wire = load_bank_app()
        async with open_aggregate_server(app, args.store, host="127.0.0.1", port=0) as server:
            # As `trio-aggregates serve` does once listening.
            tune_gc(SERVE_GC_THRESHOLD if args.gc_threshold is None else args.gc_threshold)
            announce(server.port, wire)
            await until_signalled()

    main = {"echo": echo_main, "bare": bare_main}.get(args.kind, aggregates_main)
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()

    async def controlled() -> None:
        # SIGUSR1: start the window (cProfile on); SIGUSR2: end it (cProfile off
        # and dumped; the garbage collections so far written to --gc-log)
        async def control() -> None:
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        if profiler is not None:
                            profiler.enable()
                        continue
                    if profiler is not None:
                        profiler.disable()
                        profiler.dump_stats(args.cprofile)
                    if args.gc_log:
                        done = collections_done[:]
                        del collections_done[:]
                        write_atomically(Path(args.gc_log), json.dumps(done))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(control)
            await main()
            nursery.cancel_scope.cancel()

    trio.run(controlled)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def floor_main(argv: Sequence[str]) -> None:
    """The floor: the same deposits through ``_execute_detailed`` in-process, no network.

    Prints ``{"rate": commands/s, "us_per_command": CPU µs}`` for ``CALLERS``
    concurrent callers (the server's requests in flight: connections x depth)
    doing ``TOTAL`` deposits between them over 1,000 accounts.
    """
    import trio

    from trio_aggregates import open_aggregates
    from trio_aggregates._wire._cli import SERVE_GC_THRESHOLD, tune_gc

    callers, total = int(argv[0]), int(argv[1])
    load_bank_app()
    bank = sys.modules["bank"]

    async def main() -> dict[str, float]:
        async with open_aggregates(bank.Account, "memory://") as repo:
            keys = [f"acct-{i}" for i in range(ACCOUNTS)]
            for key in keys:
                await repo.create(key, bank.OpenAccount("bench"))
            tune_gc(SERVE_GC_THRESHOLD)  # as the server it is the floor of
            execute = repo._execute_detailed
            Deposit = bank.Deposit

            async def caller(n: int, count: int) -> None:
                k = n * 10
                for _ in range(count):
                    await execute(keys[k % ACCOUNTS], Deposit(1))
                    k += 7

            async def burst(count: int) -> tuple[float, float]:
                gc.collect()
                cpu, wall = time.process_time(), time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for n in range(callers):
                        nursery.start_soon(caller, n, count)
                done = callers * count
                return (
                    done / (time.perf_counter() - wall),
                    (time.process_time() - cpu) / done * 1e6,
                )

            await burst(max(1, total // callers // 4))  # warm up
            rate, us = await burst(max(1, total // callers))
            return {"rate": rate, "us_per_command": us}

    print(json.dumps(trio.run(main)), flush=True)


def run_floor(callers: int, total: int, pin: bool) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "_floor", str(callers), str(total)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if pin:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(process.pid, {0})
    out, _ = process.communicate(timeout=300)
    if process.returncode:
        raise RuntimeError(f"the floor run failed ({process.returncode})")
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


async def serve_lines(stream: Any, answer: Callable[[list[bytes]], list[str]]) -> None:
    """The framing of the echo and bare servers (the library's, by hand): read a
    chunk (64 KiB), split the lines, ``answer`` the complete ones, and write
    the chunk's replies in one ``send_all``."""
    import trio

    buf = b""
    try:
        while True:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return
            if buf:
                data = buf + data
            lines = data.split(b"\n")
            buf = lines.pop()
            out = answer(lines)
            if out:
                out.append("")
                await stream.send_all("\n".join(out).encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def echo_answers(lines: list[bytes]) -> list[str]:
    """The baseline's work: parse each request, answer it without doing it."""
    loads, dumps = json.loads, json.dumps
    out = []
    for line in lines:
        if not line.strip():
            continue
        request = loads(line)
        out.append(dumps({"id": request.get("id"), "ok": True, "version": 1, "result": None}))
    return out


async def echo_connection(stream: Any) -> None:
    """The baseline: the same framing as the library's server, no work."""
    await serve_lines(stream, echo_answers)


class BareBank:
    """The bank's accounts without the library's runtime: what a hand-written
    server doing the same domain work keeps (see :func:`bare_connection`)."""

    def __init__(self, bank: Any) -> None:
        import cattrs

        self.bank = bank
        self.converter = cattrs.Converter()
        self.accounts: dict[str, list[Any]] = {}  # key -> [Account state, version]
        self.events: list[tuple[str, str, bytes, bytes]] = []  # (key, type, data, metadata)
        account = bank.Account
        self.commands = {
            "OpenAccount": (bank.OpenAccount, account.open),
            "Deposit": (bank.Deposit, account.deposit),
            "GetBalance": (bank.GetBalance, account.get_balance),
        }

    def answer(self, request: dict[str, Any]) -> str:
        id_ = request.get("id")
        cls, handle = self.commands[request["command"]]
        command = self.converter.structure(request.get("data") or {}, cls)
        key = request["key"]
        entry = self.accounts.get(key)
        if request.get("op") == "create":
            if entry is not None:
                return bare_error(id_, "already_exists")
            entry = [self.bank.Account(), 0]
        elif entry is None:
            return bare_error(id_, "not_found")
        try:
            decided = handle(entry[0], command)
        except self.bank.CommandRejected:
            return bare_error(id_, "rejected")
        if isinstance(decided, self.bank.Decision):
            return json.dumps({"id": id_, "ok": True, "version": entry[1], "result": decided.reply})
        data = _compact(self.converter.unstructure(decided)).encode()
        metadata = f'{{"command":{request["command"]!r},"at":{time.time()!r}}}'.encode()
        self.events.append((key, type(decided).__name__, data, metadata))
        entry[0].apply(decided)
        entry[1] += 1
        self.accounts[key] = entry
        return json.dumps({"id": id_, "ok": True, "version": entry[1], "result": None})


_compact = json.JSONEncoder(separators=(",", ":")).encode


def bare_error(id_: Any, code: str) -> str:
    return json.dumps({"id": id_, "ok": False, "error": {"code": code, "message": code}})


async def bare_connection(bank: BareBank, stream: Any) -> None:
    """A context row's server: what the library's server does for these
    workloads, hand-written with no runtime. The echo server's framing; per
    line ``json.loads``, ``cattrs`` structures the command, the bank's own
    ``Account`` handler decides and its applier applies, the event's JSON (and
    a metadata line) is appended to a list; no validation beyond what the
    workloads need, no idempotency, no limits. The library's figure against it
    is what its runtime costs beyond the domain work itself."""
    loads, answer = json.loads, bank.answer
    await serve_lines(stream, lambda lines: [answer(loads(line)) for line in lines if line.strip()])


# == the orchestration ================================================================


class Server:
    """A server subprocess; its first stdout line gives its port, wire type and pid."""

    def __init__(
        self,
        kind: str,
        store: str,
        workdir: Path,
        *,
        pin: int | None,
        gc_threshold: int | None = None,
        profile: str | None = None,
        profile_path: Path | None = None,
    ) -> None:
        self.kind = kind
        serve_kind = kind if kind in ("echo", "bare") else "aggregates"
        self.gc_log = workdir / f"gc-{kind}-{time.monotonic_ns()}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "_serve", serve_kind, store]
        command += ["--gc-log", str(self.gc_log)]
        if gc_threshold is not None and kind != "echo":
            command += ["--gc-threshold", str(gc_threshold)]
        if profile == "cprofile":
            command += ["--cprofile", str(profile_path)]
        self.stderr = open(workdir / f"server-{kind}.err", "w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(10)
            self.stderr.seek(0)
            raise RuntimeError(f"the {kind} server did not start:\n{self.stderr.read()}")
        info = json.loads(line)
        self.port: int = info["port"]
        self.wire_type: str = info["type"]
        self.pid: int = info["pid"]
        if pin is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.pid, {pin})

    def garbage_collections(self) -> list[tuple[int, int, int]]:
        """The server's garbage collections since the last call: (start ns, ns, generation)."""
        with contextlib.suppress(FileNotFoundError):
            self.gc_log.unlink()
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not self.gc_log.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} server wrote no garbage-collection log")
            time.sleep(0.005)
        return [tuple(x) for x in json.loads(self.gc_log.read_text())]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.stderr.close()


class Clients:
    """The load client processes (``_load_client.py``), driven by JSON lines."""

    def __init__(
        self, server: Server, connections: int, n: int, pin: int | None, impl: str
    ) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        per = [connections // n + (1 if i < connections % n else 0) for i in range(n)]
        for index, count in enumerate(per):
            command = [
                sys.executable, str(HERE / "_load_client.py"),
                "--port", str(server.port), "--connections", str(count),
                "--server-pid", str(server.pid), "--index", str(index),
                "--impl", impl,
            ]  # fmt: skip
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
            )
            if pin is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(process.pid, {pin})
            self.processes.append(process)
        for process in self.processes:
            self._read(process)

    @staticmethod
    def _read(process: subprocess.Popen[str]) -> dict[str, Any]:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load client exited ({process.wait(10)})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the load client failed: {answer['error']}")
        return answer

    def ask(self, cmd: dict[str, Any], only_first: bool = False) -> list[dict[str, Any]]:
        targets = self.processes[:1] if only_first else self.processes
        for process in targets:
            assert process.stdin is not None
            process.stdin.write(json.dumps(cmd) + "\n")
            process.stdin.flush()
        return [self._read(process) for process in targets]

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(OSError):
                assert process.stdin is not None
                process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def percentile(hist: Mapping[int, int], q: float) -> float:
    """The ``q``-quantile (0..1) of a histogram of whole microseconds, in µs."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = q * total
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return float(value)
    return float(max(hist))


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figures from the answers of every client process."""
    hist: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        hist.update({int(k): v for k, v in r["hist"].items()})
        errors.update(r["errors"])
    count = sum(r["count"] for r in results)
    seconds = results[0]["seconds"]
    server_cpu = results[0]["server_cpu"]
    machine = results[0].get("machine_cpu")
    clients_cpu = [r["client_cpu"] for r in results]
    others = None
    if machine is not None and server_cpu is not None and None not in clients_cpu:
        others = max(0.0, machine - server_cpu - sum(clients_cpu))
    return {
        "rate": count / seconds,
        "count": count,
        "ok_total": sum(r["ok_total"] for r in results),
        "seconds": seconds,
        "p50_us": percentile(hist, 0.50),
        "p90_us": percentile(hist, 0.90),
        "p99_us": percentile(hist, 0.99),
        "max_us": float(max(hist)) if hist else float("nan"),
        "errors": dict(errors),
        "client_cpu": clients_cpu,
        "server_cpu": server_cpu,
        "others_cpu": others,
    }


def progress(what: str, _start: list[float] = []) -> None:  # noqa: B006 - the start time
    if not _start:
        _start.append(time.perf_counter())
    print(f"[{time.perf_counter() - _start[0]:6.1f} s] {what}", flush=True)


@contextlib.contextmanager
def session(
    kind: str, workdir: Path, p: dict[str, Any], *, profile: str | None = None,
    profile_path: Path | None = None,
) -> Iterator[tuple[Server, Clients]]:  # fmt: skip
    """A fresh server (and store) with its clients connected and the accounts created."""
    if kind in ("echo", "bare"):
        store = "-"
    elif kind == "memory":
        store = "memory://"
    else:
        db = workdir / f"bench-{time.monotonic_ns()}.db"
        store = f"sqlite:///{db}"
    server = Server(
        kind,
        store,
        workdir,
        pin=0 if p["pin"] else None,
        gc_threshold=p["server_gc_threshold"],
        profile=profile,
        profile_path=profile_path,
    )
    clients = None
    try:
        clients = Clients(
            server, p["connections"], p["clients"], 1 if p["pin"] else None, p["client_impl"]
        )
        clients.ask({"cmd": "setup", "type": server.wire_type, "accounts": ACCOUNTS}, True)
        yield server, clients
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def run_cell(
    server: Server, clients: Clients, workload: str, depth: int, p: dict[str, Any]
) -> dict[str, Any]:
    start_ns = time.monotonic_ns() + 50_000_000
    cmd = {
        "cmd": "run",
        "workload": workload,
        "depth": depth,
        "start_ns": start_ns,
        "warmup": p["warmup"],
        "duration": p["duration"],
        "type": server.wire_type,
        "accounts": ACCOUNTS,
    }
    figures = merge(clients.ask(cmd))
    # the server's garbage collections inside the window
    w0 = start_ns + int(p["warmup"] * 1e9)
    w1 = w0 + int(p["duration"] * 1e9)
    gc_ns = 0
    by_generation = [0, 0, 0]
    for begin, ns, generation in server.garbage_collections():
        overlap = min(begin + ns, w1) - max(begin, w0)
        if overlap > 0:
            gc_ns += overlap
            by_generation[generation] += 1
    figures["server_gc"] = gc_ns / (w1 - w0)
    cpu = figures["server_cpu"]
    figures["server_us_per_request"] = (
        cpu / figures["rate"] * 1e6 if cpu is not None and figures["rate"] else float("nan")
    )
    figures["server_gc_collections"] = by_generation
    return figures


def check_balances(server: Server, clients: Clients) -> dict[str, Any]:
    answers = clients.ask({"cmd": "balances", "type": server.wire_type, "accounts": ACCOUNTS})
    total = answers[0]["total"]
    acked = sum(a["acked_deposits"] for a in answers)
    if total != acked:
        raise RuntimeError(
            f"{server.kind}: the balances add up to {total}, but {acked} deposits were acknowledged"
        )
    return {"total": total, "acked_deposits": acked}


# -- profiling ------------------------------------------------------------------------


def pyspy_top(path: Path, n: int) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) of py-spy's raw (collapsed) stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f.strip() for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    rows = [
        (name, 100 * count / total, 100 * inclusive[name] / total)
        for name, count in own.most_common(n)
    ]
    return rows


def pyspy_inclusive(path: Path, n: int) -> list[tuple[str, float]]:
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        for frame in {f.strip() for f in stack.split(";")}:
            inclusive[frame] += count
    return [(name, 100 * c / total) for name, c in inclusive.most_common(n)]


def pyspy_by_file(path: Path, n: int) -> list[tuple[str, float]]:
    """Self time by source file (trio internals, the library's modules, json, ...)."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        leaf = stack.split(";")[-1].strip()
        where = leaf[leaf.rfind("(") + 1 : -1] if leaf.endswith(")") else leaf
        own[where] += count
    return [(name, 100 * c / total) for name, c in own.most_common(n)]


def run_profile(kind: str, workdir: Path, p: dict[str, Any], out: TextIO) -> dict[str, Any]:
    """Profile the memory server under ``deposit`` at each depth; print the top functions.

    The profiler sees the measured window only (after the set-up and a warm-up
    cell): py-spy attaches to the running server for that window; cProfile is
    switched on and off by signals.
    """
    report: dict[str, Any] = {"profiler": kind, "depths": {}}
    p = {**p, "duration": max(p["duration"], 3.0)}
    for depth in p["depths"]:
        path = workdir / f"profile-d{depth}.{'prof' if kind == 'cprofile' else 'txt'}"
        with session("memory", workdir, p, profile=kind, profile_path=path) as (server, clients):
            run_cell(server, clients, "deposit", depth, p)  # warm up
            if kind == "py-spy":
                pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                seconds = max(1, round(p["warmup"] + p["duration"]))
                spy = subprocess.Popen(
                    [
                        pyspy, "record", "--pid", str(server.pid), "--nolineno",
                        "--format", "raw", "--rate", "500", "--duration", str(seconds),
                        "--output", str(path),
                    ],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.3)  # let it attach
                figures = run_cell(server, clients, "deposit", depth, p)
                spy.wait(60)
            else:
                os.kill(server.pid, signal.SIGUSR1)
                figures = run_cell(server, clients, "deposit", depth, p)
                os.kill(server.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not path.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
        print(
            f"\nprofile ({kind}), memory server, deposit, depth {depth}:"
            f" {figures['rate']:,.0f} requests/s under the profiler,"
            f" server CPU {fmt_cpu(figures['server_cpu'])}",
            file=out,
        )
        entry: dict[str, Any] = {"rate_under_profiler": figures["rate"], "figures": figures}
        if kind == "py-spy":
            top = pyspy_top(path, 40)
            print(f"  {'self %':>7} {'incl %':>7}  function (file)", file=out)
            for name, self_pct, incl_pct in top:
                print(f"  {self_pct:7.1f} {incl_pct:7.1f}  {name}", file=out)
            incl = pyspy_inclusive(path, 50)
            print(f"\n  {'incl %':>7}  function (file), by inclusive time", file=out)
            for name, pct in incl:
                print(f"  {pct:7.1f}  {name}", file=out)
            files = pyspy_by_file(path, 25)
            print(f"\n  {'self %':>7}  source file, by self time", file=out)
            for name, pct in files:
                print(f"  {pct:7.1f}  {name}", file=out)
            entry["top_self"] = top
            entry["top_inclusive"] = incl
            entry["by_file"] = files
        else:
            stats = pstats.Stats(str(path), stream=out)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(50)
            # calls per answer: how often each function runs for one request (for a
            # coroutine cProfile counts every resumption as a call)
            answers = figures["ok_total"] or 1
            raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
            per = sorted(
                ((v[1] / answers, v[3] / answers * 1e6, f"{k[2]} ({k[0]}:{k[1]})")
                 for k, v in raw.items()),
                key=lambda x: -x[1],
            )[:40]  # fmt: skip
            print(f"\n  calls and cumulative µs per answer ({answers:,} answers):", file=out)
            for calls, us, name in per:
                print(f"  {calls:7.2f} {us:9.1f} µs  {name}", file=out)
            entry["per_answer"] = per
        report["depths"][str(depth)] = entry
    return report


# -- main -----------------------------------------------------------------------------


def parameters(args: argparse.Namespace, extra: argparse.Namespace) -> dict[str, Any]:
    p: dict[str, Any] = {
        "connections": extra.connections,
        "depths": [int(d) for d in extra.depths.split(",")],
        "stores": [s.strip() for s in extra.stores.split(",") if s.strip()],
        "workloads": list(args.only),
        "accounts": ACCOUNTS,
        "clients": extra.clients,
        "client_impl": extra.client_impl,
        "pin": extra.pin,
        "warmup": 0.2 if args.quick else 0.5,
        "duration": extra.duration or (0.6 if args.quick else 2.0),
        "reps_server": 1 if args.quick else 3,
        "server_receive_size": _RECEIVE_SIZE,
        "floor_commands": 8_000 if args.quick else 30_000,
        "server_gc_threshold": extra.server_gc_threshold,
    }
    if args.reps is not None:
        p["reps_server"] = args.reps
    unknown = set(p["stores"]) - set(STORES)
    if unknown:
        raise SystemExit(f"unknown store(s) {sorted(unknown)}; choose from {list(STORES)}")
    return p


def fmt_us(us: float) -> str:
    if us != us:  # NaN
        return "-"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    if us < 100:
        return f"{us:.1f} µs"
    return f"{us:.0f} µs"


def fmt_cpu(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_serve"]:
        serve_main(argv[1:])
        return 0
    if argv[:1] == ["_floor"]:
        floor_main(argv[1:])
        return 0
    from _common import Report, parse_args

    extra_parser = argparse.ArgumentParser(add_help=False)
    extra_parser.add_argument("--clients", type=int, default=1)
    extra_parser.add_argument("--pin", action="store_true")
    extra_parser.add_argument("--client-impl", choices=["epoll", "trio"], default="epoll")
    extra_parser.add_argument("--stores", default=",".join(STORES))
    extra_parser.add_argument("--depths", default="1,16")
    extra_parser.add_argument("--connections", type=int, default=100)
    extra_parser.add_argument("--duration", type=float, default=None)
    extra_parser.add_argument("--profile", choices=["py-spy", "cprofile"], default=None)
    extra_parser.add_argument("--server-gc-threshold", type=int, default=None)
    extra, rest = extra_parser.parse_known_args(argv)
    doc = (__doc__ or "").splitlines()[0]
    args = parse_args(
        doc + " (also: --clients N --pin --stores --depths --profile)", WORKLOADS, rest
    )
    p = parameters(args, extra)
    report = Report("bench_server", quick=args.quick, parameters=p, baseline_label="echo server")

    # The bare server (a context row) runs with the memory store's figures.
    kinds = ["echo", *(["bare"] if "memory" in p["stores"] else []), *p["stores"]]
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    checks: list[dict[str, Any]] = []
    floors: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
    workdir = Path(tempfile.mkdtemp(prefix="bench_server-"))
    try:
        for rep in range(p["reps_server"]):
            k = rep % len(kinds)
            for kind in kinds[k:] + kinds[:k]:
                workloads = [w for w in STORE_WORKLOADS[kind] if w in p["workloads"]]
                if not workloads:
                    continue
                progress(f"rep {rep + 1}/{p['reps_server']}: {kind} server")
                with session(kind, workdir, p) as (server, clients):
                    for workload in workloads:
                        for depth in p["depths"]:
                            figures = run_cell(server, clients, workload, depth, p)
                            cells[kind, workload, depth].append(figures)
                    if kind != "echo":
                        checks.append({"server": kind, **check_balances(server, clients)})
            if "memory" in p["stores"] and "deposit" in p["workloads"]:
                for depth in p["depths"]:
                    callers = p["connections"] * depth
                    floors[depth].append(run_floor(callers, p["floor_commands"], p["pin"]))
        profile_report = None
        if extra.profile:
            progress(f"profiling the memory server with {extra.profile}")
            profile_report = run_profile(extra.profile, workdir, p, sys.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress("done")

    # -- the house-style table: requests/s, ratio to the echo server --
    for store in p["stores"]:
        for workload in STORE_WORKLOADS[store]:
            if workload not in p["workloads"]:
                continue
            for depth in p["depths"]:
                echo = [c["rate"] for c in cells["echo", workload, depth]]
                lib = [c["rate"] for c in cells[store, workload, depth]]
                target = TARGET if store == "memory" and workload == "deposit" else None
                report.compare(
                    f"{store}_{workload}_d{depth}",
                    f"{store}: {workload}, {p['connections']} conns x {depth} in flight"
                    " (requests/s)",
                    "ops/s",
                    "higher",
                    echo,
                    lib,
                    target=target,
                )

    def against_library(workload: str, depth: int) -> tuple[str, float] | None:
        """The memory server's best requests/s, for a context row's "library vs this"."""
        library = cells.get(("memory", workload, depth))
        return ("library", max(c["rate"] for c in library)) if library else None

    for workload in STORE_WORKLOADS["bare"]:
        for depth in p["depths"]:
            bare = cells.get(("bare", workload, depth))
            if not bare:
                continue
            echo_best = max((c["rate"] for c in cells["echo", workload, depth]), default=nan)
            bare_best = max(c["rate"] for c in bare)
            report.add_context(
                f"bare_{workload}_d{depth}",
                f"  hand-written server, the same domain work, no runtime: {workload},"
                f" {p['connections']} conns x {depth} (requests/s; {bare_best / echo_best:.2f}x"
                " echo)",
                "ops/s",
                "higher",
                [c["rate"] for c in bare],
                relative_to=against_library(workload, depth),
            )
    for depth, floor_samples in floors.items():
        callers = p["connections"] * depth
        report.add_context(
            f"floor_execute_d{depth}",
            f"  floor: the same deposits in-process, {callers:,} concurrent"
            " _execute_detailed callers, no network (commands/s)",
            "ops/s",
            "higher",
            [x["rate"] for x in floor_samples],
            relative_to=against_library("deposit", depth),
            note=f"{min(x['us_per_command'] for x in floor_samples):.1f} µs CPU per command",
        )
    print()
    report.print_table()

    # -- the detailed table: latency percentiles, CPU, errors (best repetition) --
    print()
    rows = [
        ("server", "workload", "depth", "requests/s", "p50", "p90", "p99", "max",
         "vs echo", "server CPU", "CPU/req", "CPU vs echo", "server GC", "client CPU", "others",
         "errors"),
    ]  # fmt: skip
    best: dict[str, Any] = {}
    for kind in kinds:
        for workload in STORE_WORKLOADS[kind]:
            for depth in p["depths"]:
                samples = cells.get((kind, workload, depth))
                if not samples:
                    continue
                top = max(samples, key=lambda c: c["rate"])
                echo_samples = cells.get(("echo", workload, depth)) or [{"rate": float("nan")}]
                ratio = top["rate"] / max(c["rate"] for c in echo_samples)
                # the cost ratio: echo's CPU per answer / this server's (lowest of each)
                cost = min(c.get("server_us_per_request", nan) for c in samples)
                echo_cost = min(c.get("server_us_per_request", nan) for c in echo_samples)
                cost_ratio = echo_cost / cost if cost else nan
                best[f"{kind}_{workload}_d{depth}"] = {
                    **top,
                    "ratio_to_echo": ratio,
                    "lowest_us_per_request": cost,
                    "cpu_cost_ratio_to_echo": cost_ratio,
                }
                rows.append(
                    (
                        kind, workload, str(depth), f"{top['rate']:,.0f}",
                        fmt_us(top["p50_us"]), fmt_us(top["p90_us"]), fmt_us(top["p99_us"]),
                        fmt_us(top["max_us"]), f"{ratio:.2f}x",
                        fmt_cpu(top["server_cpu"]), fmt_us(cost), f"{cost_ratio:.2f}x",
                        fmt_cpu(top["server_gc"]),
                        "/".join(fmt_cpu(c) for c in top["client_cpu"]),
                        fmt_cpu(top["others_cpu"]),
                        ", ".join(f"{c}: {n}" for c, n in top["errors"].items()) or "0",
                    )
                )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    saturated = [
        name
        for name, c in best.items()
        if any(cpu is not None and cpu >= 0.9 for cpu in c["client_cpu"])
    ]
    print(
        f"(best of {p['reps_server']}; latency from the send carrying a request to the receive"
        " bringing its answer; CPU = share of one core over the window; CPU/req = the server's"
        " CPU time per answer (lowest over the repetitions); CPU vs echo = echo's CPU/req over"
        " this server's: what the requests/s ratio would be with both servers saturating a"
        " core, a figure other load moves less; server GC = the garbage collector's share of"
        " the window in the server; others = every other process on the machine)"
    )
    busy = [
        name for name, c in best.items() if c["others_cpu"] is not None and c["others_cpu"] > 0.25
    ]
    if busy:
        print(
            "NOTE: other processes used more than a quarter of a core during: "
            + ", ".join(busy)
            + " (the machine was busy: run again for reliable figures)"
        )
    if saturated:
        print(
            "NOTE: the load client used >= 90% of a core in: "
            + ", ".join(saturated)
            + " (those figures may be the client's limit; try --clients 2)"
        )
    for check in checks:
        if not check["acked_deposits"]:
            continue
        print(
            f"balances add up on {check['server']}: {check['total']:,}"
            f" == {check['acked_deposits']:,} deposits acknowledged"
        )

    if args.json:
        data = report.as_json()
        data["cells"] = {
            f"{kind}_{workload}_d{depth}": samples
            for (kind, workload, depth), samples in cells.items()
        }
        data["best"] = best
        data["balance_checks"] = checks
        data["floors"] = {str(depth): samples for depth, samples in floors.items()}
        data["client_saturated"] = saturated
        data["machine_busy"] = busy
        if profile_report is not None:
            data["profile"] = profile_report
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
