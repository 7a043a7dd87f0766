"""Cluster nodes as users run them: ``trio-aggregates serve --cluster`` processes on one PostgreSQL.

Each test starts real ``serve --cluster --port 0`` subprocesses against a
fresh schema of the session's PostgreSQL server, talks to them over TCP (the
CLI's pipelined client), and checks the database afterwards: the events,
the command ids, and the lease history. Every process is killed (after a
``SIGCONT``) in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from conftest import PostgresDatabase
from test_cluster import assert_leases_never_overlapped, expire_leases, settle as settle_nodes

from trio_aggregates import open_postgres_store
from trio_aggregates._core._exceptions import InvalidArgument
from trio_aggregates._scaleout._cluster import open_cluster
from trio_aggregates._scaleout._placement import owned_shards, rendezvous_owner, shard_of
from trio_aggregates._wire._cli import ConnectionLost, _Client, _connected, load_app
from trio_aggregates._wire._protocol import Response
from trio_aggregates._wire._server import AggregateServer, ClusterOptions, open_aggregate_server

psycopg = pytest.importorskip("psycopg")

ROOT = Path(__file__).resolve().parent.parent
BANK_APP = f"{ROOT / 'examples' / 'bank.py'}:app"
LISTENING = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)\n")
SHARDS = 16


@attrs.define(eq=False)
class Node:
    """A ``serve --cluster`` process."""

    name: str
    process: trio.Process
    port: int
    stderr: Path

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


async def _start(db: PostgresDatabase, name: str, ttl: float, tmp_path: Path) -> Node:
    errors = tmp_path / f"{name}.stderr"
    with errors.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "trio_aggregates",
                "serve",
                BANK_APP,
                "--store",
                db.url,
                *(
                    f"--port 0 --cluster --node-id {name} --lease-ttl {ttl} --shards {SHARDS}"
                    " --grace-period 1 --log-level WARNING"
                ).split(),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    node = Node(name, process, 0, errors)
    assert process.stdout is not None
    first = b""
    with trio.fail_after(60):
        while not first.endswith(b"\n"):
            data = await process.stdout.receive_some(1)
            assert data, f"{name} ended before listening: {node.log()}"
            first += data
    match = LISTENING.fullmatch(first.decode())
    assert match is not None, first
    node.port = int(match[1])
    return node


@contextlib.asynccontextmanager
async def cluster_nodes(
    db: PostgresDatabase, names: list[str], tmp_path: Path, *, ttl: float
) -> AsyncIterator[list[Node]]:
    """Start ``serve --cluster`` processes, one per name; kill them all on the way out."""
    nodes: list[Node] = []
    try:
        for name in names:
            nodes.append(await _start(db, name, ttl, tmp_path))
        yield nodes
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                node.resume()
                if node.process.returncode is None:
                    node.process.kill()
                with trio.move_on_after(10):
                    await node.process.wait()
                assert node.process.stdout is not None
                await node.process.stdout.aclose()


def connect(node: Node) -> contextlib.AbstractAsyncContextManager[_Client]:
    """A pipelined client connection to ``node``."""
    return _connected("127.0.0.1", node.port)


async def ask(node: Node, **fields: Any) -> Response:
    async with connect(node) as client:
        response, _ = await client.request(**fields)
        return response


async def all_stats(node: Node) -> dict[str, Any]:
    response = await ask(node, op="stats")
    assert response.ok, response
    stats: dict[str, Any] = response.result
    return stats


async def cluster_stats(node: Node) -> dict[str, Any]:
    cluster: dict[str, Any] = (await all_stats(node))["cluster"]
    return cluster


async def wait_placement(nodes: list[Node]) -> None:
    """Until each node holds exactly its rendezvous share of the shards among ``nodes``."""
    names = [n.name for n in nodes]
    while True:
        stats = [await cluster_stats(n) for n in nodes]
        if all(
            s["held"] == len(owned_shards(n.name, names, SHARDS))
            and sorted(s["live_nodes"]) == sorted(names)
            for n, s in zip(nodes, stats, strict=True)
        ):
            return
        await trio.sleep(0.1)


def owner(key: str, names: list[str]) -> str:
    owner = rendezvous_owner(shard_of(f"Account-{key}", SHARDS), names)
    assert owner is not None
    return owner


def key_owned_by(name: str, names: list[str], prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(1000) if owner(f"{prefix}{i}", names) == name)


def command_ids(dsn: str) -> Counter[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT s.name, c.command_id FROM trio_aggregates_commands c"
            " JOIN trio_aggregates_streams s ON s.id = c.stream_id"
        ).fetchall()
    return Counter((str(s), str(c)) for s, c in rows)


def versions(dsn: str) -> dict[str, list[int]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT s.name, e.version FROM trio_aggregates_events e"
            " JOIN trio_aggregates_streams s ON s.id = e.stream_id ORDER BY s.name, e.version"
        ).fetchall()
    out: dict[str, list[int]] = {}
    for name, version in rows:
        out.setdefault(str(name), []).append(int(version))
    return out


# -- the bank under load, one node killed ---------------------------------------------------------


@attrs.define
class Ledger:
    """What the clients were told: acknowledged commands and the expected balances."""

    balances: dict[str, int]
    acked: dict[tuple[str, str], str] = attrs.Factory(dict)  # (stream, command id) -> command
    transfers: int = 0
    rejected: int = 0
    retries: int = 0


async def settle(
    clients: dict[str, _Client],
    alive: list[str],
    ledger: Ledger,
    key: str,
    command: str,
    data: dict[str, Any],
    command_id: str,
    **extra: Any,
) -> Response:
    """Send a command until it has a definitive answer (ok or rejected), through any live node.

    A timeout or a lost connection is not definitive (the command may have
    run): it is sent again, with the same command id, through another node.
    """
    while True:
        name = random.choice(alive)
        try:
            response, _ = await clients[name].request(
                type="Account", key=key, command=command, data=data, command_id=command_id, **extra
            )
        except ConnectionLost:
            response = None
        if response is not None and (response.ok or response.error_code == "rejected"):
            if response.ok:
                ledger.acked[(f"Account-{key}", command_id)] = command
            return response
        ledger.retries += 1
        await trio.sleep(0.05)


async def test_bank_transfers_through_three_nodes_survive_a_sigkill(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    names = ["n0", "n1", "n2"]
    accounts = [f"acct-{i}" for i in range(12)]
    ledger = Ledger({a: 1000 for a in accounts})
    async with cluster_nodes(postgres_database, names, tmp_path, ttl=2.0) as nodes:
        by_name = {n.name: n for n in nodes}
        with trio.fail_after(60):
            await wait_placement(nodes)
        alive = list(names)
        async with contextlib.AsyncExitStack() as stack:
            clients = {n.name: await stack.enter_async_context(connect(n)) for n in nodes}
            with trio.fail_after(60):
                for i, account in enumerate(accounts):
                    await settle(
                        clients,
                        alive,
                        ledger,
                        account,
                        "OpenAccount",
                        {"owner": "o"},
                        f"open-{account}",
                        op="create",
                    )
                    await settle(
                        clients, alive, ledger, account, "Deposit", {"amount": 1000}, f"fund-{i}"
                    )
            done = trio.Event()
            kill_after = 40
            total = 160

            async def worker(number: int) -> None:
                rng = random.Random(number)
                while ledger.transfers < total:
                    source, target = rng.sample(accounts, 2)
                    amount = rng.randint(1, 300)
                    tid = f"t{number}-{ledger.transfers}-{rng.getrandbits(32)}"
                    ledger.transfers += 1
                    withdrawn = await settle(
                        clients, alive, ledger, source, "Withdraw", {"amount": amount}, f"{tid}-w"
                    )
                    if not withdrawn.ok:
                        ledger.rejected += 1
                        continue
                    ledger.balances[source] -= amount
                    deposited = await settle(
                        clients, alive, ledger, target, "Deposit", {"amount": amount}, f"{tid}-d"
                    )
                    assert deposited.ok, deposited
                    ledger.balances[target] += amount
                    if ledger.transfers >= kill_after and not done.is_set():
                        done.set()

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for number in range(6):
                        nursery.start_soon(worker, number)
                    await done.wait()
                    by_name["n2"].process.kill()  # SIGKILL mid-load
                    alive.remove("n2")
            # The survivors hold every shard.
            with trio.fail_after(30):
                await wait_placement([by_name["n0"], by_name["n1"]])
            # Every balance as the clients were told, read through both survivors.
            for account in accounts:
                for name in alive:
                    state, _ = await clients[name].request(op="load", type="Account", key=account)
                    assert state.ok, state
                    assert state.result["balance"] == ledger.balances[account], account
            stats = [await cluster_stats(by_name[n]) for n in alive]
    assert sum(ledger.balances.values()) == 1000 * len(accounts)
    assert ledger.transfers >= total and ledger.rejected < ledger.transfers
    # Each acknowledged command is in the store exactly once; nothing else is.
    stored = command_ids(postgres_database.dsn)
    assert set(stored) == set(ledger.acked)
    assert all(count == 1 for count in stored.values())
    # No duplicate or missing version: each stream is 1..n, one event per command.
    per_stream = Counter(stream for stream, _ in ledger.acked)
    for stream, found in versions(postgres_database.dsn).items():
        assert found == list(range(1, len(found) + 1)), stream
        assert len(found) == per_stream[stream], stream
    # No two nodes ever held a valid lease on one shard at once; the survivors took n2's over.
    assert assert_leases_never_overlapped(postgres_database.dsn) >= SHARDS
    assert sum(s["moves_in"] for s in stats) > sum(
        len(owned_shards(n, names, SHARDS)) for n in alive
    )
    assert sum(s["forwarded"] for s in stats) > 0


# -- forwarding ----------------------------------------------------------------------------------


async def test_a_forwarded_request_gets_the_same_answer_as_a_local_one(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    names = ["a", "b"]
    async with cluster_nodes(postgres_database, names, tmp_path, ttl=5.0) as nodes:
        a, b = nodes
        with trio.fail_after(60):
            await wait_placement(nodes)
            key = key_owned_by("a", names, "k")
            created = await ask(
                b, type="Account", key=key, op="create", command="OpenAccount", data={"owner": "x"}
            )
            assert created.ok and created.version == 1, created
            local = await ask(
                a, type="Account", key=key, command="Deposit", data={"amount": 5}, command_id="c1"
            )
            forwarded = await ask(
                b, type="Account", key=key, command="Deposit", data={"amount": 5}, command_id="c2"
            )
            assert (local.ok, local.id, local.result) == (forwarded.ok, forwarded.id, None)
            assert (local.version, forwarded.version) == (2, 3)
            # A retry of a forwarded command, through either node, gets the first answer.
            again = await ask(
                a, type="Account", key=key, command="Deposit", data={"amount": 5}, command_id="c2"
            )
            assert again.ok and again.version == 3, again
            # Reads and refusals too.
            for op in ("load", "version", "history"):
                here = await ask(a, op=op, type="Account", key=key)
                there = await ask(b, op=op, type="Account", key=key)
                assert here == there, op
            refusals = [
                await ask(n, type="Account", key=key, command="Withdraw", data={"amount": 10**6})
                for n in (a, b)
            ]
            assert refusals[0] == refusals[1]
            assert (refusals[0].error_code, refusals[0].error_reason) == (
                "rejected",
                "InsufficientFunds",
            )
            # A forwarded request that reached a node not owning the key is not forwarded again.
            hop = await ask(
                b, type="Account", key=key, command="Deposit", data={"amount": 1}, forwarded=True
            )
            assert (hop.ok, hop.error_code, hop.id) == (False, "not_owner", 1)
            # A command without a command_id is given one before it is forwarded.
            plain = await ask(b, type="Account", key=key, command="Deposit", data={"amount": 2})
            assert plain.ok and plain.version == 4, plain
            b_stats = await cluster_stats(b)
            assert b_stats["forwarded"] >= 6
            assert (await cluster_stats(a))["forwarded"] == 0
            final = await ask(a, op="version", type="Account", key=key)
            assert final.version == 4
            # `trio-aggregates stats` shows the cluster.
            shown = await trio.run_process(
                [sys.executable, "-m", "trio_aggregates", "stats", "--connect",
                 f"tcp://127.0.0.1:{b.port}"],
                capture_stdout=True,
            )  # fmt: skip
            text = shown.stdout.decode()
            assert "cluster" in text and "shards_by_node" in text and "forwarded" in text, text
    ids = {c for (stream, c) in command_ids(postgres_database.dsn) if stream == f"Account-{key}"}
    # The create and the plain deposit forwarded by b; the refused withdrawal stored nothing.
    assert len([c for c in ids if c.startswith("cluster-")]) == 2, ids


# -- a paused owner ------------------------------------------------------------------------------


async def test_a_paused_owner_is_fenced_and_its_callers_are_served_by_the_new_owner(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    names = ["a", "b"]
    async with cluster_nodes(postgres_database, names, tmp_path, ttl=1.5) as nodes:
        a, b = nodes
        with trio.fail_after(60):
            await wait_placement(nodes)
            key = key_owned_by("a", names, "p")
            opened = await ask(
                a, type="Account", key=key, op="create", command="OpenAccount", data={"owner": "x"}
            )
            assert opened.ok, opened
            async with connect(a) as to_a:
                a.pause()
                try:
                    # b declares a dead and takes its shards once their leases expire.
                    await wait_placement([b])
                    moved = await ask(
                        b,
                        type="Account",
                        key=key,
                        command="Deposit",
                        data={"amount": 7},
                        command_id="during",
                    )
                    assert moved.ok and moved.version == 2, moved
                    # A caller of the paused node: its request waits in the socket.
                    async with trio.open_nursery() as nursery:
                        answers: list[Response] = []

                        async def late() -> None:
                            response, _ = await to_a.request(
                                type="Account",
                                key=key,
                                command="Deposit",
                                data={"amount": 1},
                                command_id="late",
                            )
                            answers.append(response)

                        nursery.start_soon(late)
                        await trio.sleep(0.2)
                        a.resume()
                finally:
                    a.resume()
            # a noticed it lost its leases: its caller was served by the new owner.
            assert answers[0].ok and answers[0].version == 3, answers
            a_stats = await all_stats(a)
            assert a_stats["cluster"]["lost"] > 0
            # The aggregate of the lost shard was passivated (its state may be stale).
            assert a_stats["registries"]["Account"]["passivations"] >= 1
            await wait_placement(nodes)
            state = await ask(a, op="load", type="Account", key=key)
            assert state.ok and state.result["balance"] == 8 and state.version == 3
    assert versions(postgres_database.dsn)[f"Account-{key}"] == [1, 2, 3]
    assert command_ids(postgres_database.dsn)[(f"Account-{key}", "late")] == 1
    assert_leases_never_overlapped(postgres_database.dsn)


# -- in one process ------------------------------------------------------------------------------


def in_process_client(server: AggregateServer) -> contextlib.AbstractAsyncContextManager[_Client]:
    return _connected("127.0.0.1", server.port)


async def test_a_single_node_with_clustering_serves_as_before(
    postgres_database: PostgresDatabase,
) -> None:
    options = ClusterOptions(node_id="solo", shards=SHARDS, lease_ttl=2.0)
    with trio.fail_after(60):
        async with open_aggregate_server(
            load_app(BANK_APP), postgres_database.url, port=0, cluster=options
        ) as server:
            async with in_process_client(server) as client:
                opened, _ = await client.request(
                    op="create", type="Account", key="x", command="OpenAccount",
                    data={"owner": "o"},
                )  # fmt: skip
                assert opened.ok, opened
                for version in (2, 3):
                    deposit, _ = await client.request(
                        type="Account", key="x", command="Deposit", data={"amount": 1}
                    )
                    assert (deposit.ok, deposit.version) == (True, version), deposit
                state, _ = await client.request(op="load", type="Account", key="x")
                assert state.result["balance"] == 2
                stats, _ = await client.request(op="stats")
            cluster = stats.result["cluster"]
            assert (cluster["node_id"], cluster["held"], cluster["live_nodes"]) == (
                "solo",
                SHARDS,
                ["solo"],
            )
            assert (cluster["forwarded"], cluster["retried"]) == (0, 0)
            with psycopg.connect(postgres_database.dsn) as conn:
                row = conn.execute("SELECT address, state FROM trio_aggregates_nodes").fetchone()
            assert row == (f"127.0.0.1:{server.port}", "alive")
    # Nothing but the acknowledged commands, no command id added on the local path.
    assert versions(postgres_database.dsn) == {"Account-x": [1, 2, 3]}
    assert command_ids(postgres_database.dsn) == Counter()
    with psycopg.connect(postgres_database.dsn) as conn:
        assert conn.execute("SELECT state FROM trio_aggregates_nodes").fetchone() == ("left",)


async def test_a_write_the_fence_refuses_is_tried_again_once_the_node_holds_the_shard(
    postgres_database: PostgresDatabase,
) -> None:
    with trio.fail_after(60):
        async with (
            open_postgres_store(postgres_database.dsn) as store,
            open_cluster(store, address="127.0.0.1:1", shards=SHARDS, lease_ttl=2.0) as node,
            open_aggregate_server(load_app(BANK_APP), store, port=0, cluster=node) as server,
            in_process_client(server) as client,
        ):
            opened, _ = await client.request(
                op="create", type="Account", key="f", command="OpenAccount", data={"owner": "o"}
            )
            assert opened.ok, opened
            # The node believes in a token the database does not know: the live
            # aggregate's next write (on the fast path) is refused by the fence.
            node._held[node.shard_of("Account-f")].token += 1000
            deposit, _ = await client.request(
                type="Account", key="f", command="Deposit", data={"amount": 3}
            )
            assert (deposit.ok, deposit.version) == (True, 2), deposit
            stats, _ = await client.request(op="stats")
    assert stats.result["cluster"]["retried"] >= 1
    assert stats.result["cluster"]["lost"] == 1
    assert stats.result["registries"]["Account"]["passivations"] >= 1
    assert versions(postgres_database.dsn) == {"Account-f": [1, 2]}
    # Tried again with a command id given at the first refusal: applied once.
    (((_, command_id), count),) = command_ids(postgres_database.dsn).items()
    assert command_id.startswith("cluster-") and count == 1


async def test_the_cluster_option_is_checked(postgres_database: PostgresDatabase) -> None:
    app = load_app(BANK_APP)
    with pytest.raises(InvalidArgument, match="ClusterNode or ClusterOptions"):
        async with open_aggregate_server(app, "memory://", port=0, cluster="yes"):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(InvalidArgument, match="PostgreSQL"):
        async with open_aggregate_server(app, "memory://", port=0, cluster=ClusterOptions()):
            pass  # pragma: no cover
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        async with open_aggregate_server(
            app, postgres_database.url, port=0, cluster=ClusterOptions(advertise="nowhere")
        ):
            pass  # pragma: no cover
    with pytest.raises(InvalidArgument, match="wildcard"):
        async with open_aggregate_server(
            app, postgres_database.url, host="0.0.0.0", port=0, cluster=ClusterOptions()
        ):
            pass  # pragma: no cover


async def test_serve_cluster_needs_a_postgresql_store(tmp_path: Path) -> None:
    for args, error in [
        (["--cluster"], "--cluster needs a PostgreSQL --store"),
        (["--node-id", "x"], "--advertise and --node-id go with --cluster"),
    ]:
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-m", "trio_aggregates", "serve", BANK_APP, "--port", "0",
                 "--store", f"sqlite:///{tmp_path}/x.db", *args],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert done.returncode == 2, done
        assert error in done.stderr.decode(), done.stderr


async def test_a_node_stopped_by_sigterm_hands_its_shards_over_at_once(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    names = ["a", "b"]
    # Leases of 30 s: the hand-over must not wait for them to expire.
    async with cluster_nodes(postgres_database, names, tmp_path, ttl=30.0) as nodes:
        a, b = nodes
        with trio.fail_after(60):
            await wait_placement(nodes)
            key = key_owned_by("b", names, "g")
            opened = await ask(
                a, type="Account", key=key, op="create", command="OpenAccount", data={"owner": "x"}
            )
            assert opened.ok, opened
        b.process.send_signal(signal.SIGTERM)
        # At a's next tick (every 7.5 s); an expiry would take at least 22.5 s.
        with trio.fail_after(20):
            await b.process.wait()
            assert b.process.returncode == 0, b.log()
            await wait_placement([a])
            deposit = await ask(a, type="Account", key=key, command="Deposit", data={"amount": 4})
            assert (deposit.ok, deposit.version) == (True, 2), deposit
        assert "Traceback" not in b.log(), b.log()
    with psycopg.connect(postgres_database.dsn) as conn:
        states = dict(conn.execute("SELECT node, state FROM trio_aggregates_nodes").fetchall())
    assert states["b"] == "left"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_write_of_a_deposed_owner_is_refused_by_the_database_and_served_by_the_new_owner(
    postgres_database: PostgresDatabase,
) -> None:
    app = load_app(BANK_APP)
    ports = {"a": free_port(), "b": free_port()}
    dsn = postgres_database.dsn
    with trio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            servers = {}
            nodes = {}
            for name, port in ports.items():
                store = await stack.enter_async_context(open_postgres_store(dsn))
                # Long leases and ticks: only the test's refreshes move anything.
                nodes[name] = node = await stack.enter_async_context(
                    open_cluster(
                        store, address=f"127.0.0.1:{port}", node_id=name, shards=SHARDS,
                        lease_ttl=60.0,
                    )
                )  # fmt: skip
                servers[name] = await stack.enter_async_context(
                    open_aggregate_server(app, store, port=port, cluster=node, token="s3cret")
                )
            await settle_nodes(nodes["a"], nodes["b"], shards=SHARDS)
            key = key_owned_by("a", ["a", "b"], "z")
            stream = f"Account-{key}"
            async with _connected("127.0.0.1", ports["a"]) as to_a:
                # With a token, nodes say hello to each other with it too.
                hello, _ = await to_a.request(op="hello", token="s3cret")
                assert hello.ok, hello
                opened, _ = await to_a.request(
                    op="create", type="Account", key=key, command="OpenAccount",
                    data={"owner": "o"},
                )  # fmt: skip
                assert opened.ok, opened
                # a is deposed without knowing it (as if paused): its heartbeat and
                # its leases run out in the database, and b takes its shards over.
                with psycopg.connect(dsn) as conn:
                    conn.execute(
                        "UPDATE trio_aggregates_nodes SET heartbeat_at = clock_timestamp()"
                        " - interval '1 hour' WHERE node = 'a'"
                    )
                expire_leases(dsn, "node", "a")
                await nodes["b"].refresh()
                assert nodes["b"].owns(stream)
                assert nodes["a"].owns(stream)  # a still trusts its lease: no self-fencing
                deposit, _ = await to_a.request(
                    type="Account", key=key, command="Deposit", data={"amount": 9}
                )
                assert (deposit.ok, deposit.version) == (True, 2), deposit
                stats, _ = await to_a.request(op="stats")
    # a's write was refused (by the database: a trusted its lease), a noticed it had
    # lost its leases, and forwarded the command to b, which applied it once.
    cluster = stats.result["cluster"]
    assert cluster["retried"] >= 1 and cluster["lost"] >= 1 and cluster["forwarded"] == 1
    assert versions(dsn)[stream] == [1, 2]
    assert next(c for (s, c) in command_ids(dsn) if s == stream).startswith("cluster-")
    assert_leases_never_overlapped(dsn)
