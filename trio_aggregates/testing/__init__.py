"""Tools for testing code built on trio_aggregates (like :mod:`trio.testing`).

* :func:`scenario`: given/when/then tests of an aggregate's decisions, pure
  (no Trio, no store).
* :class:`FaultyStore`: an in-memory event store that fails, holds (at a
  :class:`Latch`) or delays calls when the test says so.
* :func:`open_repositories`: several aggregate types on one store.
* A pytest plugin, loaded with ``pytest_plugins = ["trio_aggregates.testing"]``
  in a ``conftest.py``: the fixtures ``memory_store``, ``aggregates``,
  ``aggregate_types`` and ``aggregate_options``. Importing this module does
  not import pytest.

Its helpers raise their own AssertionError messages: there is nothing for
pytest to rewrite (PYTEST_DONT_REWRITE), so a conftest.py may import the kit
before naming it in ``pytest_plugins``.
"""

from __future__ import annotations

from ._faulty_store import (
    FaultyStore as FaultyStore,
    Latch as Latch,
    Operation as Operation,
)
from ._repositories import (
    Repositories as Repositories,
    open_repositories as open_repositories,
)
from ._scenario import (
    Expectation as Expectation,
    Scenario as Scenario,
    scenario as scenario,
)

__all__ = [
    "Expectation",
    "FaultyStore",
    "Latch",
    "Operation",
    "Repositories",
    "Scenario",
    "open_repositories",
    "scenario",
]

#: Read by pytest when this module is named in ``pytest_plugins``: the fixtures
#: live in a module of their own, so that importing the kit never imports pytest.
pytest_plugins = ["trio_aggregates.testing._pytest_plugin"]

# Show the functions as trio_aggregates.testing.X, as the package does.
open_repositories.__module__ = __name__
scenario.__module__ = __name__
