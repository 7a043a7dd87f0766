"""The examples are real programs: run them, in-process and as subprocesses."""

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
bank: Any = importlib.import_module("bank")


def check_books(summary: dict[str, Any], accounts: int) -> None:
    assert summary["accounts"] == accounts
    assert summary["total_balance"] == summary["expected_total"] == 1000 * accounts
    assert summary["transfers_done"] > 0
    assert summary["activations"] >= accounts


async def test_run_bank_in_memory() -> None:
    with trio.fail_after(60):
        summary = await bank.run_bank("memory://", accounts_count=20, transfers=400, tasks=20)
    check_books(summary, 20)


async def test_run_bank_on_sqlite(tmp_path: Path) -> None:
    with trio.fail_after(120):
        summary = await bank.run_bank(
            f"sqlite:///{tmp_path}/bank.db", accounts_count=20, transfers=400, tasks=20
        )
    check_books(summary, 20)
    assert (tmp_path / "bank.db").exists()


async def test_run_bank_with_busy_accounts() -> None:
    with trio.fail_after(60):
        summary = await bank.run_bank("memory://", accounts_count=10, transfers=2000, tasks=20)
    check_books(summary, 10)


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bank_example_runs_as_a_program(tmp_path: Path) -> None:
    done = run_example("bank.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "total balance 100000 (expected 100000)" in done.stdout
    assert "every live account equals a replay of its stream" in done.stdout
    assert (tmp_path / "bank.db").exists()  # the default store: SQLite in the cwd


def test_bank_example_in_memory_as_a_program(tmp_path: Path) -> None:
    args = ("--store", "memory://", "--accounts", "40", "--transfers", "500")
    done = run_example("bank.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "40 accounts" in done.stdout
    assert "total balance 40000 (expected 40000)" in done.stdout
    assert not (tmp_path / "bank.db").exists()


def test_counters_example_runs_as_a_program(tmp_path: Path) -> None:
    done = run_example("counters.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1000 counters, 10000 increments in all" in done.stdout
    assert "contained:" in done.stdout
    assert "counter-1 after the crash starts afresh at 0" in done.stdout
    assert "after 1 s idle: 0 live counters" in done.stdout
