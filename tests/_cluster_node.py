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

``PIN`` makes the store's writes carry the tokens the node holds *now*,
whatever happens to its leases afterwards: the state of a node that read its
token and was then paused before its write reached the database (a garbage
collector pause, SIGSTOP), which self-fencing cannot catch. ``UNPIN`` goes
back to the node's own fence.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from trio_aggregates import NewEvent, open_postgres_store
from trio_aggregates._cluster import ClusterNode, open_cluster
from trio_aggregates._exceptions import NotOwner


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
        async with open_cluster(
            store,
            address=f"127.0.0.1:{os.getpid()}",
            node_id=args.node,
            shards=args.shards,
            lease_ttl=args.ttl,
            renew_interval=args.renew,
            self_fencing=not args.no_self_fencing,
        ) as node:
            say("READY")
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
        say("LEFT")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--node", required=True)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--renew", type=float, default=0.4)
    parser.add_argument("--no-self-fencing", action="store_true")
    trio.run(main, parser.parse_args())
