"""Cluster nodes (``trio-aggregates serve --cluster``) on one PostgreSQL: scale-out figures.

Every node is a ``trio-aggregates serve examples/bank.py:app --cluster``
subprocess against a throwaway PostgreSQL server (``tests/_pgserver.py``);
the load client runs in this process (Trio, the CLI's pipelined client).

Sections:

* ``scale``: a store-bound workload (``Deposit`` with a ``command_id`` on
  500 accounts) with 1, 2 and 3 nodes, twice: every request to a node
  picked at random (``random``: with N nodes (N-1)/N of them are forwarded
  to their key's owner), and every request to its key's owner (``owner``:
  a client that knows the placement, nothing forwarded): commands/s
  acknowledged in a fixed window, as ratios to 1 node,
  and the nodes' CPU per command (their user+system time over the window,
  from ``/proc/PID/stat``, PostgreSQL's not counted). The machine has 2
  cores shared by the nodes, PostgreSQL and the client: throughput cannot
  scale here; the CPU per command is what does.
* ``forward``: two nodes; one connection, one request at a time, on keys
  owned by node A: sent to A (local) and to B (forwarded to A). Median and
  p90 latency of ``GetBalance`` (no write) and ``Deposit`` (a write), and
  the forwarded/local ratio.
* ``takeover``: three nodes with a lease TTL of ``--ttl`` seconds; one is
  killed with SIGKILL; a client asks a survivor, in a loop, for a key the
  dead node owned: the time from the kill to the first answer.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_cluster.py --quick
    .venv/bin/python benchmarks/bench_cluster.py --json out/cluster.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import metadata  # noqa: E402

from trio_aggregates._scaleout._placement import rendezvous_owner, shard_of  # noqa: E402
from trio_aggregates._wire._cli import ConnectionLost, _Client, _connected  # noqa: E402

BANK_APP = f"{ROOT / 'examples' / 'bank.py'}:app"
LISTENING = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)\n")
SHARDS = 64
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Node:
    def __init__(self, name: str, process: trio.Process, port: int) -> None:
        self.name = name
        self.process = process
        self.port = port


@contextlib.asynccontextmanager
async def nodes_of(url: str, names: Sequence[str], ttl: float) -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for name in names:
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "trio_aggregates",
                    "serve",
                    BANK_APP,
                    "--store",
                    url,
                    *(
                        f"--port 0 --cluster --node-id {name} --lease-ttl {ttl} --shards {SHARDS}"
                        " --log-level ERROR --grace-period 1"
                    ).split(),
                ],
                stdout=subprocess.PIPE,
            )
            assert process.stdout is not None
            line = b""
            with trio.fail_after(60):
                while not line.endswith(b"\n"):
                    data = await process.stdout.receive_some(1)
                    if not data:
                        raise RuntimeError(f"node {name} ended before listening")
                    line += data
            match = LISTENING.fullmatch(line.decode())
            assert match is not None, line
            nodes.append(Node(name, process, int(match[1])))
        yield nodes
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                if node.process.returncode is None:
                    node.process.send_signal(signal.SIGTERM)
            for node in nodes:
                with trio.move_on_after(10):
                    await node.process.wait()
                if node.process.returncode is None:
                    node.process.kill()
                    await node.process.wait()
                assert node.process.stdout is not None
                await node.process.stdout.aclose()


def client_of(node: Node) -> contextlib.AbstractAsyncContextManager[_Client]:
    return _connected("127.0.0.1", node.port)


async def wait_placement(nodes: list[Node]) -> None:
    names = sorted(n.name for n in nodes)
    while True:
        held = 0
        agreed = True
        for node in nodes:
            async with client_of(node) as client:
                response, _ = await client.request(op="stats")
            cluster = response.result["cluster"]
            held += cluster["held"]
            agreed = agreed and sorted(cluster["live_nodes"]) == names
        if agreed and held == SHARDS:
            return
        await trio.sleep(0.1)


def owner_of(key: str, names: Sequence[str]) -> str:
    owner = rendezvous_owner(shard_of(f"Account-{key}", SHARDS), names)
    assert owner is not None
    return owner


async def open_accounts(client: _Client, keys: Sequence[str]) -> None:
    async def one(key: str) -> None:
        response, _ = await client.request(
            op="create", type="Account", key=key, command="OpenAccount", data={"owner": "b"}
        )
        assert response.ok or response.error_code == "already_exists", response

    async with trio.open_nursery() as nursery:
        for i in range(0, len(keys), 50):
            for key in keys[i : i + 50]:
                nursery.start_soon(one, key)
            await trio.lowlevel.checkpoint()


async def scale_point(
    url: str, n: int, accounts: int, workers: int, window: float, routing: str
) -> dict[str, Any]:
    names = [f"n{i}" for i in range(n)]
    keys = [f"acct-{n}-{i}" for i in range(accounts)]
    async with nodes_of(url, names, ttl=10.0) as nodes:
        with trio.fail_after(60):
            await wait_placement(nodes)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(client_of(node)) for node in nodes]
            await open_accounts(clients[0], keys)
            by_name = dict(zip(names, clients, strict=True))
            owner_client = {key: by_name[owner_of(key, names)] for key in keys}
            acked = 0
            failed = 0
            measuring = False
            stop = False

            async def worker(number: int) -> None:
                nonlocal acked, failed
                rng = random.Random(number)
                count = 0
                while not stop:
                    count += 1
                    key = rng.choice(keys)
                    client = owner_client[key] if routing == "owner" else rng.choice(clients)
                    try:
                        response, _ = await client.request(
                            type="Account",
                            key=key,
                            command="Deposit",
                            data={"amount": 1},
                            command_id=f"w{number}-{count}",
                        )
                    except ConnectionLost:
                        failed += 1
                        continue
                    if measuring:
                        if response.ok:
                            acked += 1
                        else:
                            failed += 1

            async with trio.open_nursery() as nursery:
                for number in range(workers):
                    nursery.start_soon(worker, number)
                await trio.sleep(min(1.0, window / 3))  # warm-up
                cpu0 = [cpu_seconds(node.process.pid) for node in nodes]
                t0 = time.perf_counter()
                measuring = True
                await trio.sleep(window)
                measuring = False
                elapsed = time.perf_counter() - t0
                cpu1 = [cpu_seconds(node.process.pid) for node in nodes]
                stop = True
        cpu = sum(cpu1) - sum(cpu0)
    return {
        "nodes": n,
        "routing": routing,
        "commands_per_s": acked / elapsed,
        "acked": acked,
        "failed": failed,
        "node_cpu_s": cpu,
        "cpu_us_per_command": cpu / acked * 1e6 if acked else None,
    }


async def latency(client: _Client, fields: dict[str, Any], count: int) -> list[float]:
    out = []
    for i in range(count):
        extra = {"command_id": f"{fields['key']}-{time.perf_counter_ns()}-{i}"}
        if fields["command"] != "Deposit":
            extra = {}
        response, seconds = await client.request(**fields, **extra)
        assert response.ok, response
        out.append(seconds)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": statistics.median(ordered) * 1e6,
        "p90_us": ordered[int(len(ordered) * 0.9)] * 1e6,
    }


async def forward_cost(url: str, count: int) -> dict[str, Any]:
    names = ["a", "b"]
    async with nodes_of(url, names, ttl=10.0) as nodes:
        a, b = nodes
        with trio.fail_after(60):
            await wait_placement(nodes)
        key = next(f"f{i}" for i in range(1000) if owner_of(f"f{i}", names) == "a")
        async with client_of(a) as to_a, client_of(b) as to_b:
            await open_accounts(to_a, [key])
            out: dict[str, Any] = {}
            for command in ("GetBalance", "Deposit"):
                fields: dict[str, Any] = {"type": "Account", "key": key, "command": command}
                data = {"amount": 1} if command == "Deposit" else None
                if data is not None:
                    fields["data"] = data
                await latency(to_a, fields, 20)  # warm-up
                await latency(to_b, fields, 20)
                local = summary(await latency(to_a, fields, count))
                forwarded = summary(await latency(to_b, fields, count))
                out[command] = {
                    "local": local,
                    "forwarded": forwarded,
                    "ratio_p50": forwarded["p50_us"] / local["p50_us"],
                    "added_p50_us": forwarded["p50_us"] - local["p50_us"],
                }
    return out


async def takeover(url: str, ttl: float) -> dict[str, Any]:
    names = ["t0", "t1", "t2"]
    async with nodes_of(url, names, ttl=ttl) as nodes:
        with trio.fail_after(60):
            await wait_placement(nodes)
        key = next(f"d{i}" for i in range(1000) if owner_of(f"d{i}", names) == "t2")
        async with client_of(nodes[0]) as client:
            await open_accounts(client, [key])
            nodes[2].process.kill()
            killed = time.perf_counter()
            attempts = 0
            with trio.fail_after(10 * ttl + 30):
                while True:
                    attempts += 1
                    response, _ = await client.request(
                        type="Account",
                        key=key,
                        command="Deposit",
                        data={"amount": 1},
                        command_id="after-kill",
                    )
                    if response.ok:
                        break
            served = time.perf_counter() - killed
    return {"lease_ttl_s": ttl, "served_again_after_s": served, "answers_waited": attempts}


@contextlib.contextmanager
def postgres() -> Any:
    from _pgserver import PostgresServer

    server = PostgresServer.create()
    try:
        yield server
    finally:
        server.destroy()


def database(server: Any, name: str) -> str:
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(server.url_for(name))


async def run(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "scale" in args.only:
        points = []
        for routing in ("random", "owner"):
            for n in (1, 2, 3):
                url = database(server, f"bench_scale_{routing}_{n}")
                point = await scale_point(url, n, args.accounts, args.workers, args.window, routing)
                points.append(point)
                base = points[-n]["commands_per_s"]
                point["ratio_to_1"] = point["commands_per_s"] / base if base else None
                print(
                    f"scale ({routing} node): {n} node(s): "
                    f"{point['commands_per_s']:,.0f} commands/s ({point['ratio_to_1']:.2f}x), "
                    f"{point['cpu_us_per_command'] or 0:,.0f} us node CPU per command",
                    flush=True,
                )
        results["scale"] = points
    if "forward" in args.only:
        results["forward"] = await forward_cost(database(server, "bench_forward"), args.count)
        for command, figures in results["forward"].items():
            print(
                f"forward: {command}: local p50 {figures['local']['p50_us']:,.0f} us, "
                f"forwarded p50 {figures['forwarded']['p50_us']:,.0f} us "
                f"({figures['ratio_p50']:.2f}x, +{figures['added_p50_us']:,.0f} us)",
                flush=True,
            )
    if "takeover" in args.only:
        results["takeover"] = await takeover(database(server, "bench_takeover"), args.ttl)
        print(
            f"takeover: lease TTL {args.ttl} s: a dead node's key served again after "
            f"{results['takeover']['served_again_after_s']:.2f} s",
            flush=True,
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (about a minute)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--only", default="scale,forward,takeover", help="sections to run")
    parser.add_argument("--ttl", type=float, default=2.0, help="lease TTL for takeover (s)")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    args.window = 3.0 if args.quick else 10.0
    args.accounts = 200 if args.quick else 500
    args.workers = 64
    args.count = 200 if args.quick else 1000
    with postgres() as server:
        results = trio.run(run, args, server)
    data = {"benchmark": "cluster", "metadata": metadata(), "quick": args.quick, **results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
