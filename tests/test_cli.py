"""The command line, run as real subprocesses: serve, call, load, stats; signals; bad targets."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
import trio

from trio_aggregates._wire._cli import SERVE_GC_THRESHOLD, load_app, percentile, tune_gc

ROOT = Path(__file__).resolve().parent.parent
BANK = ROOT / "examples" / "bank.py"
BANK_APP = f"{BANK}:app"
PYTHON = [sys.executable, "-m", "trio_aggregates"]
LISTENING = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)\n")


# -- helpers -------------------------------------------------------------------------------------


async def run(
    *args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m trio_aggregates *args``, bounded in time (killed at the deadline)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*PYTHON, *args],
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *args: str, target: str = BANK_APP, store: str | None = None
) -> AsyncIterator[tuple[trio.Process, int, Path]]:
    """``serve target --port 0`` as a subprocess: yields ``(process, port, its stderr file)``.

    The first stdout line must come within 30 s and be exactly the listening line. The process is
    killed on the way out if it is still running.
    """
    store = store or f"sqlite:///{tmp_path}/served.db"
    errors = tmp_path / f"serve-{os.urandom(4).hex()}.stderr"
    with errors.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [*PYTHON, "serve", target, "--port", "0", "--store", store, *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        first = b""
        with trio.fail_after(30):
            while not first.endswith(b"\n"):
                data = await process.stdout.receive_some(1)
                assert data, (
                    f"serve ended before its first line: {await trio.Path(errors).read_text()}"
                )
                first += data
        match = LISTENING.fullmatch(first.decode())
        assert match is not None, first
        yield process, int(match[1]), errors
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(10):
                await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


async def stop(
    process: trio.Process, signum: int = signal.SIGTERM, errors: Path | None = None
) -> None:
    """Send ``signum`` and check that the server exits 0 within 30 s."""
    process.send_signal(signum)
    with trio.fail_after(30):
        await process.wait()
    log = await trio.Path(errors).read_text() if errors is not None else ""
    assert process.returncode == 0, log
    assert "Traceback" not in log, log


def free_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def shown(done: subprocess.CompletedProcess[bytes]) -> str:
    """What a finished command printed, for an assertion's message."""
    return f"exit {done.returncode}\nstdout: {done.stdout.decode()}\nstderr: {done.stderr.decode()}"


def answer_of(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1, done.stdout
    value: dict[str, Any] = json.loads(lines[0])
    return value


class LineClient:
    """A minimal pipelined NDJSON client for the tests: send lines, read answers by id."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, **fields: Any) -> None:
        await self.stream.send_all(json.dumps(fields).encode() + b"\n")

    async def receive(self) -> dict[str, Any] | None:
        """The next answer, ``None`` at EOF."""
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, **fields: Any) -> dict[str, Any]:
        await self.send(**fields)
        answer = await self.receive()
        assert answer is not None
        return answer


# -- the command itself --------------------------------------------------------------------------


async def test_python_dash_m_help() -> None:
    done = await run("--help")
    assert done.returncode == 0, shown(done)
    out = done.stdout.decode()
    assert "python -m trio_aggregates" in out
    for command in ("serve", "call", "load", "stats"):
        assert command in out


async def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "trio-aggregates"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (not an installed venv)")
    with trio.fail_after(60):
        done = await trio.run_process(
            [str(script), "load", "--help"], capture_stdout=True, check=False
        )
    assert done.returncode == 0, shown(done)
    assert "--serve TARGET" in done.stdout.decode()


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(i) for i in range(1, 101)]
    assert percentile(ordered, 50) == 50.0
    assert percentile(ordered, 90) == 90.0
    assert percentile(ordered, 99) == 99.0
    assert percentile(ordered, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) == 0.0


# -- TARGET --------------------------------------------------------------------------------------


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loading targets edits sys.path and sys.modules: undo it after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("_trio_aggregates_app_", "cli_target_")):
            del sys.modules[name]


@pytest.mark.usefixtures("isolated_imports")
def test_a_file_target_loads_with_its_type_hints() -> None:
    app = load_app(BANK_APP)
    assert [cls.__name__ for cls in app] == ["Account", "User"]
    assert load_app(BANK_APP) is not app  # a fresh list, the same module
    account = next(iter(app))
    # The file's string annotations (from __future__ import annotations) resolve: its module
    # is registered, so the codec decodes a command from JSON data.
    module = sys.modules[account.__module__]
    deposit = account.codec().converter.structure({"amount": 5}, module.Deposit)
    assert deposit == module.Deposit(5, None)
    assert load_app(f"{BANK}:Account") == [account]  # one class is an app of one type


@pytest.mark.usefixtures("isolated_imports")
def test_a_module_target_and_a_mapping_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cli_target_shop.py").write_text(
        textwrap.dedent(
            """
            from __future__ import annotations
            import attrs
            from trio_aggregates import Aggregate, applies, handles

            @attrs.frozen
            class Add:
                n: int

            @attrs.frozen
            class Added:
                n: int

            @attrs.define
            class Cart(Aggregate):
                total: int = 0

                @handles
                def add(self, command: Add) -> Added:
                    return Added(command.n)

                @applies
                def added(self, event: Added) -> None:
                    self.total += event.n

            class Apps:
                by_name = {"basket": Cart}
            """
        )
    )
    monkeypatch.chdir(tmp_path)  # a module target is found from the current directory
    app = load_app("cli_target_shop:Apps.by_name")
    assert isinstance(app, dict)
    assert list(app) == ["basket"]
    assert app["basket"].__name__ == "Cart"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no-colon-here", "is not MODULE:ATTRIBUTE"),
        (":app", "is not MODULE:ATTRIBUTE"),
        (f"{BANK}:", "is not MODULE:ATTRIBUTE"),
        ("missing/file.py:app", "no such file"),
        ("cli_target_no_such_module:app", "no module named 'cli_target_no_such_module'"),
        (f"{BANK}:nope", "has no attribute 'nope'"),
        (f"{BANK}:main", "is not an app (a function)"),
        (f"{BANK}:Deposit", "is not an app"),
        (f"{BANK}:__doc__", "is not an app (a str)"),
    ],
)
@pytest.mark.usefixtures("isolated_imports")
def test_bad_targets_are_clear_errors(target: str, message: str) -> None:
    with pytest.raises(click.BadParameter, match=re.escape(message)):
        load_app(target)


@pytest.mark.usefixtures("isolated_imports")
def test_a_target_that_is_empty_or_raises(tmp_path: Path) -> None:
    module = tmp_path / "cli_target_bad.py"
    module.write_text("empty = []\nmixed = [int]\nraise_it = False\n")
    with pytest.raises(click.BadParameter, match="an empty sequence"):
        load_app(f"{module}:empty")
    with pytest.raises(click.BadParameter, match="is not an Aggregate subclass"):
        load_app(f"{module}:mixed")
    broken = tmp_path / "cli_target_broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(click.ClickException, match="RuntimeError: boom at import"):
        load_app(f"{broken}:app")
    assert not [name for name in sys.modules if "cli_target_broken" in name]


async def test_serve_with_a_bad_target_exits_2(tmp_path: Path) -> None:
    for target, message in [
        (f"{BANK}:nope", "has no attribute 'nope'"),
        (f"{tmp_path}/absent.py:app", "no such file"),
        (f"{BANK}:main", "is not an app"),
    ]:
        done = await run("serve", target, "--port", "0", cwd=tmp_path)
        assert done.returncode == 2, shown(done)
        assert message in done.stderr.decode()
        assert b"Traceback" not in done.stderr
        assert done.stdout == b""
    done = await run("load", "--serve", f"{BANK}:nope", cwd=tmp_path)
    assert done.returncode == 2, shown(done)
    assert "has no attribute 'nope'" in done.stderr.decode()


async def test_serve_that_cannot_start_exits_1_without_a_traceback(tmp_path: Path) -> None:
    done = await run("serve", BANK_APP, "--port", "0", "--store", "bogus://x", cwd=tmp_path)
    assert done.returncode == 1, shown(done)
    assert "cannot serve: unknown event store URL 'bogus://x'" in done.stderr.decode()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = await run("serve", BANK_APP, "--port", port, "--store", "memory://", cwd=tmp_path)
    assert done.returncode == 1, shown(done)
    assert "cannot serve:" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    assert done.stdout == b""
    done = await run("load", "--serve", BANK_APP, "--store", "bogus://x", cwd=tmp_path)
    assert done.returncode == 1, shown(done)
    assert "the server did not start" in done.stderr.decode()


# -- serve and call ------------------------------------------------------------------------------


async def test_serve_prints_its_address_and_serves_call(tmp_path: Path) -> None:
    async with serving(tmp_path) as (process, port, errors):
        where = ("--connect", f"tcp://127.0.0.1:{port}")
        done = await run("call", *where, '{"op": "ping"}')
        assert done.returncode == 0, shown(done)
        assert answer_of(done) == {"id": 1, "ok": True, "result": "pong"}

        done = await run("call", "--port", str(port), '{"id": "x", "op": "ping"}')
        assert answer_of(done)["id"] == "x"

        options = ("--type", "Account", "--key", "acc-1")
        data = '{"owner": "ann"}'
        done = await run(
            "call", *where, "--op", "create", *options, "--command", "OpenAccount", "--data", data
        )
        assert done.returncode == 0, shown(done)
        assert answer_of(done)["version"] == 1
        deposit = ("--command", "Deposit", "--data", '{"amount": 500}', "--command-id", "dep-1")
        for _ in range(2):  # the retry answers the first application
            done = await run("call", *where, *options, *deposit)
            assert done.returncode == 0, shown(done)
            assert answer_of(done)["version"] == 2

        done = await run("call", *where, '{"op": "load", "type": "Account", "key": "acc-1"}')
        assert done.returncode == 0, shown(done)
        assert answer_of(done)["result"]["balance"] == 500

        # An error answer: exit 1, the answer printed as it came.
        withdraw = ("--command", "Withdraw", "--data", '{"amount": 501}')
        done = await run("call", *where, *options, *withdraw)
        assert done.returncode == 1, shown(done)
        answer = answer_of(done)
        assert answer["ok"] is False
        assert answer["error"]["code"] == "rejected"
        assert answer["error"]["reason"] == "InsufficientFunds"
        done = await run("call", *where, '{"type": "Nope", "key": 1, "command": "Deposit"}')
        assert done.returncode == 1, shown(done)
        assert answer_of(done)["error"]["code"] == "unknown_type"

        # A request that is not JSON never leaves: a usage error.
        done = await run("call", *where, "{not json")
        assert done.returncode == 2, shown(done)
        assert "not JSON" in done.stderr.decode()
        assert done.stdout == b""

        done = await run("stats", *where)
        assert done.returncode == 0, shown(done)
        assert "Account" in done.stdout.decode()
        done = await run("stats", *where, "--json")
        assert done.returncode == 0, shown(done)
        assert answer_of(done)["ok"] is True

        await stop(process, errors=errors)


async def test_call_that_cannot_connect_exits_2(tmp_path: Path) -> None:
    port = free_port()
    done = await run("call", "--port", str(port), '{"op": "ping"}', cwd=tmp_path)
    assert done.returncode == 2, shown(done)
    assert done.stdout == b""
    assert f"cannot connect to tcp://127.0.0.1:{port}" in done.stderr.decode()
    done = await run("stats", "--connect", f"tcp://127.0.0.1:{port}", cwd=tmp_path)
    assert done.returncode == 2, shown(done)
    done = await run("load", "--port", str(port), "--requests", "10", cwd=tmp_path)
    assert done.returncode == 2, shown(done)
    assert "cannot connect" in done.stdout.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("load", "--store", "memory://"), "--store is the store of the server --serve starts"),
        (("load", "--requests", "5", "--duration", "1"), "--requests or --duration, not both"),
        (("load", "--serve", BANK_APP, "--connect", "tcp://h:1"), "--serve or --connect"),
        (("load", "--connect", "nowhere"), "is not tcp://HOST:PORT"),
        (("call", '{"op": "ping"}', "--op", "ping"), "REQUEST or the request's options"),
        (("call", "[1]"), "not a JSON object"),
        (("call", "--data", "[1]", "--command", "Deposit"), "not a JSON object"),
    ],
)
async def test_usage_errors_exit_2(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    done = await run(*args, cwd=tmp_path)
    assert done.returncode == 2, shown(done)
    assert message in done.stderr.decode()
    assert done.stdout == b""


async def test_serve_with_a_token(tmp_path: Path) -> None:
    async with serving(tmp_path, "--token", "s3cret") as (process, port, errors):
        where = ("--port", str(port))
        done = await run("call", *where, '{"op": "ping"}')
        assert done.returncode == 1, shown(done)
        assert answer_of(done)["error"]["code"] == "unauthorized"
        done = await run("call", *where, "--token", "wrong", '{"op": "ping"}')
        assert done.returncode == 1, shown(done)
        assert answer_of(done)["error"]["code"] == "unauthorized"
        done = await run("call", *where, "--token", "s3cret", '{"op": "ping"}')
        assert done.returncode == 0, shown(done)
        assert answer_of(done)["result"] == "pong"
        env = {**os.environ, "TRIO_AGGREGATES_TOKEN": "s3cret"}
        done = await run(
            "load", *where, "--scenario", "ping", "--connections", "2", "--requests", "50", env=env
        )
        assert done.returncode == 0, shown(done)
        done = await run("stats", *where, "--token", "s3cret", "--json")
        assert done.returncode == 0, shown(done)
        done = await run("stats", *where)
        assert done.returncode == 1, shown(done)
        await stop(process, errors=errors)
    # load --serve hands its token to the server it starts
    small = ("--connections", "2", "--requests", "40", "--accounts", "4")
    done = await run(
        "load", "--serve", BANK_APP, "--store", "memory://", "--token", "t0k", *small, env=env
    )
    assert done.returncode == 0, shown(done)
    assert "balances add up: 4000 == 4000" in done.stdout.decode()


# -- load ----------------------------------------------------------------------------------------


SMALL = ("--connections", "4", "--depth", "4", "--requests", "400", "--accounts", "10")


@pytest.mark.parametrize("store", ["sqlite", "memory"])
async def test_load_serve_bank_balances_add_up_twice(tmp_path: Path, store: str) -> None:
    url = f"sqlite:///{tmp_path}/bank.db" if store == "sqlite" else "memory://"
    for _ in range(2 if store == "sqlite" else 1):  # a second run on the same store passes too
        done = await run("load", "--serve", BANK_APP, "--store", url, *SMALL, cwd=tmp_path)
        out = done.stdout.decode()
        assert done.returncode == 0, shown(done)
        assert "balances add up: 10000 == 10000" in out
        assert "server stopped on SIGTERM (exit 0)" in out
        for row in ("requests", "throughput", "latency p50", "latency p99", "latency max"):
            assert row in out
    if store == "sqlite":
        assert (tmp_path / "bank.db").exists()
        assert not (tmp_path / "aggregates.db").exists()


async def test_load_serve_defaults_to_sqlite_in_the_current_directory(tmp_path: Path) -> None:
    done = await run("load", "--serve", BANK_APP, *SMALL, cwd=tmp_path)
    assert done.returncode == 0, shown(done)
    assert (tmp_path / "aggregates.db").exists()


CROOKED_BANK = """
from __future__ import annotations
import attrs
from trio_aggregates import Aggregate, applies, handles

@attrs.frozen
class OpenAccount:
    owner: str

@attrs.frozen
class Deposit:
    amount: int
    reference: str | None = None

@attrs.frozen
class Withdraw:
    amount: int
    reference: str | None = None

@attrs.frozen
class Moved:
    amount: int

@attrs.define
class Account(Aggregate):
    balance: int = 0

    @handles
    def open(self, command: OpenAccount) -> Moved:
        return Moved(0)

    @handles
    def deposit(self, command: Deposit) -> Moved:
        return Moved(command.amount + 1)  # a crooked bank: one cent appears per deposit

    @handles
    def withdraw(self, command: Withdraw) -> Moved:
        return Moved(-command.amount)

    @applies
    def moved(self, event: Moved) -> None:
        self.balance += event.amount

app = [Account]
"""


async def test_load_fails_when_the_balances_do_not_add_up(tmp_path: Path) -> None:
    crooked = tmp_path / "crooked.py"
    crooked.write_text(CROOKED_BANK)
    done = await run("load", "--serve", f"{crooked}:app", "--store", "memory://", *SMALL)
    out = done.stdout.decode()
    assert done.returncode == 1, shown(done)
    assert "balances do not add up" in out
    assert "server stopped on SIGTERM (exit 0)" in out


async def test_load_bank_needs_the_bank_app_and_ping_needs_none(tmp_path: Path) -> None:
    other = tmp_path / "other.py"
    other.write_text("from bank import User\napp = {'people': User}\n")
    env = {**os.environ, "PYTHONPATH": str(BANK.parent)}
    done = await run("load", "--serve", f"{other}:app", "--store", "memory://", *SMALL, env=env)
    assert done.returncode == 1, shown(done)
    assert "the bank scenario needs a server with type Account" in done.stdout.decode()
    done = await run(
        "load", "--serve", f"{other}:app", "--store", "memory://", "--scenario", "ping",
        "--connections", "3", "--duration", "0.5", env=env,
    )  # fmt: skip
    assert done.returncode == 0, shown(done)
    assert "ping: 3 connections x depth 1" in done.stdout.decode()


async def test_load_against_a_running_server(tmp_path: Path) -> None:
    async with serving(tmp_path) as (process, port, errors):
        for _ in range(2):
            done = await run("load", "--connect", f"tcp://127.0.0.1:{port}", *SMALL)
            assert done.returncode == 0, shown(done)
            assert "balances add up: 10000 == 10000" in done.stdout.decode()
        await stop(process, errors=errors)


# -- signals with requests in flight -------------------------------------------------------------


@attrs.define
class Acks:
    """Acknowledged requests of every connection; ``enough`` is set at ``threshold``."""

    threshold: int
    count: int = 0
    enough: trio.Event = attrs.Factory(trio.Event)

    def add(self) -> None:
        self.count += 1
        if self.count >= self.threshold:
            self.enough.set()


async def drive_until_closed(
    port: int, key: str, depth: int, log: list[tuple[str, dict[str, Any] | None]], acks: Acks
) -> None:
    """Deposit on ``key`` with ``depth`` requests in flight until the server closes the
    connection; append ``(command_id, answer or None if unanswered)`` to ``log``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = LineClient(stream)
        created = await client.ask(
            id=0, op="execute", create=True, type="Account", key=key,
            command="OpenAccount", data={"owner": key}, command_id=f"{key}-open",
        )  # fmt: skip
        assert created["ok"], created
        sent: dict[int, str] = {}
        room = trio.Semaphore(depth)
        closed = trio.Event()

        async def sender() -> None:
            number = 0
            while not closed.is_set():
                await room.acquire()
                number += 1
                sent[number] = f"{key}-{number}"
                try:
                    await client.send(
                        id=number, type="Account", key=key, command="Deposit",
                        data={"amount": 1, "reference": sent[number]}, command_id=sent[number],
                    )  # fmt: skip
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            try:
                while (answer := await client.receive()) is not None:
                    log.append((sent.pop(answer["id"]), answer))
                    if answer["ok"]:
                        acks.add()
                    room.release()
            except trio.BrokenResourceError:
                pass  # a reset instead of a clean close
            closed.set()
            nursery.cancel_scope.cancel()
        log.extend((cid, None) for cid in sent.values())
        # The server reads a connection in order and answers every line it read: what it left
        # unanswered (unread when it closed) comes after everything it answered.
        answered = [
            int(cid.rsplit("-", 1)[1])
            for cid, answer in log
            if answer and cid.startswith(f"{key}-")
        ]
        if sent and answered:
            assert max(answered) < min(sent), (key, max(answered), sorted(sent)[:5])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_with_requests_in_flight_loses_no_acknowledged_command(
    tmp_path: Path, signum: int
) -> None:
    store = f"sqlite:///{tmp_path}/signal.db"
    keys = [f"acc-{n}" for n in range(4)]
    log: list[tuple[str, dict[str, Any] | None]] = []
    acks = Acks(300)
    async with serving(tmp_path, store=store) as (process, port, errors):
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(drive_until_closed, port, key, 16, log, acks)
                await acks.enough.wait()
                process.send_signal(signum)  # with 4 x 16 requests in flight
                await process.wait()
        log_text = await trio.Path(errors).read_text()
        assert process.returncode == 0, log_text
        assert "Traceback" not in log_text, log_text

    answers = [answer for _, answer in log if answer is not None]
    codes = {answer["error"]["code"] for answer in answers if not answer["ok"]}
    assert codes <= {"shutting_down"}, codes
    acknowledged = {cid: answer["version"] for cid, answer in log if answer and answer["ok"]}
    refused = sum(1 for answer in answers if not answer["ok"])
    print(
        f"{len(acknowledged)} acknowledged, {refused} shutting_down, {len(log) - len(answers)}"
        " unanswered (unread at close)"
    )
    assert len(acknowledged) >= 300

    # Restarted on the same store: every acknowledged deposit is there, at its version, once.
    async with serving(tmp_path, store=store) as (process, port, errors):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            client = LineClient(stream)
            for key in keys:
                history = await client.ask(id=key, op="history", type="Account", key=key)
                assert history["ok"], history
                references = [event["data"].get("reference") for event in history["result"]]
                assert len(references) == len(set(references))  # nothing applied twice
                by_version = {
                    event["version"]: event["data"].get("reference") for event in history["result"]
                }
                for cid, version in acknowledged.items():
                    if cid.startswith(f"{key}-") and cid != f"{key}-open":
                        assert by_version.get(version) == cid
                state = await client.ask(id="s", op="load", type="Account", key=key)
                assert state["result"]["balance"] == len(references) - 1  # the opening has none
        await stop(process, errors=errors)


# -- TLS -----------------------------------------------------------------------------------------


async def test_serve_and_call_over_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    for index, blob in enumerate(issued.cert_chain_pems):
        if index == 0:
            blob.write_to_path(str(cert))
        else:
            blob.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    async with serving(tmp_path, *tls) as (process, port, errors):
        where = ("--port", str(port))
        done = await run("call", *where, "--tls-ca", str(ca_file), '{"op": "ping"}')
        assert done.returncode == 0, shown(done)
        assert answer_of(done)["result"] == "pong"
        # Without TLS, or with TLS but not trusting the server's CA: no answer, exit 2.
        done = await run("call", *where, "--timeout", "10", '{"op": "ping"}')
        assert done.returncode == 2, shown(done)
        done = await run("call", *where, "--tls", '{"op": "ping"}')
        assert done.returncode == 2, shown(done)
        done = await run(
            "load", *where, "--tls-ca", str(ca_file), "--scenario", "ping",
            "--connections", "2", "--requests", "50",
        )  # fmt: skip
        assert done.returncode == 0, shown(done)
        await stop(process, errors=errors)
    done = await run("serve", BANK_APP, "--port", "0", "--tls-cert", str(cert), cwd=tmp_path)
    assert done.returncode == 2, shown(done)
    assert "--tls-cert and --tls-key go together" in done.stderr.decode()


# -- the README's main job -----------------------------------------------------------------------


def test_the_main_job_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = (
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
        ".venv/bin/trio-aggregates load --serve examples/bank.py:app"
    )
    assert f"```sh\n{command}\n```" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert (
        '(cd "$(mktemp -d)" && "$OLDPWD/.venv/bin/trio-aggregates" load --serve '
        '"$OLDPWD/examples/bank.py:app")'
    ) in ci


def test_serve_tunes_the_garbage_collector_once_listening() -> None:
    """``tune_gc`` (what ``serve`` runs once listening) freezes and raises gen 0; 0 does nothing."""
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_gc(0)
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
        tune_gc(SERVE_GC_THRESHOLD)
        assert gc.get_threshold() == (SERVE_GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
