"""Projections on the in-memory store, SQLite and the real PostgreSQL.

* A projection caught up (from a checkpoint, then live) equals one built from scratch.
* The checkpoint and the read model commit together: a handler failing mid-batch
  leaves nothing of the batch visible (SQLite, PostgreSQL); in memory the
  documented at-least-once rule holds.
* A failing handler stops its projection only, naming the event's position.
* reset() rebuilds from position 1; a restart continues from the checkpoint.
* A projection process killed with SIGKILL mid-stream, restarted, equals a
  projection built from scratch (a real subprocess: this file run as a script).
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio

from trio_aggregates import (
    Aggregate,
    EventDecodeError,
    EventStore,
    InMemoryEventStore,
    InvalidArgument,
    NewEvent,
    StoreError,
    applies,
    event_type,
    handles,
    open_aggregates,
    open_store,
)
from trio_aggregates._flow._projection import (
    EventContext,
    Projection,
    ProjectionFailed,
    open_projections,
    projects,
    run_projection,
)

# -- a small domain ------------------------------------------------------------


@attrs.frozen
class Add:
    amount: int


@event_type("tally.added")
@attrs.frozen
class Added:
    amount: int


@event_type("tally.noted")
@attrs.frozen
class Noted:
    text: str


@attrs.define
class Tally(Aggregate):
    total: int = 0
    extra_events = (Noted,)

    @handles
    def add(self, command: Add) -> list[object]:
        return [Added(command.amount), Noted(f"+{command.amount}")]

    @applies
    def added(self, event: Added) -> None:
        self.total += event.amount


class Totals(Projection):
    """Per key: the sum of the amounts, and the number of events. In the store's
    database when there is one (through ``ctx.db``), else in this object."""

    reads = (Tally,)
    fail_on: ClassVar[int | None] = None  # an amount that makes the handler raise

    def __init__(self, name: str = "totals", batch_size: int | None = None) -> None:
        self._name = name
        self.table = f"totals_{name}"
        self.memory: dict[str, tuple[int, int]] = {}
        self.positions: list[int] = []
        if batch_size is not None:
            self.batch_size = batch_size  # type: ignore[misc]

    @property
    def flow_name(self) -> str:
        return self._name

    def setup(self, db: Any) -> None:
        if db is not None:
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} "
                "(key TEXT PRIMARY KEY, total BIGINT NOT NULL, events BIGINT NOT NULL)"
            )

    def clear(self, db: Any) -> None:
        self.memory.clear()
        if db is not None:
            db.execute(f"DELETE FROM {self.table}")

    @projects
    def added(self, event: Added, ctx: EventContext) -> None:
        if event.amount == self.fail_on:
            raise RuntimeError(f"cannot project {event.amount}")
        self.positions.append(ctx.position)
        if ctx.db is None:
            total, events = self.memory.get(ctx.key, (0, 0))
            self.memory[ctx.key] = (total + event.amount, events + 1)
        else:
            mark = "?" if isinstance(ctx.db, sqlite3.Connection) else "%s"
            ctx.db.execute(
                f"INSERT INTO {self.table} (key, total, events) VALUES ({mark}, {mark}, 1) "
                f"ON CONFLICT (key) DO UPDATE SET total = {self.table}.total + excluded.total, "
                f"events = {self.table}.events + 1",
                (ctx.key, event.amount),
            )


class Failing(Totals):
    fail_on = 13


# -- stores ----------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/projection.db"
    else:
        yield request.getfixturevalue("postgres_database").url


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/projection.db"
    else:
        yield request.getfixturevalue("postgres_database").url


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[EventStore]:
    async with open_store(url) as store:
        yield store


def _read_model_sync(store: EventStore, table: str) -> dict[str, tuple[int, int]]:
    path = getattr(store, "path", None)
    if path is not None:
        with sqlite3.connect(path) as db:
            rows = db.execute(f"SELECT key, total, events FROM {table}").fetchall()
        return {k: (int(t), int(e)) for k, t, e in rows}
    import psycopg

    conninfo = store.conninfo  # type: ignore[attr-defined]
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(f"SELECT key, total, events FROM {table}").fetchall()
    return {k: (int(t), int(e)) for k, t, e in rows}


async def read_model(store: EventStore, projection: Totals) -> dict[str, tuple[int, int]]:
    if isinstance(store, InMemoryEventStore):
        return dict(projection.memory)
    return await trio.to_thread.run_sync(_read_model_sync, store, projection.table)


def _checkpoint_sync(store: EventStore, name: str) -> int:
    path = getattr(store, "path", None)
    query = "SELECT position FROM trio_aggregates_checkpoints WHERE name = "
    if path is not None:
        with sqlite3.connect(path) as db:
            row = db.execute(query + "?", (name,)).fetchone()
    else:
        import psycopg

        conninfo = store.conninfo  # type: ignore[attr-defined]
        with psycopg.connect(conninfo) as conn:
            row = conn.execute(query + "%s", (name,)).fetchone()
    return 0 if row is None else int(row[0])


async def add_many(store: EventStore, count: int, *, keys: int = 7, start: int = 0) -> None:
    """``count`` Add commands (2 events each) over ``keys`` tallies, amounts 1, 2, ..."""
    async with open_aggregates(Tally, store) as tallies:
        for i in range(start, start + count):
            await tallies.execute(i % keys, Add(i + 1), create_if_missing=True)


def expected(count: int, *, keys: int = 7, skip: int | None = None) -> dict[str, tuple[int, int]]:
    model: dict[str, tuple[int, int]] = {}
    for i in range(count):
        total, events = model.get(str(i % keys), (0, 0))
        model[str(i % keys)] = (total + i + 1, events + 1)
    return model


async def wait_for(predicate: Any, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (polling statistics, bounded)
            await trio.sleep(0.005)


# -- tests -------------------------------------------------------------------------


async def test_projection_catches_up_then_follows_live_and_equals_a_rebuild(
    store_url: str,
) -> None:
    async with opened(store_url) as store:
        await add_many(store, 60)  # before: the catch-up
        live = Totals("live", batch_size=16)
        async with open_projections(store, [live], poll_interval=0.05) as runner:
            stats = runner.statistics()["live"]
            assert stats.state == "running"
            assert stats.durable is (store_url != "memory://")
            await add_many(store, 40, start=60)  # while running: live
            head = await store.head_position()
            with trio.fail_after(20):
                await runner.wait_caught_up(head)
            stats = runner.statistics()["live"]
            assert stats.position == head - 1  # the last Added (a Noted follows it)
            assert stats.head_position == head
            assert stats.lag_positions == 0 and stats.lag_seconds == 0
            assert stats.events_handled == 100
            assert stats.error is None
        assert runner.statistics()["live"].state == "stopped"
        assert await read_model(store, live) == expected(100)
        # Positions strictly increase: in order, no event twice.
        assert live.positions == sorted(set(live.positions))
        # From scratch, in one catch-up: the same read model.
        scratch = Totals("scratch")
        async with open_projections(store, [scratch]) as runner:
            await runner.wait_caught_up()
        assert await read_model(store, scratch) == await read_model(store, live)


async def test_statistics_show_the_lag(durable_url: str) -> None:
    """A projection held at a batch (its handler waits, in its worker thread) lags."""
    gate = threading.Event()

    class Gated(Totals):
        @projects
        def added(self, event: Added, ctx: EventContext) -> None:
            if ctx.position > 20:
                gate.wait(30)
            Totals.added(self, event, ctx)

    async with opened(durable_url) as store:
        await add_many(store, 30)
        head = await store.head_position()
        gated = Gated("gated", batch_size=5)
        try:
            async with trio.open_nursery() as nursery:
                running = await nursery.start(run_projection, store, gated)
                await wait_for(lambda: running.statistics().position >= 19)
                stats = running.statistics()
                assert stats.state == "running"
                assert (stats.position, stats.head_position) == (19, head)
                assert stats.lag_positions == head - 19
                assert stats.lag_seconds > 0
                gate.set()
                await wait_for(lambda: running.statistics().lag_positions == 0)
                stats = running.statistics()
                assert stats.position == head - 1  # the last Added (a Noted follows)
                assert stats.lag_positions == 0 and stats.lag_seconds == 0
                assert stats.events_handled == 30
                nursery.cancel_scope.cancel()
        finally:
            gate.set()
        assert running.statistics().state == "stopped"


async def test_a_failing_handler_stops_its_projection_only(store_url: str) -> None:
    async with opened(store_url) as store:
        await add_many(store, 30)  # amounts 1..30: 13 fails
        good, bad = Totals("good"), Failing("bad", batch_size=4)
        async with open_projections(store, [good, bad], poll_interval=0.05) as runner:
            await wait_for(lambda: runner.statistics()["bad"].state == "failed")
            await add_many(store, 5, start=30)  # the good one goes on, live
            await runner.wait_caught_up(await store.head_position())
            stats = runner.statistics()
            assert stats["good"].state == "running"
            assert stats["good"].position == await store.head_position() - 1
            assert stats["good"].lag_positions == 0
            error = stats["bad"].error
            assert isinstance(error, ProjectionFailed)
            # Add(13) is the 13th command: its Added is event 25 of the store.
            assert error.position == 25 and error.name == "bad"
            assert error.stream == "Tally-5" and error.event_type == "tally.added"
            assert "position 25" in str(error)
            assert isinstance(error.__cause__, RuntimeError)
            assert stats["bad"].lag_positions > 0
        assert await read_model(store, good) == expected(35)


async def test_two_runners_of_one_projection_apply_each_event_once(durable_url: str) -> None:
    """Two runners of one name on one database (as two processes would be, each
    with its own store and connection): the checkpoint is compared and set in the
    batch's transaction, so every event is applied once, whichever runner wins."""
    async with opened(durable_url) as store, opened(durable_url) as other:
        await add_many(store, 40)
        first, second = Totals("shared", batch_size=3), Totals("shared", batch_size=5)
        async with (
            open_projections(store, [first], poll_interval=0.05) as one,
            open_projections(other, [second], poll_interval=0.05) as two,
        ):
            await add_many(store, 40, start=40)  # live, while both run
            head = await store.head_position()
            await one.wait_caught_up(head)
            await two.wait_caught_up(head)
            handled = (
                one.statistics()["shared"].events_handled
                + two.statistics()["shared"].events_handled
            )
        assert await read_model(store, first) == expected(80)
        assert handled == 80
        assert await trio.to_thread.run_sync(_checkpoint_sync, store, "shared") == head - 1


class Sleepy(Totals):
    """On PostgreSQL, the handler of amount 3 runs a statement of 30 s."""

    @projects
    def added(self, event: Added, ctx: EventContext) -> None:
        if event.amount == 3:
            ctx.db.execute("SELECT pg_sleep(30)")
        super().added(event, ctx)


async def test_a_projection_statement_is_bounded_by_the_store_timeout(
    postgres_database: Any,
) -> None:
    """The runner's own PostgreSQL connection gets the store's statement_timeout
    (nine tenths of ``timeout``): a stuck statement fails the projection, it does
    not hold it for ever."""
    async with opened(f"{postgres_database.url}&timeout=1") as store:
        await add_many(store, 5)
        sleepy = Sleepy("sleepy", batch_size=1)
        async with open_projections(store, [sleepy]) as runner:
            await wait_for(lambda: runner.statistics()["sleepy"].state == "failed", 15)
            error = runner.statistics()["sleepy"].error
            assert isinstance(error, ProjectionFailed) and error.position == 5, error
            assert "statement timeout" in repr(error.__cause__), repr(error.__cause__)


async def test_a_failed_batch_leaves_nothing_of_it_visible(durable_url: str) -> None:
    """The checkpoint and the read model are one transaction: the failing batch
    (the Added events of Add(9)..Add(16), the failing Add(13) in its middle) is
    rolled back whole. (The projection reads only the Added events: a batch of 8
    is 8 of them.)"""
    async with opened(durable_url) as store:
        await add_many(store, 30)
        bad = Failing("atomic", batch_size=8)
        async with open_projections(store, [bad]) as runner:
            await wait_for(lambda: runner.statistics()["atomic"].state == "failed")
            assert runner.statistics()["atomic"].position == 15
        # Add(1)..Add(8) (Added at positions 1, 3, ..., 15): visible. Add(9)..Add(12):
        # their handlers ran, then the batch rolled back.
        assert await trio.to_thread.run_sync(_checkpoint_sync, store, "atomic") == 15
        assert await read_model(store, bad) == expected(8)
        assert max(bad.positions) == 23


async def test_a_failing_sql_statement_names_its_event(durable_url: str) -> None:
    """On PostgreSQL a batch's statements are pipelined, so a server error surfaces
    late: the failure still names the event whose statement failed."""

    class BadSql(Totals):
        @projects
        def added(self, event: Added, ctx: EventContext) -> None:
            if event.amount == 13:
                ctx.db.execute("INSERT INTO no_such_table VALUES (1)")
            Totals.added(self, event, ctx)

    async with opened(durable_url) as store:
        await add_many(store, 30)
        bad = BadSql("bad_sql", batch_size=8)
        async with open_projections(store, [bad]) as runner:
            await wait_for(lambda: runner.statistics()["bad_sql"].state == "failed")
            error = runner.statistics()["bad_sql"].error
            assert isinstance(error, ProjectionFailed) and error.position == 25, error
            assert runner.statistics()["bad_sql"].position == 15
        assert await read_model(store, bad) == expected(8)


async def test_in_memory_a_failure_keeps_what_was_applied() -> None:
    """At least once in memory: the events before the failing one stay applied and
    are the checkpoint; handlers keep positions to skip a redelivery."""
    store = InMemoryEventStore()
    await add_many(store, 30)
    bad = Failing("memory", batch_size=8)
    async with open_projections(store, [bad]) as runner:
        await wait_for(lambda: runner.statistics()["memory"].state == "failed")
        assert runner.statistics()["memory"].position == 23
    assert await read_model(store, bad) == expected(12)


async def test_reset_rebuilds_from_position_1(store_url: str) -> None:
    async with opened(store_url) as store:
        await add_many(store, 30)
        bad = Failing("resettable", batch_size=8)
        async with open_projections(store, [bad], poll_interval=0.05) as runner:
            await wait_for(lambda: runner.statistics()["resettable"].state == "failed")
            bad.fail_on = None  # type: ignore[misc]  # fixed: reset, rebuild
            bad.positions.clear()
            await runner.reset("resettable")
            await runner.wait_caught_up(await store.head_position())
            stats = runner.statistics()["resettable"]
            assert stats.state == "running" and stats.error is None
            assert await read_model(store, bad) == expected(30)
            assert bad.positions[0] == 1  # from the start
            # A reset of a healthy projection: the same read model again.
            bad.positions.clear()
            await runner.reset("resettable")
            await runner.wait_caught_up(await store.head_position())
            assert bad.positions[0] == 1 and len(bad.positions) == 30
            assert await read_model(store, bad) == expected(30)


async def test_restart_goes_on_from_the_checkpoint_after_a_failure(store_url: str) -> None:
    async with opened(store_url) as store:
        await add_many(store, 30)
        bad = Failing("restarted", batch_size=8)
        async with open_projections(store, [bad]) as runner:
            await wait_for(lambda: runner.statistics()["restarted"].state == "failed")
            checkpoint = runner.statistics()["restarted"].position
            bad.fail_on = None  # type: ignore[misc]  # the cause is gone
            bad.positions.clear()
            await runner.restart("restarted")
            await runner.wait_caught_up()
            stats = runner.statistics()["restarted"]
            assert stats.state == "running" and stats.error is None
        # From the checkpoint on, not from the start; each event applied once.
        assert bad.positions[0] == checkpoint + 2 == (17 if store_url != "memory://" else 25)
        assert await read_model(store, bad) == expected(30)


async def test_a_restart_continues_from_the_checkpoint(durable_url: str) -> None:
    async with opened(durable_url) as store:
        await add_many(store, 20)
        first = Totals("restartable")
        async with open_projections(store, [first]) as runner:
            await runner.wait_caught_up()
        await add_many(store, 10, start=20)
        second = Totals("restartable")  # a new object: the checkpoint is in the store
        async with open_projections(store, [second]) as runner:
            await runner.wait_caught_up()
            assert runner.statistics()["restartable"].events_handled == 10
        assert second.positions[0] == 41
        assert await read_model(store, second) == expected(30)


async def test_events_the_projection_does_not_read_are_skipped() -> None:
    store = InMemoryEventStore()
    await store.append("Other-1", [NewEvent("tally.added", b'{"amount": 5}')], expected_version=0)
    await add_many(store, 3)

    class TallyOnly(Totals):
        categories = ("Tally",)

    projection = TallyOnly("only")
    async with open_projections(store, [projection]) as runner:
        await runner.wait_caught_up()
        assert runner.statistics()["only"].events_handled == 3
        assert runner.statistics()["only"].lag_positions == 0
    assert projection.memory == expected(3)


async def test_an_event_that_does_not_decode_fails_the_projection_at_its_position() -> None:
    store = InMemoryEventStore()
    await add_many(store, 2)
    await store.append("Tally-9", [NewEvent("tally.added", b"{not json")], expected_version=0)
    await add_many(store, 2, start=2)
    projection = Totals("corrupt")
    async with open_projections(store, [projection]) as runner:
        await wait_for(lambda: runner.statistics()["corrupt"].state == "failed")
        error = runner.statistics()["corrupt"].error
        assert isinstance(error, ProjectionFailed)
        assert (error.position, error.stream, error.version) == (5, "Tally-9", 1)
        assert isinstance(error.__cause__, EventDecodeError)
        assert runner.statistics()["corrupt"].position == 3
    assert projection.memory == expected(2)


async def test_handlers_by_explicit_classes_and_base_classes() -> None:
    store = InMemoryEventStore()
    await add_many(store, 3)
    seen: list[str] = []

    class Both(Projection):
        reads = (Tally,)
        checkpoint_in_store = False

        @projects(Added, Noted)
        def any_event(self, event: object) -> None:
            seen.append(type(event).__name__)

    async with open_projections(store, [Both()]) as runner:
        await runner.wait_caught_up()
    assert seen == ["Added", "Noted"] * 3


async def test_a_read_model_in_memory_on_a_durable_store_rebuilds_at_each_start(
    tmp_path: Path,
) -> None:
    class InMemory(Totals):
        checkpoint_in_store = False

    async with opened(f"sqlite:///{tmp_path}/m.db") as store:
        await add_many(store, 5)
        for _ in range(2):
            projection = InMemory("in-memory")
            async with open_projections(store, [projection]) as runner:
                await runner.wait_caught_up()
            assert projection.memory == expected(5)  # ctx.db is None: in the object


async def test_store_errors_while_reading_are_retried() -> None:
    class Flaky(InMemoryEventStore):
        failures = 3

        async def read_all(self, *args: Any, **kwargs: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise StoreError("the database is away")
            return await super().read_all(*args, **kwargs)

    store = Flaky()
    await add_many(store, 4)
    projection = Totals("retrying")
    async with open_projections(store, [projection], poll_interval=0.01) as runner:
        await runner.wait_caught_up()
        assert runner.statistics()["retrying"].error is None
    assert store.failures == 0 and projection.memory == expected(4)


async def test_a_batch_that_could_not_be_written_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_aggregates._flow import _projection

    failures = [StoreError("database is locked"), StoreError("connection lost")]
    apply = _projection._MemoryCheckpoints.apply

    async def flaky_apply(self: Any, flow: Any, records: Any) -> Any:
        if failures:
            raise failures.pop()  # before anything is applied, as a rollback
        return await apply(self, flow, records)

    monkeypatch.setattr(_projection._MemoryCheckpoints, "apply", flaky_apply)
    store = InMemoryEventStore()
    await add_many(store, 6)
    projection = Totals("rewritten")
    async with open_projections(store, [projection], poll_interval=0.01) as runner:
        await runner.wait_caught_up()
        stats = runner.statistics()["rewritten"]
        assert stats.state == "running" and stats.error is None
    assert not failures and projection.memory == expected(6)


async def test_bad_arguments_and_the_body_s_exception() -> None:
    store = InMemoryEventStore()
    with pytest.raises(InvalidArgument):
        async with open_projections(store, [Totals("twin"), Totals("twin")]):
            pass
    with pytest.raises(InvalidArgument):
        async with open_projections(store, [object()]):  # type: ignore[list-item]
            pass
    with pytest.raises(InvalidArgument):
        async with open_projections(store, [], poll_interval=0):
            pass
    # The body's exception comes out as itself, not in an exception group.
    with pytest.raises(KeyError):
        async with open_projections(store, [Totals("body")]):
            raise KeyError("mine")


# -- SIGKILL mid-stream -----------------------------------------------------------

HERE = Path(__file__)


async def test_a_projection_killed_mid_stream_and_restarted_equals_a_rebuild(
    durable_url: str,
) -> None:
    count = 3000
    async with opened(durable_url) as store:
        async with open_aggregates(Tally, store) as tallies, trio.open_nursery() as nursery:

            async def writer(task: int) -> None:
                for i in range(task, count, 20):
                    await tallies.execute(i % 7, Add(i + 1), create_if_missing=True)

            for task in range(20):
                nursery.start_soon(writer, task)
        head = await store.head_position()
        process = await trio.lowlevel.open_process(
            [sys.executable, str(HERE), "--project", durable_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            with trio.fail_after(60):
                # Kill once a few batches are in, well before the end.
                while (
                    position := await trio.to_thread.run_sync(
                        _checkpoint_sync_safe, store, "killed"
                    )
                ) < 400:
                    assert process.poll() is None, "the projector ended before it was killed"
                    await trio.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == -signal.SIGKILL
        assert position < head, "the projection was not killed mid-stream"
        # Restart where it stopped, and build another from scratch.
        restarted, scratch = Totals("killed", batch_size=7), Totals("scratch")
        async with open_projections(store, [restarted, scratch]) as runner:
            await runner.wait_caught_up(head)
        assert restarted.positions[0] > position  # it did continue, not start again
        assert await read_model(store, restarted) == await read_model(store, scratch)
        assert await read_model(store, scratch) == expected(count)


def _checkpoint_sync_safe(store: EventStore, name: str) -> int:
    try:
        return _checkpoint_sync(store, name)
    except Exception:  # the table does not exist yet
        return 0


class Slow(Totals):
    @projects
    def added(self, event: Added, ctx: EventContext) -> None:
        time.sleep(0.001)  # so that the parent kills it mid-stream
        Totals.added(self, event, ctx)


async def _project_forever(url: str) -> None:
    async with open_store(url) as store:
        projection = Slow("killed", batch_size=7)
        async with open_projections(store, [projection]):
            await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True, help="store URL: run the projection")
    trio.run(_project_forever, parser.parse_args().project)
