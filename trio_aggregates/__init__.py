"""trio_aggregates: a nursery-owning aggregate registry and event-sourced aggregates for Trio."""

import contextlib
import inspect
from typing import TYPE_CHECKING, Any

from ._core._exceptions import (
    AggregateCrashed as AggregateCrashed,
    AggregateDeclined as AggregateDeclined,
    AggregateGone as AggregateGone,
    AggregateNotFound as AggregateNotFound,
    AggregateStartError as AggregateStartError,
    AlreadyExists as AlreadyExists,
    CallAlreadyAnswered as CallAlreadyAnswered,
    CallTimeout as CallTimeout,
    CommandRejected as CommandRejected,
    ConcurrencyConflict as ConcurrencyConflict,
    DuplicateCommand as DuplicateCommand,
    EventDecodeError as EventDecodeError,
    InvalidArgument as InvalidArgument,
    InvalidKey as InvalidKey,
    KeyAlreadyRegistered as KeyAlreadyRegistered,
    NotOwner as NotOwner,
    RegistryClosed as RegistryClosed,
    StoreError as StoreError,
    StreamDeleted as StreamDeleted,
    TrioAggregatesError as TrioAggregatesError,
    UnknownCommand as UnknownCommand,
    UnknownEventType as UnknownEventType,
    WrongExpectedVersion as WrongExpectedVersion,
)
from ._core._registry import (
    AggregateFunction as AggregateFunction,
    Call as Call,
    Mailbox as Mailbox,
    Registry as Registry,
    RegistryStatistics as RegistryStatistics,
    open_registry as open_registry,
)
from ._flow._process_manager import (
    ProcessManager as ProcessManager,
    reacts as reacts,
)
from ._flow._projection import (
    EventContext as EventContext,
    Projection as Projection,
    ProjectionFailed as ProjectionFailed,
    ProjectionRunner as ProjectionRunner,
    ProjectionStatistics as ProjectionStatistics,
    RunningProjection as RunningProjection,
    open_projections as open_projections,
    projects as projects,
    run_projection as run_projection,
)
from ._flow._subscription import (
    Subscription as Subscription,
    open_subscription as open_subscription,
)
from ._runtime._aggregate import (
    NO_REPLY as NO_REPLY,
    Aggregate as Aggregate,
    Decision as Decision,
    applies as applies,
    handles as handles,
)
from ._runtime._codec import (
    EventCodec as EventCodec,
    Upcaster as Upcaster,
    event_type as event_type,
    type_name_of as type_name_of,
)
from ._runtime._repository import (
    AggregateRepository as AggregateRepository,
    StoredEvent as StoredEvent,
    open_aggregates as open_aggregates,
)
from ._stores._groupcommit import (
    StoreStatistics as StoreStatistics,
)
from ._stores._open_store import open_store as open_store
from ._stores._sqlite import (
    SQLiteEventStore as SQLiteEventStore,
    open_sqlite_store as open_sqlite_store,
)
from ._stores._store import (
    EventStore as EventStore,
    InMemoryEventStore as InMemoryEventStore,
    NewEvent as NewEvent,
    RecordedEvent as RecordedEvent,
    Snapshot as Snapshot,
    category_of as category_of,
    read_stream as read_stream,
)
from ._wire._protocol import (
    DEFAULT_MAX_LINE_BYTES as DEFAULT_MAX_LINE_BYTES,
    OPS as OPS,
    PROTOCOL_VERSION as PROTOCOL_VERSION,
    BadLine as BadLine,
    ClientCodec as ClientCodec,
    ErrorCode as ErrorCode,
    ProtocolError as ProtocolError,
    Request as Request,
    Response as Response,
    ServerCodec as ServerCodec,
    error_code_for as error_code_for,
)
from ._wire._server import (
    DEFAULT_PORT as DEFAULT_PORT,
    AggregateServer as AggregateServer,
    App as App,
    ClusterOptions as ClusterOptions,
    ServerStatistics as ServerStatistics,
    open_aggregate_server as open_aggregate_server,
    serve_aggregates as serve_aggregates,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._scaleout._cluster import (
        ClusterNode as ClusterNode,
        ClusterStatistics as ClusterStatistics,
        NodeInfo as NodeInfo,
        open_cluster as open_cluster,
    )
    from ._stores._postgres import (
        PostgresEventStore as PostgresEventStore,
        open_postgres_store as open_postgres_store,
    )

# What needs psycopg (the `postgres` extra), imported on first use: name -> module.
_LAZY = {
    "PostgresEventStore": "_stores._postgres",
    "open_postgres_store": "_stores._postgres",
    "ClusterNode": "_scaleout._cluster",
    "ClusterStatistics": "_scaleout._cluster",
    "NodeInfo": "_scaleout._cluster",
    "open_cluster": "_scaleout._cluster",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is not None:
        import importlib

        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
        if inspect.isfunction(value):
            value.__module__ = __name__  # as _fix_module_names does for the others
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
