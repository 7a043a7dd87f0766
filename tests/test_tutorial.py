"""The tutorial's and the how-to guides' programs run as written, and print what the pages say.

Every code block of ``docs/tutorial.rst`` and every runnable block of
``docs/howto/*.rst`` is a file under ``docs/`` included into its page; each
one runs here as a subprocess in a fresh directory, twice in a row (a new
user runs a step again; the second run of a program that keeps data must
find the first run's data, not fail on it), and its standard output is
compared with what the page shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Bounds a hang; the slowest program takes about 2 s.
RUN_TIMEOUT = 120

# The counter's outputs (the same on every run: nothing is kept).
COUNTER = ["3", "5", "1", "True 2", "after the block: 0 live"]
STARTUP = [
    "good got 'hello'",
    "declined: aggregate 'tmp-1' declined to start",
    "failed to start: aggregate 'bad' failed to start: ValueError('no such thing')"
    " - cause: ValueError('no such thing')",
    "crashed: RuntimeError('good was asked to crash')",
    "good got 'hello again'",
    "activations=2 crashes=1 declined=1",
]
CANCELLATION = [
    "apples: 1",
    "+5 timed out (the aggregate had already taken it)",
    "+7 cancelled (it was still queued)",
    "apples: 6",
]
BACKPRESSURE = [
    "queued: 2",
    "send_nowait: the mailbox is full (trio.WouldBlock)",
    "+100 timed out waiting for space: it was never queued",
    "apples: 4",
]
IDLE = [
    "apples: 3",
    "apples wound down (passivated=True), saved 3",
    "live: 0",
    "apples: 5",
    "apples wound down (passivated=False), saved 5",
]
ACCOUNT = ["the domain works: replay, decide, reject"]
RETRY = [
    "the deposit timed out: was it stored? the caller cannot tell",
    "the retry answers version 2",
    "alice's balance: 150",
    "events in her stream: 2",
]
RUN_ACCOUNTS_FIRST = [
    "created alice: version 1",
    "deposited 50: version 2",
    "deposited 10 for bob: version 1",
    "rejected: InvalidAmount(-5)",
    "alice's balance: 150",
]
RUN_ACCOUNTS_AGAIN = [
    "alice exists already (an earlier run created her)",
    "deposited 50: version 3",
    "deposited 10 for bob: version 2",
    "rejected: InvalidAmount(-5)",
    "alice's balance: 200",
]

SNAPSHOTS = [
    "version 1: balance 100",
    "snapshot: version 3, schema 1, b'{\"balance\":60}'",
    "version 2: cents 10000",
    "version 2: cents 10110",
    "replay: 10110 cents at version 6",
    "snapshot: version 6, schema 2, b'{\"cents\":10110}'",
]
PROCESSES = [
    "2 processes, 100 deposits each: the balances grew by 200",
    "worker 0 retried all its commands from a new process: grown by 200",
]
SCALE = [
    "10,000 live aggregates",
    re.compile(r"a full collection examined [\d,]+ objects in \d+ ms"),
    re.compile(r"after gc\.freeze\(\): [\d,]+ objects in \d+ ms"),
    "balance of account 7: 2",
]

Expected = list[str | re.Pattern[str]]

#: program -> (its output on the first run, on the second run); a pattern matches a whole line
PROGRAMS: dict[str, tuple[Expected, Expected]] = {
    "tutorial/counter.py": (COUNTER, COUNTER),
    "tutorial/startup.py": (STARTUP, STARTUP),
    "tutorial/cancellation.py": (CANCELLATION, CANCELLATION),
    "tutorial/backpressure.py": (BACKPRESSURE, BACKPRESSURE),
    "tutorial/idle.py": (IDLE, IDLE),
    "tutorial/account.py": (ACCOUNT, ACCOUNT),
    "tutorial/run_accounts.py": (RUN_ACCOUNTS_FIRST, RUN_ACCOUNTS_AGAIN),
    "tutorial/retry.py": (RETRY, RETRY),
    "howto/snapshots.py": (SNAPSHOTS, SNAPSHOTS),
    "howto/processes.py": (PROCESSES, PROCESSES),
    "howto/scale.py": (SCALE, SCALE),
}

#: program -> the file it keeps its data in (its own: no two programs share one)
DATABASES = {"tutorial/run_accounts.py": "tutorial.db", "howto/processes.py": "processes.db"}


def run_program(program: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(DOCS / program)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def matches(lines: list[str], expected: Expected) -> bool:
    if len(lines) != len(expected):
        return False
    for line, want in zip(lines, expected, strict=True):
        if isinstance(want, re.Pattern):
            if want.fullmatch(line) is None:
                return False
        elif line != want:
            return False
    return True


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_runs_twice_and_prints_what_the_page_shows(program: str, tmp_path: Path) -> None:
    for run, expected in enumerate(PROGRAMS[program], start=1):
        done = run_program(program, tmp_path)
        assert done.returncode == 0, f"run {run} of {program} failed:\n{done.stderr}"
        assert matches(done.stdout.splitlines(), expected), (
            f"run {run} of {program}:\n{done.stdout}"
        )
    kept = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert kept == ([DATABASES[program]] if program in DATABASES else [])


#: The pages whose code this file runs (the testing guide's code runs in its own test file).
PAGES = ["tutorial.rst", "howto/snapshots.rst", "howto/processes.rst", "howto/scale.rst"]


def included_programs() -> set[str]:
    """The files that the pages include with ``literalinclude``, relative to ``docs/``."""
    found = set()
    for page in PAGES:
        path = DOCS / page
        for target in re.findall(r"^\.\. literalinclude:: (\S+)$", path.read_text(), re.M):
            included = (path.parent / target).resolve()
            if included.is_relative_to(DOCS) and included.suffix == ".py":
                found.add(included.relative_to(DOCS).as_posix())
    return found


def test_every_included_program_is_run_here() -> None:
    assert included_programs() == set(PROGRAMS)


def test_the_tutorial_has_no_inline_python_blocks() -> None:
    """Code is included from files, so that it is run: no ``::`` block holds Python."""
    text = (DOCS / "tutorial.rst").read_text()
    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", text)
    python = [b for b in blocks if re.search(r"^    (async def|def|import|from|await) ", b, re.M)]
    assert python == []
