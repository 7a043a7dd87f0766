"""The protocol server, end to end over real TCP on localhost, in process.

Clients here speak the wire protocol by hand (JSON lines on a
:class:`trio.SocketStream`), so the tests pin the format itself, not only the
codec. Slow requests come from a real in-memory store whose appends wait at a
latch (the testing kit's :class:`~trio_aggregates.testing.FaultyStore`), not
from mocks. Timing tests (idle timeout, request timeout, grace period) use
the autojump clock with the in-memory store: the only I/O is loopback TCP
inside this one Trio loop.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import pytest
import trio
import trio.testing
from _examples import bank
from hypothesis import strategies as st

from trio_aggregates import (
    Aggregate,
    CommandRejected,
    Decision,
    InMemoryEventStore,
    InvalidArgument,
    applies,
    handles,
)
from trio_aggregates._wire._server import (
    DEFAULT_PORT,
    AggregateServer,
    ServerStatistics,
    open_aggregate_server,
    serve_aggregates,
)
from trio_aggregates.testing import FaultyStore

Account = bank.Account

# -- a second aggregate type: a counter whose command replies ------------------------


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class Added:
    amount: int


class TooMuch(CommandRejected):
    """The counter would pass its limit."""


@attrs.frozen
class Shout:
    size: int


@attrs.define
class Counter(Aggregate):
    total: int = 0

    @handles
    def add(self, command: Add) -> Decision:
        if self.total + command.amount > 1000:
            raise TooMuch(f"{self.total} + {command.amount} > 1000")
        return Decision([Added(command.amount)], reply={"total": self.total + command.amount})

    @handles
    def shout(self, command: Shout) -> Decision:
        return Decision(reply="x" * command.size)  # a big answer, no event

    @applies
    def added(self, event: Added) -> None:
        self.total += event.amount


APP = [Account, Counter]


# -- a hand-written client -------------------------------------------------------------

TIMEOUT = 10.0


class Client:
    """JSON lines over one connection; answers stashed by id."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""
        self.stash: dict[Any, dict[str, Any]] = {}
        self.next_id = 0

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, *requests: dict[str, Any] | bytes) -> None:
        data = b"".join(
            r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in requests
        )
        await self.stream.send_all(data)

    async def line(self) -> bytes | None:
        """The next line (without its newline), or ``None`` at EOF."""
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    assert self.buffer == b"", f"EOF after a partial line {self.buffer!r}"
                    return None
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    async def receive(self) -> dict[str, Any]:
        line = await self.line()
        assert line is not None, "the server closed the connection"
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    async def answer(self, id: Any) -> dict[str, Any]:
        """The answer to request ``id`` (answers to others are stashed)."""
        while id not in self.stash:
            answer = await self.receive()
            self.stash[answer["id"]] = answer
        return self.stash.pop(id)

    async def call(self, **request: Any) -> dict[str, Any]:
        if "id" not in request:
            self.next_id += 1
            request["id"] = self.next_id
        await self.send(request)
        return await self.answer(request["id"])

    async def ok(self, **request: Any) -> dict[str, Any]:
        answer = await self.call(**request)
        assert answer["ok"] is True, answer
        return answer

    async def error(self, **request: Any) -> dict[str, Any]:
        answer = await self.call(**request)
        assert answer["ok"] is False, answer
        assert set(answer) == {"id", "ok", "error"}
        return answer["error"]  # type: ignore[no-any-return]

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """Whether the server closes the connection (after any answers still coming)."""
        with trio.fail_after(timeout):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def serving(
    store: Any = None, app: Any = None, **options: Any
) -> AsyncIterator[AggregateServer]:
    async with open_aggregate_server(
        APP if app is None else app,
        InMemoryEventStore() if store is None else store,
        port=0,
        **options,
    ) as server:
        yield server


@asynccontextmanager
async def client_of(server: AggregateServer) -> AsyncIterator[Client]:
    client = await Client.connect(server.port)
    try:
        yield client
    finally:
        await client.aclose()


async def until(
    condition: Callable[[], bool], timeout: float = TIMEOUT, every: float = 0.001
) -> None:
    """Wait (boundedly) until ``condition()`` holds."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 (the server's state: no event to wait for)
            await trio.sleep(every)


async def events_in(store: Any, stream: str) -> int:
    return len(await store.read(stream, from_version=1, limit=1000))


# -- the ops ---------------------------------------------------------------------------


async def test_ping_hello_and_the_defaults() -> None:
    assert DEFAULT_PORT == 7411
    async with serving() as server, client_of(server) as client:
        assert server.address == f"tcp://127.0.0.1:{server.port}"
        assert await client.call(id="p", op="ping") == {"id": "p", "ok": True, "result": "pong"}
        hello = await client.ok(op="hello")
        assert "version" not in hello
        result = hello["result"]
        assert result["server"] == "trio-aggregates" and result["protocol"] == 1
        assert isinstance(result["version"], str)
        assert result["types"] == {
            "Account": ["CloseAccount", "Deposit", "GetBalance", "OpenAccount", "Withdraw"],
            "Counter": ["Add", "Shout"],
        }
        # no id: the answer's id is null
        await client.send({"op": "ping"})
        assert await client.receive() == {"id": None, "ok": True, "result": "pong"}


async def test_every_op_on_a_live_server() -> None:
    store = InMemoryEventStore()
    async with serving(store) as server, client_of(server) as c:
        a = await c.ok(op="create", type="Account", key="a", command="OpenAccount",
                       data={"owner": "ann"})  # fmt: skip
        assert (a["version"], a["result"]) == (1, None)
        # op defaults to execute; data is decoded with the aggregate's converter
        d = await c.ok(type="Account", key="a", command="Deposit", data={"amount": 50})
        assert (d["version"], d["result"]) == (2, None)
        # a handler's reply, with the version it was answered at
        b = await c.ok(type="Account", key="a", command="GetBalance")
        assert (b["version"], b["result"]) == (2, 50)
        # a stored command with a reply: both
        n = await c.ok(type="Counter", key=7, command="Add", data={"amount": 3}, create=True)
        assert (n["version"], n["result"]) == (1, {"total": 3})
        # load: the state as JSON; version
        load = await c.ok(op="load", type="Account", key="a")
        assert load["version"] == 2
        assert load["result"] == {"owner": "ann", "balance": 50, "overdraft_limit": 0,
                                  "closed": False}  # fmt: skip
        v = await c.ok(op="version", type="Counter", key="7")  # 7 and "7": one key
        assert (v["version"], v["result"]) == (1, 1)
        # dry run: the current version and the events it would store
        dry = await c.ok(type="Account", key="a", command="Withdraw", data={"amount": 5},
                         dry_run=True)  # fmt: skip
        assert dry["version"] == 2
        assert dry["result"] == [
            {"type": "account.withdrawn", "data": {"amount": 5, "reference": None}}
        ]
        # expected_version
        w = await c.ok(type="Account", key="a", command="Withdraw", data={"amount": 5},
                       expected_version=2, command_id="w-1",
                       metadata={"user": "bob", "correlation_id": "corr"})  # fmt: skip
        assert w["version"] == 3
        # history: every event with its metadata
        h = await c.ok(op="history", type="Account", key="a")
        assert h["version"] == 3
        assert [(e["version"], e["type"]) for e in h["result"]] == [
            (1, "account.opened"),
            (2, "account.deposited"),
            (3, "account.withdrawn"),
        ]
        last = h["result"][-1]
        assert last["data"] == {"amount": 5, "reference": None}
        assert last["metadata"]["user"] == "bob"
        assert last["metadata"]["correlation_id"] == "corr"
        assert last["metadata"]["command_id"] == "w-1"
        assert isinstance(last["recorded_at"], float)
        stats = await c.ok(op="stats")
        assert "version" not in stats
        result = stats["result"]
        assert result["server"]["connections"] == 1
        assert result["server"]["requests"] == 9  # this one is counted once written
        assert set(result["registries"]) == {"Account", "Counter"}
        assert result["registries"]["Account"]["live"] == 1
        assert isinstance(result["store"], dict)
        assert isinstance(server.statistics(), ServerStatistics)
    assert await events_in(store, "Account-a") == 3


async def test_create_if_missing_in_one_request() -> None:
    store = InMemoryEventStore()
    async with serving(store) as server, client_of(server) as c:
        for version in (1, 2, 3):
            answer = await c.ok(type="Counter", key="k", command="Add", data={"amount": 1},
                                create=True)  # fmt: skip
            assert answer["version"] == version
        # without create: not found; with expected_version 0 only if new
        error = await c.error(type="Counter", key="new", command="Add", data={"amount": 1})
        assert error["code"] == "not_found"
        error = await c.error(type="Counter", key="k", command="Add", data={"amount": 1},
                              create=True, expected_version=0)  # fmt: skip
        assert error["code"] == "wrong_expected_version"
    assert await events_in(store, "Counter-k") == 3


async def test_pipelined_requests_are_answered_as_they_finish_by_id() -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-slow")
    async with serving(store) as server, client_of(server) as c:
        await c.send(
            {"id": "slow", "type": "Counter", "key": "slow", "command": "Add",
             "data": {"amount": 1}, "create": True},
            *({"id": i, "type": "Counter", "key": f"k{i}", "command": "Add",
               "data": {"amount": i}, "create": True} for i in range(10)),
        )  # fmt: skip
        first = [await c.receive() for _ in range(10)]
        assert sorted(a["id"] for a in first) == list(range(10))
        assert all(a["ok"] and a["result"] == {"total": a["id"]} for a in first)
        gate.release()
        slow = await c.receive()
        assert slow["id"] == "slow" and slow["ok"] and slow["version"] == 1


async def test_a_lone_answer_larger_than_the_socket_takes_arrives_whole() -> None:
    """With one request in flight, its answer is sent at once by the task that
    gives it; what the socket does not take (an answer larger than any send
    buffer) goes through the sender, whole and before the next answer."""
    async with serving() as server:
        client = await Client.connect(server.port)
        try:
            await client.ok(type="Counter", key="c", command="Add", data={"amount": 1}, create=True)
            for i, size in enumerate((16 << 20, 10, 5 << 20)):
                await client.send(
                    {"id": i, "type": "Counter", "key": "c", "command": "Shout",
                     "data": {"size": size}}
                )  # fmt: skip
                received = bytearray()
                with trio.fail_after(TIMEOUT):
                    while not received.endswith(b"\n"):
                        data = await client.stream.receive_some(1 << 20)
                        assert data, "the server closed the connection"
                        received += data
                answer = json.loads(received)
                assert answer == {"id": i, "ok": True, "version": 1, "result": "x" * size}
            assert (await client.ok(op="ping"))["result"] == "pong"
        finally:
            await client.aclose()


async def test_a_batch_of_answers_larger_than_the_socket_takes_arrives_whole() -> None:
    """Answers given while the reader starts one chunk's requests go out in one
    send; what the socket does not take of the batch is sent after it (the
    shielded path), every answer whole and in the order given."""
    async with serving() as server:
        client = await Client.connect(server.port)
        try:
            await client.ok(type="Counter", key="c", command="Add", data={"amount": 1}, create=True)
            sizes = (8 << 20, 10, 4 << 20)
            lines = [
                json.dumps({"id": i, "type": "Counter", "key": "c", "command": "Shout",
                            "data": {"size": size}}).encode() + b"\n"
                for i, size in enumerate(sizes)
            ]  # fmt: skip
            lines.append(b'{"id": 3, "op": "ping"}\n')
            await client.stream.send_all(b"".join(lines))  # one chunk: one batch of answers
            received = bytearray()
            with trio.fail_after(TIMEOUT):
                while received.count(b"\n") < 4:
                    data = await client.stream.receive_some(1 << 20)
                    assert data, "the server closed the connection"
                    received += data
            answers = [json.loads(line) for line in bytes(received).splitlines()]
            assert answers[:3] == [
                {"id": i, "ok": True, "version": 1, "result": "x" * size}
                for i, size in enumerate(sizes)
            ]
            assert answers[3] == {"id": 3, "ok": True, "result": "pong"}
            assert (await client.ok(op="ping"))["result"] == "pong"
        finally:
            await client.aclose()


# -- exactly once -------------------------------------------------------------------------


async def test_a_retry_after_a_reconnect_gets_the_original_answer() -> None:
    store = InMemoryEventStore()
    async with serving(store) as server:
        request = {"type": "Counter", "key": "c", "command": "Add", "data": {"amount": 5},
                   "create": True, "command_id": "add-1"}  # fmt: skip
        async with client_of(server) as c:
            first = await c.ok(id=1, **request)
            await c.ok(type="Counter", key="c", command="Add", data={"amount": 1})
        async with client_of(server) as c:
            retry = await c.ok(id=1, **request)
        assert retry == first == {"id": 1, "ok": True, "version": 1, "result": {"total": 5}}
        assert server.statistics().replayed == 1
    assert await events_in(store, "Counter-c") == 2


async def test_a_retry_of_a_request_run_at_once_gets_the_original_answer() -> None:
    """A request with a command_id for a live, idle aggregate on the in-memory
    store runs straight from the reader; its answer is kept all the same: a
    retry gets it, result included, and nothing is applied twice."""
    store = InMemoryEventStore()
    async with serving(store) as server:
        request = {"type": "Counter", "key": "c", "command": "Add", "data": {"amount": 5},
                   "command_id": "add-2"}  # fmt: skip
        async with client_of(server) as c:
            await c.ok(type="Counter", key="c", command="Add", data={"amount": 1}, create=True)
            first = await c.ok(id=7, **request)
            await c.ok(type="Counter", key="c", command="Add", data={"amount": 1})
            retry = await c.ok(id=7, **request)
        assert retry == first == {"id": 7, "ok": True, "version": 2, "result": {"total": 6}}
        assert server.statistics().replayed == 1
    assert await events_in(store, "Counter-c") == 3


async def test_a_retry_across_a_server_restart_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    request = {"id": 1, "type": "Counter", "key": "c", "command": "Add", "data": {"amount": 5},
               "create": True, "command_id": "add-1"}  # fmt: skip
    async with open_aggregate_server(APP, url, port=0) as server, client_of(server) as c:
        first = await c.ok(**request)
        assert (first["version"], first["result"]) == (1, {"total": 5})
        await c.ok(type="Counter", key="c", command="Add", data={"amount": 1})
    async with open_aggregate_server(APP, url, port=0) as server, client_of(server) as c:
        retry = await c.ok(**request)
        # the repository's idempotency: the version after the first application
        assert (retry["version"], retry["result"]) == (1, None)
        h = await c.ok(op="history", type="Counter", key="c")
        assert [e["data"]["amount"] for e in h["result"]] == [5, 1]
        store = (await c.ok(op="stats"))["result"]["store"]
        assert store["appends"] >= 0 and "transactions" in store  # the SQLite writer's


@pytest.mark.parametrize("live", [False, True], ids=["activating", "live"])
async def test_identical_requests_in_flight_run_once(live: bool) -> None:
    """Coalescing, whether the first request activates the aggregate or finds it live.

    On a live aggregate the first one takes the fast path (a callback, no
    task); the identical ones wait for its outcome.
    """
    store = FaultyStore()
    request = {"type": "Counter", "key": "c", "command": "Add", "data": {"amount": 5},
               "create": True, "command_id": "same"}  # fmt: skip
    async with serving(store) as server:
        async with client_of(server) as c1, client_of(server) as c2:
            if live:
                await c1.ok(type="Counter", key="c", command="Add", data={"amount": 0},
                            create=True)  # fmt: skip
            gate = store.hold("append", streams="Counter-c")
            await c1.send({"id": "a", **request}, {"id": "b", **request})
            await c2.send({"id": "c", **request})
            await until(lambda: server.statistics().in_flight >= 3)
            await trio.testing.wait_all_tasks_blocked()
            assert gate.waiting == 1  # one append, the others wait for it
            gate.release()
            answers = [await c1.answer("a"), await c1.answer("b"), await c2.answer("c")]
        version = 2 if live else 1
        assert {(a["version"], json.dumps(a["result"])) for a in answers} == {
            (version, '{"total": 5}')
        }
        assert server.statistics().coalesced == 2
    assert await events_in(store, "Counter-c") == version


# -- bad input ---------------------------------------------------------------------------


BAD_LINES: list[tuple[bytes, str, str]] = [
    (b"{not json\n", "bad_request", ""),
    (b"[1, 2]\n", "bad_request", ""),
    (b'"a string"\n', "bad_request", ""),
    (b"\xff\xfe{}\n", "bad_request", ""),
]

BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"op": "dance"}, "bad_request", "op"),
    ({"op": "load", "type": "Nope", "key": "a"}, "unknown_type", "Nope"),
    ({"type": "os", "key": "a", "command": "system", "data": {"command": "rm"}}, "unknown_type",
     "os"),
    ({"type": "Account", "key": "a", "command": "__class__"}, "unknown_command", "__class__"),
    ({"type": "Account", "key": "a", "command": "Explode"}, "unknown_command", "Explode"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {"amount": "x"}},
     "bad_request", "data.amount"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {}}, "bad_request",
     "data.amount"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": [1]}, "bad_request", "data"),
    ({"type": "Account", "key": [1], "command": "Deposit"}, "bad_request", "key"),
    ({"type": "Account", "key": True, "command": "Deposit"}, "bad_request", "key"),
    ({"type": "Account", "command": "Deposit", "data": {"amount": 1}}, "bad_request", "key"),
    ({"key": "a", "command": "Deposit", "data": {"amount": 1}}, "bad_request", "type"),
    ({"type": "Account", "key": "a"}, "bad_request", "command"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {"amount": 1},
      "expected_version": -1}, "bad_request", "expected_version"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {"amount": 1},
      "command_id": ""}, "bad_request", "command_id"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {"amount": 1},
      "metadata": {"at": 1}}, "bad_request", "at"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {"amount": 1},
      "metadata": {"correlation_id": 5}}, "bad_request", "correlation_id"),
    ({"type": "Account", "key": "missing", "command": "Deposit", "data": {"amount": 1}},
     "not_found", "missing"),
    ({"op": "create", "type": "Account", "key": "a", "command": "OpenAccount",
      "data": {"owner": "x"}}, "already_exists", "a"),
    ({"type": "Account", "key": "a", "command": "Withdraw", "data": {"amount": 10**6}},
     "rejected", "balance"),
    ({"type": "Account", "key": "a", "command": "Deposit", "data": {"amount": 1},
      "expected_version": 9}, "wrong_expected_version", "9"),
    ({"op": "load", "type": "Account", "key": "missing"}, "not_found", "missing"),
    ({"op": "history", "type": "Account", "key": "missing"}, "not_found", "missing"),
]  # fmt: skip


async def test_bad_input_is_answered_precisely_and_the_connection_stays_usable() -> None:
    async with serving(max_line_bytes=4096) as server, client_of(server) as c:
        other = await Client.connect(server.port)
        try:
            await c.ok(op="create", type="Account", key="a", command="OpenAccount",
                       data={"owner": "ann"})  # fmt: skip
            for line, code, _ in BAD_LINES:
                await c.send(line)
                answer = await c.receive()
                assert answer["id"] is None and answer["ok"] is False, line
                assert answer["error"]["code"] == code, (line, answer)
                assert (await c.ok(op="ping"))["result"] == "pong"
            for request, code, word in BAD_REQUESTS:
                error = await c.error(**request)
                assert error["code"] == code, (request, error)
                assert word in error["message"], (request, error)
                assert (await c.ok(op="ping"))["result"] == "pong"
            rejected = await c.error(type="Account", key="a", command="Withdraw",
                                     data={"amount": 5})  # fmt: skip
            assert rejected["reason"] == "InsufficientFunds"
            # a field of the wrong type keeps the request's id
            answer = await c.call(id="x", op="load", type="Account", key="a", dry_run="yes")
            assert answer["id"] == "x" and answer["error"]["code"] == "bad_request"
            # too long: one too_large answer, the rest of the line is dropped
            await c.send(b'{"op": "ping", "pad": "' + b"x" * 10_000 + b'"}\n')
            answer = await c.receive()
            assert (answer["id"], answer["error"]["code"]) == (None, "too_large")
            # empty lines and \r\n are fine
            await c.send(b"\n\r\n" + b'{"id": 5, "op": "ping"}\r\n')
            assert (await c.receive())["id"] == 5
            # nothing happened to the account, nor to another connection
            assert (await c.ok(op="version", type="Account", key="a"))["version"] == 1
            assert (await other.ok(op="ping"))["result"] == "pong"
            errors = server.statistics().errors_by_code
            assert errors["unknown_type"] == 2 and errors["too_large"] == 1
        finally:
            await other.aclose()


async def test_a_partial_line_at_eof_is_answered() -> None:
    async with serving() as server, client_of(server) as c:
        await c.send(b'{"id": 1, "op": "ping"}\n{"id": 2, "op"')
        await c.stream.send_eof()  # type: ignore[attr-defined]
        assert (await c.receive())["result"] == "pong"
        answer = await c.receive()
        assert (answer["id"], answer["error"]["code"]) == (None, "bad_request")
        assert await c.line() is None


# -- limits ------------------------------------------------------------------------------


async def test_max_in_flight_stops_reading_the_connection() -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-c")
    async with serving(store, max_in_flight=3) as server, client_of(server) as c:
        await c.send(
            *({"id": i, "type": "Counter", "key": "c", "command": "Add", "data": {"amount": 1},
               "create": True} for i in range(20))
        )  # fmt: skip
        await until(lambda: gate.waiting >= 1)
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().in_flight == 3
        async with client_of(server) as other:  # others are not slowed
            assert (await other.ok(op="ping"))["result"] == "pong"
        gate.release()
        answers = [await c.answer(i) for i in range(20)]
        # requests in flight together run concurrently: in no particular order
        assert sorted(a["version"] for a in answers) == list(range(1, 21))


async def test_max_connections_answers_overloaded_and_closes() -> None:
    async with serving(max_connections=2) as server:
        async with client_of(server) as a, client_of(server) as b:
            await a.ok(op="ping")
            await b.ok(op="ping")
            async with client_of(server) as c:
                answer = await c.receive()
                assert answer["ok"] is False and answer["error"]["code"] == "overloaded"
                assert await c.line() is None
            assert (await a.ok(op="ping"))["result"] == "pong"
        assert server.statistics().refused == 1
        # once below the limit, connections are served again
        await until(lambda: server.statistics().connections == 0)
        async with client_of(server) as d:
            assert (await d.ok(op="ping"))["result"] == "pong"


async def test_idle_connections_are_closed(autojump_clock: trio.testing.MockClock) -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-c")
    async with (
        serving(store, idle_timeout=30, request_timeout=1000) as server,
        client_of(server) as idle,
        client_of(server) as busy,
    ):
        await idle.ok(op="ping")
        start = trio.current_time()
        await busy.send({"id": 1, "type": "Counter", "key": "c", "command": "Add",
                         "data": {"amount": 1}, "create": True})  # fmt: skip
        assert await idle.closed(timeout=60)
        assert 30 <= trio.current_time() - start < 31
        # a request in flight is not idleness
        await trio.sleep(100)
        assert server.statistics().connections == 1
        gate.release()
        assert (await busy.answer(1))["ok"]
        start = trio.current_time()
        assert await busy.closed(timeout=60)
        assert 30 <= trio.current_time() - start < 31


async def test_a_slow_request_is_answered_timeout(autojump_clock: trio.testing.MockClock) -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-c")
    async with serving(store, request_timeout=2) as server, client_of(server) as c:
        start = trio.current_time()
        error = await c.error(type="Counter", key="c", command="Add", data={"amount": 1},
                              create=True)  # fmt: skip
        assert error["code"] == "timeout"
        assert 2 <= trio.current_time() - start < 3
        gate.release()


async def test_a_timed_out_command_retried_with_its_id_is_applied_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-c")
    request = {"type": "Counter", "key": "c", "command": "Add", "data": {"amount": 4},
               "create": True, "command_id": "add-4"}  # fmt: skip
    async with serving(store, request_timeout=2) as server, client_of(server) as c:
        assert (await c.error(**request))["code"] == "timeout"
        gate.release()  # the command was in the aggregate's hands: it completes
        await until(lambda: gate.waiting == 0)
        retry = await c.ok(**request)
        assert retry["version"] == 1
        assert (await c.ok(op="load", type="Counter", key="c"))["result"] == {"total": 4}
    assert await events_in(store, "Counter-c") == 1


async def test_the_block_lets_errors_and_cancellations_through_unwrapped() -> None:
    with pytest.raises(KeyError, match="body"):
        async with serving():
            raise KeyError("body")
    with trio.move_on_after(TIMEOUT) as scope:
        async with serving() as server:
            port = server.port
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    with pytest.raises(OSError):  # shut down: nothing listens any more
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_bad_options_are_refused() -> None:
    for options in (
        {"max_in_flight": 0},
        {"max_connections": 0},
        {"idle_timeout": 0},
        {"request_timeout": -1},
        {"max_line_bytes": 1},
        {"token": ""},
    ):
        with pytest.raises(InvalidArgument):
            async with serving(**options):
                pass  # pragma: no cover
    for app in ([], [int], {"A": Account, "B": Account}, "Account"):
        with pytest.raises(InvalidArgument):
            async with serving(app=app):
                pass  # pragma: no cover


# -- security -------------------------------------------------------------------------


async def test_token_first_line_must_be_hello_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("trio_aggregates._wire._server.hmac.compare_digest", spy)
    async with serving(token="s3cret") as server:
        async with client_of(server) as c:  # no hello
            error = await c.error(op="ping")
            assert error["code"] == "unauthorized"
            assert await c.line() is None
        async with client_of(server) as c:  # a wrong token
            error = await c.error(op="hello", token="guess")
            assert error["code"] == "unauthorized"
            assert await c.line() is None
        async with client_of(server) as c:  # garbage first
            await c.send(b"{nope\n")
            assert (await c.receive())["error"]["code"] == "unauthorized"
            assert await c.line() is None
        async with client_of(server) as c:
            hello = await c.ok(op="hello", token="s3cret")
            assert hello["result"]["server"] == "trio-aggregates"
            assert (await c.ok(op="ping"))["result"] == "pong"
        assert (b"s3cret", b"s3cret") in compared and (b"guess", b"s3cret") in compared


async def test_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with serving(ssl_context=server_context) as server:
        assert server.port > 0
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        tls = trio.SSLStream(tcp, client_context, server_hostname="localhost")
        c = Client(tls)
        try:
            await c.ok(op="create", type="Account", key="t", command="OpenAccount",
                       data={"owner": "tls"})  # fmt: skip
            assert (await c.ok(op="version", type="Account", key="t"))["version"] == 1
        finally:
            await c.aclose()
        # a client speaking plain text gets nowhere, and breaks nothing
        async with client_of(server) as plain:
            await plain.send({"op": "ping"})
            assert await plain.closed()
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        c = Client(trio.SSLStream(tcp, client_context, server_hostname="localhost"))
        try:
            assert (await c.ok(op="ping"))["result"] == "pong"
        finally:
            await c.aclose()


# -- failures and shutdown ------------------------------------------------------------


def _reset(client: Client) -> None:
    """Close the client's socket with a TCP reset (SO_LINGER 0)."""
    sock = client.stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_a_client_resetting_with_requests_in_flight_breaks_nothing() -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-c")
    async with serving(store) as server:
        client = await Client.connect(server.port)
        await client.send(
            *({"id": i, "type": "Counter", "key": "c", "command": "Add", "data": {"amount": 1},
               "create": True, "command_id": f"add-{i}"} for i in range(5))
        )  # fmt: skip
        await until(lambda: gate.waiting >= 1)
        _reset(client)
        await client.aclose()
        async with client_of(server) as other:
            assert (await other.ok(op="ping"))["result"] == "pong"
            gate.release()
            # the requests in flight completed: a retry finds their outcome
            await until(lambda: server.statistics().connections <= 1)
            versions = []
            for i in range(5):
                retry = await other.ok(type="Counter", key="c", command="Add",
                                       data={"amount": 1}, create=True,
                                       command_id=f"add-{i}")  # fmt: skip
                versions.append(retry["version"])
            assert sorted(versions) == [1, 2, 3, 4, 5]
            assert server.statistics().replayed == 5
    assert await events_in(store, "Counter-c") == 5


async def test_a_client_half_closing_then_resetting_breaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FaultyStore()
    gate = store.hold("append", streams="Counter-c")
    async with serving(store) as server:
        client = await Client.connect(server.port)
        await client.send(
            *({"id": i, "type": "Counter", "key": "c", "command": "Add", "data": {"amount": 1},
               "create": True} for i in range(3))
        )  # fmt: skip
        await client.stream.send_eof()  # type: ignore[attr-defined]
        await until(lambda: gate.waiting >= 1)
        _reset(client)
        await client.aclose()
        gate.release()  # the answers go to a reset connection
        await until(lambda: server.statistics().connections == 0)
        async with client_of(server) as other:
            assert (await other.ok(op="version", type="Counter", key="c"))["version"] == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_that_reads_nothing_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(idle_timeout=60, request_timeout=1000) as server:
        client = await Client.connect(server.port)
        sock = client.stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            # Far more answer bytes than the sockets buffer, never read.
            await client.send(
                *({"id": i, "type": "Counter", "key": "c", "command": "Shout",
                   "data": {"size": 1 << 20}, "create": True} for i in range(8))
            )  # fmt: skip
            start = trio.current_time()
            await until(lambda: server.statistics().connections == 0, timeout=120, every=0.25)
            assert 60 <= trio.current_time() - start < 62
            async with client_of(server) as other:
                assert (await other.ok(op="ping"))["result"] == "pong"
        finally:
            await client.aclose()


@pytest.mark.parametrize("live", [False, True], ids=["activating", "live"])
async def test_shutdown_finishes_requests_in_flight_within_the_grace_period(
    autojump_clock: trio.testing.MockClock, live: bool
) -> None:
    """Whether the requests run in tasks (activating) or on the fast path (live)."""
    store = FaultyStore()
    async with trio.open_nursery() as nursery, serving(store, grace_period=5) as server:
        c = await Client.connect(server.port)
        try:
            if live:
                for key in ("stuck", "late"):
                    await c.ok(type="Counter", key=key, command="Add", data={"amount": 0},
                               create=True)  # fmt: skip
            gate = store.hold("append", streams="Counter-stuck")
            await c.send(
                {"id": "stuck", "type": "Counter", "key": "stuck", "command": "Add",
                 "data": {"amount": 1}, "create": True},
            )  # fmt: skip
            await trio.testing.wait_all_tasks_blocked()
            assert gate.waiting == 1
            late_gate = store.hold("append", streams="Counter-late")
            await c.send({"id": "late", "type": "Counter", "key": "late", "command": "Add",
                          "data": {"amount": 1}, "create": True})  # fmt: skip
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
            nursery.start_soon(server.aclose)
            await trio.testing.wait_all_tasks_blocked()
            # a new request is refused at once; new connections too
            answer = await c.call(id="new", op="ping")
            assert answer["error"]["code"] == "shutting_down"
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", server.port)
            # "late" is let through before the grace period ends; "stuck" is not
            await trio.sleep(1)
            late_gate.release()
            late = await c.answer("late")
            assert late["ok"] and late["version"] == (2 if live else 1)
            stuck = await c.answer("stuck")
            assert stuck["error"]["code"] == "shutting_down"
            assert 5 <= trio.current_time() - started < 6
            assert await c.closed()
        finally:
            await c.aclose()
    assert await events_in(store, "Counter-late") == (2 if live else 1)


async def test_serve_aggregates_runs_until_cancelled_then_shuts_down_gracefully() -> None:
    store = FaultyStore()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(serve_aggregates, APP, store, port=0))
        port = listeners[0].socket.getsockname()[1]
        c = await Client.connect(port)
        try:
            gate = store.hold("append", streams="Counter-c")
            await c.send({"id": 1, "type": "Counter", "key": "c", "command": "Add",
                          "data": {"amount": 2}, "create": True})  # fmt: skip
            await until(lambda: gate.waiting >= 1)
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await trio.sleep(0.05)
                gate.release()  # within the grace period: answered
                answer = await c.answer(1)
                assert answer["ok"] and answer["version"] == 1
                assert await c.closed()
        finally:
            with trio.CancelScope(shield=True):
                await c.aclose()
    assert await events_in(store, "Counter-c") == 1


# -- fuzz ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=5), json_values),
        "op": st.sampled_from(["execute", "create", "load", "version", "history", "ping",
                               "stats", "hello", "nope"]) | json_values,
        "type": st.sampled_from(["Account", "Counter", "X"]) | json_values,
        "key": st.sampled_from(["a", "b", 1]) | json_values,
        "command": st.sampled_from(["OpenAccount", "Deposit", "Withdraw", "Add"]) | json_values,
        "data": st.fixed_dictionaries({}, optional={"amount": json_values,
                                                    "owner": json_values}) | json_values,
        "command_id": st.text(max_size=3) | json_values,
        "expected_version": st.integers(-1, 3) | json_values,
        "create": st.booleans() | json_values,
        "dry_run": st.booleans() | json_values,
        "metadata": json_values,
    },
)  # fmt: skip
lines = st.lists(
    st.binary(max_size=50)
    | request_like.map(lambda r: json.dumps(r).encode() + b"\n")
    | json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
    max_size=12,
)


@hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(chunks=lines)
def test_a_live_server_survives_random_input(chunks: list[bytes]) -> None:
    async def main() -> None:
        async with serving(max_line_bytes=256) as server:
            c = await Client.connect(server.port)
            try:
                await c.send(b"".join(chunks) + b'\n{"id": "last", "op": "ping"}\n')
                answer = await c.answer("last")
                assert answer == {"id": "last", "ok": True, "result": "pong"}
                for answer in c.stash.values():
                    assert isinstance(answer["ok"], bool)
                    if not answer["ok"]:
                        assert answer["error"]["code"] != "internal", answer
            finally:
                await c.aclose()
            async with client_of(server) as fresh:
                assert (await fresh.ok(op="ping"))["result"] == "pong"

    trio.run(main)
