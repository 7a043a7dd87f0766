"""Scale-out over PostgreSQL: membership, shard leases and fencing tokens.

Several processes (*nodes*) share one PostgreSQL event store. The database is
the only coordinator: no consensus of our own, no second service, and every
time that matters is the database's clock (``clock_timestamp()``), never a
node's.

Shards. A stream belongs to one of ``shards`` shards (256 by default) by a
stable hash of its name (``_placement.shard_of``). Leases are per shard, not
per key: a node holds a few hundred leases whatever the number of keys, so
renewing them is one statement per tick and a key needs no database row of
its own before its first command; 256 shards spread well over tens of nodes.

Membership. Each node has a row in ``trio_aggregates_nodes`` (node id, the
address it can be reached at, state, heartbeat time). Every
``renew_interval`` seconds a node's *tick* writes its heartbeat, marks
``dead`` the nodes whose heartbeat is older than ``node_timeout``, renews its
leases and reads the live nodes and the leases. A node that comes back after
being declared dead is ``alive`` again at its next heartbeat (its leases have
expired meanwhile, so it starts from nothing). Leaving (the end of the
:func:`open_cluster` block) marks the node ``leaving`` (the others stop
placing shards on it), hands its shards off (``on_release``, then release)
and marks it ``left``.

Placement. Each shard is placed on the live nodes by rendezvous hashing
(``_placement.rendezvous_owner``): every node computes the same placement
from the same membership without talking to the others. At each tick a node
releases the shards it holds and should no longer own (after ``on_release``,
the hook that passivates their keys), and claims the shards it should own
that are free or whose lease expired. A claim is atomic in the database
(``trio_aggregates_claim``: an upsert that takes a lease only if it is free
or expired) and gets a new *fencing token* from a sequence, so tokens only
grow. Each grant is recorded in ``trio_aggregates_lease_grants`` (shard,
node, token, granted, expires, released): the history from which a test
checks that no two nodes ever held a valid lease on one shard at once.

Fencing. With a cluster open, the store asks the node, for each write, for
the shard's token (:meth:`ClusterNode.fence`), and the write's own
transaction starts with ``trio_aggregates_fence``: it takes a share lock on
the lease row if the lease is still this node's, with this token, and
unexpired by the database's clock, and otherwise refuses the whole
transaction (nothing is written; the store writes the batch's ops again one
by one so that only the ops of the stale shards fail, with
:exc:`NotOwner`). A claim waits for the share locks, so every write lands
before the next grant of its shard, and the next owner, which loads the
stream after its grant, sees it. So a paused or partitioned node can never
write once its lease is gone, whatever it believes.

Self-fencing. A node also stops writing to a shard by its own clock: a lease
renewed by a tick that started at local time ``t`` is trusted until ``t +
lease_ttl - margin`` (the database's expiry is later: it counts from when
the statement ran). Past that, writes fail with :exc:`NotOwner` without
reaching the database. This only avoids useless round trips and errors; the
database's check is the guarantee.

Cancellation and errors: the background tick never ends the block for a
database failure: it logs it and tries again at the next interval (the
node's leases meanwhile run out, and its writes fail with :exc:`NotOwner`).
Leaving is shielded and bounded by ``lease_ttl``.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, final

import attrs
import psycopg
import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from .._core._exceptions import InvalidArgument, NotOwner, StoreError, TrioAggregatesError
from .._core._options import check_seconds
from .._stores._postgres import Conn, PostgresEventStore, _Pool, _wrap
from ._placement import owned_shards, shard_of

__all__ = ["ClusterNode", "ClusterStatistics", "NodeInfo", "open_cluster"]

logger = logging.getLogger("trio_aggregates.cluster")

#: Most shards: a claim or renewal carries every shard's id.
_MAX_SHARDS: Final = 65536

_JOIN = """
INSERT INTO trio_aggregates_nodes AS n (node, address, state)
    VALUES (%(node)s, %(address)s, 'alive')
ON CONFLICT (node) DO UPDATE SET address = excluded.address, state = 'alive',
    joined_at = clock_timestamp(), heartbeat_at = clock_timestamp()
"""
_HEARTBEAT = """
UPDATE trio_aggregates_nodes
    SET heartbeat_at = clock_timestamp(),
        state = CASE WHEN state = 'dead' THEN 'alive' ELSE state END
    WHERE node = %(node)s
    RETURNING state
"""
_DECLARE_DEAD = """
UPDATE trio_aggregates_nodes SET state = 'dead'
    WHERE state IN ('alive', 'leaving')
        AND heartbeat_at < clock_timestamp() - make_interval(secs => %(timeout)s)
    RETURNING node
"""
_RENEW = (
    "SELECT o_shard, o_token FROM trio_aggregates_renew(%(node)s, %(shards)s, %(tokens)s, %(ttl)s)"
)
_LIVE_NODES = """
SELECT node, address FROM trio_aggregates_nodes
    WHERE state = 'alive'
        AND heartbeat_at >= clock_timestamp() - make_interval(secs => %(timeout)s)
"""
_VALID_LEASES = """
SELECT shard, node FROM trio_aggregates_leases
    WHERE node IS NOT NULL AND expires_at > clock_timestamp()
"""
_CLAIM = "SELECT o_shard, o_token FROM trio_aggregates_claim(%s, %s::integer[], %s)"
_RELEASE = "SELECT trio_aggregates_release(%s, %s::integer[], %s::bigint[])"
_SET_STATE = "UPDATE trio_aggregates_nodes SET state = %s WHERE node = %s"


@attrs.frozen
class NodeInfo:
    """A live node of the cluster, as the last tick saw it.

    Attributes:
        node_id: its id.
        address: where it can be reached (what it registered, opaque here).
    """

    node_id: str
    address: str


@attrs.frozen
class ClusterStatistics:
    """What :meth:`ClusterNode.statistics` returns.

    Attributes:
        node_id: this node's id.
        shards: the number of shards of the cluster.
        held: the shards this node holds a lease on now.
        live_nodes: the live nodes' ids at the last tick, sorted.
        claims: leases granted to this node so far.
        releases: leases this node gave up (placement moves, leaving).
        lost: leases this node failed to renew in time.
        ticks: ticks done (heartbeat, renewal, placement).
        tick_failures: ticks that failed (the database could not be reached).
        shards_by_node: the number of shards each node held a valid lease on
            at the last tick (by node id).
    """

    node_id: str
    shards: int
    held: frozenset[int]
    live_nodes: tuple[str, ...]
    claims: int
    releases: int
    lost: int
    ticks: int
    tick_failures: int
    shards_by_node: dict[str, int] = attrs.field(factory=dict)


@final
@attrs.define(eq=False)
class _Lease:
    token: int
    # Trio time after which this node stops trusting the lease (self-fencing).
    trusted_until: float


@attrs.frozen
class _View:
    """What a tick read: renewed leases, live nodes, valid leases' holders."""

    state: str | None
    renewed: frozenset[tuple[int, int]]
    nodes: dict[str, str]
    owners: dict[int, str]
    declared_dead: tuple[str, ...]


def _tick_queries(conn: Conn, params: dict[str, Any]) -> _View:
    """In a worker thread: heartbeat, declare the dead, renew, read the view.

    One round trip (pipeline mode), each statement its own transaction.
    """
    with conn.pipeline():
        beat = conn.execute(_HEARTBEAT, params)
        dead = conn.execute(_DECLARE_DEAD, params)
        renew = conn.execute(_RENEW, params)
        live = conn.execute(_LIVE_NODES, params)
        leases = conn.execute(_VALID_LEASES)
    row = beat.fetchone()
    return _View(
        None if row is None else str(row[0]),
        frozenset((int(s), int(t)) for s, t in renew.fetchall()),
        {str(n): str(a) for n, a in live.fetchall()},
        {int(s): str(n) for s, n in leases.fetchall()},
        tuple(str(n) for (n,) in dead.fetchall()),
    )


@final
class _Left:
    """The fence of a store whose node left its cluster: it refuses every write."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    @property
    def node_id(self) -> str:
        return self._node.node_id

    def fence(self, stream: str) -> tuple[int, int]:
        shard = shard_of(stream, self._node.shards)
        raise NotOwner(stream, shard, self.node_id, by_database=False)


@final
@attrs.define(eq=False)
class ClusterNode:
    """This process's membership of a cluster. Make one with :func:`open_cluster`.

    The synchronous methods read this node's view and are never checkpoints.

    Attributes:
        node_id: this node's id (unique in the cluster).
        address: where other nodes reach it (registered as given).
        shards: the cluster's number of shards (every node must use the same).
        lease_ttl: seconds a lease lasts from its grant or last renewal (by the
            database's clock).
        renew_interval: seconds between ticks (heartbeat, renewal, placement).
        node_timeout: a node whose heartbeat is older is dead.
    """

    node_id: str
    address: str
    shards: int
    lease_ttl: float
    renew_interval: float
    node_timeout: float
    _pool: _Pool
    _on_release: Callable[[frozenset[int]], Awaitable[None]] | None
    _self_fencing: bool
    _margin: float
    # Invariant: a shard is in _held only if the database granted this node a
    # lease on it with that token, and this node has not released it (the
    # lease may have expired since: the fence in the database has the last word).
    _held: dict[int, _Lease] = attrs.field(factory=dict, init=False)
    _nodes: dict[str, str] = attrs.field(factory=dict, init=False)
    _owners: dict[int, str] = attrs.field(factory=dict, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _leaving: bool = attrs.field(default=False, init=False)
    _claims: int = attrs.field(default=0, init=False)
    _releases: int = attrs.field(default=0, init=False)
    _lost: int = attrs.field(default=0, init=False)
    _ticks: int = attrs.field(default=0, init=False)
    _tick_failures: int = attrs.field(default=0, init=False)
    # More on_release hooks (the server's passivation), awaited after _on_release.
    _release_hooks: list[Callable[[frozenset[int]], Awaitable[None]]] = attrs.field(
        factory=list, init=False
    )

    # -- the fence (called by the store for each write) ----------------------

    def fence(self, stream: str) -> tuple[int, int]:
        """Return ``(shard, token)`` for a write to ``stream``. Not a checkpoint.

        Raises:
            NotOwner: this node holds no lease on the stream's shard, or no
                longer trusts it (its renewal is late: self-fencing).
        """
        shard = shard_of(stream, self.shards)
        lease = self._held.get(shard)
        if lease is None or (self._self_fencing and trio.current_time() >= lease.trusted_until):
            raise NotOwner(stream, shard, self.node_id, by_database=False)
        return shard, lease.token

    # -- the view ------------------------------------------------------------

    def shard_of(self, stream: str) -> int:
        """The shard of the stream named ``stream``."""
        return shard_of(stream, self.shards)

    def owns(self, stream: str) -> bool:
        """Whether this node holds, and trusts, the lease of ``stream``'s shard."""
        lease = self._held.get(shard_of(stream, self.shards))
        return lease is not None and trio.current_time() < lease.trusted_until

    def owner_of(self, stream: str) -> NodeInfo | None:
        """The live node holding a valid lease on ``stream``'s shard, as last seen
        (this node if it holds it), or ``None`` (free, or held by a node not seen alive)."""
        shard = shard_of(stream, self.shards)
        if shard in self._held:
            return NodeInfo(self.node_id, self.address)
        node = self._owners.get(shard)
        if node is None or node not in self._nodes:
            return None
        return NodeInfo(node, self._nodes[node])

    def held_shards(self) -> frozenset[int]:
        """The shards this node holds a lease on."""
        return frozenset(self._held)

    def live_nodes(self) -> tuple[NodeInfo, ...]:
        """The live nodes at the last tick (this one included), sorted by id."""
        return tuple(NodeInfo(n, a) for n, a in sorted(self._nodes.items()))

    def statistics(self) -> ClusterStatistics:
        """Return this node's counters and view. Not a checkpoint."""
        by_node: dict[str, int] = {}
        for node in self._owners.values():
            by_node[node] = by_node.get(node, 0) + 1
        by_node[self.node_id] = len(self._held)
        return ClusterStatistics(
            self.node_id,
            self.shards,
            frozenset(self._held),
            tuple(sorted(self._nodes)),
            self._claims,
            self._releases,
            self._lost,
            self._ticks,
            self._tick_failures,
            dict(sorted(by_node.items())),
        )

    # -- ticks ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Run a tick now: heartbeat, renew, look at the membership, release
        and claim shards. (The node does it every ``renew_interval`` anyway.)

        Raises:
            StoreError: the database failed (the leases not renewed stay
                trusted until their local deadline). ``on_release``'s
                exceptions are logged, not raised.
        """
        async with self._lock:
            await self._tick()

    async def _db(self, fn: Callable[[Conn], Any], action: str) -> Any:
        try:
            return await self._pool.run(fn)
        except psycopg.Error as exc:
            raise _wrap(exc, action) from exc

    async def _tick(self) -> None:
        held = sorted(self._held.items())
        params = {
            "node": self.node_id,
            "timeout": self.node_timeout,
            "shards": [s for s, _ in held],
            "tokens": [lease.token for _, lease in held],
            "ttl": self.lease_ttl,
        }
        started = trio.current_time()
        view: _View = await self._db(lambda conn: _tick_queries(conn, params), "tick")
        self._ticks += 1
        trusted_until = started + self.lease_ttl - self._margin
        lost = set()
        for shard, lease in held:
            if self._held.get(shard) is not lease:
                continue
            if (shard, lease.token) in view.renewed:
                lease.trusted_until = trusted_until
            else:
                del self._held[shard]
                self._lost += 1
                lost.add(shard)
                logger.warning("node %s lost its lease on shard %d", self.node_id, shard)
        if lost:
            # Their live state may be stale by now (another node may have written).
            await self._run_hooks(frozenset(lost))
        for node in view.declared_dead:
            logger.warning("node %s declared node %s dead (no heartbeat)", self.node_id, node)
        if view.state in (None, "left"):
            await self._join()
        self._nodes = dict(view.nodes)
        if not self._leaving:
            self._nodes[self.node_id] = self.address
        self._owners = view.owners
        if self._leaving:
            return
        wanted = owned_shards(self.node_id, self._nodes, self.shards)
        moving = frozenset(self._held) - wanted
        if moving:
            await self._release(moving)
        claim = sorted(
            s for s in wanted if s not in self._held and self._owners.get(s) in (None, self.node_id)
        )
        if claim:
            await self._claim(claim)

    async def _join(self) -> None:
        params = {"node": self.node_id, "address": self.address}
        await self._db(lambda conn: conn.execute(_JOIN, params), "join")

    async def _claim(self, shards: list[int]) -> None:
        started = trio.current_time()
        rows = await self._db(
            lambda conn: conn.execute(_CLAIM, (self.node_id, shards, self.lease_ttl)).fetchall(),
            "claim shards",
        )
        trusted_until = started + self.lease_ttl - self._margin
        for shard, token in rows:
            self._held[int(shard)] = _Lease(int(token), trusted_until)
            self._owners[int(shard)] = self.node_id
            self._claims += 1

    async def _release(self, shards: frozenset[int]) -> None:
        """Passivate (``on_release``), stop writing, then free the leases."""
        await self._run_hooks(shards)
        leases = {s: self._held.pop(s) for s in sorted(shards) if s in self._held}
        if not leases:
            return
        tokens = [lease.token for lease in leases.values()]
        await self._db(
            lambda conn: conn.execute(_RELEASE, (self.node_id, list(leases), tokens)),
            "release shards",
        )
        self._releases += len(leases)
        for shard in leases:
            self._owners.pop(shard, None)

    async def _run_hooks(self, shards: frozenset[int]) -> None:
        """Await ``on_release`` and the other release hooks; log their exceptions."""
        hooks = [] if self._on_release is None else [self._on_release]
        for hook in [*hooks, *self._release_hooks]:
            try:
                await hook(shards)
            except Exception:
                logger.exception("on_release failed for shards %s; releasing them anyway", shards)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.renew_interval)
            async with self._lock:
                try:
                    await self._tick()
                except StoreError as exc:
                    self._tick_failures += 1
                    logger.warning("node %s: tick failed: %s", self.node_id, exc)

    async def _leave(self) -> None:
        """Mark this node leaving, hand its shards off, mark it left. Shielded, bounded."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.lease_ttl):
            self._leaving = True
            async with self._lock:
                try:
                    await self._db(
                        lambda conn: conn.execute(_SET_STATE, ("leaving", self.node_id)), "leave"
                    )
                    await self._release(frozenset(self._held))
                    await self._db(
                        lambda conn: conn.execute(_SET_STATE, ("left", self.node_id)), "leave"
                    )
                except StoreError as exc:
                    logger.warning("node %s could not leave cleanly: %s", self.node_id, exc)
        self._held.clear()


def _check_shards(shards: object) -> int:
    if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= _MAX_SHARDS:
        raise InvalidArgument(f"shards must be an int from 1 to {_MAX_SHARDS}, not {shards!r}")
    return shards


@asynccontextmanager
async def open_cluster(
    store: PostgresEventStore,
    *,
    address: str,
    node_id: str | None = None,
    shards: int = 256,
    lease_ttl: float = 10.0,
    renew_interval: float | None = None,
    node_timeout: float | None = None,
    on_release: Callable[[frozenset[int]], Awaitable[None]] | None = None,
    self_fencing: bool = True,
) -> AsyncIterator[ClusterNode]:
    """Join the cluster of nodes sharing ``store``'s database; fence the store's writes.

    Usage::

        async with open_postgres_store(dsn) as store:
            async with open_cluster(store, address="10.0.0.5:7400") as node:
                ...  # writes to streams of shards this node holds; others: NotOwner

    On entry the node registers (``alive``), runs a first tick (it claims the
    shards placed on it that are free) and from then on every write of
    ``store`` carries its shard's fencing token, checked by the database in
    the write's transaction: a write for a shard this node does not hold
    fails with :exc:`NotOwner`, nothing written. A background task ticks
    every ``renew_interval`` seconds (see the module docstring).

    Args:
        store: the PostgreSQL store (not already in a cluster).
        address: where other nodes reach this one (kept as given).
        node_id: unique in the cluster; a random one by default. A node id
            used again takes over the old node's row (not its leases).
        shards: the number of shards (the same on every node).
        lease_ttl: a lease's life after its grant or last renewal, in the
            database's time.
        renew_interval: seconds between ticks (default ``lease_ttl / 4``;
            at most ``lease_ttl / 2``).
        node_timeout: a node whose heartbeat is older is dead (default
            ``lease_ttl``).
        on_release: awaited with the shards this node is about to give up
            (placement moved them, or the node leaves), before it stops
            writing to them and releases their leases: passivate their keys
            here. Its exceptions are logged, the shards released anyway.
            It is also awaited with the shards whose leases this node
            failed to renew in time (lost), once it notices: their live
            state may be stale.
        self_fencing: stop writing to a shard by the local clock when its
            renewal is late (``lease_ttl - renew_interval`` after the last
            renewal began). Off, only the database fences (for tests).

    Raises:
        InvalidArgument: an argument is out of range, or ``store`` is not a
            PostgreSQL store or is already in a cluster.
        StoreError: the database failed while joining.

    On exit (also on error or cancellation) the node leaves: it is marked
    ``leaving``, ``on_release`` runs for every shard it holds, the leases are
    released and the node is marked ``left``; shielded, at most ``lease_ttl``
    seconds. From then on ``store`` refuses every write with
    :exc:`NotOwner`. An exception from the body propagates unchanged.
    """
    if not isinstance(store, PostgresEventStore):
        raise InvalidArgument(f"open_cluster needs a PostgreSQL store, not {type(store).__name__}")
    if store._fence is not None:
        raise InvalidArgument("this store is already in a cluster")
    if not isinstance(address, str):
        raise InvalidArgument(f"address must be a str, not {type(address).__name__}")
    if node_id is None:
        node_id = uuid.uuid4().hex[:12]
    elif not isinstance(node_id, str) or not node_id:
        raise InvalidArgument(f"node_id must be a non-empty str, not {node_id!r}")
    shards = _check_shards(shards)
    lease_ttl = check_seconds("lease_ttl", lease_ttl, allow_zero=False)
    if renew_interval is None:
        renew_interval = lease_ttl / 4
    renew_interval = check_seconds("renew_interval", renew_interval, allow_zero=False)
    if renew_interval > lease_ttl / 2:
        raise InvalidArgument(
            f"renew_interval ({renew_interval}) must be at most half of lease_ttl ({lease_ttl})"
        )
    node_timeout = lease_ttl if node_timeout is None else node_timeout
    node_timeout = check_seconds("node_timeout", node_timeout, allow_zero=False)
    pool = _Pool(store.conninfo, 1, min(store._pool.timeout, renew_interval * 2))
    node = ClusterNode(
        node_id,
        address,
        shards,
        lease_ttl,
        renew_interval,
        node_timeout,
        pool,
        on_release,
        bool(self_fencing),
        renew_interval,
    )
    try:
        await node._join()
    except BaseException:
        await pool.aclose()
        raise
    body_error: BaseException | None = None
    try:
        store._fence = node
        async with node._lock:
            await node._tick()
        async with trio.open_nursery() as nursery:
            await nursery.start(node._run)
            try:
                yield node
            except BaseException as exc:
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # pragma: no cover - the tick loop raises nothing
        raise TrioAggregatesError("internal error in trio_aggregates (please report it)") from group
    finally:
        try:
            await node._leave()
        finally:
            if store._fence is node:
                store._fence = _Left(node)
            await pool.aclose()
    if body_error is not None:
        raise body_error
