"""Several aggregate types on one store for a test: :func:`open_repositories`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar, final

from .._core._exceptions import InvalidArgument
from .._runtime._aggregate import Aggregate
from .._runtime._repository import AggregateRepository, open_aggregates
from .._stores._store import EventStore
from ._faulty_store import FaultyStore

__all__ = ["Repositories", "open_repositories"]

A = TypeVar("A", bound=Aggregate)


@final
class Repositories(Mapping[type[Aggregate], AggregateRepository[Any]]):
    """The live repositories of a test, by aggregate type (made by :func:`open_repositories`).

    ``repositories[Account]`` is the :class:`AggregateRepository` of
    ``Account``, typed as such.

    Attributes:
        store: the event store they share.
    """

    def __init__(
        self, store: EventStore, repositories: Mapping[type[Aggregate], AggregateRepository[Any]]
    ) -> None:
        self.store = store
        self._repositories = dict(repositories)

    def __getitem__(self, aggregate_type: type[A]) -> AggregateRepository[A]:
        try:
            return self._repositories[aggregate_type]
        except KeyError:
            known = ", ".join(t.__name__ for t in self._repositories) or "none"
            raise KeyError(
                f"no repository for {getattr(aggregate_type, '__name__', aggregate_type)!r} "
                f"(open: {known}); list it in the aggregate types"
            ) from None

    def __iter__(self) -> Iterator[type[Aggregate]]:
        return iter(self._repositories)

    def __len__(self) -> int:
        return len(self._repositories)

    def __repr__(self) -> str:
        names = ", ".join(t.__name__ for t in self._repositories)
        return f"<Repositories of {names} on {self.store!r}>"


@asynccontextmanager
async def open_repositories(
    *aggregate_types: type[Aggregate], store: EventStore | None = None, **options: Any
) -> AsyncIterator[Repositories]:
    """Run one :func:`open_aggregates` per type, all on one store, for the block's duration.

    What the ``aggregates`` fixture of the pytest plugin opens; usable
    without pytest too (in ``trio.run``, or in a fixture of your own).

    Args:
        aggregate_types: the :class:`Aggregate` subclasses to run.
        store: the event store; by default a new :class:`FaultyStore` (an
            in-memory store that fails only when told to).
        options: passed on to each :func:`open_aggregates` (``idle_timeout``,
            ``mailbox_size``, ``max_retries``, ...).

    Leaving the block ends every aggregate, as leaving :func:`open_aggregates`
    does (the types in reverse order).

    Raises:
        InvalidArgument: no types, a type given twice, a type that is not an
            :class:`Aggregate` subclass, or a bad option.
    """
    if not aggregate_types:
        raise InvalidArgument("open_repositories needs at least one aggregate type")
    if len(set(aggregate_types)) != len(aggregate_types):
        raise InvalidArgument(f"an aggregate type is given twice: {aggregate_types!r}")
    shared: EventStore = FaultyStore() if store is None else store
    async with AsyncExitStack() as stack:
        repositories: dict[type[Aggregate], AggregateRepository[Any]] = {}
        for aggregate_type in aggregate_types:
            repositories[aggregate_type] = await stack.enter_async_context(
                open_aggregates(aggregate_type, shared, **options)
            )
        yield Repositories(shared, repositories)
