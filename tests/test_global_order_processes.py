"""The global order across OS processes: writers append while a reader follows.

Several writer processes (``tests/_position_writer.py``) append to one store
at once, each from many tasks, while this process pages through ``read_all``
from the position after the last event it read, as a subscription does. A
store that handed out positions in one order and committed in another would
let the reader pass position P while an event below P was still in flight:
that event would never be read. At the end, the events the reader collected
must be every event of the store, each once, in position order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_aggregates._stores._open_store import open_store
from trio_aggregates._stores._store import RecordedEvent

WRITER = str(Path(__file__).parent / "_position_writer.py")
WRITERS = 4
APPENDS = 400


@pytest.fixture(
    params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    return request.getfixturevalue("postgres_database").url  # type: ignore[no-any-return]


async def test_a_reader_following_several_writer_processes_skips_no_event(
    store_url: str,
) -> None:
    url = store_url
    async with open_store(url) as store:  # creates the schema before the writers start
        await store.append("setup-0", [], expected_version=0)
        procs: list[subprocess.Popen[str]] = []
        try:
            for seed in range(1, WRITERS + 1):
                args = [WRITER, url, "--seed", str(seed), "--appends", str(APPENDS)]
                # Starting a process is quick; its end is polled below.
                proc = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                procs.append(proc)
            seen: list[RecordedEvent] = []
            position = 1
            reads = 0
            with trio.fail_after(240):
                while True:
                    done = all(proc.poll() is not None for proc in procs)
                    page = await store.read_all(position, limit=200)
                    reads += 1
                    if page:
                        seen += page
                        position = page[-1].position + 1
                    elif done:
                        break  # read after every writer had ended: nothing is left
                    else:
                        await trio.sleep(0.001)
            # Every writer has ended: this does not block.
            outputs = [proc.communicate(timeout=30) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        totals = 0
        for proc, (out, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, (out, err)
            assert out.startswith("DONE "), (out, err)
            totals += int(out.split()[1])
        every = await store.read_all(limit=None)
    assert len(every) == totals
    missed = sorted({e.position for e in every} - {e.position for e in seen})
    assert not missed, f"the reader skipped {len(missed)} events, first at {missed[:5]}"
    assert seen == every  # each once, in position order
    assert reads > 20, "the reader should have followed the writers, not read once at the end"
