"""The protocol server: aggregates over TCP, one NDJSON request per line.

:func:`serve_aggregates` (``nursery.start``-able, like :func:`trio.serve_tcp`)
and :func:`open_aggregate_server` (an ``async with`` form) serve the aggregate
types of an *app* on one event store. The wire format (parsing, encoding, the
error codes) is the sans-IO codec of ``_protocol.py``; this module does the
I/O and runs the requests on one :class:`AggregateRepository` per wire type.

Per connection:

* the **reader** receives bytes, lets the codec cut them into requests, and
  starts each. It answers at once what needs no aggregate (a bad line,
  ``ping``, ``hello``, ``stats``, a refusal). Every line holds one of
  ``max_in_flight`` slots from when it is read until its answer is sent:
  with no slot free the reader stops reading (backpressure: the client's
  sends block in TCP, nobody else is slowed).
* an ``execute`` or ``create`` on a live aggregate with room in its mailbox
  takes the **fast path**: the reader puts the command in the mailbox with
  a completion callback, and the aggregate's task, answering, encodes the
  answer and queues it. No task runs for it but the aggregate's own. Every
  other request (an activation, a full mailbox, a retried or coalesced
  ``command_id``, ``load``, ``history`` ...) runs in a **task** of its own.
* the **sender** writes every answer queued in one ``send_all`` (the
  answers of one scheduler pass share the write), one sender at a time.
* a **watchdog** closes the connection after ``idle_timeout`` with nothing
  in flight and nothing received, answers ``timeout`` for a request running
  longer than ``request_timeout``, and drops a client that reads no answer
  for ``idle_timeout``. The hot path pays for none of these with a deadline.

Answers come as they finish, each with its request's ``id``. Requests in
flight together run concurrently, in no particular order, even on one key:
a client that needs an order waits for an answer before sending the next.
A connection's failure (a reset, a TLS error, a client gone with requests
in flight) ends that connection only: its running requests still complete
(so a retry finds their outcome), their answers are dropped.

Exactly once: a request with a ``command_id`` runs at most once while it is
in flight (identical requests, on any connection, wait for the first and get
its answer), and its answer is kept in a bounded LRU for retries after a
reconnect (version *and* result). Beyond the LRU, and across restarts, the
repository's idempotency answers (the version after the first application,
result ``null``).

Shutdown (:meth:`AggregateServer.aclose`, leaving the block, or cancelling
:func:`serve_aggregates`): stop accepting; requests in flight get
``grace_period`` seconds to finish, the rest (and every request read
meanwhile) are answered ``shutting_down``; connections are closed; then the
aggregates, and the store if the server opened it from a URL.

Cluster (``cluster=``, see ``_cluster.py``): a node runs a request itself
when it owns its key's shard (the fast path included), else forwards it to
the owner over one pipelined connection per peer (``_Peer``), marked
``forwarded`` so that it makes one hop at most; while the shard moves
(``NotOwner``, ``not_owner``, an owner unknown or unreachable) the request
is tried again after a refresh of the node's view, with a ``command_id``
given at the first node, until the watchdog's ``request_timeout``. Without
a cluster, the hot path pays one ``is None`` test.

Security: only the app's aggregate classes and their commands can be named;
a request can make the server run nothing else. With a ``token``, the first
line of a connection must be ``{"op": "hello", "token": ...}`` (compared in
constant time), else ``unauthorized`` and the connection is closed.
"""

from __future__ import annotations

import collections
import functools
import hmac
import logging
import math
import os
import socket
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias, final

import attrs
import cattrs
import msgspec
import outcome
import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from .._core._exceptions import (
    AggregateNotFound,
    InvalidArgument,
    NotOwner,
    StoreError,
    TrioAggregatesError,
)
from .._core._options import check_count, check_seconds
from .._core._registry import Call, Registry
from .._runtime._aggregate import Aggregate, canonical_key
from .._runtime._command import ANY, EXISTING, NEW, Command, Inspect
from .._runtime._repository import AggregateRepository, _name_key_as_given, open_aggregates
from .._stores._store import EventStore
from ._protocol import (
    PROTOCOL_VERSION,
    BadLine,
    ClientCodec,
    ErrorCode,
    ProtocolError,
    Request,
    Response,
    ServerCodec,
    error_details,
)

if TYPE_CHECKING:  # _cluster needs psycopg, an optional dependency: imported when used
    from .._scaleout._cluster import ClusterNode

__all__ = [
    "DEFAULT_PORT",
    "AggregateServer",
    "App",
    "ClusterOptions",
    "ServerStatistics",
    "open_aggregate_server",
    "serve_aggregates",
]

logger = logging.getLogger("trio_aggregates.server")

#: The port the server listens on unless told otherwise.
DEFAULT_PORT: Final = 7411

#: The aggregate types a server serves: a sequence of :class:`Aggregate`
#: subclasses (wire type name = class name) or a mapping ``{wire name: class}``.
App: TypeAlias = Sequence[type[Aggregate]] | Mapping[str, type[Aggregate]]

#: Bytes asked for per receive.
_RECEIVE_SIZE: Final = 65536
#: Finished answers kept for retries after a reconnect.
_FINISHED_ANSWERS: Final = 10_000
#: After the grace period: how long connections get to flush and close.
_FLUSH_TIME: Final = 1.0
#: How long a closing connection reads (and drops) what the client still sends,
#: so that closing with unread data (a TCP reset) does not lose the answers.
_LINGER: Final = 0.5

_Key: TypeAlias = tuple[str, str, str]

# An outcome: ("ok", version, result) or ("error", code, message, reason).
_Outcome: TypeAlias = tuple[Any, ...]

#: A connection's failure: the client reset, TLS failed, the socket is gone.
_CONNECTION_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

#: Cluster: the first wait before a request whose shard is moving is tried
#: again, and the longest (it doubles in between).
_RETRY_FIRST: Final = 0.01
_RETRY_MAX: Final = 0.25
#: Cluster: the least time between two refreshes asked for by retrying requests.
_REFRESH_EVERY: Final = 0.05
#: Cluster: how long connecting to a peer may take.
_PEER_CONNECT_TIMEOUT: Final = 2.0


@attrs.frozen
class ClusterOptions:
    """Options of the cluster a server opens itself (``cluster=`` of :func:`open_aggregate_server`).

    The server joins the cluster of the nodes sharing its PostgreSQL store
    once it listens (see :func:`~trio_aggregates.open_cluster` for the
    options' meaning) and leaves it when it shuts down.

    Attributes:
        advertise: ``HOST:PORT`` where the other nodes reach this one
            (default: the address the server listens on, which must then not
            be a wildcard such as ``0.0.0.0``).
        node_id: this node's id (default: a random one).
        shards: the cluster's number of shards (the same on every node).
        lease_ttl: a shard lease's life, in seconds.
        renew_interval: seconds between ticks (default ``lease_ttl / 4``).
        node_timeout: a node without heartbeat for this long is dead
            (default ``lease_ttl``).
    """

    advertise: str | None = None
    node_id: str | None = None
    shards: int = 256
    lease_ttl: float = 10.0
    renew_interval: float | None = None
    node_timeout: float | None = None


@attrs.frozen
class ServerStatistics:
    """A server's counters, from :meth:`AggregateServer.statistics`.

    Attributes:
        connections: connections open now.
        accepted: connections accepted since the start.
        refused: connections refused (``overloaded`` or ``shutting_down``).
        requests: requests answered (each line that got an answer).
        in_flight: requests read whose answers are not written yet.
        coalesced: requests answered by an identical one in flight.
        replayed: requests answered from the finished answers (a retry).
        errors_by_code: error answers, by code.
        closing: whether the server is shutting down.
        forwarded: requests answered by another cluster node (forwarded to
            the owner of their key's shard).
        retried: times a request was tried again because its key's shard
            was moving (or its owner could not be reached).
    """

    connections: int
    accepted: int
    refused: int
    requests: int
    in_flight: int
    coalesced: int
    replayed: int
    errors_by_code: dict[str, int]
    closing: bool
    forwarded: int = 0
    retried: int = 0


@final
@attrs.define(eq=False)
class _Route:
    """One wire type: its repository and its commands by name."""

    name: str
    repository: AggregateRepository[Any]
    converter: cattrs.Converter
    #: command name -> (class, structure hook)
    commands: dict[str, tuple[type[Any], Callable[[Any, Any], Any]]]
    #: The repository's registry (its property, read once).
    registry: Registry


@final
class _Pending:
    """A request with a ``command_id`` in flight: identical ones wait for it."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done: trio.Event | None = None  # made by the first one to wait
        self.outcome: _Outcome | None = None

    async def wait(self) -> None:
        if self.done is None:
            self.done = trio.Event()
        await self.done.wait()

    def finish(self, outcome: _Outcome | None) -> None:
        self.outcome = outcome
        if self.done is not None:
            self.done.set()


def _routes_of(app: object) -> dict[str, type[Aggregate]]:
    """The app as ``{wire name: class}``, checked."""
    if isinstance(app, Mapping):
        items = list(app.items())
    elif isinstance(app, Sequence) and not isinstance(app, str | bytes):
        items = [(getattr(cls, "__name__", None), cls) for cls in app]
    else:
        raise InvalidArgument(
            f"app must be a sequence of Aggregate subclasses or a mapping "
            f"{{wire name: class}}, not {type(app).__name__}"
        )
    if not items:
        raise InvalidArgument("app names no aggregate type")
    routes: dict[str, type[Aggregate]] = {}
    streams: dict[str, str] = {}
    for name, cls in items:
        if not (isinstance(cls, type) and issubclass(cls, Aggregate)):
            raise InvalidArgument(f"{cls!r} is not an Aggregate subclass")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"a wire type name is a non-empty str, not {name!r}")
        if name in routes:
            raise InvalidArgument(f"two aggregate types are named {name!r}")
        category = cls.stream_name("")
        if category in streams:
            raise InvalidArgument(
                f"{name!r} and {streams[category]!r} would share streams "
                f"({category}...): one stream, one aggregate"
            )
        streams[category] = name
        routes[name] = cls
    return routes


def _commands_of(wire: str, cls: type[Aggregate]) -> dict[str, tuple[type[Any], Any]]:
    converter = cls.codec().converter
    commands: dict[str, tuple[type[Any], Any]] = {}
    for command_cls in cls._handlers:
        name = command_cls.__name__
        known = commands.get(name)
        if known is not None and known[0] is not command_cls:
            raise InvalidArgument(
                f"{wire}: two commands are named {name!r} "
                f"({known[0].__module__} and {command_cls.__module__})"
            )
        commands[name] = (command_cls, converter.get_structure_hook(command_cls))
    return commands


def _structure_error(exc: BaseException) -> str:
    try:
        messages = cattrs.transform_error(exc, path="data")
    except Exception:  # pragma: no cover (transform_error handles any exception)
        messages = [f"{exc!r} @ data"]
    return "; ".join(messages) or f"{type(exc).__name__} @ data"


@final
class AggregateServer:
    """A running protocol server, from :func:`open_aggregate_server`.

    Attributes:
        listeners: the listeners it accepts connections on.
        repositories: ``{wire type name: AggregateRepository}``.
    """

    def __init__(
        self,
        routes: dict[str, _Route],
        store: EventStore,
        listeners: list[trio.abc.Listener[Any]],
        *,
        token: str | None,
        max_line_bytes: int,
        max_in_flight: int,
        max_connections: int,
        idle_timeout: float,
        request_timeout: float,
        grace_period: float,
        cluster: ClusterNode | None = None,
    ) -> None:
        self._routes = routes
        # Invariant: None when the server is not a cluster node (the hot path
        # then pays one ``is None`` test for clustering).
        self._cluster = cluster
        self._peers: dict[str, _Peer] = {}
        self._peer_nursery: trio.Nursery | None = None
        self._refreshing: trio.Event | None = None
        self._last_refresh = -math.inf
        self._store = store
        self.listeners = listeners
        self.repositories: Mapping[str, AggregateRepository[Any]] = {
            name: route.repository for name, route in routes.items()
        }
        self._token = None if token is None else token.encode()
        self._max_line_bytes = max_line_bytes
        self._max_in_flight = max_in_flight
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._grace_period = grace_period
        from .. import __version__

        self._hello = {
            "server": "trio-aggregates",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "types": {name: sorted(route.commands) for name, route in routes.items()},
        }
        self._connections: set[_Connection] = set()
        self._no_connections = trio.Event()
        self._no_connections.set()
        self._pending: dict[_Key, _Pending] = {}
        self._finished: collections.OrderedDict[_Key, _Outcome] = collections.OrderedDict()
        self._accept_scope: trio.CancelScope | None = None
        self._closing = False
        self._closed = trio.Event()
        # counters
        self._accepted = 0
        self._refused = 0
        self._requests = 0
        self._in_flight = 0
        self._coalesced = 0
        self._replayed = 0
        self._errors: dict[str, int] = {}
        self._forwarded = 0
        self._retried = 0

    # -- public --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port of the first listener (the one picked for ``port=0``)."""
        listener: Any = self.listeners[0]
        while not isinstance(listener, trio.SocketListener):
            listener = listener.transport_listener  # an SSLListener
        return int(listener.socket.getsockname()[1])

    @property
    def address(self) -> str:
        """``tcp://HOST:PORT`` of the first listener."""
        listener: Any = self.listeners[0]
        while not isinstance(listener, trio.SocketListener):
            listener = listener.transport_listener
        host, port = listener.socket.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"tcp://{host}:{port}"

    def statistics(self) -> ServerStatistics:
        """Return the server's counters. Not a checkpoint."""
        return ServerStatistics(
            connections=len(self._connections),
            accepted=self._accepted,
            refused=self._refused,
            requests=self._requests,
            in_flight=self._in_flight,
            coalesced=self._coalesced,
            replayed=self._replayed,
            errors_by_code=dict(self._errors),
            closing=self._closing,
            forwarded=self._forwarded,
            retried=self._retried,
        )

    async def aclose(self) -> None:
        """Shut down gracefully; return once every connection is closed.

        Stops accepting; requests in flight get ``grace_period`` seconds to
        finish, then are answered ``shutting_down`` (as is every request read
        meanwhile); connections close after their answers are written (at most
        one more second). Idempotent. The aggregates and the store are closed
        when the block of :func:`open_aggregate_server` ends.

        Cancellation: shielded; it takes at most ``grace_period`` plus a few
        seconds.
        """
        if self._closing:
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            if self._accept_scope is not None:
                self._accept_scope.cancel()  # serve_listeners closes the listeners
            deadline = trio.current_time() + self._grace_period
            for connection in list(self._connections):
                connection.shut_down(deadline)
            with trio.move_on_at(deadline + _FLUSH_TIME + _LINGER + 1.0):
                await self._no_connections.wait()
            for connection in list(self._connections):  # pragma: no cover (a stuck close)
                connection.cancel()
            await self._no_connections.wait()
            self._closed.set()

    # -- accepting -----------------------------------------------------------------

    async def _serve(
        self,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as self._accept_scope:
            if self._closing:
                task_status.started()
                return
            await trio.serve_listeners(
                self._handle,
                self.listeners,
                handler_nursery=handler_nursery,
                task_status=task_status,  # type: ignore[arg-type]
            )

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """One connection, from accept to close. Never raises (but Cancelled)."""
        self._accepted += 1
        connection = _Connection(self, stream)
        self._connections.add(connection)
        self._no_connections = trio.Event()
        try:
            if self._closing or len(self._connections) > self._max_connections:
                self._refused += 1
                code = ErrorCode.SHUTTING_DOWN if self._closing else ErrorCode.OVERLOADED
                await connection.refuse(code)
            else:
                await connection.run()
        except BaseExceptionGroup as group:
            _log_unless_cancelled(group)
        except _CONNECTION_ERRORS:
            pass
        except Exception:
            logger.exception("connection handler failed (please report it)")
        finally:
            connection.close_second_handle()
            self._connections.discard(connection)
            if not self._connections:
                self._no_connections.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(Exception):
                await stream.aclose()
            await trio.aclose_forcefully(stream)

    # -- answering -----------------------------------------------------------------

    def _count_error(self, code: str) -> None:
        errors = self._errors
        errors[code] = errors.get(code, 0) + 1

    def _encode_error(
        self, codec: ServerCodec, id: Any, code: ErrorCode, message: str, reason: str | None = None
    ) -> bytes:
        self._count_error(code.value)
        return codec.encode_error(id, code, message, reason)

    def _encode_outcome(self, codec: ServerCodec, id: Any, outcome: _Outcome) -> bytes:
        if outcome[0] == "ok":
            try:
                return codec.encode_ok(id, outcome[2], outcome[1])
            except (TypeError, ValueError) as exc:
                logger.error("cannot encode the answer to request %r: %r", id, exc)
                return self._encode_error(
                    codec, id, ErrorCode.INTERNAL, f"internal error: the result is not JSON: {exc}"
                )
        return self._encode_error(codec, id, outcome[1], outcome[2], outcome[3])

    def _failure(self, request: Request, exc: BaseException) -> _Outcome:
        """The error outcome for ``exc``; logs what is not the caller's doing."""
        if isinstance(exc, trio.TooSlowError) and not isinstance(exc, TrioAggregatesError):
            return ("error", ErrorCode.TIMEOUT, "no answer within the request timeout", None)
        code, message, reason = error_details(exc)
        if code is ErrorCode.INTERNAL:
            logger.error(
                "request %r (%s %s) failed", request.id, request.op, request.type, exc_info=exc
            )
        return ("error", code, message, reason)

    async def _answer(self, codec: ServerCodec, request: Request) -> bytes:
        """Run one request that needs the aggregates; return its answer line."""
        if self._cluster is not None:
            return await self._cluster_answer(codec, request, self._cluster)
        return await self._answer_here(codec, request)

    async def _answer_here(self, codec: ServerCodec, request: Request) -> bytes:
        """Run one request on this node's aggregates; return its answer line."""
        try:
            route = self._routes.get(request.type)  # type: ignore[arg-type]
            if route is None:
                return self._unknown_type(codec, request)
            if request.key is None:
                return self._encode_error(
                    codec, request.id, ErrorCode.BAD_REQUEST, f"{request.op} needs a key"
                )
            outcome = await self._outcome(route, request)
        except Exception as exc:
            outcome = self._failure(request, exc)
        return self._encode_outcome(codec, request.id, outcome)

    async def _outcome(self, route: _Route, request: Request) -> _Outcome:
        """Run a request with a type and a key here. Raises what the request failed with."""
        assert request.key is not None
        op = request.op
        if op == "execute" or op == "create":
            return await self._command(route, request)
        if op == "load":
            state, version = await route.repository._send(request.key, Inspect(True), None)
            return ("ok", version, route.converter.unstructure(state))
        if op == "version":
            version = await route.repository.version(request.key)
            return ("ok", version, version)
        return await self._history(route, request)  # history

    # -- the cluster ---------------------------------------------------------------

    def _stream_of(self, request: Request) -> str | None:
        """The stream of ``request``'s key, or ``None`` (no such type, no key: answered here)."""
        route = self._routes.get(request.type)  # type: ignore[arg-type]
        if route is None or request.key is None:
            return None
        try:
            return str(route.repository.aggregate_type.stream_name(request.key))
        except Exception:
            return None

    def _is_local(self, cluster: ClusterNode, request: Request) -> bool:
        """Whether this node runs ``request`` itself (it owns the key's shard, or
        the request fails anyway)."""
        stream = self._stream_of(request)
        return stream is None or cluster.owns(stream)

    async def _cluster_answer(
        self, codec: ServerCodec, request: Request, cluster: ClusterNode
    ) -> bytes:
        """A request on a cluster node: run here if this node owns the key's shard,
        else forward it to the owner; while the shard moves, try again.

        A request gets a ``command_id`` before it is forwarded or tried again,
        so that it is applied once whatever happens. The watchdog's
        ``request_timeout`` bounds the retries (it answers ``timeout``).
        """
        stream = self._stream_of(request)
        if stream is None:
            return await self._answer_here(codec, request)
        route = self._routes[request.type]  # type: ignore[index]
        delay = _RETRY_FIRST
        while True:
            if cluster.owns(stream):
                try:
                    outcome = await self._outcome(route, request)
                except Exception as exc:
                    outcome = self._failure(request, exc)
                if request.forwarded or not (
                    outcome[0] == "error" and outcome[1] is ErrorCode.NOT_OWNER
                ):
                    return self._encode_outcome(codec, request.id, outcome)
            elif request.forwarded:
                return self._encode_error(
                    codec,
                    request.id,
                    ErrorCode.NOT_OWNER,
                    f"node {cluster.node_id!r} does not own stream {stream!r} "
                    f"(shard {cluster.shard_of(stream)})",
                )
            else:
                owner = cluster.owner_of(stream)
                if owner is not None and owner.node_id != cluster.node_id:
                    request = _with_command_id(request)
                    response = await self._forward(owner.address, request)
                    if response is not None and response.error_code != ErrorCode.NOT_OWNER:
                        self._forwarded += 1
                        return self._relay(codec, request.id, response)
            request = _with_command_id(request)
            self._retried += 1
            await self._refresh(cluster)
            await trio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _relay(self, codec: ServerCodec, id: Any, response: Response) -> bytes:
        """The owner's answer, with this request's ``id``."""
        if response.ok:
            return codec.encode_ok(id, response.result, response.version)
        code = response.error_code or ErrorCode.INTERNAL.value
        self._count_error(code)
        return codec.encode_error(id, code, response.error_message or "", response.error_reason)

    async def _refresh(self, cluster: ClusterNode) -> None:
        """A tick of the node now, unless one ran lately (retrying requests share it).

        Shielded: a tick cut short could lose a lease it was granted.
        """
        waiting = self._refreshing
        if waiting is not None:
            await waiting.wait()
            return
        if trio.current_time() - self._last_refresh < _REFRESH_EVERY:
            return
        done = self._refreshing = trio.Event()
        try:
            with trio.CancelScope(shield=True):
                await cluster.refresh()
        except StoreError as exc:
            logger.warning("cluster refresh failed: %s", exc)
        finally:
            self._last_refresh = trio.current_time()
            self._refreshing = None
            done.set()

    async def _forward(self, address: str, request: Request) -> Response | None:
        """Send ``request`` to the node at ``address``; its answer, or ``None`` if
        the connection failed (the request may or may not have run there)."""
        peer = self._peers.get(address)
        if peer is None or peer.lost is not None:
            assert self._peer_nursery is not None
            peer = self._peers[address] = _Peer(
                address, None if self._token is None else self._token.decode(), self._peer_nursery
            )
        return await peer.request(request)

    async def _passivate_shards(self, shards: frozenset[int]) -> None:
        """The cluster's release hook: passivate the live aggregates of ``shards``."""
        cluster = self._cluster
        assert cluster is not None
        for route in self._routes.values():
            stream_name = route.repository.aggregate_type.stream_name
            route.repository.registry._passivate_where(
                lambda key, name=stream_name: cluster.shard_of(name(key)) in shards  # type: ignore[misc]
            )

    def _unknown_type(self, codec: ServerCodec, request: Request) -> bytes:
        if request.type is None:
            return self._encode_error(
                codec, request.id, ErrorCode.BAD_REQUEST, f"{request.op} needs a type"
            )
        return self._encode_error(
            codec,
            request.id,
            ErrorCode.UNKNOWN_TYPE,
            f"unknown type {request.type!r}; known types: {', '.join(sorted(self._routes))}",
        )

    async def _history(self, route: _Route, request: Request) -> _Outcome:
        assert request.key is not None
        events = await route.repository.history(request.key)
        if not events:
            raise AggregateNotFound(request.key)
        unstructure = route.converter.unstructure
        name_for = route.repository.aggregate_type.codec().name_for
        result = [
            {
                "version": e.version,
                "type": name_for(e.event),
                "data": unstructure(e.event),
                "metadata": e.metadata,
                "recorded_at": e.recorded_at,
            }
            for e in events
        ]
        return ("ok", events[-1].version, result)

    async def _command(self, route: _Route, request: Request) -> _Outcome:
        """An execute or create: decode the command, run it once, return its outcome."""
        if request.command is None:
            raise InvalidArgument(f"{request.op} needs a command")
        found = route.commands.get(request.command)
        if found is None:
            return (
                "error",
                ErrorCode.UNKNOWN_COMMAND,
                f"{route.name} has no command {request.command!r}; "
                f"its commands: {', '.join(sorted(route.commands))}",
                None,
            )
        cls, structure = found
        try:
            command = structure(request.data if request.data is not None else {}, cls)
        except Exception as exc:
            return ("error", ErrorCode.BAD_REQUEST, _structure_error(exc), None)
        command_id = request.command_id
        if command_id is None or request.dry_run:
            return await self._run(route, request, command)
        key: _Key = (route.name, canonical_key(request.key), command_id)
        finished = self._finished.get(key)
        if finished is not None:
            self._finished.move_to_end(key)
            self._replayed += 1
            return finished
        pending = self._pending.get(key)
        while pending is not None:
            await pending.wait()
            if pending.outcome is not None:
                self._coalesced += 1
                return pending.outcome
            # The first one was cancelled: run it (or wait for whoever does).
            pending = self._pending.get(key)
        finished = self._finished.get(key)
        if finished is not None:  # pragma: no cover (finished while cancelled ones woke)
            return finished
        pending = self._pending[key] = _Pending()
        outcome = None
        try:
            try:
                outcome = await self._run(route, request, command)
            except Exception as exc:
                outcome = self._failure(request, exc)
            return outcome
        finally:
            self._settle(key, pending, outcome)

    def _settle(self, key: _Key, pending: _Pending, outcome: _Outcome | None) -> None:
        """A request with a ``command_id`` is done: keep a success, wake identical ones.

        ``outcome`` is ``None`` when it was withdrawn (cancelled, timed
        out): the identical ones waiting then run it themselves.
        """
        if outcome is not None:
            self._keep(key, outcome)
        if self._pending.get(key) is pending:
            del self._pending[key]
        pending.finish(outcome)

    def _keep(self, key: _Key, outcome: _Outcome) -> None:
        """Keep the answer of a request with a ``command_id``, if a success (for retries)."""
        if outcome[0] == "ok":
            self._finished[key] = outcome
            if len(self._finished) > _FINISHED_ANSWERS:
                self._finished.popitem(last=False)

    def _command_request(self, route: _Route, request: Request, command: object) -> Command:
        """The repository's request for an execute or create, made as
        ``_execute_detailed`` makes it, with no keyword arguments (the hot path).

        Raises:
            InvalidArgument: as :meth:`AggregateRepository.execute`.
        """
        if request.op == "create":
            mode = NEW
            expected = None
        else:
            mode = ANY if request.create else EXISTING
            expected = request.expected_version
        if request.metadata:
            # The codec checked them: correlation and causation ids are strings.
            correlation_id, causation_id = request.correlation_id, request.causation_id
            metadata = request.extra_metadata
        else:
            correlation_id = causation_id = metadata = None
        return route.repository._detailed_request(
            command, mode, expected, request.dry_run, request.command_id,
            correlation_id, causation_id, metadata,
        )  # fmt: skip

    async def _run(self, route: _Route, request: Request, command: object) -> _Outcome:
        assert request.key is not None
        version, reply = await route.repository._submit(
            request.key, self._command_request(route, request, command)
        )
        return self._executed(route, request, version, reply)

    def _executed(self, route: _Route, request: Request, version: int, reply: Any) -> _Outcome:
        """The outcome of an execute or create that ran: its version and result."""
        if request.dry_run:
            name_for = route.repository.aggregate_type.codec().name_for
            unstructure = route.converter.unstructure
            events = reply or ()
            return (
                "ok",
                version,
                [{"type": name_for(e), "data": unstructure(e)} for e in events],
            )
        if reply is not None and type(reply) not in _JSON_SCALARS:
            reply = route.converter.unstructure(reply)
        return ("ok", version, reply)

    def _stats(self) -> dict[str, Any]:
        store_stats: Any = {}
        statistics = getattr(self._store, "statistics", None)
        if callable(statistics):
            try:
                value = statistics()
                store_stats = attrs.asdict(value) if attrs.has(type(value)) else value
            except Exception as exc:  # pragma: no cover (a store's statistics failing)
                store_stats = {"error": repr(exc)}
        stats = {
            "server": attrs.asdict(self.statistics()),
            "registries": {
                name: attrs.asdict(route.repository.registry.statistics())
                for name, route in self._routes.items()
            },
            "store": store_stats,
        }
        if self._cluster is not None:
            cluster = self._cluster.statistics()
            stats["cluster"] = {
                "node_id": cluster.node_id,
                "shards": cluster.shards,
                "held": len(cluster.held),
                "live_nodes": list(cluster.live_nodes),
                "shards_by_node": cluster.shards_by_node,
                "moves_in": cluster.claims,
                "moves_out": cluster.releases,
                "lost": cluster.lost,
                "forwarded": self._forwarded,
                "retried": self._retried,
                "ticks": cluster.ticks,
                "tick_failures": cluster.tick_failures,
            }
        return stats


_JSON_SCALARS: Final = frozenset({int, str, float, bool})


def _with_command_id(request: Request) -> Request:
    """``request`` with a ``command_id`` (a new one if it has none) if it runs a command,
    so that forwarding it, or trying it again, applies it once."""
    if request.command_id is not None or request.dry_run or request.op not in ("execute", "create"):
        return request
    return msgspec.structs.replace(request, command_id=f"cluster-{uuid.uuid4().hex}")


def _split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``tcp://HOST:PORT``, ``[v6]:PORT``) as ``(host, port)``.

    Raises:
        InvalidArgument: not such an address.
    """
    rest = address.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"a node address is HOST:PORT, not {address!r}")
    return host, int(port)


@final
class _PeerSlot:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Response | None = None


@final
class _Peer:
    """One pipelined connection to another node: requests matched to answers by id.

    Opened on first use; when it fails, every request waiting on it gets
    ``None`` and the server makes a new one for the next request.
    """

    def __init__(self, address: str, token: str | None, nursery: trio.Nursery) -> None:
        self.address = address
        self.token = token
        self.nursery = nursery
        self.codec = ClientCodec()
        self.pending: dict[int, _PeerSlot] = {}
        self.next_id = 0
        self.lost: str | None = None
        self.stream: trio.abc.Stream | None = None
        self.connecting = trio.Lock()
        self.out: list[bytes] = []
        self.send_lot = trio.lowlevel.ParkingLot()

    async def request(self, request: Request) -> Response | None:
        if self.stream is None:
            async with self.connecting:
                if self.stream is None and self.lost is None:
                    await self._connect()
        if self.lost is not None or self.stream is None:
            return None
        self.next_id += 1
        rid = self.next_id
        slot = self.pending[rid] = _PeerSlot()
        self._queue(
            self.codec.encode_request(
                id=rid, op=request.op, type=request.type, key=request.key,
                command=request.command, data=request.data or None,
                expected_version=request.expected_version, dry_run=request.dry_run or None,
                command_id=request.command_id, metadata=request.metadata,
                create=request.create or None, forwarded=True,
            )
        )  # fmt: skip
        try:
            await slot.event.wait()
        finally:
            self.pending.pop(rid, None)
        return slot.response

    def _queue(self, line: bytes) -> None:
        self.out.append(line)
        self.send_lot.unpark()

    async def _connect(self) -> None:
        try:
            host, port = _split_address(self.address)
            with trio.fail_after(_PEER_CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError, InvalidArgument) as exc:
            self._fail(f"cannot connect: {exc!r}")
            return
        self.stream = stream
        if self.token is not None:
            self._queue(self.codec.encode_request(id=0, op="hello", token=self.token))
        self.nursery.start_soon(self._run, stream)

    def _fail(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            logger.info("connection to node %s lost: %s", self.address, why)
        for slot in self.pending.values():
            slot.event.set()
        self.pending.clear()

    async def _run(self, stream: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, stream)
                await self._read(stream)
                nursery.cancel_scope.cancel()
        finally:
            self._fail("closed")
            await trio.aclose_forcefully(stream)

    async def _write(self, stream: trio.abc.Stream) -> None:
        try:
            while True:
                if not self.out:
                    await self.send_lot.park()
                    continue
                batch, self.out = self.out, []
                await stream.send_all(b"".join(batch))
        except _CONNECTION_ERRORS as exc:
            self._fail(f"sending failed: {exc!r}")
            await stream.aclose()

    async def _read(self, stream: trio.abc.Stream) -> None:
        pending = self.pending
        try:
            while self.lost is None:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    return
                for response in self.codec.receive_data(data):
                    slot = pending.pop(response.id, None) if type(response.id) is int else None
                    if slot is not None:
                        slot.response = response
                        slot.event.set()
        except _CONNECTION_ERRORS as exc:
            self._fail(f"receiving failed: {exc!r}")
        except ProtocolError as exc:
            self._fail(f"not a valid answer: {exc}")


_HELLO_FIRST: Final = 'the first request must be {"op": "hello", "token": ...}'
_SHUTTING_DOWN: Final = "the server is shutting down"


def _log_unless_cancelled(group: BaseExceptionGroup[BaseException]) -> None:
    """A connection's task group failed: log what is not a cancellation or a lost client.

    Re-raises the cancellations (the scope that cancelled them absorbs them),
    and a KeyboardInterrupt or SystemExit alone.
    """
    cancelled, rest = group.split(trio.Cancelled)
    if rest is None:
        raise group
    fatal, rest = rest.split((KeyboardInterrupt, SystemExit))
    if fatal is not None:
        raise _first_leaf(fatal) from None
    if rest is not None:
        _, bugs = rest.split(_CONNECTION_ERRORS)
        if bugs is not None:
            logger.error("connection handler failed (please report it)", exc_info=bugs)
    if cancelled is not None:
        raise cancelled


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


@final
class _Entry:
    """A request read and not yet answered: for the watchdog, shutdown and the answer."""

    __slots__ = (
        "answered", "call", "key", "pending", "request", "route", "scope", "started", "token",
    )  # fmt: skip

    def __init__(self, request: Request, started: float, token: int) -> None:
        self.request = request
        self.started = started
        self.token = token
        self.answered = False
        # A request run on the fast path: its call, route, and command_id slot.
        self.call: Call | None = None
        self.route: _Route | None = None
        self.key: _Key | None = None
        self.pending: _Pending | None = None
        # A request run by a task of its own: its cancel scope.
        self.scope: trio.CancelScope | None = None


@final
class _Ran:
    """A request run to its answer in the reader's task (``_Connection._start_fast``,
    through ``Registry._ran_here``): the answer, kept for the reader. One per
    connection, reused: only its reader runs requests this way, one at a time."""

    __slots__ = ("error", "message", "value")

    def __init__(self) -> None:
        self.message: Command | None = None
        self.value: Any = None  # (version, reply)
        self.error: BaseException | None = None

    def reply(self, value: Any = None) -> None:
        self.value = value

    def fail(self, exception: BaseException) -> None:
        self.error = exception


@final
class _Connection:
    """One client connection: a reader, a sender, a watchdog, and the requests in flight.

    The reader parses lines and starts each request. An ``execute`` or
    ``create`` whose aggregate is live with room in its mailbox takes the
    fast path: the reader decodes it and puts it in the mailbox with a
    completion callback, which the aggregate's task calls with the outcome;
    the callback encodes the answer and queues it. No task runs for the
    request but the aggregate's own. Every other request (an activation, a
    full mailbox, an identical ``command_id`` in flight, ``load`` ...) runs
    in a task of its own. The reader answers at once what needs no
    aggregate (a bad line, ``ping``, ``hello``, ``stats``, a refusal).

    Answers queue in ``out``; the sender writes all that are queued in one
    ``send_all`` (the callbacks of one scheduler pass share the write), one
    sender at a time (the reader sends the answers it gave itself).

    Invariant: ``in_flight`` counts the lines read whose answers are not yet
    sent (or dropped, on a broken connection); it is at most
    ``max_in_flight`` and so bounds the requests running and the answers
    waiting. ``running`` holds the requests not yet answered, oldest first.

    The timeouts cost the hot path no cancel scope and no deadline: the
    reader notes the time, and one watchdog task wakes at the earliest
    deadline (at least every ``min(idle_timeout, request_timeout)`` seconds)
    and answers or cancels what is due.
    """

    def __init__(self, server: AggregateServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.codec = ServerCodec(max_line_bytes=server._max_line_bytes)
        self.authenticated = server._token is None
        self.in_flight = 0
        self.closing = False
        self.broken = False
        self.stop_reading = False
        self.reading_done = False
        self.running: dict[int, _Entry] = {}
        self.next_token = 0
        self.out: list[bytes] = []
        self.ran = _Ran()
        self.sending = False
        # True while the reader starts a request: an answer given then (a
        # command run in the reader's task) waits for the reader's batch.
        self.dispatching = False
        self.sender_parked = False
        self.sending_since = 0.0
        self.send_scope: trio.CancelScope | None = None
        # trio.current_time() without its two wrappers (per chunk, per drain).
        self.now = trio.lowlevel.current_clock().current_time
        self.last_activity = self.now()
        self.grace_deadline = math.inf
        self.hard_deadline = math.inf
        self.scope = trio.CancelScope()
        self.read_scope = trio.CancelScope()
        self.tasks_scope = trio.CancelScope()
        self.drain_scope = trio.CancelScope()
        self.slot_lot = trio.lowlevel.ParkingLot()
        self.send_lot = trio.lowlevel.ParkingLot()
        self.drained_lot = trio.lowlevel.ParkingLot()
        self.tasks: trio.Nursery
        # A second handle on a plain TCP connection's socket (POSIX), to send
        # a lone answer from the task that gives it (see _answer).
        self.raw = _second_handle(stream)

    def close_second_handle(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    def cancel(self) -> None:
        self.scope.cancel()
        if self.send_scope is not None:
            self.send_scope.cancel()

    def shut_down(self, deadline: float) -> None:
        """The server is closing: finish by ``deadline``, answer the rest ``shutting_down``."""
        self.closing = True
        self.grace_deadline = deadline
        self.tasks_scope.deadline = deadline
        self.drain_scope.deadline = deadline
        self.hard_deadline = deadline + _FLUSH_TIME
        self.scope.deadline = self.hard_deadline + _LINGER
        if self.send_scope is not None:
            self.send_scope.deadline = self.hard_deadline
        if self.in_flight == 0:
            self.read_scope.cancel()

    async def refuse(self, code: ErrorCode) -> None:
        """Answer one ``overloaded`` (or ``shutting_down``) line and close."""
        message = "too many connections" if code is ErrorCode.OVERLOADED else "shutting down"
        line = self.server._encode_error(self.codec, None, code, message)
        self.server._requests += 1
        with trio.move_on_after(_FLUSH_TIME):
            await self.stream.send_all(line)
            await self._linger()

    async def run(self) -> None:
        with self.scope:
            try:
                async with trio.open_nursery() as helpers:
                    helpers.start_soon(self._watchdog)
                    helpers.start_soon(self._sender)
                    with self.tasks_scope:
                        async with trio.open_nursery() as tasks:
                            self.tasks = tasks
                            try:
                                await self._read_loop()
                            finally:
                                self.reading_done = True
                    # The tasks are done (or past the grace period); the fast ones:
                    with self.drain_scope:
                        while self.running:
                            await self.drained_lot.park()
                    for entry in list(self.running.values()):  # past the grace period
                        self._shutting_down(entry)
                    await self._send()
                    helpers.cancel_scope.cancel()
            finally:
                self._withdraw_all()
            if self.closing or self.stop_reading:
                await self._linger()

    def _withdraw_all(self) -> None:
        """The connection is gone: its requests not yet taken are never run."""
        for entry in self.running.values():
            entry.answered = True
            if entry.call is not None:
                entry.call._abandoned = True
            if entry.pending is not None:
                assert entry.key is not None
                self.server._settle(entry.key, entry.pending, None)
        self.running.clear()

    async def _linger(self) -> None:
        """Half-close and read (and drop) what the client still sends, briefly.

        Closing a TCP socket with unread data sends a reset, which can make
        the client lose the answers it has not read yet.
        """
        if self.broken:
            return
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            return
        with trio.move_on_after(_LINGER):
            try:
                await send_eof()
                while await self.stream.receive_some(_RECEIVE_SIZE):
                    pass
            except _CONNECTION_ERRORS:
                pass

    async def _watchdog(self) -> None:
        """Close an idle connection, time requests out, drop a client that reads nothing."""
        server = self.server
        idle = server._idle_timeout
        limit = server._request_timeout
        await self._watch(idle, limit, min(idle, limit))

    async def _watch(self, idle: float, limit: float, every: float) -> None:
        while True:
            now = trio.current_time()
            wake = now + every
            if self.in_flight == 0:
                due = self.last_activity + idle
                if now >= due:
                    self.read_scope.cancel()  # idle: the reader ends, then the connection
                    return
                wake = min(wake, due)
            if self.sending and self.send_scope is not None:
                due = self.sending_since + idle
                if now >= due:
                    logger.info("dropping a client that read no answer for %s s", idle)
                    self.send_scope.cancel()  # the sender finds the connection broken
                else:
                    wake = min(wake, due)
            late = []
            for entry in self.running.values():  # oldest first
                due = entry.started + limit
                if now < due:
                    wake = min(wake, due)
                    break
                late.append(entry)
            for entry in late:
                self._time_out(entry)
            await trio.sleep_until(wake)

    # -- reading ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        stream = self.stream
        codec = self.codec
        server = self.server
        lines = 0  # read from the last chunk
        with self.read_scope:
            while not self.stop_reading:
                if self.closing and self.in_flight == 0:
                    return
                try:
                    data: bytes | bytearray
                    if self.raw is not None:
                        # One request read last, and answered: the client
                        # most likely waits for it, so wait for the socket first.
                        data = await _receive(self.raw, lines == 1 and self.in_flight == 0)
                    else:
                        data = await stream.receive_some(_RECEIVE_SIZE)
                except _CONNECTION_ERRORS:
                    self.broken = True
                    return
                self.last_activity = self.now()
                lines = 0
                for lines, item in enumerate(codec.receive_data(data), 1):  # noqa: B007 (read after)
                    if self.in_flight >= server._max_in_flight:
                        if self.out:
                            await self._send()
                        while self.in_flight >= server._max_in_flight and not self.broken:
                            await self.slot_lot.park()
                        if self.broken:
                            return
                        self.last_activity = trio.current_time()
                    self.dispatching = True
                    self._dispatch(item)
                    self.dispatching = False
                    if self.stop_reading:
                        break
                if self.out:
                    await self._send()  # the answers given here
                if not data:
                    return  # EOF: the answers in flight are still sent

    def _dispatch(self, item: Request | BadLine) -> None:
        """Take one line: answer it here, or start it."""
        self.in_flight += 1
        server = self.server
        server._in_flight += 1
        codec = self.codec
        if type(item) is BadLine:
            if not self.authenticated:
                self.out.append(
                    server._encode_error(
                        codec, item.id, ErrorCode.UNAUTHORIZED, _HELLO_FIRST + f" ({item.message})"
                    )
                )
                self.stop_reading = True
                return
            self.out.append(
                server._encode_error(codec, item.id, ErrorCode(item.code), item.message)
            )
            return
        assert type(item) is Request
        op = item.op
        if not self.authenticated:
            self._authenticate(item)
        elif self.closing:
            self.out.append(
                server._encode_error(codec, item.id, ErrorCode.SHUTTING_DOWN, _SHUTTING_DOWN)
            )
        elif op == "ping":
            self.out.append(codec.encode_ok(item.id, "pong"))
        elif op == "hello":
            self.out.append(codec.encode_ok(item.id, server._hello))
        elif op == "stats":
            self.out.append(codec.encode_ok(item.id, server._stats()))
        elif (
            (op == "execute" or op == "create")
            and (server._cluster is None or server._is_local(server._cluster, item))
            and self._start_fast(item)
        ):
            return
        else:
            entry = self._new_entry(item)
            entry.scope = trio.CancelScope()
            self.tasks.start_soon(self._run_task, entry)

    def _new_entry(self, request: Request) -> _Entry:
        """A request in flight, for the watchdog, shutdown and its answer."""
        token = self.next_token
        self.next_token = token + 1
        entry = self.running[token] = _Entry(request, self.last_activity, token)
        return entry

    def _authenticate(self, request: Request) -> None:
        server = self.server
        token = server._token
        assert token is not None
        given = request.token
        if (
            request.op == "hello"
            and isinstance(given, str)
            and hmac.compare_digest(given.encode(), token)
        ):
            self.authenticated = True
            self.out.append(self.codec.encode_ok(request.id, server._hello))
            return
        message = "wrong token" if request.op == "hello" else _HELLO_FIRST
        self.out.append(
            server._encode_error(self.codec, request.id, ErrorCode.UNAUTHORIZED, message)
        )
        self.stop_reading = True

    # -- running ----------------------------------------------------------------------

    def _start_fast(self, request: Request) -> bool:
        """Start an execute or create on the fast path; ``False`` if it needs a task.

        From the reader, while it dispatches (its answers go out together
        once it has started all it read). True when the request was answered
        here: run to its answer at once by an idle live aggregate on the
        in-memory store (``Registry._ran_here``: no entry, call or callback), or
        refused (a command ``data`` that does not decode, a bad key); or when
        it went into a live aggregate's mailbox, with a completion callback.
        A request with a ``command_id`` the server has answered, or has in
        flight, goes to a task (it gets that answer).
        """
        server = self.server
        route = server._routes.get(request.type)  # type: ignore[arg-type]
        name = request.command
        if route is None or request.key is None or name is None:
            return False  # an error: the task answers it
        found = route.commands.get(name)
        if found is None:
            return False
        key = None
        entry = None
        command_id = request.command_id
        try:
            if command_id is not None and not request.dry_run:
                key = (route.name, canonical_key(request.key), command_id)
                if key in server._finished or key in server._pending:
                    return False  # a retry, or an identical one in flight: the task handles it
            cls, structure = found
            try:
                command = structure(request.data if request.data is not None else {}, cls)
            except Exception as exc:
                self.out.append(
                    server._encode_error(
                        self.codec, request.id, ErrorCode.BAD_REQUEST, _structure_error(exc)
                    )
                )
                return True
            submitted = server._command_request(route, request, command)
            ran = self.ran
            ran.message = submitted
            ran.value = ran.error = None
            # The aggregate runs it here if it is live, idle and on the
            # in-memory store (AggregateRepository._run_now).
            if route.registry._ran_here(canonical_key(request.key), ran):
                if key is None and ran.error is None and not request.dry_run:
                    version, reply = ran.value
                    if reply is None or type(reply) is int:  # as _executed would, no outcome kept
                        self.out.append(self.codec.encode_ok(request.id, reply, version))
                        return True
                if ran.error is None:
                    try:
                        answer = server._executed(route, request, *ran.value)
                    except Exception as exc:
                        answer = self._failed(request, exc)
                else:
                    answer = self._failed(request, ran.error)
                if key is not None:
                    # Run to its end here: no identical request could come
                    # in meanwhile (no _pending needed); kept for retries.
                    server._keep(key, answer)
                self.out.append(server._encode_outcome(self.codec, request.id, answer))
                return True
            # Not run here (a busy aggregate, or another store): into the
            # mailbox, with the entry its callback answers (not tried here
            # again: nothing ran since _ran_here declined).
            entry = self._new_entry(request)
            entry.route = route
            if key is not None:
                entry.key = key
                entry.pending = server._pending[key] = _Pending()
            call = route.repository._submit_soon(
                request.key, submitted, functools.partial(self._fast_done, entry), run_here=False
            )
        except Exception as exc:
            line = server._encode_outcome(self.codec, request.id, server._failure(request, exc))
            if entry is None:
                self.out.append(line)
            else:
                self._unstart(entry)
                self._answer(entry, line)
            return True
        if call is None:
            self._unstart(entry)
            del self.running[entry.token]  # the task that runs it makes its own
            return False
        entry.call = call
        return True

    def _failed(self, request: Request, exc: BaseException) -> _Outcome:
        """The answer to an execute or create that raised ``exc``."""
        _name_key_as_given(exc, request.key, canonical_key(request.key))
        return self.server._failure(request, exc)

    def _unstart(self, entry: _Entry) -> None:
        """Undo what _start_fast prepared for a call that was not made."""
        entry.route = None
        if entry.pending is not None:
            assert entry.key is not None
            self.server._settle(entry.key, entry.pending, None)
            entry.pending = entry.key = None

    def _fast_done(self, entry: _Entry, result: outcome.Outcome[Any]) -> None:
        """A fast-path request's outcome, from the aggregate's task: answer it."""
        if entry.answered:
            return  # timed out, or the connection is gone
        server = self.server
        request = entry.request
        try:
            version, reply = result.unwrap()
            assert entry.route is not None
            answer = server._executed(entry.route, request, version, reply)
        except NotOwner as exc:
            if self._retry_as_task(entry):
                return
            answer = server._failure(request, exc)
        except Exception as exc:
            answer = self._failed(request, exc)
        pending = entry.pending
        if pending is not None:
            assert entry.key is not None
            server._settle(entry.key, pending, answer)
        self._answer(entry, server._encode_outcome(self.codec, request.id, answer))

    def _retry_as_task(self, entry: _Entry) -> bool:
        """A fast-path request of a cluster node met NotOwner (nothing was written):
        run it again in a task, which forwards it or waits for the shard."""
        server = self.server
        if server._cluster is None or entry.request.forwarded:
            return False
        entry.scope = trio.CancelScope()
        try:
            self.tasks.start_soon(self._run_task, entry)
        except RuntimeError:  # the connection's tasks are done: answer not_owner
            entry.scope = None
            return False
        pending = entry.pending
        if pending is not None:
            assert entry.key is not None
            server._settle(entry.key, pending, None)
        entry.call = None
        entry.pending = None
        entry.key = None
        return True

    async def _run_task(self, entry: _Entry) -> None:
        """Run a request in a task of its own (not on the fast path), and answer it.

        The watchdog cancels it when it runs too long (having answered
        ``timeout``); the end of the grace period at shutdown cancels it too
        (it answers ``shutting_down``).
        """
        assert entry.scope is not None
        try:
            with entry.scope:
                line = await self.server._answer(self.codec, entry.request)
                self._answer(entry, line)
        except trio.Cancelled:
            self._shutting_down(entry)
            raise

    def _time_out(self, entry: _Entry) -> None:
        """The watchdog: ``entry`` ran longer than ``request_timeout``."""
        self._answer(entry, self._timed_out(entry.request))
        self._withdraw(entry)

    def _shutting_down(self, entry: _Entry) -> None:
        """The grace period is over and ``entry`` is still running."""
        line = self.server._encode_error(
            self.codec, entry.request.id, ErrorCode.SHUTTING_DOWN, _SHUTTING_DOWN
        )
        self._answer(entry, line)
        self._withdraw(entry)

    def _withdraw(self, entry: _Entry) -> None:
        """Stop ``entry`` (answered already): a call not yet taken never runs."""
        if entry.call is not None:
            entry.call._abandoned = True
        if entry.scope is not None:
            entry.scope.cancel()
        if entry.pending is not None:
            assert entry.key is not None
            self.server._settle(entry.key, entry.pending, None)
            entry.pending = None

    def _timed_out(self, request: Request) -> bytes:
        return self.server._encode_error(
            self.codec,
            request.id,
            ErrorCode.TIMEOUT,
            f"no answer within {self.server._request_timeout} seconds "
            f"(the command may still be applied: retry with its command_id)",
        )

    # -- sending ----------------------------------------------------------------------

    def _answer(self, entry: _Entry, line: bytes) -> None:
        """Queue ``entry``'s answer (the first one given: later ones are dropped).

        The answer of the only request in flight, with nothing queued or
        being sent, goes out at once from the calling task (a non-blocking
        send on a plain TCP connection); what the socket does not take is
        queued for the sender. Not from the reader starting a request: its
        answers go out together once it has started all it read.
        """
        if entry.answered:
            return
        entry.answered = True
        del self.running[entry.token]
        if (
            self.in_flight == 1
            and self.raw is not None
            and not (self.out or self.sending or self.dispatching)
        ):
            line = self._send_now(self.raw, line)
        if line:
            self.out.append(line)
            if self.sender_parked and not (self.sending or self.dispatching):
                self.sender_parked = False
                self.send_lot.unpark()
        if not self.running and self.reading_done:
            self.drained_lot.unpark_all()

    def _send_now(self, raw: socket.socket, line: bytes) -> bytes:
        """Send what the socket takes of ``line`` (one answer) now; return the rest."""
        rest = self._send_what_fits(raw, line)
        if not rest:
            self._sent(1)
        return rest

    def _send_what_fits(self, raw: socket.socket, data: bytes) -> bytes:
        """One non-blocking send of ``data``: return what the socket did not take
        (nothing if the connection is, or turns out, broken). Never a checkpoint."""
        if self.broken:
            return b""
        try:
            sent = raw.send(data)
        except BlockingIOError:
            return data
        except OSError:
            self.broken = True
            self.read_scope.cancel()
            return b""
        return data[sent:] if sent < len(data) else b""

    def _sent(self, n: int) -> None:
        """``n`` answers were sent (or dropped: the connection is broken)."""
        self.in_flight -= n
        server = self.server
        server._in_flight -= n
        server._requests += n
        if self.slot_lot:  # the reader waits for a slot (unpark_all costs ~1 us even when empty)
            self.slot_lot.unpark_all()
        if self.in_flight == 0:
            if self.closing:
                self.read_scope.cancel()
            else:
                self.last_activity = self.now()

    async def _sender(self) -> None:
        """Send the answers queued by callbacks and tasks (the reader sends its own)."""
        while True:
            if not self.out or self.sending:
                self.sender_parked = True
                await self.send_lot.park()
                continue
            await self._send()

    async def _send(self) -> None:
        """Send every answer queued, in batches, unless another task is sending.

        On a plain TCP connection a batch goes first in one non-blocking
        send, without a checkpoint (the usual case: the socket takes it all;
        the reader and the sender reach a checkpoint right after). What the
        socket does not take is sent shielded from cancellation (a cut write
        would garble the stream) but bounded: the watchdog cancels a send
        stuck for ``idle_timeout`` (the client reads nothing), shutdown one
        stuck past the grace period; the connection is then broken.
        """
        if self.sending:
            return
        self.sending = True
        try:
            while self.out:
                batch = self.out
                self.out = []
                if not self.broken:
                    data = batch[0] if len(batch) == 1 else b"".join(batch)
                    if self.raw is not None:
                        data = self._send_what_fits(self.raw, data)
                    if data:
                        await self._send_blocking(data)
                self._sent(len(batch))
        finally:
            self.sending = False

    async def _send_blocking(self, data: bytes) -> None:
        """Send all of ``data``, shielded but bounded (see :meth:`_send`)."""
        self.sending_since = trio.current_time()
        with trio.CancelScope(shield=True) as scope:
            if self.closing:
                scope.deadline = self.hard_deadline
            self.send_scope = scope
            try:
                if self.raw is not None:
                    await _send_all(self.raw, data)
                else:
                    await self.stream.send_all(data)
            except _CONNECTION_ERRORS:
                self.broken = True
        self.send_scope = None
        if scope.cancelled_caught:
            self.broken = True
        if self.broken:
            self.read_scope.cancel()


async def _receive(raw: socket.socket, wait_first: bool) -> bytes:
    """``receive_some`` on the second handle: what trio's does, without its layers.

    A checkpoint: it waits for the socket (cancellable), or yields once when
    data was there already. ``wait_first``: wait for the socket before the
    first ``recv``, when it is most likely empty (every request answered: the
    client waits for its answers). That saves the ``recv`` failing with
    ``EAGAIN`` and the yield after a ``recv`` that found data (the wait was
    the yield): about 7 us of a request at one in flight, measured.
    """
    if not wait_first:
        try:
            data = raw.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            pass
        else:
            await trio.lowlevel.checkpoint()
            return data
    while True:
        await trio.lowlevel.wait_readable(raw)
        try:
            return raw.recv(_RECEIVE_SIZE)
        except BlockingIOError:  # pragma: no cover - a spurious wake-up
            continue


async def _send_all(raw: socket.socket, data: bytes) -> None:
    """``send_all`` on the second handle, without SocketStream's layers, for
    what a non-blocking send did not take: it waits for room first.

    A checkpoint (it always waits for the socket).
    """
    view = memoryview(data)
    total = len(data)
    sent = 0
    while sent < total:
        await trio.lowlevel.wait_writable(raw)
        try:
            sent += raw.send(view[sent:])
        except BlockingIOError:  # pragma: no cover - a spurious wake-up
            continue


def _second_handle(stream: trio.abc.Stream) -> socket.socket | None:
    """A duplicate of a plain TCP stream's socket, non-blocking; None for any
    other stream (TLS) or where descriptors cannot be duplicated."""
    if type(stream) is not trio.SocketStream or os.name != "posix":
        return None
    try:
        raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
    except OSError:  # pragma: no cover - out of descriptors: the sender does it all
        return None
    raw.setblocking(False)
    return raw


def _check_options(
    max_line_bytes: int,
    max_in_flight: int,
    max_connections: int,
    idle_timeout: float,
    request_timeout: float,
    grace_period: float,
    passivate_after: float | None,
    mailbox_size: int,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
) -> None:
    check_count("max_line_bytes", max_line_bytes, minimum=64)
    check_count("max_in_flight", max_in_flight)
    check_count("max_connections", max_connections)
    check_seconds("idle_timeout", idle_timeout, allow_zero=False)
    check_seconds("request_timeout", request_timeout, allow_zero=False)
    check_seconds("grace_period", grace_period, allow_zero=True)
    if passivate_after is not None:
        check_seconds("passivate_after", passivate_after, allow_zero=False)
    check_count("mailbox_size", mailbox_size, minimum=0)
    if token is not None and (not isinstance(token, str) or not token):
        raise InvalidArgument("token must be a non-empty str or None")
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        raise InvalidArgument(f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}")


@asynccontextmanager
async def open_aggregate_server(
    app: App,
    store: EventStore | str,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_line_bytes: int = 1 << 20,
    max_in_flight: int = 64,
    max_connections: int = 1024,
    idle_timeout: float = 300.0,
    request_timeout: float = 30.0,
    grace_period: float = 5.0,
    passivate_after: float | None = 300.0,
    mailbox_size: int = 64,
    handler_nursery: trio.Nursery | None = None,
    cluster: ClusterNode | ClusterOptions | None = None,
) -> AsyncIterator[AggregateServer]:
    """Serve ``app``'s aggregates on ``store`` over TCP for the block's duration.

    Args:
        app: the aggregate types served (see :data:`App`).
        store: an :class:`EventStore`, or a URL for :func:`open_store` (the
            server then closes the store at the end).
        host, port: where to listen (``port=0``: a free port, see
            :attr:`AggregateServer.port`).
        token: a shared secret the first line of each connection must give
            in a ``hello`` (``None``: no authentication).
        ssl_context: serve TLS with this server-side context.
        max_line_bytes: the longest request line (``too_large`` beyond).
        max_in_flight: requests in flight per connection; beyond, the server
            stops reading that connection (backpressure).
        max_connections: connections beyond it get one ``overloaded`` line
            and are closed.
        idle_timeout: a connection with nothing in flight and nothing received
            for this long is closed (also: a client that reads no answer for
            this long is dropped).
        request_timeout: seconds a request may take (``timeout`` beyond).
        grace_period: at shutdown, how long requests in flight may finish.
        passivate_after: aggregates idle this long are passivated (``None``:
            never).
        mailbox_size: each aggregate's mailbox buffer.
        handler_nursery: run the connection tasks here instead of the
            server's own nursery.
        cluster: serve as a node of a cluster (see :doc:`cluster`): a
            :class:`ClusterNode` of ``store`` (opened by the caller with
            :func:`~trio_aggregates.open_cluster`), or :class:`ClusterOptions`
            to open one once listening and leave it at shutdown (``store``
            must then be PostgreSQL). A request for a key whose shard another
            node owns is forwarded to it (one pooled, pipelined connection
            per peer; the client gets the owner's answer), and while a shard
            moves the request is tried again, with a ``command_id`` (one is
            given to a command without), until ``request_timeout``. The live
            aggregates of shards the node gives up or loses are passivated.
            TLS (``ssl_context``) between nodes is not supported.

    Leaving the block shuts down gracefully (see :meth:`AggregateServer.aclose`).

    Cancellation: the server runs shielded from cancellations from outside
    the block (opening it is not cancellable: a store URL's own timeouts
    bound it); a cancellation of the block's body makes it leave the block,
    which shuts the server down gracefully (bounded by ``grace_period`` plus
    a few seconds), and the cancellation goes on from there.

    Raises:
        InvalidArgument: a bad option or app.
        OSError: the address cannot be listened on.
    """
    error: BaseException | None = None
    async with trio.open_nursery() as relay:
        body = trio.CancelScope()
        relay.start_soon(_relay_cancellation, body)
        try:
            with trio.CancelScope(shield=True):
                async with _open_server(
                    app, store, host=host, port=port, token=token, ssl_context=ssl_context,
                    max_line_bytes=max_line_bytes, max_in_flight=max_in_flight,
                    max_connections=max_connections, idle_timeout=idle_timeout,
                    request_timeout=request_timeout, grace_period=grace_period,
                    passivate_after=passivate_after, mailbox_size=mailbox_size,
                    handler_nursery=handler_nursery, cluster=cluster,
                ) as server:  # fmt: skip
                    with body:
                        yield server
        except BaseException as exc:
            error = exc
        finally:
            relay.cancel_scope.cancel()
    if error is not None:
        raise error


async def _relay_cancellation(body: trio.CancelScope) -> None:
    """Cancel ``body`` when this task is cancelled (from outside the server's shield)."""
    try:
        await trio.sleep_forever()
    finally:
        body.cancel()


@asynccontextmanager
async def _open_server(
    app: App,
    store: EventStore | str,
    *,
    host: str,
    port: int,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    max_line_bytes: int,
    max_in_flight: int,
    max_connections: int,
    idle_timeout: float,
    request_timeout: float,
    grace_period: float,
    passivate_after: float | None,
    mailbox_size: int,
    handler_nursery: trio.Nursery | None,
    cluster: ClusterNode | ClusterOptions | None,
) -> AsyncIterator[AggregateServer]:
    """:func:`open_aggregate_server`, but for the cancellation relay."""
    if cluster is not None:
        from .._scaleout._cluster import ClusterNode

        if not isinstance(cluster, ClusterNode | ClusterOptions):
            raise InvalidArgument(
                f"cluster must be a ClusterNode or ClusterOptions, not {type(cluster).__name__}"
            )
        if ssl_context is not None:
            raise InvalidArgument("a cluster node cannot serve TLS (not supported yet)")
    _check_options(
        max_line_bytes, max_in_flight, max_connections, idle_timeout, request_timeout,
        grace_period, passivate_after, mailbox_size, token, ssl_context,
    )  # fmt: skip
    classes = _routes_of(app)
    commands = {name: _commands_of(name, cls) for name, cls in classes.items()}
    body_error: BaseException | None = None
    reraise: BaseException | None = None
    async with AsyncExitStack() as stack:
        if isinstance(store, str):
            from .._stores._open_store import open_store

            store = await stack.enter_async_context(open_store(store))
        routes: dict[str, _Route] = {}
        for name, cls in classes.items():
            repository = await stack.enter_async_context(
                open_aggregates(
                    cls,
                    store,
                    idle_timeout=passivate_after,
                    mailbox_size=mailbox_size,
                    shutdown_timeout=max(grace_period, 0.1),
                )
            )
            routes[name] = _Route(
                name, repository, cls.codec().converter, commands[name], repository.registry
            )
        listeners: list[Any] = list(await trio.open_tcp_listeners(port, host=host))
        if ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, ssl_context, https_compatible=False)
                for listener in listeners
            ]
        node: ClusterNode | None = None
        try:
            if isinstance(cluster, ClusterOptions):
                node = await stack.enter_async_context(_open_cluster_for(store, cluster, listeners))
            elif cluster is not None:
                node = cluster
        except BaseException:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)
            raise
        server = AggregateServer(
            routes,
            store,
            listeners,
            token=token,
            max_line_bytes=max_line_bytes,
            max_in_flight=max_in_flight,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            request_timeout=request_timeout,
            grace_period=grace_period,
            cluster=node,
        )
        if node is not None:
            node._release_hooks.append(server._passivate_shards)
            stack.callback(node._release_hooks.remove, server._passivate_shards)
        try:
            async with trio.open_nursery() as nursery:
                server._peer_nursery = nursery
                await nursery.start(
                    server._serve, nursery if handler_nursery is None else handler_nursery
                )
                try:
                    yield server
                except BaseException as exc:
                    body_error = exc
                finally:
                    await server.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            only_cancelled = group.split(trio.Cancelled)[1] is None
            if only_cancelled and body_error is None:
                raise
            if not only_cancelled:
                fatal = group.split((KeyboardInterrupt, SystemExit))[0]
                if fatal is None:
                    raise TrioAggregatesError(
                        "internal error in the trio_aggregates server (please report it)"
                    ) from group
                reraise = _first_leaf(fatal)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)
    if reraise is not None:
        raise reraise from None
    if body_error is not None:
        raise body_error


def _open_cluster_for(store: EventStore, options: ClusterOptions, listeners: list[Any]) -> Any:
    """``open_cluster`` for a server that listens on ``listeners``, by ``options``."""
    from .._scaleout._cluster import open_cluster

    address = options.advertise
    if address is None:
        listener: Any = listeners[0]
        host, port = listener.socket.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            raise InvalidArgument(
                "a cluster node listening on a wildcard address needs an advertised address"
            )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _split_address(address)
    return open_cluster(
        store,  # type: ignore[arg-type]
        address=address,
        node_id=options.node_id,
        shards=options.shards,
        lease_ttl=options.lease_ttl,
        renew_interval=options.renew_interval,
        node_timeout=options.node_timeout,
    )


async def serve_aggregates(
    app: App,
    store: EventStore | str,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_line_bytes: int = 1 << 20,
    max_in_flight: int = 64,
    max_connections: int = 1024,
    idle_timeout: float = 300.0,
    request_timeout: float = 30.0,
    grace_period: float = 5.0,
    passivate_after: float | None = 300.0,
    mailbox_size: int = 64,
    cluster: ClusterNode | ClusterOptions | None = None,
) -> NoReturn:
    """Serve ``app``'s aggregates on ``store`` until cancelled; ``nursery.start``-able.

    Takes the options of :func:`open_aggregate_server`. ``task_status.started``
    reports the listeners (``listeners[0].socket.getsockname()`` gives the
    port picked for ``port=0``)::

        listeners = await nursery.start(serve_aggregates, [Account], "sqlite:///bank.db")

    Cancellation: it shuts down gracefully (shielded, bounded by
    ``grace_period`` plus a few seconds: requests in flight finish or are
    answered ``shutting_down``, connections are closed, then the aggregates
    and a store opened from a URL), then lets the cancellation through.

    Raises:
        InvalidArgument: a bad option or app.
        OSError: the address cannot be listened on.
    """
    async with open_aggregate_server(
        app, store, host=host, port=port, handler_nursery=handler_nursery, token=token,
        ssl_context=ssl_context, max_line_bytes=max_line_bytes, max_in_flight=max_in_flight,
        max_connections=max_connections, idle_timeout=idle_timeout,
        request_timeout=request_timeout, grace_period=grace_period,
        passivate_after=passivate_after, mailbox_size=mailbox_size, cluster=cluster,
    ) as server:  # fmt: skip
        task_status.started(server.listeners)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
