"""Instructions per served deposit: a deterministic figure for A/B work on the server.

Wall-clock A/B runs of ``bench_server.py`` on a shared 2-core machine move by
20-40% from one hour to the next; the number of instructions the CPU runs
per request does not (about 1%). This script counts them with callgrind
(``valgrind --tool=callgrind``) over an in-process harness: the protocol
server (``open_aggregate_server`` on ``memory://``, ``examples/bank.py``'s
app) and 20 TCP client connections in the same Trio run, each sending
``ROUNDS`` rounds of 16 pipelined ``Deposit`` requests on 100 accounts and
waiting for their answers. The client is counted too, the same in both
sides of an A/B.

Two runs, ``--rounds`` and a quarter of it (at least 10); their difference
divided by the extra requests leaves out the start-up (imports, account
creation). ``PYTHONHASHSEED=0`` keeps string hashing the same across runs.

Usage (from the project root; valgrind must be installed; about 90 s)::

    .venv/bin/python benchmarks/server_instructions.py
    .venv/bin/python benchmarks/server_instructions.py --checkout /tmp/base  # another tree

``--checkout DIR`` counts the trio_aggregates of another working tree (for
example a ``git worktree`` of the commit to compare with), with this
harness. ``--harness`` runs the harness alone, once, without valgrind, and
prints its requests/s.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 20
DEPTH = 16
ACCOUNTS = 100
DEPOSIT = (
    b'{"id":%d,"op":"execute","type":"Account","key":"acct-%d",'
    b'"command":"Deposit","data":{"amount":1}}\n'
)
OPEN = (
    b'{"id":%d,"op":"create","type":"Account","key":"acct-%d",'
    b'"command":"OpenAccount","data":{"owner":"x"}}\n'
)


async def client(port: int, n: int, rounds: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    rest = b""
    for _ in range(rounds):
        await stream.send_all(b"".join(DEPOSIT % (i, (n * 7 + i) % ACCOUNTS) for i in range(DEPTH)))
        answered = 0
        while answered < DEPTH:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the server closed the connection")
            *lines, rest = (rest + data).split(b"\n")
            for line in lines:
                if b'"ok":true' not in line:
                    raise RuntimeError(f"not an ok answer: {line!r}")
            answered += len(lines)
    await stream.aclose()


async def harness(rounds: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_server import load_bank_app

    from trio_aggregates import open_aggregate_server
    from trio_aggregates._wire._cli import SERVE_GC_THRESHOLD, tune_gc

    app, _ = load_bank_app()
    async with open_aggregate_server(app, "memory://", host="127.0.0.1", port=0) as server:
        setup = await trio.open_tcp_stream("127.0.0.1", server.port)
        await setup.send_all(b"".join(OPEN % (i, i) for i in range(ACCOUNTS)))
        answered = 0
        while answered < ACCOUNTS:
            answered += (await setup.receive_some(65536)).count(b"\n")
        tune_gc(SERVE_GC_THRESHOLD)  # as `trio-aggregates serve` does
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(CONNECTIONS):
                nursery.start_soon(client, server.port, n, rounds)
        elapsed = time.perf_counter() - started
        requests = CONNECTIONS * DEPTH * rounds
        print(f"{requests / elapsed:,.0f} requests/s ({requests:,} requests)", file=sys.stderr)
        await setup.aclose()
        await server.aclose()


def count(checkout: Path, rounds: int) -> int:
    """Instructions of one harness run of ``rounds`` rounds, under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(checkout)}
        done = subprocess.run(
            [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
                sys.executable, __file__, "--harness", "--rounds", str(rounds),
            ],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count in callgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    parser.add_argument("--harness", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.harness:
        trio.run(harness, args.rounds)
        return
    few = max(10, args.rounds // 4)
    if args.rounds <= few:
        parser.error(f"--rounds must be above {few}")
    extra = (args.rounds - few) * CONNECTIONS * DEPTH
    per_request = (count(args.checkout, args.rounds) - count(args.checkout, few)) / extra
    print(f"{args.checkout}: {per_request / 1000:.1f}k instructions per served deposit")


if __name__ == "__main__":
    main()
