"""A cluster node process for tests/test_cluster.py (run as a script, not collected).

    python tests/_cluster_node.py DSN --node a --shards 16 --ttl 2 --renew 0.4 [--no-self-fencing]

Opens the PostgreSQL store at DSN, joins the cluster (``open_cluster``) and
prints ``READY``; then reads one command a line on stdin and answers one line
on stdout, flushed at once:

    HELD                 ->  HELD <shard>,<shard>,...   (the shards it holds now)
    REFRESH              ->  OK                         (a tick now)
    APPEND <stream>      ->  APPENDED <version> | NOTOWNER <db|node> | ERROR <exception>
    PIN                  ->  PINNED
    UNPIN                ->  UNPINNED
    LEAVE (or EOF)       ->  LEFT, once the node has left the cluster

With ``--load N --ack-file PATH`` a writer task appends, one at a time and
for as long as the node runs, to the streams ``s-0`` .. ``s-<N-1>``, each
event's metadata naming the node and the fencing token its write carried:
to the shards the node holds, and, *knowingly*, to the shards it held once,
with the last token it had (what a node that has not noticed its loss would
do: the database must refuse those). After each acknowledged append it
writes a line ``<stream> <version> <token>`` to PATH, after each refused one
``REFUSED <stream> <token>`` (flushed at once, so that a node killed by
SIGKILL has recorded every append acknowledged before).

``PIN`` makes the store's writes carry the tokens the node holds *now*,
whatever happens to its leases afterwards: the state of a node that read its
token and was then paused before its write reached the database (a garbage
collector pause, SIGSTOP), which self-fencing cannot catch. ``UNPIN`` goes
back to the node's own fence.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import trio

from trio_aggregates import NewEvent, open_postgres_store
from trio_aggregates._core._exceptions import NotOwner
from trio_aggregates._scaleout._cluster import ClusterNode, open_cluster
from trio_aggregates._stores._postgres import PostgresEventStore


class _Exactly:
    """A fence that hands the store one given (shard, token): the writer's own."""

    def __init__(self, node_id: str, grant: tuple[int, int]) -> None:
        self.node_id = node_id
        self.grant = grant

    def fence(self, stream: str) -> tuple[int, int]:
        return self.grant


async def write_load(store: PostgresEventStore, node: ClusterNode, streams: int, path: str) -> None:
    """Append all the time; to a shard the node lost, go on writing with its
    last token, as a node that has not noticed (paused, partitioned) would."""
    rng = random.Random(node.node_id)
    remembered: dict[int, int] = {}
    # A small local file, a line per append: blocking writes are fine here.
    with open(path, "a", encoding="utf-8") as acks:  # noqa: ASYNC230
        while True:
            await trio.sleep(0.002)
            stream = f"s-{rng.randrange(streams)}"
            try:
                grant = node.fence(stream)
            except NotOwner as exc:
                if exc.shard not in remembered:
                    continue
                grant = exc.shard, remembered[exc.shard]  # stale, knowingly
            remembered[grant[0]] = grant[1]
            metadata = json.dumps({"node": node.node_id, "token": grant[1]}).encode()
            store._fence = _Exactly(node.node_id, grant)
            try:
                version = await store.append(
                    stream, [NewEvent("t", b"{}", metadata)], expected_version=None
                )
            except NotOwner:
                acks.write(f"REFUSED {stream} {grant[1]}\n")
                continue
            finally:
                store._fence = node
                acks.flush()
            acks.write(f"{stream} {version} {grant[1]}\n")
            acks.flush()


class _Pinned:
    def __init__(self, node: ClusterNode) -> None:
        self.node_id = node.node_id
        self._node = node
        self._tokens = {s: node._held[s].token for s in node._held}

    def fence(self, stream: str) -> tuple[int, int]:
        shard = self._node.shard_of(stream)
        if shard not in self._tokens:
            raise NotOwner(stream, shard, self.node_id, by_database=False)
        return shard, self._tokens[shard]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def lines() -> object:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    async with stdin:
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.decode().strip()
            chunk = await stdin.receive_some()
            if not chunk:
                return
            buffer += chunk


async def main(args: argparse.Namespace) -> None:
    async with open_postgres_store(args.dsn, timeout=10) as store:
        async with (
            open_cluster(
                store,
                address=f"127.0.0.1:{os.getpid()}",
                node_id=args.node,
                shards=args.shards,
                lease_ttl=args.ttl,
                renew_interval=args.renew,
                self_fencing=not args.no_self_fencing,
            ) as node,
            trio.open_nursery() as nursery,
        ):
            if args.load:
                nursery.start_soon(write_load, store, node, args.load, args.ack_file)
            say("READY")
            await serve_commands(store, node)
            nursery.cancel_scope.cancel()
        say("LEFT")


async def serve_commands(store: PostgresEventStore, node: ClusterNode) -> None:
    async for line in lines():  # type: ignore[attr-defined]
        command, _, arg = line.partition(" ")
        if command == "HELD":
            say("HELD " + ",".join(str(s) for s in sorted(node.held_shards())))
        elif command == "REFRESH":
            await node.refresh()
            say("OK")
        elif command == "PIN":
            store._fence = _Pinned(node)
            say("PINNED")
        elif command == "UNPIN":
            store._fence = node
            say("UNPINNED")
        elif command == "APPEND":
            try:
                version = await store.append(
                    arg, [NewEvent("t", b"{}", b"{}")], expected_version=None
                )
            except NotOwner as exc:
                say(f"NOTOWNER {'db' if exc.by_database else 'node'}")
            except Exception as exc:
                say(f"ERROR {exc!r}")
            else:
                say(f"APPENDED {version}")
        elif command == "LEAVE":
            break


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--node", required=True)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--renew", type=float, default=0.4)
    parser.add_argument("--no-self-fencing", action="store_true")
    parser.add_argument("--load", type=int, default=0)
    parser.add_argument("--ack-file")
    trio.run(main, parser.parse_args())
