"""Idempotent commands across OS processes: two runtimes retry the same command ids.

Two processes (``tests/_retrier.py``), each with its own runtime on one store,
send the same commands with the same ``command_id`` s, each twice, in different
orders and from many tasks at once. Whatever the interleaving, each command is
stored exactly once, and every answer for a command id, in either process, is
the version right after its one application.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_aggregates import open_aggregates

sys.path.insert(0, str(Path(__file__).parent))
from _writer import Open, Tally

RETRIER = str(Path(__file__).parent / "_retrier.py")
KEYS = 10
COMMANDS = 300


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    return request.getfixturevalue("postgres_database").url  # type: ignore[no-any-return]


async def test_two_processes_retrying_the_same_command_ids_apply_each_once(store_url: str) -> None:
    url = store_url
    async with open_aggregates(Tally, url) as tallies:
        for key in range(KEYS):
            await tallies.create(key, Open())

    def run_both() -> list[str]:
        args = [sys.executable, RETRIER, url, "--keys", str(KEYS), "--commands", str(COMMANDS)]
        procs = [
            subprocess.Popen(
                [*args, "--seed", str(seed)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed in (1, 2)
        ]
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
            outputs.append(out)
        return outputs

    outputs = await trio.to_thread.run_sync(run_both)
    answers: dict[str, set[int]] = collections.defaultdict(set)
    for out in outputs:
        lines = out.splitlines()
        assert lines[-1] == "DONE"
        errors = [line for line in lines if line.startswith("ERROR")]
        assert not errors, errors[:5]
        for line in lines[:-1]:
            _, _, command_id, version = line.split(" ")
            answers[command_id].add(int(version))
    assert len(answers) == COMMANDS
    assert all(len(versions) == 1 for versions in answers.values()), "two answers for one id"

    async with open_aggregates(Tally, url) as tallies:
        for key in range(KEYS):
            history = await tallies.history(key)
            ids = collections.Counter(
                e.metadata["command_id"] for e in history if e.metadata["command"] == "Add"
            )
            assert all(n == 3 for n in ids.values()), f"a command applied twice in {key}"
            assert set(ids) == {f"c{i}" for i in range(COMMANDS) if i % KEYS == key}
            for event in history[1:]:
                if event.event.part == event.event.parts - 1:  # its command's last event
                    (answer,) = answers[event.metadata["command_id"]]
                    assert answer == event.version
            state, _ = await tallies.replay(key)
            expected = sum(i + 1 for i in range(COMMANDS) if i % KEYS == key)
            assert state.total == expected
            assert (await tallies.load(key)).total == expected
