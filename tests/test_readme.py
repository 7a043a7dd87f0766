"""The README's Python examples run as written, in a fresh directory each, twice in a row.

A reader runs an example again: the second run must work too, and an example
that keeps data keeps it in a file of its own (``readme.db``), never one that
another example (the tutorial's ``tutorial.db``, ``examples/bank.py``'s
``bank.db``) writes with other event types.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def run_block(number: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKS[number]],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_runs_twice(number: int, tmp_path: Path) -> None:
    for run in (1, 2):
        done = run_block(number, tmp_path)
        assert done.returncode == 0, f"run {run}:\n{done.stderr}"
        assert done.stdout.strip(), "the example prints what it shows"
    files = {p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    assert files <= {"readme.db"}, "an example keeps its data in readme.db, nowhere else"


def test_the_event_sourced_example_keeps_its_events_in_readme_db(tmp_path: Path) -> None:
    [number] = [n for n, block in enumerate(BLOCKS) if "open_aggregates(" in block]
    assert "sqlite:///readme.db" in BLOCKS[number]
    first = run_block(number, tmp_path)
    again = run_block(number, tmp_path)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout.split() == ["1", "2"]
    # The create's command_id makes it safe to run again; the deposit is a new command.
    assert again.stdout.split() == ["1", "3"]
    assert (tmp_path / "readme.db").exists()


def test_the_quick_start_has_one_main_job_and_one_test_command() -> None:
    quick_start = TEXT.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", quick_start, re.S)
    installs = [c for c in commands if "pip install" in c]
    assert installs == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
        ".venv/bin/trio-aggregates load --serve examples/bank.py:app\n",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && "
        ".venv/bin/python -m pytest\n",
    ]
