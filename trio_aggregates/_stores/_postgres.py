"""The PostgreSQL event store.

Driver: psycopg 3's *synchronous* API, run in worker threads with
:func:`trio.to_thread.run_sync`. psycopg's ``AsyncConnection`` cannot be used
under Trio: psycopg 3.3 waits on its sockets with asyncio (its ``waiting``
module calls ``asyncio.get_running_loop()``; under Trio connecting fails with
``RuntimeError: no running event loop``), and it has no AnyIO backend. Two
exceptions are sent from the Trio thread through libpq's nonblocking API
(``_pgwire.py``, on a pooled connection that needs no check): the write
group commit repeats most, a batch that is one run of appends, because a
worker thread had to win the GIL back from the busy Trio thread twice per
batch (measured 1.3-1.4x more commands/s without it); and a ``read_all``
page of at most 2,000 events without a category filter (catch-up measured
1.17x faster). Anything else, or a batch the server refuses, goes through
the worker-thread path.

Connections: a small pool of our own (:class:`_Pool`), not
``psycopg_pool.ConnectionPool``. That pool reconnects from background threads
with an exponential back-off (1 s, 2 s, 4 s, ...), so after the database came
back a call could still time out for seconds, and while the database is down
every call waits its full timeout. Ours connects on demand in the calling
worker thread: a call fails at once when the server refuses connections, and
the first call after the server is back reconnects. A connection that failed
is closed, and the idle ones opened before the failure are checked before use.

Timeouts: every operation is bounded by ``timeout`` (30 s by default), so a
server that stops answering (frozen, or behind a network partition that
drops packets) stalls nothing for longer. A call runs in a worker thread
under a Trio deadline; when it fires, the thread is abandoned, the
connection's socket is shut down from the Trio thread (waking the worker
thread, which then closes the connection: it is never reused), and the call
fails with :exc:`StoreError` ("PostgreSQL did not answer within 30.0 s
(timeout)"). A cancelled read is abandoned the same way, at once. Below that
bound: the server's ``statement_timeout`` (nine tenths of ``timeout``, so
that on a live server a slow statement is cancelled cleanly and the
connection kept), libpq's ``connect_timeout``, and TCP keepalives with
``tcp_user_timeout``, so that a dead peer is noticed even between calls
(what the DSN sets itself wins).

The store is a durable store core (``_durable.py``), which holds the shell
it shares with the SQLite store (group commit, statistics, closing, the write
calls); this module holds the SQL, the connections and the migrations.

Writes use group commit like the SQLite store (``_groupcommit.py``): the
writes queued while a transaction runs share the next transaction, taken in
(stable) order of stream name, so that two processes' batches lock streams in
the same order and cannot deadlock. The expected-version check is enforced by
the database: the stream's row is locked (``FOR UPDATE``) and ``(stream_id,
version)`` is the events' primary key, so two processes racing on a stream can
never both win. So is the command-id check: ``(stream_id, command_id)`` is the
primary key of ``trio_aggregates_commands``, written in the append's
transaction, and read under the stream's row lock.

A batch is one transaction and one round trip. Each write op is one call of a
function that reports its outcome rather than raising (a conflict, a
duplicate command or a tombstone fails its op alone): a run of appends is
one call of ``trio_aggregates_write_appends`` (it locks, or creates, the
streams' rows in name order, C collation: the order of Python's sort; checks
each append against its stream's running version, so that appends to one
stream in a batch chain; records command ids; inserts every accepted event
with one ``INSERT ... SELECT FROM unnest(...)``; a lone append without a
command id, the usual write of one caller at a time, calls the cheaper
``trio_aggregates_append`` of the first schema version); a snapshot is one call of
``trio_aggregates_save_snapshot``, a delete one of
``trio_aggregates_delete_stream``. A batch of one call (the usual case: a run
of appends) runs in autocommit mode, so the call is its own transaction; a
batch of several calls is sent in *pipeline mode*, between ``BEGIN`` and
``COMMIT``, without waiting for each answer. If the transaction raises anyway
(a value the driver cannot send, a deadlock, the primary-key backstop),
nothing of it is written, and its ops are written again one transaction each,
so that only the ops at fault fail.

Global order (design invariant 8): an event's position is the events
table's identity column, given when the row is inserted, and transactions
from several processes commit in any order; so every function that inserts
events first takes a transaction-scoped advisory lock on the events table,
just before its ``INSERT`` and after its row locks and checks (schema version
4). Positions are then handed out one transaction at a time, and the lock is
released only once the commit is visible: commit order is position order, and
a reader that has seen position P never finds a new event below P.
``read_all`` needs no filter of its own, and ``head_position`` is
``max(position)``. The lock is held from the ``INSERT`` to the end of the
commit (its ``fsync``): one process's batches were one at a time already
(group commit), so it costs a single process nothing but one function call
per batch; several processes' commits are serialized. (The alternative,
reading only below the oldest transaction still in flight with
``pg_snapshot_xmin``, does not give an order of integer positions: a
transaction that took its xid first may take its position last.) Each such
transaction also sends a ``NOTIFY trio_aggregates_events`` (delivered at
commit); subscriptions ``LISTEN`` on a connection of their own.

Schema: tables ``trio_aggregates_streams``, ``trio_aggregates_events``,
``trio_aggregates_snapshots``, ``trio_aggregates_commands`` (version 3) and
the write functions (version 3, and ``trio_aggregates_append`` of version 1;
version 2's ``trio_aggregates_append_batch`` only an older library calls),
created in the first schema of the connection's ``search_path`` and migrated
by the library (version 4 replaces the functions that insert events with the same
code plus the position lock and the notification, the function only an older
library calls included, so that every writer of an upgraded database keeps
the order); applied versions are rows of ``trio_aggregates_schema``.
Migrations run in one transaction under a transaction-scoped advisory lock,
so processes opening the store at once are safe, and opening again is a no-op.
A released migration is never edited: a change is a new migration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Final, Protocol, TypeVar, cast, final

import attrs
import outcome
import psycopg
import psycopg.conninfo
import psycopg.errors
import trio
from psycopg.pq import TransactionStatus

from .._core._exceptions import (
    ConcurrencyConflict,
    DuplicateCommand,
    EventDecodeError,
    InvalidArgument,
    NotOwner,
    StoreError,
    StreamDeleted,
)
from .._core._options import check_count, check_seconds
from . import _pgwire
from ._durable import (
    _TOMBSTONE,
    _Append,
    _check_name,
    _Delete,
    _describe,
    _DurableStore,
    _fail_all,
    _is_append,
    _op_stream,
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
    _records_of,
)

__all__ = ["PostgresEventStore", "open_postgres_store"]

logger = logging.getLogger("trio_aggregates.postgres")

T = TypeVar("T")
Conn = psycopg.Connection[Any]

# pg_advisory_xact_lock key guarding migrations: the bytes "trioaggr".
_MIGRATION_LOCK = 0x7472696F61676772

_MIGRATIONS: list[tuple[str, ...]] = [
    # version 1
    (
        """
        CREATE TABLE trio_aggregates_streams (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL,
            state smallint NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2))
        )
        """,
        """
        CREATE UNIQUE INDEX trio_aggregates_streams_name
            ON trio_aggregates_streams (name) WHERE state <> 1
        """,
        """
        CREATE TABLE trio_aggregates_events (
            position bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            stream_id bigint NOT NULL REFERENCES trio_aggregates_streams (id),
            version bigint NOT NULL CHECK (version >= 1),
            type text NOT NULL,
            data bytea NOT NULL,
            metadata bytea NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (stream_id, version)
        )
        """,
        """
        CREATE TABLE trio_aggregates_snapshots (
            stream_id bigint PRIMARY KEY REFERENCES trio_aggregates_streams (id),
            version bigint NOT NULL,
            schema integer NOT NULL,
            type text NOT NULL,
            data bytea NOT NULL
        )
        """,
        # One round trip per append: lock the stream's row (creating it if
        # needed), check the expected version, insert. o_status: 0 appended,
        # 1 version conflict (o_version is the stream's version), 2 tombstone.
        """
        CREATE FUNCTION trio_aggregates_append(
            p_name text, p_expected bigint, p_types text[], p_data bytea[], p_metadata bytea[],
            OUT o_status integer, OUT o_version bigint
        ) LANGUAGE plpgsql AS $$
        DECLARE
            v_id bigint;
            v_state smallint;
            v_count integer := coalesce(cardinality(p_types), 0);
        BEGIN
            SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                WHERE s.name = p_name AND s.state <> 1 FOR UPDATE;
            IF NOT FOUND AND v_count > 0 THEN
                INSERT INTO trio_aggregates_streams (name) VALUES (p_name)
                    ON CONFLICT (name) WHERE state <> 1 DO NOTHING;
                -- Ours, or the row another transaction committed meanwhile.
                SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                    WHERE s.name = p_name AND s.state <> 1 FOR UPDATE;
            END IF;
            IF v_state = 2 THEN
                o_status := 2;
                RETURN;
            END IF;
            o_version := 0;
            IF v_id IS NOT NULL THEN
                SELECT coalesce(max(e.version), 0) INTO o_version
                    FROM trio_aggregates_events e WHERE e.stream_id = v_id;
            END IF;
            IF p_expected IS NOT NULL AND p_expected <> o_version THEN
                o_status := 1;
                RETURN;
            END IF;
            IF v_count > 0 THEN
                INSERT INTO trio_aggregates_events (stream_id, version, type, data, metadata)
                    SELECT v_id, o_version + i, p_types[i], p_data[i], p_metadata[i]
                    FROM generate_subscripts(p_types, 1) AS i;
                o_version := o_version + v_count;
            END IF;
            o_status := 0;
        END
        $$
        """,
    ),
    # version 2
    (
        # A batch of appends in one round trip. Append i is to p_streams[i],
        # expects version p_expected[i] (NULL: any) and has p_counts[i] events,
        # which lie consecutively in p_types / p_data / p_metadata (all the
        # appends' events, in append order). The streams are locked (created if
        # needed) in C-collation order of their names -- the order of Python's
        # sort, used by every writer, so that writers cannot deadlock -- and an
        # append is checked against its stream's running version, so appends
        # to one stream chain in input order. The accepted events go in with one
        # INSERT. o_status[i] / o_version[i] as trio_aggregates_append's.
        """
        CREATE OR REPLACE FUNCTION trio_aggregates_append_batch(
            p_streams text[], p_expected bigint[], p_counts integer[],
            p_types text[], p_data bytea[], p_metadata bytea[],
            OUT o_status integer[], OUT o_version bigint[]
        ) LANGUAGE plpgsql AS $$
        DECLARE
            v_n integer := coalesce(cardinality(p_streams), 0);
            v_total integer := coalesce(cardinality(p_types), 0);
            v_offsets integer[];
            v_ids bigint[];
            v_versions bigint[];
            v_prev text;
            v_name text;
            v_id bigint;
            v_state smallint;
            v_version bigint;
            v_count integer;
            v_offset integer := 0;
            v_any boolean := false;
            i integer;
        BEGIN
            o_status := array_fill(NULL::integer, ARRAY[v_n]);
            o_version := array_fill(NULL::bigint, ARRAY[v_n]);
            v_offsets := array_fill(0, ARRAY[v_n]);
            v_ids := array_fill(NULL::bigint, ARRAY[v_total]);
            v_versions := array_fill(NULL::bigint, ARRAY[v_total]);
            FOR i IN 1 .. v_n LOOP
                v_offsets[i] := v_offset;
                v_offset := v_offset + coalesce(p_counts[i], 0);
            END LOOP;
            IF v_offset <> v_total THEN
                RAISE EXCEPTION 'trio_aggregates_append_batch: counts do not match the events';
            END IF;
            FOR i IN
                SELECT u.ord FROM unnest(p_streams) WITH ORDINALITY AS u(name, ord)
                ORDER BY u.name COLLATE "C", u.ord
            LOOP
                v_name := p_streams[i];
                v_count := coalesce(p_counts[i], 0);
                IF v_prev IS NULL OR v_name <> v_prev THEN
                    v_prev := v_name;
                    v_id := NULL;
                    v_state := NULL;
                    v_version := 0;
                    SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                        WHERE s.name = v_name AND s.state <> 1 FOR UPDATE;
                    IF v_id IS NOT NULL AND v_state <> 2 THEN
                        SELECT coalesce(max(e.version), 0) INTO v_version
                            FROM trio_aggregates_events e WHERE e.stream_id = v_id;
                    END IF;
                END IF;
                IF v_id IS NULL AND v_count > 0 THEN
                    INSERT INTO trio_aggregates_streams (name) VALUES (v_name)
                        ON CONFLICT (name) WHERE state <> 1 DO NOTHING;
                    -- Ours, or the row another transaction committed meanwhile.
                    SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                        WHERE s.name = v_name AND s.state <> 1 FOR UPDATE;
                    v_version := 0;
                    IF v_state <> 2 THEN
                        SELECT coalesce(max(e.version), 0) INTO v_version
                            FROM trio_aggregates_events e WHERE e.stream_id = v_id;
                    END IF;
                END IF;
                IF v_state = 2 THEN
                    o_status[i] := 2;
                ELSIF p_expected[i] IS NOT NULL AND p_expected[i] <> v_version THEN
                    o_status[i] := 1;
                    o_version[i] := v_version;
                ELSE
                    FOR j IN 1 .. v_count LOOP
                        v_version := v_version + 1;
                        v_ids[v_offsets[i] + j] := v_id;
                        v_versions[v_offsets[i] + j] := v_version;
                        v_any := true;
                    END LOOP;
                    o_status[i] := 0;
                    o_version[i] := v_version;
                END IF;
            END LOOP;
            IF v_any THEN
                INSERT INTO trio_aggregates_events (stream_id, version, type, data, metadata)
                    SELECT u.id, u.version, u.type, u.data, u.metadata
                    FROM unnest(v_ids, v_versions, p_types, p_data, p_metadata)
                        AS u(id, version, type, data, metadata)
                    WHERE u.id IS NOT NULL;
            END IF;
        END
        $$
        """,
    ),
    # version 3: command ids (idempotent appends), and one function per write
    # op, so that a batch is one statement per run of ops, sent in one round
    # trip (pipeline mode). Functions report outcomes (o_status: 0 written,
    # 1 version conflict, 2 tombstone, 3 duplicate command) rather than raise.
    (
        """
        CREATE TABLE trio_aggregates_commands (
            stream_id bigint NOT NULL REFERENCES trio_aggregates_streams (id),
            command_id text NOT NULL,
            version bigint NOT NULL,
            PRIMARY KEY (stream_id, command_id)
        )
        """,
        # trio_aggregates_append_batch's rules, plus command ids: append i
        # carries p_commands[i] (NULL: none). Set-based: one statement locks
        # the streams' rows, creating the missing ones, in name order (C
        # collation: the order of Python's sort, so that writers cannot
        # deadlock), and one, with a fresh snapshot taken after the locks,
        # reads each append's stream (id, state, version).
        # Then each append, in name order (appends to one stream chain), is
        # checked against its stream's running version, in this order: a
        # tombstone (2), a command id the stream holds (3, o_version = the
        # version recorded with it), the expected version (1, o_version = the
        # stream's version). An accepted append records its command id at
        # once (so a second append of the same command in this call sees it);
        # the events go in with one INSERT at the end.
        """
        CREATE FUNCTION trio_aggregates_write_appends(
            p_streams text[], p_expected bigint[], p_counts integer[], p_commands text[],
            p_types text[], p_data bytea[], p_metadata bytea[],
            OUT o_status integer[], OUT o_version bigint[]
        ) LANGUAGE plpgsql AS $$
        DECLARE
            v_n integer := coalesce(cardinality(p_streams), 0);
            v_total integer := coalesce(cardinality(p_types), 0);
            v_offsets integer[];
            v_ids bigint[];
            v_versions bigint[];
            v_sids bigint[];
            v_states smallint[];
            v_svers bigint[];
            v_prev text;
            v_id bigint;
            v_state smallint;
            v_version bigint;
            v_count integer;
            v_command text;
            v_applied bigint;
            v_offset integer := 0;
            v_any boolean := false;
            i integer;
        BEGIN
            o_status := array_fill(NULL::integer, ARRAY[v_n]);
            o_version := array_fill(NULL::bigint, ARRAY[v_n]);
            v_offsets := array_fill(0, ARRAY[v_n]);
            v_ids := array_fill(NULL::bigint, ARRAY[v_total]);
            v_versions := array_fill(NULL::bigint, ARRAY[v_total]);
            FOR i IN 1 .. v_n LOOP
                v_offsets[i] := v_offset;
                v_offset := v_offset + coalesce(p_counts[i], 0);
            END LOOP;
            IF v_offset <> v_total THEN
                RAISE EXCEPTION 'trio_aggregates_write_appends: counts do not match the events';
            END IF;
            -- Lock every stream's row, creating the missing ones, in one pass in
            -- name order (a conflicting row is locked, not updated: WHERE false).
            INSERT INTO trio_aggregates_streams AS s (name)
                SELECT DISTINCT u.name COLLATE "C" FROM unnest(p_streams) AS u(name) ORDER BY 1
                ON CONFLICT (name) WHERE state <> 1 DO UPDATE SET state = s.state WHERE false;
            SELECT array_agg(s.id ORDER BY u.ord), array_agg(s.state ORDER BY u.ord),
                    array_agg(v.version ORDER BY u.ord)
                INTO v_sids, v_states, v_svers
                FROM unnest(p_streams) WITH ORDINALITY AS u(name, ord)
                LEFT JOIN trio_aggregates_streams s ON s.name = u.name AND s.state <> 1
                LEFT JOIN LATERAL (
                    SELECT coalesce(max(e.version), 0) AS version
                    FROM trio_aggregates_events e WHERE e.stream_id = s.id
                ) v ON true;
            FOR i IN
                SELECT u.ord FROM unnest(p_streams) WITH ORDINALITY AS u(name, ord)
                ORDER BY u.name COLLATE "C", u.ord
            LOOP
                IF v_prev IS NULL OR p_streams[i] <> v_prev THEN
                    v_prev := p_streams[i];
                    v_id := v_sids[i];
                    v_state := v_states[i];
                    v_version := coalesce(v_svers[i], 0);
                END IF;
                IF v_state = 2 THEN
                    o_status[i] := 2;
                    CONTINUE;
                END IF;
                v_command := p_commands[i];
                IF v_command IS NOT NULL AND v_id IS NOT NULL THEN
                    SELECT c.version INTO v_applied FROM trio_aggregates_commands c
                        WHERE c.stream_id = v_id AND c.command_id = v_command;
                    IF FOUND THEN
                        o_status[i] := 3;
                        o_version[i] := v_applied;
                        CONTINUE;
                    END IF;
                END IF;
                IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_version THEN
                    o_status[i] := 1;
                    o_version[i] := v_version;
                    CONTINUE;
                END IF;
                v_count := coalesce(p_counts[i], 0);
                FOR j IN 1 .. v_count LOOP
                    v_version := v_version + 1;
                    v_ids[v_offsets[i] + j] := v_id;
                    v_versions[v_offsets[i] + j] := v_version;
                    v_any := true;
                END LOOP;
                IF v_command IS NOT NULL THEN
                    INSERT INTO trio_aggregates_commands (stream_id, command_id, version)
                        VALUES (v_id, v_command, v_version);
                END IF;
                o_status[i] := 0;
                o_version[i] := v_version;
            END LOOP;
            IF v_any THEN
                INSERT INTO trio_aggregates_events (stream_id, version, type, data, metadata)
                    SELECT u.id, u.version, u.type, u.data, u.metadata
                    FROM unnest(v_ids, v_versions, p_types, p_data, p_metadata)
                        AS u(id, version, type, data, metadata)
                    WHERE u.id IS NOT NULL;
            END IF;
        END
        $$
        """,
        # Save a snapshot: lock (create) the stream's row; 0 saved, 2 tombstone.
        """
        CREATE FUNCTION trio_aggregates_save_snapshot(
            p_name text, p_version bigint, p_schema integer, p_type text, p_data bytea
        ) RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            v_id bigint;
            v_state smallint;
        BEGIN
            SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                WHERE s.name = p_name AND s.state <> 1 FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO trio_aggregates_streams (name) VALUES (p_name)
                    ON CONFLICT (name) WHERE state <> 1 DO NOTHING;
                SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                    WHERE s.name = p_name AND s.state <> 1 FOR UPDATE;
            END IF;
            IF v_state = 2 THEN
                RETURN 2;
            END IF;
            INSERT INTO trio_aggregates_snapshots (stream_id, version, schema, type, data)
                VALUES (v_id, p_version, p_schema, p_type, p_data)
                ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version,
                    schema = excluded.schema, type = excluded.type, data = excluded.data;
            RETURN 0;
        END
        $$
        """,
        # Delete a stream: 0 deleted, 2 already a tombstone. Soft: detach the
        # live row (its events, snapshot and command ids stay with it). Hard:
        # erase them and make the row a tombstone (creating one if needed).
        """
        CREATE FUNCTION trio_aggregates_delete_stream(p_name text, p_hard boolean)
        RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            v_id bigint;
            v_state smallint;
        BEGIN
            SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                WHERE s.name = p_name AND s.state <> 1 FOR UPDATE;
            IF NOT FOUND THEN
                IF NOT p_hard THEN
                    RETURN 0;
                END IF;
                INSERT INTO trio_aggregates_streams (name, state) VALUES (p_name, 2)
                    ON CONFLICT (name) WHERE state <> 1 DO NOTHING;
                -- Ours (a tombstone), or a row another transaction committed meanwhile.
                SELECT s.id, s.state INTO v_id, v_state FROM trio_aggregates_streams s
                    WHERE s.name = p_name AND s.state <> 1 FOR UPDATE;
                IF v_state = 2 THEN
                    RETURN 0;
                END IF;
            ELSIF v_state = 2 THEN
                RETURN 2;
            END IF;
            IF p_hard THEN
                DELETE FROM trio_aggregates_events WHERE stream_id = v_id;
                DELETE FROM trio_aggregates_snapshots WHERE stream_id = v_id;
                DELETE FROM trio_aggregates_commands WHERE stream_id = v_id;
                UPDATE trio_aggregates_streams SET state = 2 WHERE id = v_id;
            ELSE
                UPDATE trio_aggregates_streams SET state = 1 WHERE id = v_id;
            END IF;
            RETURN 0;
        END
        $$
        """,
    ),
]

# -- version 4: the global order ------------------------------------------------
#
# Positions come from an identity column, assigned when a row is inserted;
# transactions commit in any order, so without more a reader could see
# position 11 committed while 10 is still in flight, and find 10 later (the
# lost-event bug of SQL event stores). So every function that inserts events
# first takes a transaction-scoped advisory lock on the events table
# (``_POSITION_LOCK``, the table's oid), just before its INSERT, after every
# row lock and check: positions are then handed out one transaction at a
# time, and the lock is released only after the commit is visible, so commit
# order is position order. Taken last, it is held only for the INSERT and the
# commit; a transaction waiting for it holds only row locks, and the holder
# waits for none (a batch of several statements locks all its streams first:
# ``_LOCK_STREAMS``), so no deadlock. The same statement sends a NOTIFY on
# ``_CHANNEL`` (delivered when the transaction commits, to listening
# subscriptions in any process). The functions of versions 1 to 3 are
# replaced by the same code with the lock and the notification added (also
# the one only an older library still calls), so upgraded databases are safe
# whatever version of the library writes to them.

# pg_advisory_xact_lock(int, int) keys: the bytes "tria", and the events table's oid.
_POSITION_LOCK_KEY = 0x74726961
_CHANNEL = "trio_aggregates_events"
_POSITION_LOCK = (
    f"PERFORM pg_advisory_xact_lock({_POSITION_LOCK_KEY}, "
    "'trio_aggregates_events'::regclass::oid::integer), "
    f"pg_notify('{_CHANNEL}', '');\n"
)


def _in_global_order(function: str) -> str:
    """A released write function, as CREATE OR REPLACE, taking the position lock
    just before it inserts events (see above)."""
    insert = "INSERT INTO trio_aggregates_events"
    assert function.count(insert) == 1
    function = function.replace(insert, _POSITION_LOCK + "                " + insert)
    if "CREATE OR REPLACE FUNCTION" not in function:
        function = function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    return function


_MIGRATIONS.append(
    (
        _in_global_order(_MIGRATIONS[0][4]),  # trio_aggregates_append
        _in_global_order(_MIGRATIONS[1][0]),  # trio_aggregates_append_batch
        _in_global_order(_MIGRATIONS[2][1]),  # trio_aggregates_write_appends
    )
)

# -- version 5: cluster membership, shard leases, fencing ---------------------
#
# The tables and functions of ``_cluster.py`` (see its docstring for the
# design). Every time is the database's clock (``clock_timestamp()``), never a
# node's. A lease row per shard holds the current grant (node, fencing token,
# expiry); the token comes from a sequence, so it only grows; the grants table
# keeps the history (one row per grant, its expiry moved on renewal, its
# release time), from which a test checks that no two grants of one shard were
# ever valid at once.
#
# trio_aggregates_fence is the fencing check an append runs first in its own
# transaction: it takes a shared transaction-scoped advisory lock per shard
# the append writes to (key _SHARD_LOCK_KEY, shard), then checks, with a
# fresh snapshot, that each (shard, token) lease is this node's and not
# expired by the database's clock, and raises SQLSTATE TAF01 (nothing of the
# transaction is written) if one is not. A claim or release takes the same
# locks exclusively, so it waits for the appends in flight on its shards, and
# they for it: every append lands before the next grant of its shard (the
# next owner, which loads the stream after its grant, reads it), or sees that
# grant and is refused. Advisory locks live in memory: the fence writes
# nothing (a FOR SHARE row lock would dirty the lease row and write WAL on
# every append). A renewal takes no advisory lock: an append that found the
# lease valid stays right. Every function takes its locks in shard order,
# advisory locks first, so lease writers and appends cannot deadlock.

_FENCED = "TAF01"
# In the lease functions: the rows of this node's leases (p_node) among the
# (shard, token) pairs given (p_shards, p_tokens), as ``l``.
_OWN_LEASES = (
    "trio_aggregates_leases l JOIN unnest(p_shards, p_tokens) AS u(shard, token)"
    " ON l.shard = u.shard AND l.token = u.token WHERE l.node = p_node"
)
# pg_advisory_xact_lock(int, int) key of the shard locks: the bytes "trib".
_SHARD_LOCK_KEY = 0x74726962
# Take the shards' advisory locks (``lock``: shared or exclusive) in shard order.
_LOCK_SHARDS = (
    "FOR v_shard IN SELECT DISTINCT u.s FROM unnest(p_shards) AS u(s) ORDER BY 1 LOOP\n"
    f"                PERFORM {{lock}}({_SHARD_LOCK_KEY}, v_shard);\n"
    "            END LOOP;"
)

_MIGRATIONS.append(
    (
        """
        CREATE TABLE trio_aggregates_nodes (
            node text PRIMARY KEY,
            address text NOT NULL,
            state text NOT NULL CHECK (state IN ('alive', 'leaving', 'dead', 'left')),
            joined_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """,
        "CREATE SEQUENCE trio_aggregates_fencing_tokens AS bigint",
        """
        CREATE TABLE trio_aggregates_leases (
            shard integer PRIMARY KEY,
            node text,
            token bigint NOT NULL,
            expires_at timestamptz NOT NULL
        )
        """,
        """
        CREATE TABLE trio_aggregates_lease_grants (
            token bigint PRIMARY KEY,
            shard integer NOT NULL,
            node text NOT NULL,
            granted_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            released_at timestamptz
        )
        """,
        "CREATE INDEX trio_aggregates_lease_grants_shard ON trio_aggregates_lease_grants (shard)",
        # Claim the shards among p_shards that are free (released or expired):
        # a new token each; return what was granted.
        f"""
        CREATE FUNCTION trio_aggregates_claim(p_node text, p_shards integer[], p_ttl float8)
        RETURNS TABLE (o_shard integer, o_token bigint) LANGUAGE plpgsql AS $$
        DECLARE
            v_now timestamptz;
            v_expires timestamptz;
            v_shard integer;
        BEGIN
            {_LOCK_SHARDS.format(lock="pg_advisory_xact_lock")}
            v_now := clock_timestamp();
            v_expires := v_now + make_interval(secs => p_ttl);
            RETURN QUERY
            WITH granted AS (
                INSERT INTO trio_aggregates_leases AS l (shard, node, token, expires_at)
                    SELECT u.shard, p_node, nextval('trio_aggregates_fencing_tokens'), v_expires
                    FROM (SELECT DISTINCT unnest(p_shards) AS shard) u ORDER BY u.shard
                ON CONFLICT (shard) DO UPDATE
                    SET node = excluded.node, token = excluded.token,
                        expires_at = excluded.expires_at
                    WHERE l.node IS NULL OR l.expires_at <= clock_timestamp()
                RETURNING l.shard, l.token
            ), recorded AS (
                INSERT INTO trio_aggregates_lease_grants
                    (token, shard, node, granted_at, expires_at)
                    SELECT g.token, g.shard, p_node, clock_timestamp(), v_expires FROM granted g
                RETURNING shard, token
            )
            SELECT r.shard, r.token FROM recorded r;
        END
        $$
        """,
        # Renew this node's leases (shard, token) that have not expired;
        # return those renewed (the others are lost).
        f"""
        CREATE FUNCTION trio_aggregates_renew(
            p_node text, p_shards integer[], p_tokens bigint[], p_ttl float8
        ) RETURNS TABLE (o_shard integer, o_token bigint) LANGUAGE plpgsql AS $$
        DECLARE
            v_expires timestamptz := clock_timestamp() + make_interval(secs => p_ttl);
        BEGIN
            RETURN QUERY
            WITH locked AS (
                SELECT l.shard FROM {_OWN_LEASES} AND l.expires_at > clock_timestamp()
                    ORDER BY l.shard FOR UPDATE OF l
            ), renewed AS (
                UPDATE trio_aggregates_leases l SET expires_at = v_expires
                    FROM locked WHERE l.shard = locked.shard
                RETURNING l.shard, l.token
            ), recorded AS (
                UPDATE trio_aggregates_lease_grants g SET expires_at = v_expires
                    FROM renewed WHERE g.token = renewed.token
                RETURNING g.shard, g.token
            )
            SELECT r.shard, r.token FROM recorded r;
        END
        $$
        """,
        # Release this node's leases (shard, token): free at once.
        f"""
        CREATE FUNCTION trio_aggregates_release(
            p_node text, p_shards integer[], p_tokens bigint[]
        ) RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            v_now timestamptz;
            v_count integer;
            v_shard integer;
        BEGIN
            {_LOCK_SHARDS.format(lock="pg_advisory_xact_lock")}
            v_now := clock_timestamp();
            WITH locked AS (
                SELECT l.shard FROM {_OWN_LEASES}
                    ORDER BY l.shard FOR UPDATE OF l
            ), released AS (
                UPDATE trio_aggregates_leases l
                    SET node = NULL, expires_at = least(l.expires_at, v_now)
                    FROM locked WHERE l.shard = locked.shard
                RETURNING l.token
            )
            UPDATE trio_aggregates_lease_grants g
                SET released_at = v_now, expires_at = least(g.expires_at, v_now)
                FROM released WHERE g.token = released.token;
            GET DIAGNOSTICS v_count = ROW_COUNT;
            RETURN v_count;
        END
        $$
        """,
        # The fence: see above. Raises TAF01 naming the shards not held.
        f"""
        CREATE FUNCTION trio_aggregates_fence(
            p_node text, p_shards integer[], p_tokens bigint[]
        ) RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            v_held integer[];
            v_shard integer;
        BEGIN
            {_LOCK_SHARDS.format(lock="pg_advisory_xact_lock_shared")}
            SELECT coalesce(array_agg(l.shard), '{{}}') INTO v_held
                FROM {_OWN_LEASES} AND l.expires_at > clock_timestamp();
            IF cardinality(v_held) < cardinality(p_shards) THEN
                RAISE EXCEPTION 'fenced: node % holds no valid lease on shards %', p_node,
                    ARRAY(SELECT s FROM unnest(p_shards) s WHERE NOT s = ANY(v_held) ORDER BY s)
                    USING ERRCODE = '{_FENCED}';
            END IF;
            RETURN cardinality(v_held);
        END
        $$
        """,
        # A fenced append as one statement (one round trip, autocommit): the
        # fence, then trio_aggregates_append, in the same transaction. Measured
        # on a single append: a BEGIN/fence/append/COMMIT pipeline costs
        # several times more than one function call doing both.
        """
        CREATE FUNCTION trio_aggregates_fenced_append(
            p_node text, p_shards integer[], p_tokens bigint[],
            p_name text, p_expected bigint, p_types text[], p_data bytea[], p_metadata bytea[],
            OUT o_status integer, OUT o_version bigint
        ) LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM trio_aggregates_fence(p_node, p_shards, p_tokens);
            SELECT a.o_status, a.o_version INTO o_status, o_version
                FROM trio_aggregates_append(p_name, p_expected, p_types, p_data, p_metadata) a;
        END
        $$
        """,
        """
        CREATE FUNCTION trio_aggregates_fenced_write_appends(
            p_node text, p_shards integer[], p_tokens bigint[],
            p_streams text[], p_expected bigint[], p_counts integer[], p_commands text[],
            p_types text[], p_data bytea[], p_metadata bytea[],
            OUT o_status integer[], OUT o_version bigint[]
        ) LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM trio_aggregates_fence(p_node, p_shards, p_tokens);
            SELECT a.o_status, a.o_version INTO o_status, o_version
                FROM trio_aggregates_write_appends(
                    p_streams, p_expected, p_counts, p_commands, p_types, p_data, p_metadata
                ) a;
        END
        $$
        """,
    )
)

# -- version 6: no foreign key from events to streams -------------------------
#
# The check of ``trio_aggregates_events.stream_id REFERENCES
# trio_aggregates_streams (id)`` ran a trigger (a ``SELECT ... FOR KEY SHARE``
# of the stream's row) per inserted event: about a seventh of a batch's time
# on the server, on rows the same function had just locked or created in the
# same transaction. Only the write functions insert events, always after the
# stream's row (a hard delete removes the events first), so the key is dropped;
# the primary key ``(stream_id, version)`` stays.
_MIGRATIONS.append(
    (
        "ALTER TABLE trio_aggregates_events"
        " DROP CONSTRAINT IF EXISTS trio_aggregates_events_stream_id_fkey",
    )
)

# -- version 7: the deleted streams, indexed ----------------------------------
#
# ``read_all`` without a category filter reads the events alone and skips
# those of deleted streams through this index (see _READ_ALL_LIVE): it holds
# only the streams deleted (soft or hard), usually none or few, so asking
# whether there are any, and probing it per event when there are, is cheap
# whatever the planner knows; writing a live stream never touches it.
_MIGRATIONS.append(
    (
        "CREATE INDEX IF NOT EXISTS trio_aggregates_streams_deleted"
        " ON trio_aggregates_streams (id) WHERE state IN (1, 2)",
    )
)
SCHEMA_VERSION = len(_MIGRATIONS)


def _wrap(exc: BaseException, action: str) -> StoreError:
    return _wrap_error("PostgreSQL", exc, action)


# -- connections ------------------------------------------------------------
#
# Every operation is bounded (see "Timeouts" in the module docstring): each
# call runs in a worker thread under a Trio deadline; when it fires (or the
# call is cancelled) the thread is abandoned and the connection it holds is
# cut (its socket shut down from the Trio thread), then closed by the thread
# itself, never reused. Below that, the server's statement_timeout, libpq's
# connect_timeout, TCP keepalives and tcp_user_timeout.


def _conninfo(dsn: str, *, timeout: float, connect_timeout: float | None) -> str:
    """``dsn`` with the store's bounds added.

    What the DSN sets itself wins; ``connect_timeout``, when given, wins over
    the DSN's.

    Raises:
        psycopg.ProgrammingError: ``dsn`` is malformed or has an unknown parameter.
    """
    params: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(dsn)
    if connect_timeout is None:
        given = params.get("connect_timeout")
        try:
            connect_timeout = float(given) if given not in (None, "") else 10.0
        except ValueError:
            raise psycopg.ProgrammingError(f"bad value for connect_timeout: {given!r}") from None
        if not 0 < connect_timeout < math.inf:
            connect_timeout = 10.0  # libpq's "wait forever": never, here
    # psycopg counts whole seconds, at least 2.
    params["connect_timeout"] = max(2, math.ceil(min(connect_timeout, timeout)))
    params.setdefault("fallback_application_name", "trio_aggregates")
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", max(1, int(timeout / 3)))
    params.setdefault("keepalives_interval", max(1, int(timeout / 9)))
    params.setdefault("keepalives_count", 3)
    params.setdefault("tcp_user_timeout", max(1, int(timeout * 1000)))
    return psycopg.conninfo.make_conninfo("", **params)


@final
class _Link:
    """A pooled connection, with a second handle on its socket.

    The handle (a ``dup`` of the connection's file descriptor) lets the Trio
    thread shut the socket down, which wakes a worker thread blocked on it,
    without the race of a descriptor that libpq closed and the system reused
    meanwhile: the duplicate keeps the socket alive until :meth:`close`.
    """

    __slots__ = ("conn", "generation", "prepared", "since", "sock")

    def __init__(self, conn: Conn, generation: int) -> None:
        self.conn = conn
        # Statements prepared on it by the write from the Trio thread (_pgwire.py).
        self.prepared: set[bytes] = set()
        self.since = time.monotonic()
        self.generation = generation
        self.sock: socket.socket | None
        try:
            self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        except OSError:  # pragma: no cover - nothing to cut: the bounds below still hold
            self.sock = None

    def cut(self) -> None:
        """Shut the socket down (from any thread): whoever waits on it wakes with an error."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            if self.sock is not None:
                self.sock.close()


@final
class _Attempt:
    """One call's claim on a connection, shared by its worker thread and Trio.

    The lock makes "take a connection" (in the thread) and "abandon" (in
    Trio) exclusive: once abandoned, the thread takes no connection, and the
    one it holds is cut at once and closed by the thread when it returns.
    """

    __slots__ = ("abandoned", "finished", "link", "lock", "took_idle")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.took_idle = False
        self.link: _Link | None = None
        # The connection the thread finished with and hands back to Trio: if
        # the call is cancelled after the thread returned but before Trio got
        # its result, abandon() takes it back (else nobody would close it).
        self.finished: _Link | None = None

    def hold(self, link: _Link, *, idle: bool = False) -> bool:
        """In the thread: use ``link`` from now on; False if the call was abandoned."""
        with self.lock:
            if self.abandoned:
                return False
            self.link = link
            self.took_idle = self.took_idle or idle
            return True

    def release(self, keep: _Link | None) -> bool:
        """In the thread: done with the connection; True if ``keep`` may be kept."""
        with self.lock:
            self.link = None
            if self.abandoned:
                return False
            self.finished = keep
            return True

    def abandon(self) -> tuple[bool, _Link | None]:
        """In Trio: give the thread up; return whether it took the idle
        connection, and the connection it finished with, if it had returned."""
        with self.lock:
            self.abandoned = True
            if self.link is not None:
                self.link.cut()
            finished, self.finished = self.finished, None
            return self.took_idle, finished


class _Abandoned(Exception):
    """Raised in a worker thread whose call was abandoned (nobody reads it)."""


def _nothing(conn: Conn) -> None:
    pass


@final
class _NoFreshLink:
    """What :meth:`_Pool.run_here` returns when no idle connection can be used unchecked."""


NO_FRESH_LINK: Final = _NoFreshLink()


@final
@attrs.define(eq=False)
class _Pool:
    """At most ``max_size`` connections, made on demand in worker threads.

    ``run(fn)`` runs ``fn(connection)`` in a worker thread within
    ``timeout`` seconds. If the thread has not returned by then, the call
    fails with :exc:`StoreError` ("did not answer within ... (timeout)"); if
    the call is cancelled, it raises :exc:`trio.Cancelled` at once. Either
    way the thread is abandoned and its connection dropped (:class:`_Attempt`).
    An idle connection is checked (an empty query) before use if it sat idle
    longer than ``check_after`` seconds, if a connection failed since it was
    last used, or if its socket has something to read (an idle connection
    has nothing to read unless the server closed it); a failed check or a
    broken connection is replaced by a new one.
    """

    conninfo: str
    max_size: int
    timeout: float
    check_after: float = 1.0
    _idle: list[_Link] = attrs.field(factory=list, init=False)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _generation: int = attrs.field(default=0, init=False)
    _in_use: int = attrs.field(default=0, init=False)
    _all_returned: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    # False when the DSN's ``options`` set statement_timeout themselves.
    _set_statement_timeout: bool = attrs.field(default=True, init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.max_size)
        options = psycopg.conninfo.conninfo_to_dict(self.conninfo).get("options") or ""
        self._set_statement_timeout = "statement_timeout" not in str(options)

    def _connect(self, attempt: _Attempt, generation: int) -> _Link:
        """In a worker thread: a new connection, held by ``attempt``."""
        if attempt.abandoned:
            raise _Abandoned  # (after a failed check of an idle connection)
        conn = psycopg.connect(self.conninfo, autocommit=True)
        try:
            if self._set_statement_timeout:
                # The server's own bound, below ours: on a live server a
                # statement that runs too long is cancelled, the connection kept.
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    (f"{max(1, int(self.timeout * 900))}ms",),
                )
            link = _Link(conn, generation)
        except BaseException:
            conn.close()
            raise
        if not attempt.hold(link):
            link.close()
            raise _Abandoned
        return link

    def _prepare(self, idle: _Link | None, generation: int, attempt: _Attempt) -> _Link:
        """In a worker thread: a usable connection (checked or new), held by ``attempt``."""
        if idle is not None:
            if not attempt.hold(idle, idle=True):
                raise _Abandoned  # Trio keeps the idle connection
            conn = idle.conn
            if conn.broken or conn.closed:
                attempt.release(None)
                idle.close()
                return self._connect(attempt, generation)
            stale = (
                idle.generation != generation
                or time.monotonic() - idle.since > self.check_after
                # An idle connection has nothing to read, unless the server
                # said goodbye (shutdown, restart, terminated backend).
                or bool(select.select([conn.fileno()], [], [], 0)[0])
            )
            if not stale:
                return idle
            try:
                conn.execute("")
            except psycopg.Error:
                attempt.release(None)
                idle.close()
            else:
                return idle
        return self._connect(attempt, generation)

    async def fill(self, count: int) -> None:
        """Open ``count`` connections now (to fail early on a bad DSN)."""
        for _ in range(count):
            await self.run(_nothing, fresh=True)

    async def run(self, fn: Callable[[Conn], T], *, fresh: bool = False) -> T:
        """Run ``fn`` on a connection (a new one if ``fresh``) in a worker thread.

        Raises what ``fn`` raises, :exc:`psycopg.Error` if no connection could
        be made, :exc:`StoreError` if the call took longer than ``timeout``,
        :exc:`trio.Cancelled` at once if it is cancelled.
        """
        if self._closed:
            raise StoreError("the PostgreSQL event store is closed")
        async with self._limiter:
            idle = self._idle.pop() if self._idle and not fresh else None
            generation = self._generation
            attempt = _Attempt()

            def work() -> tuple[_Link | None, outcome.Outcome[T]]:
                link: _Link | None = None
                try:
                    link = self._prepare(idle, generation, attempt)
                    result: outcome.Outcome[T] = outcome.Value(fn(link.conn))
                except Exception as exc:
                    result = outcome.Error(exc)
                if link is not None:
                    conn = link.conn
                    usable = not (
                        conn.broken
                        or conn.closed
                        or conn.info.transaction_status != TransactionStatus.IDLE
                    )
                    keep = attempt.release(link if usable else None) and usable
                    if not keep:
                        link.close()
                        link = None
                return link, result

            self._in_use += 1
            try:
                with trio.move_on_after(self.timeout) as bound:
                    link, result = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
                if bound.cancelled_caught:
                    self._abandon(attempt, idle)
                    raise self._timed_out()
            except trio.Cancelled:
                self._abandon(attempt, idle)
                raise
            finally:
                self._in_use -= 1
                if self._in_use == 0:
                    self._all_returned.set()
            if link is None:
                # A connection failed: check the other idle ones before use.
                self._generation += 1
            elif self._closed:
                link.close()  # closing while closing the store: no thread hop
            else:
                link.since = time.monotonic()
                link.generation = self._generation
                self._idle.append(link)
        return result.unwrap()

    async def run_here(self, fn: Callable[[_Link], Awaitable[T]]) -> T | _NoFreshLink:
        """Run ``fn`` on an idle connection in the Trio thread, within ``timeout``.

        Only a connection that needs no check is used (same generation, used
        less than ``check_after`` ago, nothing to read); without one, returns
        :data:`NO_FRESH_LINK` at once and the caller takes the worker-thread
        path (:meth:`run`), which checks or connects. Past ``timeout`` (or if
        ``fn`` leaves it broken) the connection is closed, never reused.

        Raises:
            StoreError: ``fn`` took longer than ``timeout``.
            Whatever ``fn`` raises (the connection is kept unless broken).
        """
        if self._closed:
            raise StoreError("the PostgreSQL event store is closed")
        # No checkpoint before the statement is sent: under load a checkpoint
        # waits for every other runnable task, and this is the writer's path.
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            return NO_FRESH_LINK
        try:
            link = self._fresh_idle()
            if link is None:
                return NO_FRESH_LINK
            self._in_use += 1
            keep = False
            try:
                with trio.move_on_after(self.timeout) as bound:
                    result = await fn(link)
                    keep = True
                if bound.cancelled_caught:
                    raise self._timed_out()
                return result
            except psycopg.Error:
                keep = not (link.conn.broken or link.conn.closed)
                raise
            finally:
                self._in_use -= 1
                if self._in_use == 0:
                    self._all_returned.set()
                if keep and not self._closed:
                    link.since = time.monotonic()
                    self._idle.append(link)
                else:
                    if not keep:
                        self._generation += 1
                    with contextlib.suppress(Exception):
                        link.close()
        finally:
            self._limiter.release()

    def _timed_out(self) -> StoreError:
        return StoreError(
            f"PostgreSQL did not answer within {self.timeout} s (timeout); the "
            "connection was dropped (a write in flight may or may not have been committed)"
        )

    def _fresh_idle(self) -> _Link | None:
        """Take the newest idle connection if it can be used without a check."""
        if not self._idle:
            return None
        link = self._idle[-1]
        conn = link.conn
        if (
            link.generation != self._generation
            or time.monotonic() - link.since > self.check_after
            or conn.broken
            or conn.closed
            or select.select([conn.fileno()], [], [], 0)[0]
        ):
            return None
        return self._idle.pop()

    def _abandon(self, attempt: _Attempt, idle: _Link | None) -> None:
        took_idle, finished = attempt.abandon()
        if finished is not None:
            # The thread was done, its result lost: keep its connection.
            if self._closed:
                finished.close()
            else:
                self._idle.append(finished)
            return
        if took_idle or idle is None:
            # The thread's connection is cut; look at the idle ones before use.
            self._generation += 1
        else:
            self._idle.append(idle)  # the thread never took it

    async def aclose(self) -> None:
        """Wait for the calls in progress (each bounded), then close every connection."""
        self._closed = True
        while self._in_use:
            self._all_returned = trio.Event()
            await self._all_returned.wait()
        idle, self._idle = self._idle, []

        def close_all() -> None:
            for link in idle:
                with contextlib.suppress(Exception):
                    link.close()

        # Closing does not wait for the server; bounded all the same.
        with trio.move_on_after(self.timeout):
            await trio.to_thread.run_sync(close_all, abandon_on_cancel=True)


def _migrate(conn: Conn) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS trio_aggregates_schema ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM trio_aggregates_schema"
        ).fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database's schema version {current} is newer than this library's "
                f"({SCHEMA_VERSION})"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO trio_aggregates_schema (version) VALUES (%s)", (version,))


# -- writing: one statement per op run ----------------------------------------

_LOCK_STREAMS = """
SELECT count(*) FROM (
    SELECT 1 FROM trio_aggregates_streams WHERE name = ANY(%s::text[]) AND state <> 1
    ORDER BY name COLLATE "C" FOR UPDATE
) locked
"""

# What the write functions report for an op (o_status).
_OK, _CONFLICT, _DELETED, _DUPLICATE = 0, 1, 2, 3

_WRITE_APPENDS = (
    "SELECT o_status, o_version FROM trio_aggregates_write_appends("
    "%s::text[], %s::bigint[], %s::integer[], %s::text[], %s::text[], %b::bytea[], %b::bytea[])"
)
# A lone append without a command id (one caller at a time): the schema's
# first function, half the server time of trio_aggregates_write_appends for
# one append (which wins from a few dozen appends on).
_APPEND_ONE = "SELECT o_status, o_version FROM trio_aggregates_append(%s, %s, %s, %b, %b)"
_SAVE_SNAPSHOT = "SELECT trio_aggregates_save_snapshot(%s, %s, %s, %s, %b)"
_DELETE_STREAM = "SELECT trio_aggregates_delete_stream(%s, %s)"

_Statement = tuple[str, tuple[Any, ...]]


def _statement(ops: Sequence[_WriteOp]) -> _Statement:
    """The one statement that writes ``ops``: a run of appends, or one snapshot or delete."""
    first = ops[0]
    if type(first) is _SaveSnapshot:
        s = first.snapshot
        return _SAVE_SNAPSHOT, (s.stream, s.version, s.schema, s.type, s.data)
    if type(first) is _Delete:
        return _DELETE_STREAM, (first.stream, first.hard)
    if len(ops) == 1 and first.command_id is None:
        events = first.events
        if not events:
            return _APPEND_ONE, (first.stream, first.expected_version, None, None, None)
        return _APPEND_ONE, (
            first.stream,
            first.expected_version,
            [e.type for e in events],
            [e.data for e in events],
            [e.metadata for e in events],
        )
    streams: list[str] = []
    expected: list[int | None] = []
    counts: list[int] = []
    commands: list[str | None] = []
    types: list[str] = []
    datas: list[bytes] = []
    metadatas: list[bytes] = []
    for op in cast("Sequence[_Append]", ops):
        streams.append(op.stream)
        expected.append(op.expected_version)
        counts.append(len(op.events))
        commands.append(op.command_id)
        for e in op.events:
            types.append(e.type)
            datas.append(e.data)
            metadatas.append(e.metadata)
    return _WRITE_APPENDS, (streams, expected, counts, commands, types, datas, metadatas)


def _outcomes(ops: Sequence[_WriteOp], row: Any) -> list[outcome.Outcome[Any]]:
    """Each op's outcome, from the row its statement (:func:`_statement`) returned."""
    assert row is not None
    first = ops[0]
    if type(first) is not _Append:
        if row[0] == _DELETED:
            return [outcome.Error(StreamDeleted(_op_stream(first)))]
        return [outcome.Value(None)]
    statuses, versions = row
    if not isinstance(statuses, list):  # _APPEND_ONE's scalars
        statuses, versions = [statuses], [versions]
    results: list[outcome.Outcome[Any]] = []
    for op, status, version in zip(cast("Sequence[_Append]", ops), statuses, versions, strict=True):
        if status == _OK:
            results.append(outcome.Value(int(version)))
        elif status == _CONFLICT:
            assert op.expected_version is not None
            error = ConcurrencyConflict(op.stream, op.expected_version, int(version))
            results.append(outcome.Error(error))
        elif status == _DUPLICATE:
            assert op.command_id is not None
            results.append(outcome.Error(DuplicateCommand(op.stream, op.command_id, int(version))))
        else:
            results.append(outcome.Error(StreamDeleted(op.stream)))
    return results


def _run_statements(conn: Conn, statements: list[_Statement]) -> list[Any]:
    """Run ``statements`` in one transaction and one round trip; return their rows.

    One statement runs alone in autocommit mode (it is its own transaction);
    several are sent together in pipeline mode between ``BEGIN`` and
    ``COMMIT``. Raises if any of them fails (nothing is written then).
    """
    if len(statements) == 1:
        sql, params = statements[0]
        return [conn.execute(sql, params).fetchone()]
    with conn.pipeline(), conn.transaction():
        cursors = [conn.execute(sql, params) for sql, params in statements]
    return [cursor.fetchone() for cursor in cursors]


# -- fencing (cluster mode, see _cluster.py) ------------------------------------


class _Fence(Protocol):
    """What a store in cluster mode asks before each write (``_cluster.py``)."""

    @property
    def node_id(self) -> str: ...

    def fence(self, stream: str) -> tuple[int, int]:
        """Return ``(shard, fencing token)`` for a write to ``stream``.

        Raises:
            NotOwner: this node holds no lease it trusts on the stream's shard.
        """
        ...


@final
@attrs.frozen
class _Fencing:
    """A batch's fencing: the node, and each op's ``(shard, token)``, in op order."""

    node: str
    grants: list[tuple[int, int]]

    def params(self, ops: Sequence[int] | None = None) -> tuple[Any, ...]:
        """The fence's parameters for the ops at indexes ``ops`` (all if ``None``)."""
        grants = self.grants if ops is None else [self.grants[i] for i in ops]
        pairs = sorted(set(grants))
        return self.node, [s for s, _ in pairs], [t for _, t in pairs]

    def fenced(self, statements: list[_Statement], ops: Sequence[int] | None = None) -> None:
        """Make ``statements`` (one transaction) check the fence first.

        One append statement becomes its fenced twin (one function call, one
        statement: still autocommit); otherwise the fence check goes first.
        """
        if len(statements) == 1 and statements[0][0] in _FENCED_TWIN:
            sql, params = statements[0]
            statements[0] = _FENCED_TWIN[sql], (*self.params(ops), *params)
        else:
            statements.insert(0, (_FENCE, self.params(ops)))

    def refused(self, op: _WriteOp, index: int) -> NotOwner:
        return NotOwner(_op_stream(op), self.grants[index][0], self.node, by_database=True)


_FENCE = "SELECT trio_aggregates_fence(%s, %s::integer[], %s::bigint[])"
_FENCED_TWIN = {
    _APPEND_ONE: "SELECT o_status, o_version FROM trio_aggregates_fenced_append("
    "%s, %s::integer[], %s::bigint[], %s, %s, %s, %b, %b)",
    _WRITE_APPENDS: "SELECT o_status, o_version FROM trio_aggregates_fenced_write_appends("
    "%s, %s::integer[], %s::bigint[], %s::text[], %s::bigint[], %s::integer[], %s::text[], "
    "%s::text[], %b::bytea[], %b::bytea[])",
}


def _is_fenced(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.Error) and exc.sqlstate == _FENCED


def _names_lacking(rows: list[Any], cache: dict[int, str]) -> tuple[dict[int, str], list[int]]:
    """The names of the streams of rows of _READ_ALL_LIVE (the stream's id first)
    that ``cache`` has, and the ids it lacks (read them with _STREAM_NAMES)."""
    names: dict[int, str] = {}
    missing: list[int] = []
    for stream_id in {row[0] for row in rows}:
        name = cache.get(stream_id)
        if name is None:
            missing.append(stream_id)
        else:
            names[stream_id] = name
    return names, missing


def _remember_names(cache: dict[int, str], rows: list[Any]) -> dict[int, str]:
    """Names read by _STREAM_NAMES, added to ``cache`` (which starts again
    empty past _NAMES_KEPT); returned."""
    found = dict(rows)
    if len(cache) + len(found) > _NAMES_KEPT:
        cache.clear()
    cache.update(found)
    return found


def _cached_records(rows: list[Any], cache: dict[int, str]) -> list[RecordedEvent] | None:
    """Records from rows of _READ_ALL_LIVE if ``cache`` names every one's
    stream (the common case: no set of the page's streams to make); ``None``
    if it lacks one (then _names_lacking)."""
    try:
        return _named_records(rows, cache)
    except KeyError:
        return None


def _named_records(rows: list[Any], names: dict[int, str]) -> list[RecordedEvent]:
    """Records from rows of _READ_ALL_LIVE, their streams named by ``names``."""
    return [
        RecordedEvent(names[stream_id], v, t, d, m, at, p) for stream_id, v, t, d, m, at, p in rows
    ]


def _write_here(
    ops: list[_WriteOp],
) -> tuple[list[int], _pgwire.Prepared, list[bytes | None]] | None:
    """For a batch that is one run of appends: the ops' order (by stream name,
    as :func:`_write_batch`), the prepared statement and its parameters in
    binary; None for any other batch, or for values this encoding refuses (the
    worker-thread path then reports them)."""
    if not all(type(op) is _Append for op in ops):
        return None
    order = sorted(range(len(ops)), key=lambda i: _op_stream(ops[i]))
    sql, params = _statement([ops[i] for i in order])
    try:
        if sql is _WRITE_APPENDS:
            streams, expected, counts, commands, types, datas, metadatas = params
            return (
                order,
                _pgwire.WRITE_APPENDS,
                [
                    _pgwire.text_array(streams),
                    _pgwire.int8_array(expected),
                    _pgwire.int4_array(counts),
                    _pgwire.text_array(commands),
                    _pgwire.text_array(types),
                    _pgwire.bytea_array(datas),
                    _pgwire.bytea_array(metadatas),
                ],
            )
        stream, expected_one, types1, datas1, metadatas1 = params
        return (
            order,
            _pgwire.APPEND_ONE,
            [
                _pgwire.text(stream),
                _pgwire.int8(expected_one),
                None if types1 is None else _pgwire.text_array(types1),
                None if datas1 is None else _pgwire.bytea_array(datas1),
                None if metadatas1 is None else _pgwire.bytea_array(metadatas1),
            ],
        )
    except (UnicodeError, struct.error, TypeError, ValueError):
        return None


def _write_alone(
    conn: Conn, op: _WriteOp, fencing: _Fencing | None = None, index: int = 0
) -> outcome.Outcome[Any]:
    """Write ``op`` in a transaction of its own: if it fails, it fails alone."""
    statements = [_statement([op])]
    if fencing is not None:
        fencing.fenced(statements, [index])
    try:
        row = _run_statements(conn, statements)[-1]
    except psycopg.Error as exc:
        if conn.broken:
            raise
        if fencing is not None and _is_fenced(exc):
            return outcome.Error(fencing.refused(op, index))
        return outcome.Error(_wrap(exc, _describe(op)))
    return _outcomes([op], row)[0]


# Errors that are not one op's fault: writing the ops again one at a time
# would only fail each again, after as long (the statement_timeout, under the
# store's own bound): the whole batch fails at once.
_NOT_ONE_OPS_FAULT = (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)


def _write_batch(conn: Conn, ops: list[_WriteOp], fencing: _Fencing | None = None) -> _BatchResult:
    """In a worker thread: write ``ops`` in one transaction, in one round trip.

    The ops are taken in (stable) order of stream name, so that every writer
    locks streams in the same order, and split into runs of appends (one call
    of ``trio_aggregates_write_appends`` each) and lone snapshots and deletes
    (one function call each). A conflict, a duplicate command or a deleted
    stream is an outcome the functions report, failing its op alone. If the
    transaction raises anyway (a value the driver cannot send, a deadlock
    with another process, ...), nothing of it is written, and the ops are
    written again one transaction each, so that only the ops at fault fail.

    With ``fencing`` (cluster mode), the transaction first runs the fence
    check of every op's ``(shard, token)``; if any is stale, the transaction
    is refused as a whole and each op is written again alone, under its own
    fence check: the ops of stale shards fail with :exc:`NotOwner`.
    """
    # Stable sort: one stream's writes keep their order.
    order = sorted(range(len(ops)), key=lambda i: _op_stream(ops[i]))
    runs = [order[start:end] for _, start, end in _split_runs(order, lambda i: _is_append(ops[i]))]
    results: list[outcome.Outcome[Any]] = [outcome.Value(None)] * len(ops)
    statements = [_statement([ops[i] for i in run]) for run in runs]
    if len(statements) > 1 and any(_is_append(op) for op in ops):
        # Lock every stream first, so that no statement waits for a row lock
        # once an earlier one took the position lock (see "version 4").
        names = sorted({_op_stream(op) for op in ops})
        statements.insert(0, (_LOCK_STREAMS, (names,)))
    if fencing is not None:
        fencing.fenced(statements)
    try:
        try:
            rows = _run_statements(conn, statements)
            del rows[: len(rows) - len(runs)]
        except psycopg.Error as exc:
            if conn.broken or isinstance(exc, _NOT_ONE_OPS_FAULT):
                raise
            logger.debug("batch write failed; writing one op at a time", exc_info=True)
            for i in order:
                results[i] = _write_alone(conn, ops[i], fencing, i)
            return _BatchResult(results, committed=True)
    except Exception as exc:
        # The connection was lost: none of the batch is written -- unless it
        # was lost during COMMIT, when the outcome is unknown.
        return _fail_all(ops, _wrap(exc, "write a transaction"))
    for run, row in zip(runs, rows, strict=True):
        for i, result in zip(run, _outcomes([ops[i] for i in run], row), strict=True):
            results[i] = result
    return _BatchResult(results, committed=True)


# Times: date_part('epoch', ...) is a float8 at once; extract() goes through
# numeric (0.8 us a row more in the server, measured on read_all pages). Both
# give the double nearest the stored microseconds.
_READ = """
SELECT s.state, e.version, e.type, e.data, e.metadata, date_part('epoch', e.recorded_at),
    e.position
FROM trio_aggregates_streams s
LEFT JOIN LATERAL (
    SELECT version, type, data, metadata, recorded_at, position FROM trio_aggregates_events
    WHERE stream_id = s.id AND version >= %s ORDER BY version LIMIT %s
) e ON true
WHERE s.name = %s AND s.state <> 1
ORDER BY e.version
"""

# The global order: every live stream's events from a position on (see
# "version 4" above for why a reader never finds a new event below one it has
# seen), with a category filter. The stream of each event is looked up row by
# row (a LATERAL subquery the planner cannot flatten: OFFSET 0), so the plan is
# always a scan of the position index that stops at the limit; as a plain
# join, a table not yet analyzed got a hash join over every later event and a
# sort (10x slower). A stream's category is split_part(name, '-', 1).
_READ_ALL = """
SELECT s.name, e.version, e.type, e.data, e.metadata,
    date_part('epoch', e.recorded_at), e.position
FROM trio_aggregates_events e
CROSS JOIN LATERAL (
    SELECT name FROM trio_aggregates_streams
    WHERE id = e.stream_id AND state = 0{stream_filter} OFFSET 0
) s
WHERE e.position >= %s{event_filter}
ORDER BY e.position LIMIT %s
"""
# Without a category filter (the common case: a subscription, a projection,
# a catch-up), the events are read alone, each with its stream's id; the names
# come from the store's cache of stream ids (an id's name never changes), the
# ones it lacks read by _STREAM_NAMES in the same call.
#
# The events of deleted streams are skipped, but only looked for when there
# are any: the first condition is a subquery run once per page (an InitPlan,
# on the small index of deleted streams, version 7), true when no stream is
# deleted, and then the per-event probe of that index is never made. When
# some are, each event's stream is probed in the index (OFFSET 0 keeps the
# probe per event: without it the planner may hash every deleted stream's id
# for each page). Either way the plan is a scan of the position index that
# stops at the limit. Measured on pages of 1,000 events (psycopg, binary rows,
# per event): with no deleted stream 1.3-1.6 us against 1.4-2.2 us for the
# anti-join this replaces (NOT EXISTS alone); with 5% of 300,000 streams
# deleted about the same (2.6-3.3 us); with all but the 1,000 the events
# belong to deleted (and half of those), 4.5-5.8 us, where the anti-join's
# plan became a merge of every event with every deleted stream and a sort
# (23-39 us).
_READ_ALL_LIVE = """
SELECT e.stream_id, e.version, e.type, e.data, e.metadata,
    date_part('epoch', e.recorded_at), e.position
FROM trio_aggregates_events e
WHERE e.position >= %s{event_filter} AND (
    (SELECT d.id FROM trio_aggregates_streams d WHERE d.state IN (1, 2) ORDER BY d.id LIMIT 1)
        IS NULL
    OR NOT EXISTS (
        SELECT FROM trio_aggregates_streams s
        WHERE s.id = e.stream_id AND s.state IN (1, 2) OFFSET 0
    )
)
ORDER BY e.position LIMIT %s
"""
_STREAM_NAMES = "SELECT id, name FROM trio_aggregates_streams WHERE id = ANY(%s::bigint[])"


def _numbered(sql: str) -> str:
    """``sql`` with its ``%s`` placeholders numbered for libpq: ``$1``, ``$2``, ..."""
    first, *rest = sql.split("%s")
    return first + "".join(f"${n}{part}" for n, part in enumerate(rest, 1))


# The same statements, run from the Trio thread (_pgwire.py) for a page of
# at most _HERE_ROWS rows: no worker thread, and the rows loaded in C.
_READ_ALL_HERE = _pgwire.Prepared(
    "trio_aggregates_read_all",
    _numbered(_READ_ALL_LIVE.format(event_filter="")),
    (_pgwire.INT8, _pgwire.INT8),
)
_READ_ALL_TYPES_HERE = _pgwire.Prepared(
    "trio_aggregates_read_all_types",
    _numbered(_READ_ALL_LIVE.format(event_filter=" AND e.type = ANY(%s::text[])")),
    (_pgwire.INT8, _pgwire.TEXT_ARRAY, _pgwire.INT8),
)
_STREAM_NAMES_HERE = _pgwire.Prepared(
    "trio_aggregates_stream_names", _numbered(_STREAM_NAMES), (_pgwire.INT8_ARRAY,)
)
#: The longest page read from the Trio thread. Building the records blocks it
#: (about 1 ms for 1,000 events); longer pages are read in a worker thread.
_HERE_ROWS: Final = 2000
#: Stream names the cache keeps at most (then it starts again, empty).
_NAMES_KEPT: Final = 100_000

_HEAD = "SELECT coalesce(max(position), 0) FROM trio_aggregates_events"

_VERSION = """
SELECT s.state,
    (SELECT coalesce(max(version), 0) FROM trio_aggregates_events WHERE stream_id = s.id)
FROM trio_aggregates_streams s WHERE s.name = %s AND s.state <> 1
"""

_COMMAND = """
SELECT s.state, c.version
FROM trio_aggregates_streams s
LEFT JOIN trio_aggregates_commands c ON c.stream_id = s.id AND c.command_id = %s
WHERE s.name = %s AND s.state <> 1
"""

_SNAPSHOT = """
SELECT s.state, n.version, n.schema, n.type, n.data
FROM trio_aggregates_streams s LEFT JOIN trio_aggregates_snapshots n ON n.stream_id = s.id
WHERE s.name = %s AND s.state <> 1
"""


def _columns(names: tuple[str, ...], values: tuple[Any, ...]) -> str:
    """The first column holding NULL, for messages (the others are typed by the schema)."""
    for name, value in zip(names, values, strict=True):
        if value is None:
            return f"its {name} column holds NULL"
    return "a column holds a value of the wrong type"  # pragma: no cover


def _unreadable_event(stream: str, rows: list[Any]) -> EventDecodeError:
    """The error for the first event of ``rows`` that cannot be read (a foreign row).

    The schema types every column (``NOT NULL``, ``bytea``, ``timestamptz``),
    so only a changed schema lets a NULL through; say where it is.
    """
    names = ("version", "type", "data", "metadata", "recorded_at")
    for row in rows:
        version, *rest = row[1:6]
        if version is None or None in rest:
            return EventDecodeError(
                f"event at {stream}@{version} cannot be read: {_columns(names, row[1:6])}"
            )
    return EventDecodeError(f"stream {stream!r} holds an event that cannot be read")


@final
@attrs.define(eq=False)
class PostgresEventStore(_DurableStore):
    """An :class:`~trio_aggregates.EventStore` in PostgreSQL. Make one with
    :func:`open_postgres_store`.

    Every call runs in a worker thread and is a checkpoint, and takes at most
    the store's ``timeout`` (see :func:`open_postgres_store`): past it, the
    call fails with :exc:`StoreError` ("PostgreSQL did not answer within ...
    (timeout)") and its connection is dropped. A cancelled read is abandoned
    at once (:exc:`trio.Cancelled`; its connection is dropped). Writes go
    through group commit; a cancelled write either committed entirely or not
    at all: if it was still queued it is withdrawn and :exc:`trio.Cancelled`
    is raised; if its transaction had begun, the call returns its result (or
    its error, at most ``timeout`` later) and the cancellation takes effect
    at the next checkpoint.

    Errors: every driver error (``psycopg.Error``: connection refused or lost,
    ...) comes out as :exc:`StoreError` with the driver's exception as
    ``__cause__``. A failed write leaves nothing behind, except when the
    connection was lost during ``COMMIT`` or the server did not answer in
    time: then the write may or may not have happened. After the database
    comes back (or answers again), the store works again: a failed or
    dropped connection is replaced at the next call. Calls after :meth:`aclose` raise
    :exc:`StoreError`.
    """

    _backend: ClassVar[str] = "PostgreSQL"
    # One batch at a time. Two in flight (each on its own connection) measured
    # 1.2-1.3x faster while the disk was slow (a loaded machine, 3 ms fsyncs)
    # but 0.85x on a quiet one (more, smaller batches): not worth it here.
    _batches_in_flight: ClassVar[int] = 1

    _pool: _Pool
    # Cluster mode (``_cluster.py``): asked for each write's (shard, token);
    # None (the default) writes exactly as without a cluster, at no cost.
    _fence: _Fence | None = attrs.field(default=None, init=False)
    # Stream id -> name, for read_all (see _READ_ALL_LIVE); shared by the
    # worker threads (each page copies what it uses, so a clear is harmless).
    _stream_names: dict[int, str] = attrs.field(factory=dict, init=False)

    async def _write_batch(self, ops: list[_WriteOp]) -> _BatchResult:
        fence = self._fence
        if fence is not None:
            return await self._write_fenced(fence, ops)
        here = _write_here(ops)
        if here is not None:
            # The usual batch, one run of appends: from the Trio thread.
            order, statement, params = here

            async def write(link: _Link) -> Any:
                try:
                    return await _pgwire.execute(link.conn, link.prepared, statement, params)
                except psycopg.Error as exc:
                    if link.conn.broken or isinstance(exc, _NOT_ONE_OPS_FAULT):
                        raise
                    # Refused, nothing written: the worker-thread path below
                    # finds the op at fault.
                    logger.debug("batch write failed; writing it in a worker thread", exc_info=True)
                    return NO_FRESH_LINK

            try:
                row = await self._pool.run_here(write)
            except psycopg.Error as exc:
                return _fail_all(ops, _wrap(exc, "write a transaction"))
            if row is not NO_FRESH_LINK:
                results: list[outcome.Outcome[Any]] = [outcome.Value(None)] * len(ops)
                sorted_ops = [ops[i] for i in order]
                for i, result in zip(order, _outcomes(sorted_ops, row), strict=True):
                    results[i] = result
                return _BatchResult(results, committed=True)
        try:
            return await self._pool.run(lambda conn: _write_batch(conn, ops))
        except psycopg.Error as exc:
            raise _wrap(exc, "connect") from exc

    async def _write_fenced(self, fence: _Fence, ops: list[_WriteOp]) -> _BatchResult:
        """Cluster mode: each op carries its shard's token, checked in the write's
        transaction; an op the node itself knows it does not own fails alone, unsent."""
        results: list[outcome.Outcome[Any]] = [outcome.Value(None)] * len(ops)
        sent: list[int] = []
        grants: list[tuple[int, int]] = []
        for i, op in enumerate(ops):
            try:
                grants.append(fence.fence(_op_stream(op)))
            except NotOwner as exc:
                results[i] = outcome.Error(exc)
            else:
                sent.append(i)
        if not sent:
            return _BatchResult(results, committed=False)
        batch = [ops[i] for i in sent]
        fencing = _Fencing(fence.node_id, grants)
        try:
            written = await self._pool.run(lambda conn: _write_batch(conn, batch, fencing))
        except psycopg.Error as exc:
            raise _wrap(exc, "connect") from exc
        for i, result in zip(sent, written.outcomes, strict=True):
            results[i] = result
        return _BatchResult(results, committed=written.committed)

    async def _query(
        self,
        query: str,
        params: tuple[Any, ...],
        action: str,
        *,
        convert: Callable[[list[Any]], list[Any]] | None = None,
    ) -> list[Any]:
        """The rows of ``query`` (binary), through ``convert`` in the worker thread if given."""
        self._check_open()

        def run(conn: Conn) -> list[Any]:
            with conn.cursor(binary=True) as cursor:
                cursor.execute(query, params)
                rows = cursor.fetchall()
            return rows if convert is None else convert(rows)

        try:
            return await self._pool.run(run)
        except psycopg.Error as exc:
            raise _wrap(exc, action) from exc

    async def read(
        self, stream: str, *, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` events of ``stream`` from ``from_version`` on.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: PostgreSQL failed.
        """
        _check_name(stream)
        count = None if limit is None else max(limit, 0)
        rows = await self._query(
            _READ, (max(from_version, 1), count, stream), f"read stream {stream!r}"
        )
        if not rows:
            return []
        if rows[0][0] == _TOMBSTONE:
            raise StreamDeleted(stream)
        try:
            return [
                RecordedEvent(stream, int(v), t, bytes(d), bytes(m), float(r), p)
                for _, v, t, d, m, r, p in rows
                if v is not None
            ]
        except (TypeError, ValueError):
            raise _unreadable_event(stream, rows) from None

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

        With any number of writer processes, once this has returned an event
        at position P no later call returns a new event below P (see "Global
        order" in the module docstring).

        Raises:
            EventDecodeError: a row cannot be read (a changed schema).
            StoreError: PostgreSQL failed.
        """
        start, count, cats, types = _check_read_all(from_position, limit, categories, event_types)
        if count == 0 or (cats is not None and not cats) or (types is not None and not types):
            self._check_open()
            await trio.lowlevel.checkpoint()
            return []
        stream_filter = event_filter = ""
        params: list[Any] = []
        if cats is not None:
            stream_filter = " AND split_part(name, '-', 1) = ANY(%s::text[])"
            params.append(sorted(cats))
        params.append(start)
        if types is not None:
            event_filter = " AND e.type = ANY(%s::text[])"
            params.append(sorted(types))
        params.append(count)
        if cats is not None:
            query = _READ_ALL.format(stream_filter=stream_filter, event_filter=event_filter)
            # The columns are in RecordedEvent's field order, NOT NULL and typed
            # (bytea loads as bytes): the records are built in the worker thread.
            records: list[RecordedEvent] = await self._query(
                query, tuple(params), "read all streams", convert=_records_of
            )
            return records
        cache = self._stream_names
        self._check_open()
        if count is not None and count <= _HERE_ROWS:
            # The usual page: from the Trio thread, on an idle connection.
            if types is None:
                statement = _READ_ALL_HERE
                wire = [_pgwire.int8(start), _pgwire.int8(count)]
            else:
                statement = _READ_ALL_TYPES_HERE
                wire = [_pgwire.int8(start), _pgwire.text_array(sorted(types)), _pgwire.int8(count)]

            async def read_here(link: _Link) -> list[RecordedEvent]:
                rows = await _pgwire.query(link.conn, link.prepared, statement, wire)
                records = _cached_records(rows, cache)  # [] for no rows
                if records is not None:
                    return records
                names, missing = _names_lacking(rows, cache)
                if missing:
                    found = await _pgwire.query(
                        link.conn,
                        link.prepared,
                        _STREAM_NAMES_HERE,
                        [_pgwire.int8_array(missing)],
                    )
                    names.update(_remember_names(cache, found))
                return _named_records(rows, names)

            try:
                page = await self._pool.run_here(read_here)
            except psycopg.Error as exc:
                raise _wrap(exc, "read all streams") from exc
            if not isinstance(page, _NoFreshLink):
                return page
        query = _READ_ALL_LIVE.format(event_filter=event_filter)

        def run(conn: Conn) -> list[RecordedEvent]:
            with conn.cursor(binary=True) as cursor:
                cursor.execute(query, params)
                rows = cursor.fetchall()
                records = _cached_records(rows, cache)  # [] for no rows
                if records is not None:
                    return records
                names, missing = _names_lacking(rows, cache)
                if missing:
                    cursor.execute(_STREAM_NAMES, (missing,))
                    names.update(_remember_names(cache, cursor.fetchall()))
                return _named_records(rows, names)

        try:
            return await self._pool.run(run)
        except psycopg.Error as exc:
            raise _wrap(exc, "read all streams") from exc

    async def head_position(self) -> int:
        """Return the highest position readable now (0 if none).

        Raises:
            StoreError: PostgreSQL failed.
        """
        rows = await self._query(_HEAD, (), "read the head position")
        return int(rows[0][0])

    async def stream_version(self, stream: str) -> int:
        """Return the stream's version (0 for a stream with no events).

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: PostgreSQL failed.
        """
        _check_name(stream)
        rows = await self._query(_VERSION, (stream,), f"read the version of {stream!r}")
        if not rows:
            return 0
        if rows[0][0] == _TOMBSTONE:
            raise StreamDeleted(stream)
        return int(rows[0][1])

    async def find_command(self, stream: str, command_id: str) -> int | None:
        """Return the stream's version right after the append that carried
        ``command_id``, or ``None`` if the stream does not hold it.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: PostgreSQL failed.
        """
        _check_name(stream)
        _check_command_id(command_id, required=True)
        rows = await self._query(
            _COMMAND, (command_id, stream), f"look up command {command_id!r} of {stream!r}"
        )
        if not rows:
            return None
        state, version = rows[0]
        if state == _TOMBSTONE:
            raise StreamDeleted(stream)
        return None if version is None else int(version)

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        """Return the stream's latest snapshot, or ``None``.

        Raises:
            StreamDeleted: the stream was hard-deleted.
            StoreError: PostgreSQL failed.
        """
        _check_name(stream)
        rows = await self._query(_SNAPSHOT, (stream,), f"load the snapshot of {stream!r}")
        if not rows:
            return None
        state, version, schema, type_, data = rows[0]
        if state == _TOMBSTONE:
            raise StreamDeleted(stream)
        if version is None:
            return None
        try:
            return Snapshot(stream, int(version), int(schema), type_, bytes(data))
        except (TypeError, ValueError):
            raise EventDecodeError(
                f"the snapshot of stream {stream!r} cannot be read: "
                f"{_columns(('version', 'schema', 'type', 'data'), rows[0][1:])}"
            ) from None

    @property
    def conninfo(self) -> str:
        """The libpq connection string the store connects with: the DSN it was
        opened with plus its bounds (timeouts, keepalives). For a connection of
        your own to the same database (a read model written in the same
        transaction as a projection's checkpoint, say)."""
        return self._pool.conninfo

    @asynccontextmanager
    async def _open_listener(self) -> AsyncIterator[_Listener]:
        """A ``LISTEN`` connection of its own, for one subscription (``_subscription.py``)."""
        listener = _Listener(self._pool.conninfo, self._pool.timeout)
        try:
            yield listener
        finally:
            listener.close()

    async def _close_connections(self) -> None:
        await self._pool.aclose()


@final
class _Listener:
    """Notifications of committed appends, from any process: ``LISTEN`` on ``_CHANNEL``.

    Connects at the first :meth:`wait` (a subscription catching up needs no
    wake-up). The socket is waited on by Trio itself
    (:func:`trio.lowlevel.wait_readable`), no thread. Never raises but for
    cancellation: if the connection fails, :meth:`wait` waits for ever (the
    subscription polls meanwhile) and connects again at most every
    ``timeout`` seconds; a new connection may have missed notifications, so
    :meth:`wait` returns at once after connecting (the caller reads again).
    """

    __slots__ = ("_conn", "_conninfo", "_retry_at", "_timeout")

    def __init__(self, conninfo: str, timeout: float) -> None:
        self._conninfo = conninfo
        self._timeout = timeout
        self._conn: Conn | None = None
        self._retry_at = -math.inf

    def drain(self) -> None:
        """Forget the notifications received so far (before a read)."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.pgconn.consume_input()
            while conn.pgconn.notifies() is not None:
                pass
        except psycopg.Error:
            self.close()

    async def wait(self) -> None:
        """Return when a notification arrived since :meth:`drain` (or after connecting)."""
        conn = self._conn
        if conn is None:
            if trio.current_time() < self._retry_at:
                await trio.sleep_forever()
            await self._connect()
            if self._conn is None:
                self._retry_at = trio.current_time() + self._timeout
                await trio.sleep_forever()
            return
        fd = conn.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            notified = False
            try:
                conn.pgconn.consume_input()
                while conn.pgconn.notifies() is not None:
                    notified = True
            except psycopg.Error:
                logger.debug("the LISTEN connection failed", exc_info=True)
                self.close()
                return  # read again (and connect again at the next wait)
            if notified:
                return

    async def _connect(self) -> None:
        lock = threading.Lock()
        abandoned = False
        made: list[Conn] = []

        def connect() -> None:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            try:
                conn.execute(f"LISTEN {_CHANNEL}")
            except BaseException:
                conn.close()
                raise
            with lock:
                if abandoned:
                    conn.close()
                else:
                    made.append(conn)

        try:
            with trio.move_on_after(self._timeout):
                await trio.to_thread.run_sync(connect, abandon_on_cancel=True)
        except psycopg.Error:
            logger.debug("LISTEN failed; polling", exc_info=True)
        finally:
            with lock:
                abandoned = True
                if made and self._conn is None:
                    self._conn = made[0]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


@asynccontextmanager
async def open_postgres_store(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    connect_timeout: float | None = None,
    timeout: float = 30.0,
) -> AsyncIterator[PostgresEventStore]:
    """Connect to PostgreSQL, create or migrate the schema, and yield the store.

    Usage::

        async with open_postgres_store("postgresql://app@localhost/app") as store:
            await store.append("order-1", [event], expected_version=0)

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL (with libpq's
            parameters only; :func:`open_store` also takes the store's own
            knobs in a URL).
        min_size: connections opened at once (at least 1, which also runs
            the migrations).
        max_size: most connections open at a time (calls beyond wait).
        connect_timeout: seconds to wait for a new connection (psycopg rounds
            it up to whole seconds, at least 2; never more than ``timeout``).
            ``None``: the DSN's ``connect_timeout``, else 10.
        timeout: seconds any one database operation may take (a read, a
            write transaction, a connection). Past it the call fails with
            :exc:`StoreError` and its connection is dropped; the server
            cancels a statement running longer than nine tenths of it; TCP
            keepalives notice a dead peer within about two thirds of it.

    Raises:
        InvalidArgument: an argument is out of range or of the wrong type, or
            the DSN is malformed.
        StoreError: the server could not be reached or did not answer within
            ``timeout``, or the migration failed (the driver's exception is
            the ``__cause__``), or the database's schema is newer than this
            library's.

    On exit (also on error or cancellation) the store finishes its queued
    writes and closes its connections; with the server not answering, that
    takes at most ``timeout``.
    """
    if not isinstance(dsn, str):
        raise InvalidArgument(f"dsn must be a str, not {type(dsn).__name__}")
    min_size = check_count("min_size", min_size)
    max_size = check_count("max_size", max_size)
    if min_size > max_size:
        raise InvalidArgument(f"min_size ({min_size}) must not exceed max_size ({max_size})")
    timeout = check_seconds("timeout", timeout, allow_zero=False)
    if connect_timeout is not None:
        connect_timeout = check_seconds("connect_timeout", connect_timeout, allow_zero=False)
    try:
        conninfo = _conninfo(dsn, timeout=timeout, connect_timeout=connect_timeout)
    except psycopg.Error as exc:
        raise InvalidArgument(f"malformed PostgreSQL DSN: {exc}") from None
    pool = _Pool(conninfo, max_size, timeout)
    store = PostgresEventStore(pool)
    try:
        try:
            await pool.fill(min_size)
            await pool.run(_migrate)
        except psycopg.Error as exc:
            raise _wrap(exc, "open the store") from exc
        yield store
    finally:
        await store.aclose()
