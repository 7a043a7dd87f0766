"""Faults and concurrency on the durable stores, with real processes and servers.

* Two OS processes, each with its own registry, hammer the same 100 streams of
  one store (a SQLite file; a PostgreSQL database): no lost update, no
  duplicate version, every conflict retried or reported, final states equal a
  replay of the streams.
* A writer killed with SIGKILL mid-load: every acknowledged command is in the
  store, no half-written batch is visible, aggregates rebuild.
* PostgreSQL stopped mid-load: callers get StoreError, the registry stays up,
  and service resumes when the server is back.
* A foreign or corrupt event fails that aggregate only.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_aggregates import (
    EventDecodeError,
    NewEvent,
    StoreError,
    UnknownEventType,
    open_aggregates,
    open_store,
)

sys.path.insert(0, str(Path(__file__).parent))
from _writer import Add, Open, Tally

WRITER = str(Path(__file__).parent / "_writer.py")
KEYS = 100


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shared.db"
    else:
        yield request.getfixturevalue("postgres_database").url


async def create_tallies(url: str, keys: int = KEYS) -> None:
    async with open_aggregates(Tally, url) as tallies, trio.open_nursery() as nursery:
        for key in range(keys):
            nursery.start_soon(tallies.create, key, Open())


def parse(output: str) -> tuple[dict[str, tuple[int, int]], set[str], list[str], bool]:
    """ACKs (command id → key, amount), conflicted ids, error lines, DONE seen."""
    acked: dict[str, tuple[int, int]] = {}
    conflicts: set[str] = set()
    errors: list[str] = []
    done = False
    for line in output.splitlines():
        kind, *rest = line.split(" ", 3)
        if kind == "ACK":
            acked[rest[1]] = (int(rest[0]), int(rest[2]))
        elif kind == "CONFLICT":
            conflicts.add(rest[1])
        elif kind == "ERROR":
            errors.append(line)
        elif kind == "DONE":
            done = True
    return acked, conflicts, errors, done


async def check_streams(
    url: str, acked: dict[str, tuple[int, int]], *, exact: set[str] | None = None
) -> int:
    """Check every stream; return the number of commands found stored.

    Every acknowledged command is stored once, with all 3 of its events;
    versions run 1..n without gap or duplicate; no command is stored in part;
    if ``exact`` is given, exactly those command ids are stored; and the
    state rebuilt by a fresh activation equals a replay of the stream.
    """
    stored_commands = 0
    async with open_aggregates(Tally, url) as tallies:
        for key in range(KEYS):
            history = await tallies.history(key)
            assert [e.version for e in history] == list(range(1, len(history) + 1))
            parts = collections.Counter(
                e.metadata["command_id"] for e in history if e.metadata["command"] == "Add"
            )
            assert all(n == 3 for n in parts.values()), f"half-written batch in {key}: {parts}"
            mine = {cid for cid, (k, _) in acked.items() if k == key}
            assert mine <= parts.keys(), f"acknowledged commands lost in {key}"
            if exact is not None:
                assert parts.keys() == {cid for cid in exact if acked[cid][0] == key}
            stored_commands += len(parts)
            replayed, version = await tallies.replay(key)
            live = await tallies.load(key)
            assert live == replayed
            assert version == len(history)
            if exact is not None:
                assert replayed.total == sum(a for cid, (k, a) in acked.items() if k == key)
    return stored_commands


async def test_two_processes_hammer_the_same_streams(store_url: str) -> None:
    await create_tallies(store_url)
    outputs: list[str] = []

    async def writer(seed: int) -> None:
        result = await trio.run_process(
            [sys.executable, WRITER, store_url, "--commands", "1500", "--seed", str(seed)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        outputs.append(result.stdout.decode())

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 1)
            nursery.start_soon(writer, 2)

    acked: dict[str, tuple[int, int]] = {}
    conflicts: set[str] = set()
    for output in outputs:
        a, c, errors, done = parse(output)
        assert done and not errors, errors[:5]
        acked |= a
        conflicts |= c
    # Every command has exactly one outcome, and the store agrees with the ACKs.
    assert len(acked) + len(conflicts) == 3000
    stored = await check_streams(store_url, acked, exact=set(acked))
    assert stored == len(acked)


async def test_sigkill_mid_load_loses_no_acknowledged_command(store_url: str) -> None:
    await create_tallies(store_url)
    process = await trio.lowlevel.open_process(
        [sys.executable, WRITER, store_url, "--commands", "100000", "--tasks", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    output = b""
    with trio.fail_after(120):
        while output.count(b"\nACK ") < 500:
            chunk = await process.stdout.receive_some()
            assert chunk, "the writer ended before it was killed"
            output += chunk
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert process.returncode == -signal.SIGKILL
    # Lines printed before the kill; a torn last line is not an ACK.
    complete = output.decode(errors="replace").rsplit("\n", 1)[0]
    acked, _, errors, done = parse(complete)
    assert not done and not errors
    assert len(acked) >= 500
    stored = await check_streams(store_url, acked)
    assert stored >= len(acked)


async def test_foreign_or_corrupt_events_fail_only_their_aggregate(store_url: str) -> None:
    await create_tallies(store_url, keys=3)
    async with open_store(store_url) as store:
        await store.append("Tally-1", [NewEvent("no.such.type", b"{}")], expected_version=1)
        await store.append("Tally-2", [NewEvent("tally.added", b"{not json")], expected_version=1)
    async with open_aggregates(Tally, store_url) as tallies:
        with pytest.raises(UnknownEventType, match=r"no\.such\.type"):
            await tallies.execute(1, Add(3))
        with pytest.raises(EventDecodeError, match="Tally-2@2"):
            await tallies.execute(2, Add(3))
        assert await tallies.execute(0, Add(3)) == 4
        assert 1 not in tallies.registry and 2 not in tallies.registry
        assert not tallies.registry.closed


@pytest.mark.postgres
async def test_postgres_going_away_gives_store_errors_then_recovers() -> None:
    from conftest import make_postgres_server

    server = make_postgres_server()
    try:
        url = server.url_for("postgres")
        async with open_aggregates(Tally, url) as tallies:
            await tallies.create(1, Open())
            assert await tallies.execute(1, Add(5)) == 4
            await trio.to_thread.run_sync(server.stop)
            with trio.fail_after(120):
                with pytest.raises(StoreError) as live_error:
                    await tallies.execute(1, Add(5))  # a live aggregate's append
                with pytest.raises(StoreError):
                    await tallies.execute(2, Add(5))  # an activation's load
            assert live_error.value.__cause__ is not None
            assert not tallies.registry.closed
            await trio.to_thread.run_sync(server.start)
            with trio.fail_after(120):
                version = await tallies.execute(1, Add(5))
            assert version in (7, 10)  # the failed append may or may not have landed
            live = await tallies.load(1)
            replayed, replay_version = await tallies.replay(1)
            assert live == replayed and replay_version == version
    finally:
        server.destroy()
