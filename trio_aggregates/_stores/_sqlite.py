"""The SQLite event store.

:class:`SQLiteEventStore` keeps streams in one SQLite file, through the
standard library's :mod:`sqlite3` driven from worker threads
(:func:`trio.to_thread.run_sync`). The file is in WAL mode with
``synchronous=FULL``: an append that returned is on disk.

The store is a durable store core (``_durable.py``): the shell it shares with
the PostgreSQL store (group commit, statistics, closing, the write calls)
lives there; this module holds the SQL, the connections and the migrations.

Writes (appends, snapshots, deletes) go through a single writer path with
*group commit* (see ``_groupcommit.py``): the writes that arrive while a
transaction is being written queue up, and the next transaction (``BEGIN
IMMEDIATE``) writes all of them, so many tasks appending at once pay for one
``fsync`` per batch instead of one each. Within the transaction:

* a batch of one write runs its statements directly, without a savepoint
  (a failure rolls the whole transaction back);
* a run of appends and snapshots is written *set-based*: one query reads the
  id, state and current version of every stream it touches, each append's
  expected version is checked in Python against the stream's running version
  (two appends to one stream in a batch chain), and one ``executemany``
  inserts every accepted event (another upserts the snapshots). A conflicting
  append (:exc:`ConcurrencyConflict`) or one to a hard-deleted stream
  (:exc:`StreamDeleted`) fails alone, without touching the database, while
  the others commit. The run sits in one ``SAVEPOINT``: if it raises anyway (a
  driver error such as an unbindable value, or the ``UNIQUE (stream_id,
  version)`` backstop), it is rolled back and written again one savepoint per
  write, so that only the writes at fault fail;
* deletes always take that one-savepoint-per-write path.

An append with a ``command_id`` first looks the id up on its stream's row
(and among the ids the run records before it), then inserts it into
``commands`` with the events: only such appends pay for it. The primary key
is the backstop against two writers racing.

The writer connection keeps its statement and savepoint journals in memory
(``temp_store = MEMORY``). Reads go through separate read connections, in
parallel worker threads.

Schema (``PRAGMA user_version`` holds its version; migrations are idempotent
and run in one ``BEGIN IMMEDIATE`` transaction, so two processes opening the
same new file at once are safe)::

    streams(id INTEGER PRIMARY KEY, name TEXT, state INTEGER)  -- 0 live, 1 deleted, 2 tombstone
        UNIQUE (name) WHERE state <> 1   -- one live stream (or tombstone) per name
    events(position INTEGER PRIMARY KEY, stream_id, version, type, data, metadata, recorded_at)
        UNIQUE (stream_id, version)
    snapshots(stream_id PRIMARY KEY, version, schema, type, data)
    commands(stream_id, command_id, version)   -- version 2
        PRIMARY KEY (stream_id, command_id)    -- the version right after that append
    -- version 3: events rebuilt with position INTEGER PRIMARY KEY AUTOINCREMENT

A soft delete marks the stream row deleted: its events stay, attached to the
old row, and the name gets a fresh row (from version 0) at its next write. A
hard delete erases the events, the snapshot and the command ids and turns the row into a
tombstone.

The global order is ``events.position`` (the rowid). There is one writer at a
time (``BEGIN IMMEDIATE``, in this process and in any other), so positions are
given in commit order: a reader never finds a new event below one it has
seen. Since version 3 the column is ``AUTOINCREMENT``: a position is never
given twice, not even after a hard delete erased the highest ones (a plain
rowid would be the highest left + 1). ``read_all`` scans ``events``
by position and joins each event's stream for its name (its category is the
part before the first ``"-"``) and state (deleted streams are left out).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from os import PathLike
from typing import Any, ClassVar, Final, cast, final

import attrs
import outcome
import trio

from .._core._exceptions import (
    ConcurrencyConflict,
    DuplicateCommand,
    EventDecodeError,
    InvalidArgument,
    StoreError,
    StreamDeleted,
)
from .._core._options import check_count, check_seconds
from ._durable import (
    _LIVE,
    _TOMBSTONE,
    _Append,
    _check_name,
    _Delete,
    _describe,
    _DurableStore,
    _SaveSnapshot,
    _split_runs,
    _wrap_error,
    _WriteOp,
)
from ._groupcommit import _BatchResult
from ._store import (
    RecordedEvent,
    Snapshot,
    _check_command_id,
    _check_read_all,
    _checked,
    _checked_records,
)

__all__ = ["SQLiteEventStore", "open_sqlite_store"]

logger = logging.getLogger("trio_aggregates.sqlite")

_MIGRATIONS: list[tuple[str, ...]] = [
    # version 1
    (
        """
        CREATE TABLE streams (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            state INTEGER NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2))
        )
        """,
        "CREATE UNIQUE INDEX streams_name ON streams (name) WHERE state <> 1",
        """
        CREATE TABLE events (
            position INTEGER PRIMARY KEY,
            stream_id INTEGER NOT NULL REFERENCES streams (id),
            version INTEGER NOT NULL CHECK (version >= 1),
            type TEXT NOT NULL,
            data BLOB NOT NULL,
            metadata BLOB NOT NULL,
            recorded_at REAL NOT NULL,
            UNIQUE (stream_id, version)
        )
        """,
        """
        CREATE TABLE snapshots (
            stream_id INTEGER PRIMARY KEY REFERENCES streams (id),
            version INTEGER NOT NULL,
            schema INTEGER NOT NULL,
            type TEXT NOT NULL,
            data BLOB NOT NULL
        )
        """,
    ),
    # version 2: command ids (idempotent appends)
    (
        """
        CREATE TABLE commands (
            stream_id INTEGER NOT NULL REFERENCES streams (id),
            command_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (stream_id, command_id)
        ) WITHOUT ROWID
        """,
    ),
    # version 3: positions are never given twice (the global order): the
    # events table rebuilt with AUTOINCREMENT (SQLite cannot alter a key), its
    # rows copied as they are. (Measured: no cost to appends.)
    (
        """
        CREATE TABLE events_v3 (
            position INTEGER PRIMARY KEY AUTOINCREMENT,
            stream_id INTEGER NOT NULL REFERENCES streams (id),
            version INTEGER NOT NULL CHECK (version >= 1),
            type TEXT NOT NULL,
            data BLOB NOT NULL,
            metadata BLOB NOT NULL,
            recorded_at REAL NOT NULL,
            UNIQUE (stream_id, version)
        )
        """,
        "INSERT INTO events_v3 SELECT position, stream_id, version, type, data, metadata, "
        "recorded_at FROM events ORDER BY position",
        "DROP TABLE events",
        "ALTER TABLE events_v3 RENAME TO events",
    ),
]
SCHEMA_VERSION = len(_MIGRATIONS)


def _wrap(exc: BaseException, action: str) -> StoreError:
    return _wrap_error("SQLite", exc, action)


# Errors of sqlite3 itself, and of text it cannot encode (lone surrogates).
_DRIVER_ERRORS = (sqlite3.Error, UnicodeError, OverflowError)


@attrs.define(eq=False)
class _Connection:
    """A sqlite3 connection and the lock that gives one thread at a time its use."""

    db: sqlite3.Connection
    lock: threading.Lock = attrs.Factory(threading.Lock)


def _connect(target: str, *, uri: bool, busy_timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(
        target, uri=uri, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection) -> None:
    (current,) = db.execute("PRAGMA user_version").fetchone()
    if current >= SCHEMA_VERSION:
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database's schema version {current} is newer than this library's "
                f"({SCHEMA_VERSION})"
            )
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read again inside the write lock: another process may have migrated.
        (current,) = db.execute("PRAGMA user_version").fetchone()
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


# Write operations, run by the writer thread (see the module docstring).


def _find_stream(db: sqlite3.Connection, stream: str) -> tuple[int, int] | None:
    row: tuple[int, int] | None = db.execute(
        "SELECT id, state FROM streams WHERE name = ? AND state <> 1", (stream,)
    ).fetchone()
    return row


def _live_stream_id(db: sqlite3.Connection, stream: str, *, create: bool) -> int | None:
    row = _find_stream(db, stream)
    if row is None:
        if not create:
            return None
        cursor = db.execute("INSERT INTO streams (name, state) VALUES (?, 0)", (stream,))
        assert cursor.lastrowid is not None
        return cursor.lastrowid
    stream_id, state = row
    if state == _TOMBSTONE:
        raise StreamDeleted(stream)
    return stream_id


def _version_of(db: sqlite3.Connection, stream_id: int | None) -> int:
    if stream_id is None:
        return 0
    (version,) = db.execute(
        "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = ?", (stream_id,)
    ).fetchone()
    return int(version)


_INSERT_EVENTS = (
    "INSERT INTO events (stream_id, version, type, data, metadata, recorded_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (stream_id, version, schema, type, data) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
    "schema = excluded.schema, type = excluded.type, data = excluded.data"
)


_INSERT_COMMAND = "INSERT INTO commands (stream_id, command_id, version) VALUES (?, ?, ?)"


def _command_version(db: sqlite3.Connection, stream_id: int, command_id: str) -> int | None:
    """The version recorded with ``command_id`` on the stream row ``stream_id``, or None."""
    row = db.execute(
        "SELECT version FROM commands WHERE stream_id = ? AND command_id = ?",
        (stream_id, command_id),
    ).fetchone()
    if row is None:
        return None
    (version,) = row
    if type(version) is not int:  # a row another program wrote
        raise EventDecodeError(
            f"command {command_id!r} cannot be read: its version column holds "
            f"{_held(_storage_of(version), version)}, not a whole number"
        )
    return version


_STREAM_AND_VERSION = (
    "SELECT id, state, (SELECT coalesce(max(version), 0) FROM events WHERE stream_id = streams.id) "
    "FROM streams WHERE name = ? AND state <> 1"
)


def _apply(db: sqlite3.Connection, op: _WriteOp, now: float) -> Any:
    """Write one op, statement by statement; raise if it fails (the caller rolls back)."""
    if isinstance(op, _Append):
        row = db.execute(_STREAM_AND_VERSION, (op.stream,)).fetchone()
        stream_id: int | None = None
        version = 0
        command_id = op.command_id
        if row is not None:
            stream_id, state, version = row
            if state == _TOMBSTONE:
                raise StreamDeleted(op.stream)
            if command_id is not None:
                applied = _command_version(db, stream_id, command_id)
                if applied is not None:
                    raise DuplicateCommand(op.stream, command_id, applied)
        if op.expected_version is not None and op.expected_version != version:
            raise ConcurrencyConflict(op.stream, op.expected_version, version)
        if not op.events and command_id is None:
            return version
        if stream_id is None:
            stream_id = _create_stream(db, op.stream)
        try:
            db.executemany(
                _INSERT_EVENTS,
                [
                    (stream_id, version + i, e.type, e.data, e.metadata, now)
                    for i, e in enumerate(op.events, 1)
                ],
            )
        except sqlite3.IntegrityError as exc:  # pragma: no cover - guarded by the check above
            raise ConcurrencyConflict(op.stream, version) from exc
        version += len(op.events)
        if command_id is not None:
            db.execute(_INSERT_COMMAND, (stream_id, command_id, version))
        return version
    if isinstance(op, _SaveSnapshot):
        s = op.snapshot
        stream_id = _live_stream_id(db, s.stream, create=True)
        db.execute(
            _UPSERT_SNAPSHOT,
            (stream_id, s.version, s.schema, s.type, s.data),
        )
        return None
    row = _find_stream(db, op.stream)
    if row is not None and row[1] == _TOMBSTONE:
        raise StreamDeleted(op.stream)
    if op.hard:
        if row is None:
            db.execute("INSERT INTO streams (name, state) VALUES (?, 2)", (op.stream,))
        else:
            db.execute("DELETE FROM events WHERE stream_id = ?", (row[0],))
            db.execute("DELETE FROM snapshots WHERE stream_id = ?", (row[0],))
            db.execute("DELETE FROM commands WHERE stream_id = ?", (row[0],))
            db.execute("UPDATE streams SET state = 2 WHERE id = ?", (row[0],))
    elif row is not None:
        db.execute("UPDATE streams SET state = 1 WHERE id = ?", (row[0],))
    return None


def _write_one(db: sqlite3.Connection, op: _WriteOp, now: float) -> outcome.Outcome[Any]:
    """Write ``op`` inside its own savepoint: if it fails, it fails alone."""
    db.execute("SAVEPOINT write")
    try:
        value = _apply(db, op, now)
    except Exception as exc:
        if not db.in_transaction:
            raise  # SQLite rolled the whole transaction back (disk full, I/O error)
        db.execute("ROLLBACK TO write")
        db.execute("RELEASE write")
        if isinstance(exc, _DRIVER_ERRORS):
            exc = _wrap(exc, _describe(op))
        return outcome.Error(exc)
    db.execute("RELEASE write")
    return outcome.Value(value)


# Set-based writes: the streams a run of appends and snapshots touches are
# looked up in one query (padded to a power of two of names, so that a few
# prepared statements serve every batch size).
_LOOKUP_CHUNK = 512


@functools.cache
def _lookup_sql(names: int) -> str:
    return (
        "SELECT s.name, s.id, s.state, "
        "(SELECT coalesce(max(version), 0) FROM events WHERE stream_id = s.id) "
        f"FROM streams s WHERE s.name IN ({', '.join('?' * names)}) AND s.state <> 1"
    )


def _lookup(db: sqlite3.Connection, names: list[str]) -> dict[str, list[int]]:
    """``{name: [stream id, state, version]}`` of the named streams that have a row."""
    found: dict[str, list[int]] = {}
    for start in range(0, len(names), _LOOKUP_CHUNK):
        chunk = names[start : start + _LOOKUP_CHUNK]
        size = 1 << (len(chunk) - 1).bit_length()
        chunk += [chunk[0]] * (size - len(chunk))
        for name, stream_id, state, version in db.execute(_lookup_sql(size), chunk):
            found[name] = [stream_id, state, version]
    return found


def _write_set(
    db: sqlite3.Connection, ops: Sequence[_Append | _SaveSnapshot], now: float
) -> list[outcome.Outcome[Any]]:
    """Write a run of appends and snapshots with set-based statements.

    One query reads the id, state and version of every stream the run touches;
    each append's expected version is checked in Python against the stream's
    running version (so two appends to one stream in the run chain), and the
    accepted events go in with one ``executemany`` (the snapshots with
    another). A conflict or a deleted stream fails its write alone, without a
    statement. Anything that raises here (a driver error, an IntegrityError
    from the UNIQUE backstop) makes the caller roll the run back and write it
    again one savepoint per write.
    """
    names = list(
        dict.fromkeys(op.stream if type(op) is _Append else op.snapshot.stream for op in ops)
    )
    streams = _lookup(db, names)
    outcomes: list[outcome.Outcome[Any]] = []
    rows: list[tuple[int, int, str, bytes, bytes, float]] = []
    snapshots: list[tuple[int, int, int, str, bytes]] = []
    # Command ids this run records: {(stream id, command id): version}.
    commands: dict[tuple[int, str], int] = {}
    for op in ops:
        if type(op) is _Append:
            name = op.stream
            entry = streams.get(name)
            version = 0 if entry is None else entry[2]
            if entry is not None and entry[1] == _TOMBSTONE:
                outcomes.append(outcome.Error(StreamDeleted(name)))
                continue
            command_id = op.command_id
            if command_id is not None and entry is not None:
                applied = commands.get((entry[0], command_id))
                if applied is None:
                    applied = _command_version(db, entry[0], command_id)
                if applied is not None:
                    outcomes.append(outcome.Error(DuplicateCommand(name, command_id, applied)))
                    continue
            expected = op.expected_version
            if expected is not None and expected != version:
                outcomes.append(outcome.Error(ConcurrencyConflict(name, expected, version)))
                continue
            events = op.events
            if events or command_id is not None:
                if entry is None:
                    entry = streams[name] = [_create_stream(db, name), _LIVE, 0]
                stream_id = entry[0]
                for e in events:
                    version += 1
                    rows.append((stream_id, version, e.type, e.data, e.metadata, now))
                entry[2] = version
                if command_id is not None:
                    commands[stream_id, command_id] = version
            outcomes.append(outcome.Value(version))
        else:
            s = op.snapshot
            entry = streams.get(s.stream)
            if entry is None:
                entry = streams[s.stream] = [_create_stream(db, s.stream), _LIVE, 0]
            elif entry[1] == _TOMBSTONE:
                outcomes.append(outcome.Error(StreamDeleted(s.stream)))
                continue
            snapshots.append((entry[0], s.version, s.schema, s.type, s.data))
            outcomes.append(outcome.Value(None))
    if rows:
        db.executemany(_INSERT_EVENTS, rows)
    if commands:
        db.executemany(
            _INSERT_COMMAND, [(sid, cid, version) for (sid, cid), version in commands.items()]
        )
    if snapshots:
        db.executemany(_UPSERT_SNAPSHOT, snapshots)
    return outcomes


def _create_stream(db: sqlite3.Connection, stream: str) -> int:
    cursor = db.execute("INSERT INTO streams (name, state) VALUES (?, 0)", (stream,))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _write_ops(
    db: sqlite3.Connection, ops: list[_WriteOp], now: float
) -> list[outcome.Outcome[Any]]:
    """Write ``ops`` (inside the batch's transaction); return their outcomes, in order.

    Runs of appends and snapshots are written set-based (:func:`_write_set`)
    inside one savepoint; if the run raises, the savepoint is rolled back and
    the run written again one savepoint per write (:func:`_write_one`), so that
    only the writes at fault fail. Deletes always take that path.
    """
    outcomes: list[outcome.Outcome[Any]] = []
    for is_run, start, end in _split_runs(ops, _not_a_delete):
        if not is_run:
            outcomes.append(_write_one(db, ops[start], now))
            continue
        run = cast("list[_Append | _SaveSnapshot]", ops[start:end])
        db.execute("SAVEPOINT run")
        try:
            done = _write_set(db, run, now)
        except Exception:
            if not db.in_transaction:
                raise  # SQLite rolled the whole transaction back (disk full, I/O error)
            db.execute("ROLLBACK TO run")
            db.execute("RELEASE run")
            done = [_write_one(db, op, now) for op in run]
        else:
            db.execute("RELEASE run")
        outcomes += done
    return outcomes


def _head_position(db: sqlite3.Connection) -> int:
    (position,) = db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
    return int(position)


def _not_a_delete(op: _WriteOp) -> bool:
    return type(op) is not _Delete


# -- reading rows, including rows another program wrote -------------------------
#
# SQLite columns hold whatever a writer put there: the sqlite3 shell writes
# TEXT where the store writes BLOBs, a timestamp as text, and nothing stops a
# number in the data column. The fast path takes rows of the types the store
# writes; any other row (or text that is not UTF-8, which sqlite3 cannot even
# fetch) sends the page through the careful path, which reads every column
# with its storage class and either converts it or raises EventDecodeError
# naming the stream, the version and the column.

_READ_EVENTS = (
    "SELECT version, type, data, metadata, recorded_at, position FROM events "
    "WHERE stream_id = ? AND version >= ? ORDER BY version LIMIT ?"
)


def _raw(column: str) -> str:
    """SQL giving ``column``'s storage class and its value (text as UTF-8 bytes)."""
    return (
        f"typeof({column}), CASE WHEN typeof({column}) IN ('text', 'blob') "
        f"THEN CAST({column} AS BLOB) ELSE {column} END"
    )


_READ_EVENTS_RAW = (
    f"SELECT {_raw('version')}, {_raw('type')}, {_raw('data')}, {_raw('metadata')}, "
    f"{_raw('recorded_at')}, position FROM events "
    "WHERE stream_id = ? AND version >= ? ORDER BY version LIMIT ?"
)

# The global order: every live stream's events from a position on. The
# category of a stream is the part of its name before the first "-".
_CATEGORY = (
    "CASE WHEN instr(s.name, '-') > 0 THEN substr(s.name, 1, instr(s.name, '-') - 1) "
    "ELSE s.name END"
)


@functools.cache
def _read_all_sql(categories: int, types: int, *, raw: bool = False) -> str:
    """The query of a read_all page with that many category and type filters."""
    columns = (
        # RecordedEvent's field order: the page's columns build the records.
        "s.name, e.version, e.type, e.data, e.metadata, e.recorded_at, e.position"
        if not raw
        else f"e.position, s.name, {_raw('e.version')}, {_raw('e.type')}, {_raw('e.data')}, "
        f"{_raw('e.metadata')}, {_raw('e.recorded_at')}"
    )
    where = ""
    if categories:
        where += f" AND {_CATEGORY} IN ({', '.join('?' * categories)})"
    if types:
        where += f" AND e.type IN ({', '.join('?' * types)})"
    return (
        f"SELECT {columns} FROM events e JOIN streams s ON s.id = e.stream_id "
        f"WHERE e.position >= ? AND s.state = 0{where} ORDER BY e.position LIMIT ?"
    )


_READ_SNAPSHOT = "SELECT version, schema, type, data FROM snapshots WHERE stream_id = ?"
_MAX_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = ?"
_READ_SNAPSHOT_RAW = (
    f"SELECT {_raw('version')}, {_raw('schema')}, {_raw('type')}, {_raw('data')} "
    "FROM snapshots WHERE stream_id = ?"
)

_STORAGE_CLASS = {"integer": "an integer", "real": "a real", "text": "text", "blob": "a blob"}


def _held(storage: str, value: object) -> str:
    """What a column holds, for messages: ``an integer (42)``, ``NULL``, ..."""
    if storage == "null":
        return "NULL"
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{_STORAGE_CLASS.get(storage, storage)} ({shown})"


def _storage_of(value: object) -> str:
    """The SQLite storage class of a value as sqlite3 returns it."""
    return _PYTHON_STORAGE.get(type(value), type(value).__name__)


_PYTHON_STORAGE: dict[type, str] = {
    int: "integer",
    float: "real",
    str: "text",
    bytes: "blob",
    type(None): "null",
}


class _Unreadable(Exception):
    """A column's value the store cannot read; the caller says where."""


def _as_int(storage: str, value: object) -> int:
    if storage == "integer":
        return cast("int", value)
    raise _Unreadable(f"holds {_held(storage, value)}, not a whole number")


def _as_text(storage: str, value: object) -> str:
    if storage in ("text", "blob"):
        try:
            return cast("bytes", value).decode("utf-8")
        except UnicodeDecodeError:
            raise _Unreadable(f"holds {_held(storage, value)}, not UTF-8 text") from None
    raise _Unreadable(f"holds {_held(storage, value)}, not text")


def _as_bytes(storage: str, value: object) -> bytes:
    if storage in ("text", "blob"):
        return cast("bytes", value)
    raise _Unreadable(f"holds {_held(storage, value)}, not bytes or text")


def _as_time(storage: str, value: object) -> float:
    if storage in ("real", "integer"):
        return float(cast("float", value))
    if storage == "text":
        text = cast("bytes", value).decode("utf-8", "replace").strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:  # SQLite's datetime() is UTC
                moment = moment.replace(tzinfo=datetime.timezone.utc)
            return moment.timestamp()
    raise _Unreadable(f"holds {_held(storage, value)}, not a time")


def _careful_events(
    db: sqlite3.Connection, stream: str, params: tuple[Any, ...]
) -> list[RecordedEvent]:
    """The events of a page, read column by column (see above)."""
    return [
        _careful_record(stream, row[10], row, 0) for row in db.execute(_READ_EVENTS_RAW, params)
    ]


def _careful_record(stream: str, position: int, row: Sequence[Any], at: int) -> RecordedEvent:
    """One event from its raw columns: ``(value, storage class)`` pairs of its
    version, type, data, metadata and recorded_at, from ``row[at]`` on.

    Raises:
        EventDecodeError: a column holds what no reading makes sense of,
            naming the stream, the version (when it could be read) and the column.
    """
    try:
        version = _as_int(row[at], row[at + 1])
    except _Unreadable as exc:
        raise EventDecodeError(
            f"stream {stream!r} holds an event that cannot be read: its version {exc}"
        ) from None
    column = "type"
    try:
        type_ = _as_text(row[at + 2], row[at + 3])
        column = "data"
        data = _as_bytes(row[at + 4], row[at + 5])
        column = "metadata"
        metadata = _as_bytes(row[at + 6], row[at + 7])
        column = "recorded_at"
        recorded_at = _as_time(row[at + 8], row[at + 9])
    except _Unreadable as exc:
        raise EventDecodeError(
            f"event at {stream}@{version} cannot be read: its {column} column {exc}"
        ) from None
    return RecordedEvent(stream, version, type_, data, metadata, recorded_at, position)


def _careful_snapshot(db: sqlite3.Connection, stream: str, stream_id: int) -> Snapshot | None:
    row = db.execute(_READ_SNAPSHOT_RAW, (stream_id,)).fetchone()
    if row is None:
        return None
    column = "version"
    try:
        version = _as_int(row[0], row[1])
        column = "schema"
        schema = _as_int(row[2], row[3])
        column = "type"
        type_ = _as_text(row[4], row[5])
        column = "data"
        data = _as_bytes(row[6], row[7])
    except _Unreadable as exc:
        raise EventDecodeError(
            f"the snapshot of stream {stream!r} cannot be read: its {column} column {exc}"
        ) from None
    return Snapshot(stream, version, schema, type_, data)


def _read_events(
    db: sqlite3.Connection, stream: str, params: tuple[Any, ...]
) -> list[RecordedEvent]:
    """A page of events: the fast path, or the careful one for rows the store did not write."""
    try:
        rows = db.execute(_READ_EVENTS, params).fetchall()
    except sqlite3.OperationalError:
        # Text that is not UTF-8 cannot be fetched as str; anything else
        # fails again, and is reported, in the careful path.
        return _careful_events(db, stream, params)
    checked = _checked(rows, _STREAM_ROWS)
    if checked is None:
        return _careful_events(db, stream, params)
    return [RecordedEvent(stream, v, t, d, m, at, p) for v, t, d, m, at, p in checked]


#: The rows of _READ_EVENTS, as :func:`_checked` checks them.
_STREAM_ROWS: Final = list[tuple[int, str, bytes, bytes, float, int]]


def _read_all_page(db: sqlite3.Connection, params: list[Any], sql: str, raw_sql: str) -> list[Any]:
    """A read_all page: the fast path, or the careful one for rows the store did not write.

    The fast path checks the whole page's Python types and builds its records
    in C (:func:`_checked_records`).
    """
    try:
        rows = db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return _careful_all(db, params, raw_sql)
    records = _checked_records(rows)
    if records is None:
        return _careful_all(db, params, raw_sql)
    return records


def _careful_all(db: sqlite3.Connection, params: list[Any], raw_sql: str) -> list[Any]:
    """A read_all page, read column by column (see above)."""
    return [_careful_record(row[1], row[0], row, 2) for row in db.execute(raw_sql, params)]


@final
@attrs.define(eq=False)
class SQLiteEventStore(_DurableStore):
    """An :class:`~trio_aggregates.EventStore` in an SQLite file. Make one with
    :func:`open_sqlite_store`.

    Every call runs in a worker thread and is a checkpoint. Calls are not
    abandoned on cancellation: a cancelled call finishes its statement first.
    Writes go through group commit (see the module docstring); a cancelled
    write either committed entirely or not at all: if it was still queued, it
    is withdrawn and :exc:`trio.Cancelled` is raised; if its transaction had
    begun, the call returns its result and the cancellation takes effect at
    the next checkpoint.

    Errors: every :mod:`sqlite3` error comes out as :exc:`StoreError` (or a
    subclass) with the driver's exception as ``__cause__``; a failed write
    leaves nothing behind. Rows another program wrote are read as they are
    (TEXT as UTF-8 bytes, a text timestamp parsed); one that cannot be read
    raises :exc:`EventDecodeError` naming the stream, the version and the
    column. Calls after :meth:`aclose` raise :exc:`StoreError`.
    """

    _backend: ClassVar[str] = "SQLite"

    _writer: _Connection
    _readers: list[_Connection]
    _path: str
    _free_readers: list[_Connection] = attrs.field(init=False)
    _reader_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _busy_readers: int = attrs.field(default=0, init=False)
    _readers_idle: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._free_readers = list(self._readers)
        self._reader_limiter = trio.CapacityLimiter(len(self._readers))

    @property
    def path(self) -> str:
        """The database file's path (or ``:memory:``)."""
        return self._path

    # -- writing ----------------------------------------------------------

    async def _write_batch(self, ops: list[_WriteOp]) -> _BatchResult:
        return await trio.to_thread.run_sync(self._write_batch_in_thread, ops)

    def _write_batch_in_thread(self, ops: list[_WriteOp]) -> _BatchResult:
        """In the writer thread: write ``ops`` in one transaction (see :func:`_write_ops`)."""
        conn = self._writer
        now = time.time()
        with conn.lock:
            db = conn.db
            try:
                db.execute("BEGIN IMMEDIATE")
            except _DRIVER_ERRORS as exc:
                return _BatchResult(
                    [outcome.Error(_wrap(exc, "begin a transaction")) for _ in ops], False
                )
            outcomes: list[outcome.Outcome[Any]]
            try:
                if len(ops) == 1:
                    # A batch of one needs no savepoint: the transaction is its own.
                    try:
                        outcomes = [outcome.Value(_apply(db, ops[0], now))]
                    except Exception as exc:
                        if db.in_transaction:  # SQLite may have rolled back itself
                            db.execute("ROLLBACK")
                        if isinstance(exc, _DRIVER_ERRORS):
                            exc = _wrap(exc, _describe(ops[0]))
                        return _BatchResult([outcome.Error(exc)], False)
                else:
                    outcomes = _write_ops(db, ops, now)
                db.execute("COMMIT")
            except BaseException as exc:
                # The transaction itself failed (disk full, I/O error, ...):
                # nothing of this batch is written.
                try:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                except _DRIVER_ERRORS:
                    logger.exception("rollback failed")
                error = _wrap(exc, "commit")
                return _BatchResult([outcome.Error(error) for _ in ops], False)
            return _BatchResult(outcomes, True)

    # -- reading ----------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any], action: str) -> Any:
        self._check_open()
        async with self._reader_limiter:
            conn = self._free_readers.pop()
            self._busy_readers += 1
            try:

                def run() -> Any:
                    with conn.lock:
                        try:
                            conn.db.execute("BEGIN")
                            try:
                                return fn(conn.db)
                            finally:
                                conn.db.execute("COMMIT")
                        except _DRIVER_ERRORS as exc:
                            raise _wrap(exc, action) from exc

                return await trio.to_thread.run_sync(run)
            finally:
                self._free_readers.append(conn)
                self._busy_readers -= 1
                if self._busy_readers == 0:
                    self._readers_idle.set()

    async def read(
        self, stream: str, *, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` events of ``stream`` from ``from_version`` on.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: SQLite failed.
        """
        _check_name(stream)
        start = max(from_version, 1)
        count = -1 if limit is None else max(limit, 0)

        def query(db: sqlite3.Connection) -> list[RecordedEvent]:
            row = _find_stream(db, stream)
            if row is None:
                return []
            if row[1] == _TOMBSTONE:
                raise StreamDeleted(stream)
            return _read_events(db, stream, (row[0], start, count))

        events: list[RecordedEvent] = await self._read(query, f"read stream {stream!r}")
        return events

    async def read_all(
        self,
        from_position: int = 1,
        *,
        limit: int | None = 1000,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` events of every live stream from ``from_position`` on,
        in position order (see :meth:`EventStore.read_all`).

        SQLite has one writer at a time, and positions are given in the write
        transaction, so commit order is position order: a reader never finds a
        new event below one it has seen.

        Raises:
            EventDecodeError: a row another program wrote cannot be read.
            StoreError: SQLite failed.
        """
        start, count, cats, types = _check_read_all(from_position, limit, categories, event_types)
        if count == 0 or (cats is not None and not cats) or (types is not None and not types):
            self._check_open()
            await trio.lowlevel.checkpoint()
            return []
        ncats = 0 if cats is None else len(cats)
        ntypes = 0 if types is None else len(types)
        params: list[Any] = [start]
        if cats:
            params += sorted(cats)
        if types:
            params += sorted(types)
        params.append(-1 if count is None else count)
        sql = _read_all_sql(ncats, ntypes)
        raw_sql = _read_all_sql(ncats, ntypes, raw=True)

        def query(db: sqlite3.Connection) -> list[RecordedEvent]:
            return _read_all_page(db, params, sql, raw_sql)

        events: list[RecordedEvent] = await self._read(query, "read all streams")
        return events

    async def head_position(self) -> int:
        """Return the position of the last event written (0 if none).

        Raises:
            StoreError: SQLite failed.
        """

        def query(db: sqlite3.Connection) -> int:
            return _head_position(db)

        position: int = await self._read(query, "read the head position")
        return position

    async def stream_version(self, stream: str) -> int:
        """Return the stream's version (0 for a stream with no events).

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: SQLite failed.
        """
        _check_name(stream)

        def query(db: sqlite3.Connection) -> int:
            row = _find_stream(db, stream)
            if row is None:
                return 0
            if row[1] == _TOMBSTONE:
                raise StreamDeleted(stream)
            (version,) = db.execute(_MAX_VERSION, (row[0],)).fetchone()
            if type(version) is not int:
                raise EventDecodeError(
                    f"stream {stream!r} holds an event that cannot be read: "
                    f"its version holds {_held(_storage_of(version), version)}, "
                    "not a whole number"
                )
            return version

        version: int = await self._read(query, f"read the version of stream {stream!r}")
        return version

    async def find_command(self, stream: str, command_id: str) -> int | None:
        """Return the stream's version right after the append that carried
        ``command_id``, or ``None`` if the stream does not hold it.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: SQLite failed.
        """
        _check_name(stream)
        _check_command_id(command_id, required=True)

        def query(db: sqlite3.Connection) -> int | None:
            row = _find_stream(db, stream)
            if row is None:
                return None
            if row[1] == _TOMBSTONE:
                raise StreamDeleted(stream)
            return _command_version(db, row[0], command_id)

        version: int | None = await self._read(
            query, f"look up command {command_id!r} of stream {stream!r}"
        )
        return version

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        """Return the stream's latest snapshot, or ``None``.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: SQLite failed.
        """
        _check_name(stream)

        def query(db: sqlite3.Connection) -> Snapshot | None:
            row = _find_stream(db, stream)
            if row is None:
                return None
            if row[1] == _TOMBSTONE:
                raise StreamDeleted(stream)
            try:
                found = db.execute(_READ_SNAPSHOT, (row[0],)).fetchone()
            except sqlite3.OperationalError:  # text that is not UTF-8
                return _careful_snapshot(db, stream, row[0])
            if found is None:
                return None
            version, schema, type_, data = found
            if (
                type(version) is int
                and type(schema) is int
                and type(type_) is str
                and type(data) is bytes
            ):
                return Snapshot(stream, version, schema, type_, data)
            return _careful_snapshot(db, stream, row[0])

        snapshot: Snapshot | None = await self._read(query, f"load the snapshot of {stream!r}")
        return snapshot

    # -- closing ----------------------------------------------------------

    async def _close_connections(self) -> None:
        # The queued writes are done; wait for the reads in progress.
        while self._busy_readers:
            self._readers_idle = trio.Event()
            await self._readers_idle.wait()
        connections = [self._writer, *(r for r in self._readers if r is not self._writer)]
        await trio.to_thread.run_sync(_close_all, connections)


def _close_all(connections: list[_Connection]) -> None:
    for conn in connections:
        with conn.lock:
            try:
                conn.db.close()
            except sqlite3.Error:  # pragma: no cover
                logger.exception("closing an SQLite connection failed")


def _connect_writer(path: str, busy_timeout: float) -> sqlite3.Connection:
    writer = _connect(path, uri=False, busy_timeout=busy_timeout)
    try:
        # Statement and savepoint journals in memory rather than in temporary
        # files: every page a write dirties is copied there first. (They only
        # hold the pages one batch changes.)
        writer.execute("PRAGMA temp_store = MEMORY")
    except BaseException:
        writer.close()
        raise
    return writer


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return code == 5 if code is not None else "database is locked" in str(exc)


def _enter_wal(db: sqlite3.Connection, busy_timeout: float) -> object:
    """Put the file in WAL mode; return the journal mode it is in.

    Switching a new file to WAL takes an exclusive lock, and when another
    connection is opening the same file at that moment SQLite may report
    "database is locked" at once rather than wait (waiting could deadlock):
    retry until ``busy_timeout``.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
        else:
            return mode


def _open_connections(path: str, readers: int, busy_timeout: float) -> list[_Connection]:
    """In a worker thread: connect, set WAL mode, migrate; return writer + readers."""
    opened: list[sqlite3.Connection] = []
    try:
        if path == ":memory:":
            # A private in-memory database has one connection: reads and
            # writes take turns on it.
            writer = _connect_writer(path, busy_timeout)
            opened.append(writer)
            _migrate(writer)
            return [_Connection(writer)]
        writer = _connect_writer(path, busy_timeout)
        opened.append(writer)
        mode = _enter_wal(writer, busy_timeout)
        if str(mode).lower() != "wal":
            raise StoreError(f"could not put {path!r} in WAL mode (journal_mode is {mode!r})")
        _migrate(writer)
        for _ in range(readers):
            reader = _connect(path, uri=False, busy_timeout=busy_timeout)
            opened.append(reader)
            reader.execute("PRAGMA query_only = ON")
        return [_Connection(db) for db in opened]
    except BaseException as exc:
        for db in opened:
            db.close()
        if isinstance(exc, StoreError):
            raise
        if isinstance(exc, _DRIVER_ERRORS):
            raise _wrap(exc, f"open {path!r}") from exc
        raise


@asynccontextmanager
async def open_sqlite_store(
    path: str | PathLike[str], *, readers: int = 4, busy_timeout: float = 5.0
) -> AsyncIterator[SQLiteEventStore]:
    """Open (creating or migrating if needed) an SQLite event store.

    Usage::

        async with open_sqlite_store("events.db") as store:
            await store.append("order-1", [event], expected_version=0)

    Args:
        path: the database file, created if missing. ``":memory:"`` makes a
            private in-memory database (gone when the store closes; its reads
            and writes share one connection).
        readers: how many read connections (reads running at once), at
            least 1.
        busy_timeout: seconds to wait for another process's write lock
            (finite, at least 0).

    Raises:
        InvalidArgument: an argument is out of range or of the wrong type.
        StoreError: the file could not be opened or is not a database, or its
            schema is newer than this library's.

    On exit (also on error or cancellation) the store finishes its queued
    writes and closes its connections.
    """
    if not isinstance(path, str | os.PathLike):
        raise InvalidArgument(f"path must be a str or a path, not {type(path).__name__}")
    readers = check_count("readers", readers)
    busy_timeout = check_seconds("busy_timeout", busy_timeout, allow_zero=True)
    target = os.fspath(path)
    if not isinstance(target, str):
        raise InvalidArgument(f"path must be a str or a path, not {type(target).__name__}")
    connections = await trio.to_thread.run_sync(
        _open_connections, target, readers, busy_timeout, abandon_on_cancel=False
    )
    writer, *rest = connections
    store = SQLiteEventStore(writer, rest or [writer], target)
    try:
        yield store
    finally:
        await store.aclose()
