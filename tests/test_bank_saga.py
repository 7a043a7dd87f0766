"""The transfer saga (examples/bank_saga.py): every transfer completes or is refunded.

In-process on memory, SQLite and PostgreSQL; then the example itself as a real
process, killed mid-run with SIGKILL (and with SIGINT), and run again: every
transfer is settled, each account movement happened exactly once, and the
bank's total is exact.
"""

from __future__ import annotations

import collections
import importlib
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

from trio_aggregates import AggregateNotFound, open_aggregates, open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
saga: Any = importlib.import_module("bank_saga")
bank: Any = importlib.import_module("bank")
SCRIPT = str(EXAMPLES / "bank_saga.py")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bank_saga.db"
    else:
        yield request.getfixturevalue("postgres_database").url


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bank_saga.db"
    else:
        yield request.getfixturevalue("postgres_database").url


def check_summary(summary: dict[str, Any], transfers: int, accounts: int) -> None:
    assert summary["states"]["completed"] + summary["states"]["refunded"] == transfers
    assert summary["states"]["refunded"] == transfers // 10  # those to the closed account
    assert summary["total_balance"] == summary["expected_total"] == 1000 * accounts
    assert summary["closed_balance"] == 0
    assert summary["projection_agrees"]


async def check_movements(url: str, run: str, transfers: int, accounts: int) -> None:
    """Each transfer moved money exactly once: one withdrawal, then one deposit
    (completed) or one refund (refunded), never more."""
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
        async with open_aggregates(saga.Transfer, store) as transfers_repo:
            for i in range(transfers):
                key = f"{run}-{i}"
                state = (await transfers_repo.load(key)).state
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
    async with open_store(url) as store, open_aggregates(saga.Transfer, store) as repo:
        for i in range(transfers):
            try:
                states[(await repo.load(f"{run}-{i}")).state] += 1
            except AggregateNotFound:
                states["not requested"] += 1
    return states


async def test_the_saga_settles_every_transfer(store_url: str) -> None:
    with trio.fail_after(120):
        summary = await saga.run_saga(
            store_url, run="t", accounts_count=10, transfers_count=120, progress=False
        )
    check_summary(summary, 120, 10)
    if store_url != "memory://":
        await check_movements(store_url, "t", 120, 10)


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
        summary = await saga.run_saga(
            store, run="f", accounts_count=5, transfers_count=30, progress=False
        )
    # Every deposit went in (then its answer was lost): the fence finds it there,
    # so every transfer but those to the closed account completes; nothing doubles.
    check_summary(summary, 30, 5)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
async def test_the_example_killed_mid_run_settles_everything_after_a_restart(
    durable_url: str, how: str, tmp_path: Path
) -> None:
    transfers, accounts = 600, 20
    args = ["--store", durable_url, "--run", "k", "--transfers", str(transfers)]
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
    assert begun > 0 and states["completed"] + states["refunded"] < transfers, states
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
    assert "every transfer completed or refunded; the books balance" in out
    assert "the balances projection equals every account's balance" in out
    assert f"total balance {1000 * accounts} (expected {1000 * accounts})" in out
    assert f"{transfers - transfers // 10} completed, {transfers // 10} refunded" in out
    await check_movements(durable_url, "k", transfers, accounts)
