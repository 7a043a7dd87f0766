"""The bank example (examples/bank.py): every transfer is settled by the saga.

In-process on memory, SQLite and PostgreSQL; then the example itself as a real
process, killed mid-run with SIGKILL (and with SIGINT), and run again: every
transfer is completed, refunded or rejected, each account movement happened
exactly once, the balances projection equals the accounts, and the bank's
total is exact.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from _examples import EXAMPLES, bank

from trio_aggregates import AggregateNotFound, open_aggregates, open_store

SCRIPT = str(EXAMPLES / "bank.py")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bank.db"
    else:
        yield request.getfixturevalue("postgres_database").url


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bank.db"
    else:
        yield request.getfixturevalue("postgres_database").url


def expected_states(transfers: int) -> dict[str, int]:
    """One transfer in 25 asks for too much (rejected), one in 10 goes to the closed
    account (refunded, unless rejected first), the others complete."""
    rejected = sum(1 for i in range(transfers) if i % 25 == 24)
    refunded = sum(1 for i in range(transfers) if i % 10 == 9 and i % 25 != 24)
    return {
        "completed": transfers - rejected - refunded,
        "refunded": refunded,
        "rejected": rejected,
    }


def check_summary(
    summary: dict[str, Any], transfers: int, accounts: int, *, exact: bool = True
) -> None:
    """The books; ``exact``: no transfer was refused for want of funds but the oversized ones."""
    assert summary["transfers"] == transfers
    assert sum(summary["states"].values()) == transfers
    if exact:
        assert summary["states"] == expected_states(transfers)
    else:  # some transfers also found their source short of funds: rejected
        assert summary["states"]["rejected"] >= expected_states(transfers)["rejected"]
    assert summary["total_balance"] == summary["expected_total"] == 1000 * accounts
    assert summary["closed_balance"] == 0
    assert summary["projection_agrees"]


async def check_movements(url: str, run: str, transfers: int, accounts: int) -> None:
    """Each transfer moved money exactly once: one withdrawal, then one deposit
    (completed) or one refund (refunded), never more; a rejected one, nothing."""
    keys = [f"{run}-account-{i}" for i in range(accounts)]
    moves: collections.Counter[tuple[str, str]] = collections.Counter()
    async with open_store(url) as store:
        async with open_aggregates(bank.Account, store) as accounts_repo:
            for key in [*keys, f"{run}-closed"]:
                for stored in await accounts_repo.history(key):
                    event = stored.event
                    reference = getattr(event, "reference", None)
                    if reference and reference != "initial":
                        moves[(type(event).__name__, reference)] += 1
        async with open_aggregates(bank.Transfer, store) as transfers_repo:
            for i in range(transfers):
                key = f"{run}-{i}"
                state = (await transfers_repo.load(key)).state
                if state == "rejected":
                    assert i % 25 == 24, key
                    assert not [m for m in moves if m[1].endswith(f"transfer:{key}")], key
                    continue
                assert moves[("Withdrawn", f"transfer:{key}")] == 1, key
                if state == "completed":
                    assert moves[("Deposited", f"transfer:{key}")] == 1, key
                    assert moves[("Deposited", f"refund:transfer:{key}")] == 0, key
                else:
                    assert state == "refunded", (key, state)
                    assert moves[("Deposited", f"transfer:{key}")] == 0, key
                    assert moves[("Deposited", f"refund:transfer:{key}")] == 1, key


async def transfer_states(url: str, run: str, transfers: int) -> collections.Counter[str]:
    states: collections.Counter[str] = collections.Counter()
    async with open_store(url) as store, open_aggregates(bank.Transfer, store) as repo:
        for i in range(transfers):
            try:
                states[(await repo.load(f"{run}-{i}")).state] += 1
            except AggregateNotFound:
                states["not requested"] += 1
    return states


async def test_the_saga_settles_every_transfer(store_url: str) -> None:
    with trio.fail_after(120):
        summary = await bank.run_bank(store_url, run="t", accounts_count=10, transfers=120)
    check_summary(summary, 120, 10)
    if store_url != "memory://":
        await check_movements(store_url, "t", 120, 10)


async def test_busy_accounts_many_transfers_each() -> None:
    """Ten accounts, 1000 transfers from 20 tasks: the saga's commands contend, and
    sources run short of funds (rejected, whichever order the saga runs them in)."""
    with trio.fail_after(120):
        summary = await bank.run_bank(
            "memory://", run="b", accounts_count=10, transfers=1000, tasks=20
        )
    check_summary(summary, 1000, 10, exact=False)


async def test_a_finished_run_run_again_changes_nothing(tmp_path: Path) -> None:
    """The same ``run`` again: every command is a duplicate, no event is appended,
    and the books are the same."""
    url = f"sqlite:///{tmp_path}/bank.db"
    with trio.fail_after(120):
        first = await bank.run_bank(url, run="r", accounts_count=5, transfers=50)
        async with open_store(url) as store:
            head = await store.head_position()
        again = await bank.run_bank(url, run="r", accounts_count=5, transfers=50)
        async with open_store(url) as store:
            assert await store.head_position() == head
    check_summary(first, 50, 5)
    check_summary(again, 50, 5)
    assert again["states"] == first["states"]


async def test_a_store_error_on_the_deposit_is_refunded_never_doubled() -> None:
    """The deposit step fails with a store error: the saga fences the deposit's
    command id (so it can never apply later) and refunds."""
    from trio_aggregates import InMemoryEventStore, StoreError

    class Flaky(InMemoryEventStore):
        async def append(self, stream: str, events: Any, **kwargs: Any) -> int:
            if any(e.type == "account.deposited" and b'"transfer:' in e.data for e in events):
                # Stored, then the answer is lost: the worst case.
                await super().append(stream, events, **kwargs)
                raise StoreError("the connection broke during COMMIT")
            return await super().append(stream, events, **kwargs)

    store = Flaky()
    with trio.fail_after(60):
        summary = await bank.run_bank(store, run="f", accounts_count=5, transfers=30)
    # Every deposit went in (then its answer was lost): the fence finds it there,
    # so every transfer but those to the closed account completes; nothing doubles.
    check_summary(summary, 30, 5)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
async def test_the_example_killed_mid_run_settles_everything_after_a_restart(
    durable_url: str, how: str, tmp_path: Path
) -> None:
    transfers, accounts = 600, 20
    args = ["--store", durable_url, "--run", "k", "--transfers", str(transfers)]
    args += ["--accounts", str(accounts)]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as errors:
        process = await trio.lowlevel.open_process(
            [sys.executable, SCRIPT, *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(120):
            # Mid-run: 200 of the 600 transfers requested, the saga at work.
            while not re.search(rb"\nrequested (2\d\d|[3-9]\d\d)/", output):
                chunk = await process.stdout.receive_some()
                assert chunk, f"the example ended before it was killed: {output[-500:]!r}"
                output += chunk
        process.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
        with trio.fail_after(30):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(10):
                await process.wait()
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, stderr.read_text()[-3000:]
    assert b"the books balance" not in output
    # Killed mid-saga: the saga had begun (money withdrawn), not every transfer settled.
    states = await transfer_states(durable_url, "k", transfers)
    begun = sum(states[s] for s in ("withdrawn", "deposit_failed", "completed", "refunded"))
    settled = sum(states[s] for s in ("completed", "refunded", "rejected"))
    assert begun > 0 and settled < transfers, states
    # Restart: it finishes the same run.
    with trio.fail_after(180):
        result = await trio.run_process(
            [sys.executable, SCRIPT, *args, "--quiet"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode()[-3000:])
    assert "every transfer completed, refunded or rejected; the books balance" in out
    assert "the balances projection equals every account's balance" in out
    assert "every live account equals a replay of its stream" in out
    assert f"total balance {1000 * accounts} (expected {1000 * accounts})" in out
    expected = expected_states(transfers)
    assert (
        f"{expected['completed']} completed, {expected['refunded']} refunded, "
        f"{expected['rejected']} rejected;"
    ) in out
    await check_movements(durable_url, "k", transfers, accounts)
