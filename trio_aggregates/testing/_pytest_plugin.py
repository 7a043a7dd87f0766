"""The pytest fixtures of :mod:`trio_aggregates.testing` (loaded by ``pytest_plugins``).

Async fixtures need pytest-trio (``trio_mode = true``, or tests marked
``@pytest.mark.trio``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from .._runtime._aggregate import Aggregate
from ._faulty_store import FaultyStore
from ._repositories import Repositories, open_repositories

__all__ = ["aggregate_options", "aggregate_types", "aggregates", "memory_store"]


@pytest.fixture
def aggregate_types() -> Sequence[type[Aggregate]]:
    """The aggregate types the ``aggregates`` fixture runs: override it.

    In a ``conftest.py`` or a test module::

        @pytest.fixture
        def aggregate_types():
            return [Account, User]

    or for one test: ``@pytest.mark.parametrize("aggregate_types", [[Account]])``.
    """
    pytest.fail(
        "the aggregates fixture needs the aggregate types to run: define a fixture "
        "`aggregate_types` returning them (in conftest.py or the test module), or "
        '@pytest.mark.parametrize("aggregate_types", [[MyAggregate]])',
        pytrace=False,
    )


@pytest.fixture
def aggregate_options() -> dict[str, Any]:
    """Options for each ``open_aggregates`` of the ``aggregates`` fixture (none by
    default): override it, e.g. ``return {"idle_timeout": 5}``."""
    return {}


@pytest.fixture
def memory_store() -> FaultyStore:
    """A fresh in-memory event store for the test: a :class:`FaultyStore`, which
    fails, holds or delays calls only when the test tells it to."""
    return FaultyStore()


@pytest.fixture
async def aggregates(
    aggregate_types: Sequence[type[Aggregate]],
    memory_store: FaultyStore,
    aggregate_options: dict[str, Any],
) -> AsyncIterator[Repositories]:
    """The live repositories of ``aggregate_types`` on ``memory_store``: ``aggregates[Account]``.

    Opened before the test, closed after it (every aggregate ends). Add
    ``autojump_clock`` to the test's own arguments to run it on virtual time
    (pytest-trio takes the clock from the test's arguments only).
    """
    async with open_repositories(
        *aggregate_types, store=memory_store, **aggregate_options
    ) as repositories:
        yield repositories
