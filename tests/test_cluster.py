"""Cluster mode over PostgreSQL: membership, shard leases, fencing tokens, placement.

The rendezvous placement is pure and tested with Hypothesis. The rest runs on
the session's real PostgreSQL: nodes in this process for the deterministic
cases (a stale token written straight after another node's takeover), and
node processes (``tests/_cluster_node.py``) for the faults (SIGSTOP past a
lease, SIGKILL). After each test with leases, the grant history is checked:
no two grants of one shard were ever valid at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from conftest import PostgresDatabase
from hypothesis import given, strategies as st

from trio_aggregates import NewEvent, open_postgres_store
from trio_aggregates._core._exceptions import InvalidArgument, NotOwner
from trio_aggregates._scaleout._cluster import ClusterNode, NodeInfo, open_cluster
from trio_aggregates._scaleout._placement import owned_shards, rendezvous_owner, shard_of
from trio_aggregates._stores._postgres import PostgresEventStore

NODE = str(Path(__file__).parent / "_cluster_node.py")
EVENT = NewEvent("t", b"{}", b"{}")

# -- placement (pure) ---------------------------------------------------------------

node_ids = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=8, unique=True)


def test_shard_of_is_stable_and_in_range() -> None:
    # Pinned: a change of the hash would move every stream of a running cluster.
    assert shard_of("account-1", 256) == shard_of("account-1", 256)
    assert [shard_of(f"account-{i}", 256) for i in range(3)] == [109, 52, 137]
    assert all(0 <= shard_of(f"s-{i}", 7) < 7 for i in range(200))


@given(nodes=node_ids, shards=st.integers(1, 64), data=st.data())
def test_rendezvous_places_each_shard_on_exactly_one_node(
    nodes: list[str], shards: int, data: st.DataObject
) -> None:
    owned = {node: owned_shards(node, nodes, shards) for node in nodes}
    assert sorted(s for mine in owned.values() for s in mine) == list(range(shards))
    shuffled = data.draw(st.permutations(nodes))
    for shard in range(shards):
        assert rendezvous_owner(shard, shuffled) == rendezvous_owner(shard, nodes)


@given(nodes=node_ids, newcomer=st.text(min_size=1, max_size=8), shards=st.integers(1, 64))
def test_rendezvous_moves_only_what_a_membership_change_must(
    nodes: list[str], newcomer: str, shards: int
) -> None:
    if newcomer in nodes:
        return
    before = {s: rendezvous_owner(s, nodes) for s in range(shards)}
    after = {s: rendezvous_owner(s, [*nodes, newcomer]) for s in range(shards)}
    # A node joins: a shard moves only to the newcomer.
    assert all(after[s] in (before[s], newcomer) for s in range(shards))
    # It leaves again: exactly its shards move back, where they were.
    assert {s: rendezvous_owner(s, nodes) for s in range(shards)} == before
    # A node leaves: only its shards move.
    gone = nodes[0]
    rest = nodes[1:]
    for s in range(shards):
        if before[s] != gone:
            assert rendezvous_owner(s, rest) == before[s]


def test_rendezvous_spreads_shards() -> None:
    nodes = [f"node-{i}" for i in range(4)]
    counts = [len(owned_shards(n, nodes, 256)) for n in nodes]
    assert sum(counts) == 256
    assert min(counts) >= 40, counts


# -- helpers ----------------------------------------------------------------------


def grants(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT shard, node, token, granted_at, least(expires_at, released_at), released_at"
            " FROM trio_aggregates_lease_grants ORDER BY shard, token"
        ).fetchall()


def assert_leases_never_overlapped(dsn: str) -> int:
    """No two grants of a shard valid at once; tokens grow with grant time. Returns the count."""
    rows = grants(dsn)
    previous: dict[int, tuple[Any, ...]] = {}
    for row in rows:
        shard, _node, token, granted_at, _valid_until, _ = row
        before = previous.get(shard)
        if before is not None:
            assert token > before[2]
            assert granted_at >= before[4], f"shard {shard}: {before} overlaps {row}"
        previous[shard] = row
    return len(rows)


def node_states(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT node, state FROM trio_aggregates_nodes").fetchall())


def stream_length(dsn: str, stream: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(e.*) FROM trio_aggregates_streams s"
            " JOIN trio_aggregates_events e ON e.stream_id = s.id WHERE s.name = %s",
            (stream,),
        ).fetchone()
        assert row is not None
        return int(row[0])


def expire_leases(dsn: str, where: str, param: object) -> None:
    """Make leases expire now in the database (as if their renewals had stopped),
    in the grant history too."""
    with psycopg.connect(dsn) as conn:
        tokens = conn.execute(
            "UPDATE trio_aggregates_leases SET expires_at = clock_timestamp()"
            f" WHERE {where} = %s RETURNING token",
            (param,),
        ).fetchall()
        conn.execute(
            "UPDATE trio_aggregates_lease_grants SET expires_at = clock_timestamp()"
            " WHERE token = ANY(%s)",
            ([t for (t,) in tokens],),
        )


def stream_in(shards: frozenset[int], count: int, prefix: str = "s") -> str:
    for i in range(10_000):
        name = f"{prefix}-{i}"
        if shard_of(name, count) in shards:
            return name
    raise AssertionError("no stream found")


@asynccontextmanager
async def cluster_store(db: PostgresDatabase) -> AsyncIterator[PostgresEventStore]:
    async with open_postgres_store(db.dsn, timeout=10) as store:
        yield store


async def settle(*nodes: ClusterNode, shards: int) -> None:
    """Refresh the nodes until they hold exactly their rendezvous placement."""
    ids = [n.node_id for n in nodes]
    while True:
        for node in nodes:
            await node.refresh()
        if all(n.held_shards() == owned_shards(n.node_id, ids, shards) for n in nodes):
            return
        await trio.sleep(0.05)


# -- in one process -----------------------------------------------------------------


async def test_a_lone_node_claims_every_shard_and_writes(
    postgres_database: PostgresDatabase,
) -> None:
    async with cluster_store(postgres_database) as store:
        async with open_cluster(store, address="here", node_id="a", shards=8) as node:
            assert node.held_shards() == frozenset(range(8))
            assert await store.append("s-1", [EVENT], expected_version=0) == 1
            assert node.owns("s-1")
            assert node.owner_of("s-1") is not None
            stats = node.statistics()
            assert stats.claims == 8
            assert stats.live_nodes == ("a",)
        # Left: the store refuses writes, the leases are released.
        with pytest.raises(NotOwner):
            await store.append("s-1", [EVENT], expected_version=1)
    assert node_states(postgres_database.dsn) == {"a": "left"}
    rows = grants(postgres_database.dsn)
    assert len(rows) == 8
    assert all(row[5] is not None for row in rows)


async def test_open_cluster_checks_its_arguments(postgres_database: PostgresDatabase) -> None:
    async with cluster_store(postgres_database) as store:
        for kwargs in ({"shards": 0}, {"lease_ttl": 0}, {"lease_ttl": 1, "renew_interval": 0.9}):
            with pytest.raises(InvalidArgument):
                async with open_cluster(store, address="x", **kwargs):
                    pass  # pragma: no cover
        async with open_cluster(store, address="x", shards=4):
            with pytest.raises(InvalidArgument, match="already in a cluster"):
                async with open_cluster(store, address="y"):
                    pass  # pragma: no cover


async def test_two_nodes_split_the_shards_and_refuse_each_others_writes(
    postgres_database: PostgresDatabase,
) -> None:
    shards = 16
    async with (
        cluster_store(postgres_database) as sa,
        cluster_store(postgres_database) as sb,
        open_cluster(sa, address="a", node_id="a", shards=shards) as a,
        open_cluster(sb, address="b", node_id="b", shards=shards) as b,
    ):
        with trio.fail_after(30):
            await settle(a, b, shards=shards)
        assert a.held_shards().isdisjoint(b.held_shards())
        assert a.held_shards() | b.held_shards() == frozenset(range(shards))
        mine = stream_in(a.held_shards(), shards)
        theirs = stream_in(b.held_shards(), shards)
        assert await sa.append(mine, [EVENT], expected_version=0) == 1
        with pytest.raises(NotOwner) as caught:
            await sa.append(theirs, [EVENT], expected_version=0)
        assert not caught.value.by_database
        assert caught.value.shard == shard_of(theirs, shards)
        await a.refresh()  # a's view of the other node's leases
        assert a.owner_of(theirs) is not None
        assert a.owner_of(theirs).node_id == "b"  # type: ignore[union-attr]
        assert stream_length(postgres_database.dsn, theirs) == 0
    assert assert_leases_never_overlapped(postgres_database.dsn) >= shards


async def test_the_database_refuses_a_stale_token(postgres_database: PostgresDatabase) -> None:
    """A node that still believes it owns a shard (its lease expired in the
    database, another node claimed it) has its write refused in the write's own
    transaction; nothing is written. Self-fencing is off, so the database alone
    decides (with it on, the node would not even try). Its lease_ttl is long, so
    that no tick of its own notices the loss before its write."""
    dsn = postgres_database.dsn
    shards = 4
    async with (
        cluster_store(postgres_database) as sa,
        cluster_store(postgres_database) as sb,
        open_cluster(
            sa, address="a", node_id="a", shards=shards, lease_ttl=60, self_fencing=False
        ) as a,
    ):
        stream = "s-1"
        assert a.owns(stream)
        assert await sa.append(stream, [EVENT], expected_version=0) == 1
        expire_leases(dsn, "node", "a")
        # Expired, not yet claimed: refused already.
        with pytest.raises(NotOwner) as caught:
            await sa.append(stream, [EVENT], expected_version=1)
        assert caught.value.by_database
        async with open_cluster(sb, address="b", node_id="b", shards=shards) as b:
            # b sees a alive (a's heartbeat is fresh) but a's leases free: b
            # claims those rendezvous gives it; make b take them all.
            await b._claim(list(range(shards)))
            assert b.held_shards() == frozenset(range(shards))
            assert b.owns(stream)
            assert shard_of(stream, shards) in a.held_shards()  # a has not noticed
            with pytest.raises(NotOwner) as caught:
                await sa.append(stream, [EVENT], expected_version=1)
            assert caught.value.by_database
            assert "holds no valid lease" in str(caught.value)
            assert await sb.append(stream, [EVENT], expected_version=1) == 2
            # a's next tick: its renewals fail, it counts the leases lost.
            await a.refresh()
            assert a.held_shards() == frozenset()
            assert a.statistics().lost == shards
            assert a.owner_of(stream) == b.owner_of(stream) == NodeInfo("b", "b")
    assert stream_length(dsn, stream) == 2
    assert_leases_never_overlapped(dsn)


async def test_a_claim_waits_for_the_appends_in_flight_on_its_shard(
    postgres_database: PostgresDatabase,
) -> None:
    """The fence's shard lock: while a transaction that passed the fence is
    open, no other node can be granted the shard (even once the lease has
    expired), so that write lands before the next grant or not at all."""
    dsn = postgres_database.dsn
    async with (
        cluster_store(postgres_database) as store,
        open_cluster(store, address="a", node_id="a", shards=4, lease_ttl=60) as a,
    ):
        token = a._held[0].token
        with psycopg.connect(dsn) as writer, psycopg.connect(dsn, autocommit=True) as other:
            writer.execute(
                "SELECT trio_aggregates_fence('a', ARRAY[0], ARRAY[%s::bigint])", (token,)
            )
            expire_leases(dsn, "shard", 0)
            other.execute("SET lock_timeout = '300ms'")
            claim = "SELECT o_shard FROM trio_aggregates_claim('b', ARRAY[0], 10)"
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute(claim)
            writer.commit()
            assert other.execute(claim).fetchall() == [(0,)]
    assert_leases_never_overlapped(dsn)


async def test_a_node_stops_writing_when_its_renewal_is_late(
    postgres_database: PostgresDatabase, mock_clock: trio.testing.MockClock
) -> None:
    """Self-fencing: past ``lease_ttl - renew_interval`` after its last renewal
    began (by the node's own clock), the node refuses its writes itself, while
    the database would still take them; a renewal makes it write again."""
    async with (
        cluster_store(postgres_database) as store,
        open_cluster(
            store, address="a", node_id="a", shards=4, lease_ttl=10, renew_interval=2.5
        ) as a,
    ):
        assert await store.append("s-1", [EVENT], expected_version=0) == 1
        mock_clock.jump(7.6)
        assert not a.owns("s-1")
        with pytest.raises(NotOwner) as caught:
            await store.append("s-1", [EVENT], expected_version=1)
        assert not caught.value.by_database
        await a.refresh()
        assert a.owns("s-1")
        assert await store.append("s-1", [EVENT], expected_version=1) == 2


async def test_a_batch_fails_only_its_stale_writes(postgres_database: PostgresDatabase) -> None:
    dsn = postgres_database.dsn
    shards = 8
    async with (
        cluster_store(postgres_database) as store,
        open_cluster(
            store, address="a", node_id="a", shards=shards, lease_ttl=60, self_fencing=False
        ),
    ):
        stale_shard = shard_of("s-0", shards)
        streams = [f"s-{i}" for i in range(40)]
        stale = [s for s in streams if shard_of(s, shards) == stale_shard]
        expire_leases(dsn, "shard", stale_shard)
        outcomes: dict[str, str] = {}

        async def write(stream: str) -> None:
            try:
                await store.append(stream, [EVENT], expected_version=0)
            except NotOwner as exc:
                assert exc.by_database
                outcomes[stream] = "fenced"
            else:
                outcomes[stream] = "ok"

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(write, stream)
        assert store.statistics().transactions < len(streams)  # batched
    assert {s for s, o in outcomes.items() if o == "fenced"} == set(stale)
    for stream in streams:
        assert stream_length(dsn, stream) == (0 if stream in stale else 1)
    assert_leases_never_overlapped(dsn)


async def test_graceful_leave_hands_the_shards_off(postgres_database: PostgresDatabase) -> None:
    shards = 16
    released: list[frozenset[int]] = []

    async def passivate(moving: frozenset[int]) -> None:
        released.append(moving)

    async with (
        cluster_store(postgres_database) as sa,
        cluster_store(postgres_database) as sb,
        open_cluster(sb, address="b", node_id="b", shards=shards) as b,
    ):
        async with open_cluster(
            sa, address="a", node_id="a", shards=shards, on_release=passivate
        ) as a:
            with trio.fail_after(30):
                await settle(a, b, shards=shards)
            had = a.held_shards()
            assert had
            assert node_states(postgres_database.dsn)["a"] == "alive"
        assert released[-1] == had
        assert node_states(postgres_database.dsn)["a"] == "left"
        # b takes a's shards over at once: they were released, not left to expire.
        await b.refresh()
        assert b.held_shards() == frozenset(range(shards))
        assert b.statistics().live_nodes == ("b",)
    rows = grants(postgres_database.dsn)
    assert all(row[5] is not None for row in rows if row[1] == "a")
    assert_leases_never_overlapped(postgres_database.dsn)


# -- node processes ---------------------------------------------------------------


class NodeProcess:
    """A ``_cluster_node.py`` process, driven a line at a time."""

    def __init__(self, proc: trio.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._buffer = b""

    async def reply(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"node {self.name} exited (code {self.proc.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")
        return await self.reply()

    async def held(self) -> frozenset[int]:
        answer = await self.ask("HELD")
        assert answer.startswith("HELD")
        return frozenset(int(s) for s in answer[5:].split(",") if s)


@asynccontextmanager
async def node_processes(
    dsn: str, names: list[str], *extra: str, shards: int = 16
) -> AsyncIterator[list[NodeProcess]]:
    procs: list[trio.Process] = []
    try:
        for name in names:
            procs.append(
                await trio.lowlevel.open_process(
                    [sys.executable, NODE, dsn, "--node", name, "--shards", str(shards), *extra],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        nodes = [NodeProcess(p, n) for p, n in zip(procs, names, strict=True)]
        with trio.fail_after(60):
            for node in nodes:
                assert await node.reply() == "READY"
        yield nodes
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()


async def wait_placement(nodes: list[NodeProcess], shards: int) -> None:
    """Until the processes hold exactly their rendezvous placement among themselves."""
    ids = [n.name for n in nodes]
    while True:
        held = [await n.held() for n in nodes]
        if all(h == owned_shards(n.name, ids, shards) for n, h in zip(nodes, held, strict=True)):
            return
        await trio.sleep(0.1)


async def test_node_processes_claiming_at_once_never_share_a_lease(
    postgres_database: PostgresDatabase,
) -> None:
    """Four processes start together and claim; one is killed (SIGKILL) and the
    survivors take its shards over once its leases expire. The grant history
    shows no two valid leases on one shard at any time."""
    dsn = postgres_database.dsn
    shards = 32
    names = ["n1", "n2", "n3", "n4"]
    async with node_processes(dsn, names, "--ttl", "2", "--renew", "0.3", shards=shards) as nodes:
        with trio.fail_after(60):
            await wait_placement(nodes, shards)
        victim = nodes.pop()
        victim.proc.kill()
        with trio.fail_after(60):
            await wait_placement(nodes, shards)
    assert assert_leases_never_overlapped(dsn) >= shards
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT node) FROM trio_aggregates_lease_grants"
        ).fetchone()
    assert row is not None and row[0] == 4


def events_by_position(dsn: str) -> list[tuple[str, int, int, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT s.name, e.version, e.position, e.metadata FROM trio_aggregates_events e"
            " JOIN trio_aggregates_streams s ON s.id = e.stream_id ORDER BY e.position"
        ).fetchall()
    return [
        (name, version, position, json.loads(bytes(meta))) for name, version, position, meta in rows
    ]


async def test_writes_under_membership_changes_follow_the_grants(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    """Node processes write all the time to the streams they own while the
    membership changes: a third node joins (shards move to it by release and
    claim), one is killed with SIGKILL (its shards are claimed once its leases
    expire), the others leave gracefully. Every write carries its token in its
    metadata; the nodes also go on writing, knowingly, to the shards they lost,
    with their old tokens. Afterwards: every acknowledged write is stored, once; each write's
    token is a grant of its shard to its node; and, positions being commit order
    (the global order), on each shard the tokens never go down in commit order:
    no write of an older grant committed after the first write of a newer one."""
    dsn = postgres_database.dsn
    shards = 16
    common = ["--ttl", "1.5", "--renew", "0.3", "--load", "24"]

    def load(name: str) -> list[str]:
        return [*common, "--ack-file", str(tmp_path / f"{name}.acks")]

    async with (
        node_processes(dsn, ["n1"], *load("n1"), shards=shards) as (n1,),
        node_processes(dsn, ["n2"], *load("n2"), shards=shards) as (n2,),
    ):
        with trio.fail_after(60):
            await wait_placement([n1, n2], shards)
        await trio.sleep(1.0)  # load on two nodes
        async with node_processes(dsn, ["n3"], *load("n3"), shards=shards) as (n3,):
            with trio.fail_after(60):
                await wait_placement([n1, n2, n3], shards)
            await trio.sleep(1.0)
            n1.proc.kill()
            with trio.fail_after(60):
                await wait_placement([n2, n3], shards)
            await trio.sleep(1.0)
            with trio.fail_after(30):
                assert await n3.ask("LEAVE") == "LEFT"
        with trio.fail_after(60):
            await wait_placement([n2], shards)
        await trio.sleep(0.5)
        with trio.fail_after(30):
            assert await n2.ask("LEAVE") == "LEFT"

    events = events_by_position(dsn)
    stored = {(name, version): meta["token"] for name, version, _, meta in events}
    acked = refused = 0
    for name in ("n1", "n2", "n3"):
        for line in (tmp_path / f"{name}.acks").read_text().splitlines():
            if line.startswith("REFUSED"):
                refused += 1
                continue
            stream, version, token = line.split()
            assert stored[stream, int(version)] == int(token), line
            acked += 1
    assert acked > 50
    granted = {row[2]: row for row in grants(dsn)}
    last_token: dict[int, int] = {}
    tokens_per_shard: dict[int, set[int]] = {}
    for name, _, position, meta in events:
        shard = shard_of(name, shards)
        token = meta["token"]
        assert granted[token][0] == shard and granted[token][1] == meta["node"]
        assert token >= last_token.get(shard, 0), f"{name}@{position}: token {token} after newer"
        last_token[shard] = token
        tokens_per_shard.setdefault(shard, set()).add(token)
    assert {meta["node"] for *_, meta in events} == {"n1", "n2", "n3"}
    assert any(len(tokens) >= 3 for tokens in tokens_per_shard.values())
    assert_leases_never_overlapped(dsn)
    assert refused > 0  # stale writes were tried, and refused


async def test_a_paused_owner_is_fenced_when_it_wakes(postgres_database: PostgresDatabase) -> None:
    """SIGSTOP the owner past its lease; another node takes the shards over and
    writes; SIGCONT: the old owner's late write, with the token it held before
    the pause, is refused by the database, and nothing of it is written."""
    dsn = postgres_database.dsn
    shards = 8
    stream = "s-1"
    async with node_processes(
        dsn, ["old"], "--ttl", "1.5", "--renew", "0.3", "--no-self-fencing", shards=shards
    ) as (old,):
        with trio.fail_after(30):
            assert await old.held() == frozenset(range(shards))
            assert await old.ask(f"APPEND {stream}") == "APPENDED 1"
            # The token read, then the pause before the write reaches the database.
            assert await old.ask("PIN") == "PINNED"
        os.kill(old.proc.pid, signal.SIGSTOP)
        try:
            async with (
                cluster_store(postgres_database) as store,
                open_cluster(
                    store, address="new", node_id="new", shards=shards, lease_ttl=1.5
                ) as new,
            ):
                with trio.fail_after(30):
                    while new.held_shards() != frozenset(range(shards)):
                        await trio.sleep(0.1)
                        await new.refresh()
                assert await store.append(stream, [EVENT], expected_version=1) == 2
                os.kill(old.proc.pid, signal.SIGCONT)
                with trio.fail_after(30):
                    assert await old.ask(f"APPEND {stream}") == "NOTOWNER db"
                    # Its own fence: refused too (by the node or the database).
                    assert await old.ask("UNPIN") == "UNPINNED"
                    assert (await old.ask(f"APPEND {stream}")).startswith("NOTOWNER")
                assert await store.append(stream, [EVENT], expected_version=2) == 3
        finally:
            os.kill(old.proc.pid, signal.SIGCONT)
    assert stream_length(dsn, stream) == 3
    assert_leases_never_overlapped(dsn)


async def test_a_node_without_heartbeat_is_declared_dead(
    postgres_database: PostgresDatabase,
) -> None:
    dsn = postgres_database.dsn
    shards = 8
    async with node_processes(dsn, ["gone"], "--ttl", "1", "--renew", "0.2", shards=shards) as (
        gone,
    ):
        with trio.fail_after(30):
            assert await gone.held() == frozenset(range(shards))
        gone.proc.kill()
        async with (
            cluster_store(postgres_database) as store,
            open_cluster(store, address="b", node_id="b", shards=shards, lease_ttl=1) as b,
        ):
            with trio.fail_after(30):
                while node_states(dsn).get("gone") != "dead":
                    await trio.sleep(0.1)
                    await b.refresh()
                while b.held_shards() != frozenset(range(shards)):
                    await trio.sleep(0.1)
                    await b.refresh()
            assert b.statistics().live_nodes == ("b",)
    assert_leases_never_overlapped(dsn)
