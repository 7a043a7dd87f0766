"""The PostgreSQL store's write from the Trio thread (``_pgwire.py``): the binary
parameters it encodes, as the real server reads them, and that the usual batch
takes this path (and falls back to the worker thread when it must)."""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from typing import Any

import psycopg
import pytest
import trio
from conftest import PostgresDatabase

from trio_aggregates._core._exceptions import ConcurrencyConflict, StoreError
from trio_aggregates._stores import _pgwire, _postgres as postgres_module
from trio_aggregates._stores._postgres import open_postgres_store
from trio_aggregates._stores._store import NewEvent

pytestmark = pytest.mark.postgres


def as_json(dsn: str, sql: bytes, value: bytes | None, oid: int) -> Any:
    """The server's reading of ``value`` (binary, of type ``oid``), as JSON."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        result = conn.pgconn.exec_params(sql, [value], [oid], [psycopg.pq.Format.BINARY])
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
        text = result.get_value(0, 0)
        return None if text is None else json.loads(text)


@pytest.mark.parametrize(
    "values",
    [[], ["a"], ["stream-1", "Ünïcødé ✓", "", None, "x" * 5000], [None]],
)
def test_text_arrays_read_back(
    postgres_database: PostgresDatabase, values: list[str | None]
) -> None:
    got = as_json(
        postgres_database.dsn, b"SELECT to_json($1)::text", _pgwire.text_array(values), 1009
    )
    assert got == values


@pytest.mark.parametrize("values", [[], [b""], [b"\x00\xff" * 3, b'{"a": 1}', bytes(range(256))]])
def test_bytea_arrays_read_back(postgres_database: PostgresDatabase, values: list[bytes]) -> None:
    sql = b"SELECT to_json(ARRAY(SELECT encode(x, 'hex') FROM unnest($1::bytea[]) x))::text"
    got = as_json(postgres_database.dsn, sql, _pgwire.bytea_array(values), 1001)
    assert got == [v.hex() for v in values]


def test_integer_arrays_read_back(postgres_database: PostgresDatabase) -> None:
    dsn = postgres_database.dsn
    big = [0, 1, -1, 2**63 - 1, -(2**63), None]
    assert as_json(dsn, b"SELECT to_json($1)::text", _pgwire.int8_array(big), 1016) == big
    small = [0, 7, -(2**31), 2**31 - 1]
    assert as_json(dsn, b"SELECT to_json($1)::text", _pgwire.int4_array(small), 1007) == small
    assert as_json(dsn, b"SELECT to_json($1)::text", _pgwire.int8_array([]), 1016) == []


def test_scalars_read_back(postgres_database: PostgresDatabase) -> None:
    dsn = postgres_database.dsn
    assert as_json(dsn, b"SELECT to_json($1)::text", _pgwire.text("Ü-1"), 25) == "Ü-1"
    assert as_json(dsn, b"SELECT to_json($1)::text", _pgwire.int8(-5), 20) == -5
    assert as_json(dsn, b"SELECT to_json($1)::text", _pgwire.int8(None), 20) is None


def test_values_it_cannot_encode_raise() -> None:
    with pytest.raises(UnicodeEncodeError):
        _pgwire.text_array(["lone \udc80 surrogate"])
    with pytest.raises(struct.error):
        _pgwire.int8_array([2**63])


def test_parse_ints() -> None:
    assert _pgwire.parse_ints(None) is None
    assert _pgwire.parse_ints(b"42") == 42
    assert _pgwire.parse_ints(b"{}") == []
    assert _pgwire.parse_ints(b"{0,-3,NULL,12}") == [0, -3, None, 12]


def ev(n: int) -> NewEvent:
    return NewEvent("Happened", f"event-{n}".encode())


def count_thread_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the batches written by the worker-thread path."""
    calls: list[int] = []
    original = postgres_module._write_batch

    def counted(conn: Any, ops: Any, fencing: Any = None) -> Any:
        calls.append(len(ops))
        return original(conn, ops, fencing)

    monkeypatch.setattr(postgres_module, "_write_batch", counted)
    return calls


async def test_the_usual_batch_is_written_from_the_trio_thread(
    postgres_database: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_postgres_store(postgres_database.dsn) as store:
        await store.append("warm", [ev(0)], expected_version=0)  # a connection in the pool
        calls = count_thread_writes(monkeypatch)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(
                        functools.partial(
                            store.append, f"s-{i % 50}", [ev(i)], expected_version=None
                        )
                    )
            await store.append("one", [ev(1), ev(2)], expected_version=0)  # a lone append
            await store.append("one", [ev(3)], expected_version=2, command_id="c-1")
        assert calls == []
        for i in range(50):
            # (Trio runs the tasks in any order: the two appends in either.)
            assert {e.data for e in await store.read(f"s-{i}")} == {
                f"event-{i}".encode(),
                f"event-{i + 50}".encode(),
            }
        assert [e.version for e in await store.read("one")] == [1, 2, 3]
        assert await store.find_command("one", "c-1") == 3
        with pytest.raises(ConcurrencyConflict):
            await store.append("one", [ev(4)], expected_version=2)
        assert calls == []


async def test_what_it_cannot_send_goes_through_the_worker_thread(
    postgres_database: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value the server refuses (NUL in text) fails its op alone, through the
    worker-thread path that finds the op at fault; the batch's others are written."""
    async with open_postgres_store(postgres_database.dsn) as store:
        await store.append("warm", [ev(0)], expected_version=0)
        calls = count_thread_writes(monkeypatch)
        errors: dict[str, BaseException] = {}

        async def append(stream: str, event: NewEvent) -> None:
            try:
                await store.append(stream, [event], expected_version=0)
            except StoreError as exc:
                errors[stream] = exc

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(append, "ok-1", ev(1))
                nursery.start_soon(append, "bad", NewEvent("Bad\x00Type", b""))
                nursery.start_soon(append, "ok-2", ev(2))
        assert set(errors) == {"bad"}
        assert calls, "the refused batch was not written again in a worker thread"
        assert await store.stream_version("ok-1") == 1
        assert await store.stream_version("ok-2") == 1
        assert await store.stream_version("bad") == 0


async def test_a_connection_killed_between_writes_is_replaced(
    postgres_database: PostgresDatabase,
) -> None:
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as store:
        await store.append("s", [ev(1)], expected_version=0)
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with trio.fail_after(30):
            # The pool notices the dead connection before use (something to
            # read: the server's goodbye), or the write fails with StoreError;
            # either way the next write goes through.
            with contextlib.suppress(StoreError):
                await store.append("s", [ev(2)], expected_version=1)
            version = await store.stream_version("s")
            assert await store.append("s", [ev(3)], expected_version=version) == version + 1


async def test_events_carry_no_foreign_key_check(postgres_database: PostgresDatabase) -> None:
    """Schema version 6 drops the per-event foreign-key trigger (see _postgres.py)."""
    dsn = postgres_database.dsn
    async with open_postgres_store(dsn) as store:
        await store.append("s", [ev(1)], expected_version=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        kinds = conn.execute(
            "SELECT contype FROM pg_constraint"
            " WHERE conrelid = 'trio_aggregates_events'::regclass ORDER BY contype"
        ).fetchall()
    assert sorted(k for (k,) in kinds) == ["c", "p", "u"]  # version check, key, position
