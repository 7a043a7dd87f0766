"""Shared fixtures: a throwaway PostgreSQL server for the session, a fresh schema per test,
and the fixtures of the testing kit (``trio_aggregates.testing``).

The PostgreSQL tests skip, with the reason shown, when no PostgreSQL server
binaries are installed; when the ``CI`` environment variable is set they fail
instead, because CI must run them (``.ci/install-postgres`` installs the server).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import attrs
import pytest
from _pgserver import PostgresNotFound, PostgresServer

# The testing kit's fixtures (memory_store, aggregates, ...), as users load them.
pytest_plugins = ["trio_aggregates.testing"]


def _no_postgres(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the PostgreSQL tests must run, but: {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


def make_postgres_server() -> PostgresServer:
    """Start a new throwaway server, or skip (fail under CI) if there are no binaries."""
    try:
        return PostgresServer.create()
    except PostgresNotFound as exc:
        _no_postgres(str(exc))
        raise  # unreachable: skip and fail raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started on first use, removed at the end)."""
    server = make_postgres_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN for the session server's ``postgres`` database (for administration)."""
    return postgres_server.dsn


@attrs.frozen
class PostgresDatabase:
    """The place one test gets to itself: a fresh schema, first on the search path.

    ``dsn`` and ``url`` connect with ``search_path`` set to the schema alone, so
    everything a store creates lands there. (A schema per test instead of a
    database per test: ``CREATE DATABASE`` costs about 0.3 s, a schema 5 ms.)
    """

    schema: str
    dsn: str
    url: str


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty schema for this test alone, dropped afterwards."""
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield PostgresDatabase(
            schema,
            f"{postgres_server.dsn} options='-csearch_path={schema}'",
            f"{postgres_server.url_for('postgres')}?options=-csearch_path%3D{schema}",
        )
    finally:
        if postgres_server.running:
            with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
                admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
