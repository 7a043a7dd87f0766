"""trio_aggregates: a nursery-owning aggregate registry and event-sourced aggregates for Trio."""

import contextlib
import inspect
from typing import TYPE_CHECKING, Any

from ._aggregate import (
    NO_REPLY as NO_REPLY,
)
from ._aggregate import (
    Aggregate as Aggregate,
)
from ._aggregate import (
    Decision as Decision,
)
from ._aggregate import (
    applies as applies,
)
from ._aggregate import (
    handles as handles,
)
from ._codec import (
    EventCodec as EventCodec,
)
from ._codec import (
    Upcaster as Upcaster,
)
from ._codec import (
    event_type as event_type,
)
from ._codec import (
    type_name_of as type_name_of,
)
from ._exceptions import (
    AggregateCrashed as AggregateCrashed,
)
from ._exceptions import (
    AggregateDeclined as AggregateDeclined,
)
from ._exceptions import (
    AggregateGone as AggregateGone,
)
from ._exceptions import (
    AggregateNotFound as AggregateNotFound,
)
from ._exceptions import (
    AggregateStartError as AggregateStartError,
)
from ._exceptions import (
    AlreadyExists as AlreadyExists,
)
from ._exceptions import (
    CallAlreadyAnswered as CallAlreadyAnswered,
)
from ._exceptions import (
    CallTimeout as CallTimeout,
)
from ._exceptions import (
    CommandRejected as CommandRejected,
)
from ._exceptions import (
    ConcurrencyConflict as ConcurrencyConflict,
)
from ._exceptions import (
    EventDecodeError as EventDecodeError,
)
from ._exceptions import (
    InvalidArgument as InvalidArgument,
)
from ._exceptions import (
    InvalidKey as InvalidKey,
)
from ._exceptions import (
    KeyAlreadyRegistered as KeyAlreadyRegistered,
)
from ._exceptions import (
    RegistryClosed as RegistryClosed,
)
from ._exceptions import (
    StoreError as StoreError,
)
from ._exceptions import (
    StreamDeleted as StreamDeleted,
)
from ._exceptions import (
    TrioAggregatesError as TrioAggregatesError,
)
from ._exceptions import (
    UnknownCommand as UnknownCommand,
)
from ._exceptions import (
    UnknownEventType as UnknownEventType,
)
from ._exceptions import (
    WrongExpectedVersion as WrongExpectedVersion,
)
from ._groupcommit import (
    StoreStatistics as StoreStatistics,
)
from ._open_store import open_store as open_store
from ._registry import (
    AggregateFunction as AggregateFunction,
)
from ._registry import (
    Call as Call,
)
from ._registry import (
    Mailbox as Mailbox,
)
from ._registry import (
    Registry as Registry,
)
from ._registry import (
    RegistryStatistics as RegistryStatistics,
)
from ._registry import (
    open_registry as open_registry,
)
from ._repository import (
    AggregateRepository as AggregateRepository,
)
from ._repository import (
    StoredEvent as StoredEvent,
)
from ._repository import (
    open_aggregates as open_aggregates,
)
from ._sqlite import (
    SQLiteEventStore as SQLiteEventStore,
)
from ._sqlite import (
    open_sqlite_store as open_sqlite_store,
)
from ._store import (
    EventStore as EventStore,
)
from ._store import (
    InMemoryEventStore as InMemoryEventStore,
)
from ._store import (
    NewEvent as NewEvent,
)
from ._store import (
    RecordedEvent as RecordedEvent,
)
from ._store import (
    Snapshot as Snapshot,
)
from ._store import (
    read_stream as read_stream,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._postgres import (
        PostgresEventStore as PostgresEventStore,
    )
    from ._postgres import (
        open_postgres_store as open_postgres_store,
    )


def __getattr__(name: str) -> Any:
    # The PostgreSQL store needs psycopg (the `postgres` extra): import it on first use.
    if name in ("PostgresEventStore", "open_postgres_store"):
        from . import _postgres

        value = getattr(_postgres, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fix_module_names() -> None:
    # Show exceptions and functions as trio_aggregates.X (as trio does), not
    # trio_aggregates._module.X. Not other classes: typing.get_type_hints (and
    # so cattrs, for snapshots) resolves a class's string annotations in the
    # namespace of its __module__.
    prefix = __name__ + "._"
    for name, value in list(globals().items()):
        if name.startswith("_") or not getattr(value, "__module__", "").startswith(prefix):
            continue
        if inspect.isfunction(value) or (
            isinstance(value, type) and issubclass(value, BaseException)
        ):
            with contextlib.suppress(AttributeError, TypeError):
                value.__module__ = __name__


_fix_module_names()
del _fix_module_names
