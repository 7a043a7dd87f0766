"""Shards and rendezvous placement: pure functions, no I/O (see ``_cluster.py``).

A stream belongs to one of a fixed number of *shards* by a stable hash of its
name (:func:`shard_of`: BLAKE2b, the same in every process and every Python,
unlike ``hash()``). A shard is placed on a node by rendezvous (highest random
weight) hashing (:func:`rendezvous_owner`): each node gets a pseudo-random
weight per shard and the heaviest live node owns it. Every node that sees the
same set of live nodes computes the same owner, with no coordination; when a
node joins, only the shards it wins move (to it); when one leaves, only its
shards move, spread over the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["owned_shards", "rendezvous_owner", "shard_of"]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def shard_of(stream: str, shards: int) -> int:
    """The shard (``0 <= shard < shards``) of the stream named ``stream``.

    Stable across processes, machines and Python versions.
    """
    return _hash64(stream.encode("utf-8")) % shards


def _weight(node: str, shard: int) -> tuple[int, str]:
    # The node id breaks a (2**-64) tie, so that the owner never depends on order.
    return _hash64(f"{shard}:{node}".encode()), node


def rendezvous_owner(shard: int, nodes: Iterable[str]) -> str | None:
    """The node that owns ``shard`` among ``nodes`` (``None`` if there is none)."""
    best: tuple[int, str] | None = None
    for node in nodes:
        weight = _weight(node, shard)
        if best is None or weight > best:
            best = weight
    return None if best is None else best[1]


def owned_shards(node: str, nodes: Iterable[str], shards: int) -> frozenset[int]:
    """The shards ``node`` owns when ``nodes`` are the live nodes (``node`` counted in)."""
    everyone = set(nodes) | {node}
    return frozenset(s for s in range(shards) if rendezvous_owner(s, everyone) == node)
