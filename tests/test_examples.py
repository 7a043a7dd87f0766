"""The examples are real programs: run them as subprocesses (``tests/test_bank.py``
runs the bank in-process, on every store, and kills it mid-run)."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
    assert "100 accounts, 2000 transfers" in done.stdout
    assert "1760 completed, 160 refunded, 80 rejected;" in done.stdout
    assert "total balance 100000 (expected 100000)" in done.stdout
    assert "the balances projection equals every account's balance" in done.stdout
    assert "every live account equals a replay of its stream" in done.stdout
    assert (tmp_path / "bank.db").exists()  # the default store: SQLite in the cwd
    assert not list(tmp_path.glob("*.db"))[1:]  # one example, one database file


def test_bank_example_in_memory_as_a_program(tmp_path: Path) -> None:
    args = ("--store", "memory://", "--accounts", "40", "--transfers", "500", "--quiet")
    done = run_example("bank.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "40 accounts, 500 transfers" in done.stdout
    assert "requested" not in done.stdout  # --quiet
    assert "total balance 40000 (expected 40000)" in done.stdout
    assert not (tmp_path / "bank.db").exists()


def test_counters_example_runs_as_a_program(tmp_path: Path) -> None:
    done = run_example("counters.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1000 counters, 10000 increments in all" in done.stdout
    assert "contained:" in done.stdout
    assert "counter-1 after the crash starts afresh at 0" in done.stdout
    assert "after 1 s idle: 0 live counters" in done.stdout
