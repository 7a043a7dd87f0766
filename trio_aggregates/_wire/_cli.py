"""The command line ``trio-aggregates serve | call | load | stats`` (``python -m trio_aggregates``).

* ``serve TARGET`` serves an app (``module:attr`` or ``path/to/file.py:attr``) over TCP; its first
  line on stdout is exactly ``listening on tcp://HOST:PORT``; SIGINT or SIGTERM shut it down
  gracefully (in-flight requests finish within the grace period) and it exits 0.
* ``call`` sends one request and prints the answer line: exit 0 when the answer is ok, 1 when it
  is an error answer, 2 when no answer could be had (cannot connect, connection lost, timeout).
* ``load`` drives a server with many pipelined connections, shows a progress bar, ends with a
  table (throughput, latency percentiles, errors by code) and, for the bank scenario, checks that
  the balances add up (exit 1 when they do not). ``--serve TARGET`` starts the server itself as a
  child process (``python -m trio_aggregates serve TARGET --port 0``) and stops it at the end.
* ``stats`` prints a running server's statistics as tables.

The client side here (``_Client``) is a small pipelined NDJSON client on the library's
:class:`~trio_aggregates.ClientCodec`: requests are matched to answers by id, a writer
task batches what is ready into one ``send_all``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import attrs
import click
import outcome
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .._core._exceptions import InvalidArgument, StoreError
from .._runtime._aggregate import Aggregate
from ._protocol import ClientCodec, ProtocolError, Response
from ._server import DEFAULT_PORT, ClusterOptions, open_aggregate_server

DEFAULT_STORE = "sqlite:///aggregates.db"
DEFAULT_HOST = "127.0.0.1"
#: ``serve``'s young-generation threshold for the garbage collector (see :func:`tune_gc`).
SERVE_GC_THRESHOLD: Final = 50_000
_LISTENING = re.compile(r"^listening on tcp://(?P<host>.+):(?P<port>\d+)$")
#: Error codes a bank command is retried on, with the same command_id (so at most once applied).
_RETRY_CODES = frozenset({"timeout", "overloaded", "store_unavailable", "conflict"})
_RETRIES = 6
_START_TIMEOUT = 60.0  # seconds to wait for a child server's first line
_STOP_TIMEOUT = 30.0  # seconds to wait for a SIGTERMed child server to exit

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- loading the app -----------------------------------------------------------------------------


def load_app(target: str) -> Sequence[type[Aggregate]] | Mapping[str, type[Aggregate]]:
    """The app that ``target`` names: ``module:attr`` or ``path/to/file.py:attr``.

    A file is loaded by path under a module name of its own (registered in ``sys.modules`` before
    it runs, so type hints resolve) with its directory first on ``sys.path``, as ``python file.py``
    would; a module is imported with the current directory on ``sys.path``. ``attr`` may be
    dotted. An app is a sequence of :class:`Aggregate` subclasses, a mapping ``{wire type name:
    class}``, or one :class:`Aggregate` subclass (served alone).

    Raises:
        click.BadParameter: a malformed target, a module or file that cannot be found, a missing
            attribute, or an attribute that is not an app.
        click.ClickException: the module raised while it was imported (the traceback is printed).
    """
    location, colon, attribute = target.rpartition(":")
    if not colon or not location or not attribute:
        raise click.BadParameter(
            f"{target!r} is not MODULE:ATTRIBUTE or path/to/file.py:ATTRIBUTE", param_hint="TARGET"
        )
    try:
        if location.endswith(".py") or "/" in location or os.sep in location:
            module = _load_file(Path(location))
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(location)
            except ModuleNotFoundError as exc:
                if exc.name is not None and location.startswith(exc.name):
                    raise click.BadParameter(
                        f"no module named {location!r}", param_hint="TARGET"
                    ) from None
                raise
    except click.ClickException:
        raise
    except Exception as exc:
        import traceback

        traceback.print_exc()
        raise click.ClickException(
            f"loading {location} failed: {type(exc).__name__}: {exc}"
        ) from exc
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise click.BadParameter(
                f"{location} has no attribute {attribute!r}", param_hint="TARGET"
            ) from None
    return _check_app(value, target)


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise click.BadParameter(f"no such file: {str(path)!r}", param_hint="TARGET")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"_trio_aggregates_app_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise click.BadParameter(f"cannot load {str(path)!r} as Python", param_hint="TARGET")
    module = importlib.util.module_from_spec(spec)
    directory = str(resolved.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[name] = module  # before it runs: attrs/cattrs resolve its type hints through it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_aggregate_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, Aggregate) and value is not Aggregate


def _check_app(
    value: Any, target: str
) -> Sequence[type[Aggregate]] | Mapping[str, type[Aggregate]]:
    def not_an_app(why: str) -> NoReturn:
        raise click.BadParameter(
            f"{target} is not an app ({why}): an app is a list of Aggregate subclasses or a "
            "mapping {wire type name: Aggregate subclass}",
            param_hint="TARGET",
        )

    if _is_aggregate_class(value):
        return [value]
    if isinstance(value, Mapping):
        if not value:
            not_an_app("an empty mapping")
        for name, cls in value.items():
            if not isinstance(name, str) or not _is_aggregate_class(cls):
                not_an_app(f"{name!r}: {cls!r}")
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if not value:
            not_an_app("an empty sequence")
        for cls in value:
            if not _is_aggregate_class(cls):
                not_an_app(f"{cls!r} is not an Aggregate subclass")
        return list(value)
    not_an_app(f"a {type(value).__name__}")


# -- addresses and TLS ---------------------------------------------------------------------------


def _parse_address(url: str) -> tuple[str, int]:
    match = re.fullmatch(r"(?:tcp://)?(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/?", url)
    if match is None:
        raise click.BadParameter(f"{url!r} is not tcp://HOST:PORT", param_hint="--connect")
    return match["host"].strip("[]"), int(match["port"])


def _client_ssl(tls: bool, tls_ca: str | None) -> ssl.SSLContext | None:
    if not tls and tls_ca is None:
        return None
    return ssl.create_default_context(cafile=tls_ca)


async def _open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    if ssl_context is None:
        return await trio.open_tcp_stream(host, port)
    return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)


def _connect_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--connect",
            metavar="tcp://HOST:PORT",
            help="the server's address (default: --host and --port)",
        ),
        click.option("--host", default=DEFAULT_HOST, show_default=True),
        click.option("--port", type=int, default=DEFAULT_PORT, show_default=True),
        click.option(
            "--token",
            envvar="TRIO_AGGREGATES_TOKEN",
            help="shared secret (env TRIO_AGGREGATES_TOKEN)",
        ),
        click.option("--tls", is_flag=True, help="connect with TLS"),
        click.option(
            "--tls-ca",
            type=click.Path(exists=True, dir_okay=False),
            help="CA file to verify the server with (implies --tls)",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _target(connect: str | None, host: str, port: int) -> tuple[str, int]:
    return _parse_address(connect) if connect is not None else (host, port)


# -- the pipelined client ------------------------------------------------------------------------


class ConnectionLost(Exception):
    """The connection ended (or could not be used) before the answer came."""


@attrs.define(eq=False)
class _Slot:
    t0: float
    event: trio.Event = attrs.Factory(trio.Event)
    response: Response | None = None
    latency: float = 0.0


class _Client:
    """One connection, many requests in flight; answers matched by id."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._codec = ClientCodec()
        self._pending: dict[int, _Slot] = {}
        self._next_id = 0
        self._send, self._outbox = trio.open_memory_channel[bytes](math.inf)
        self._lost: str | None = None
        self._notice = ""  # the last error answer that was no request's

    async def request(self, **fields: Any) -> tuple[Response, float]:
        """Send one request, wait for its answer: ``(response, latency in seconds)``.

        Raises:
            ConnectionLost: the connection ended before the answer came.
        """
        if self._lost is not None:
            raise ConnectionLost(self._lost)
        self._next_id += 1
        rid = self._next_id
        slot = _Slot(time.perf_counter())
        self._pending[rid] = slot
        self._send.send_nowait(self._codec.encode_request(id=rid, **fields))
        try:
            await slot.event.wait()
        finally:
            self._pending.pop(rid, None)
        if slot.response is None:
            raise ConnectionLost(self._lost or "connection lost")
        return slot.response, slot.latency

    def _fail(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        for slot in self._pending.values():
            slot.event.set()
        self._pending.clear()

    async def _write(self) -> None:
        try:
            async for first in self._outbox:
                batch = [first]
                while True:
                    try:
                        batch.append(self._outbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._stream.send_all(b"".join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"sending failed: {exc!r}")

    async def _read(self) -> None:
        pending = self._pending
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    self._fail(f"the server closed the connection{self._notice}")
                    return
                now = time.perf_counter()
                for response in self._codec.receive_data(data):
                    slot = pending.pop(response.id, None) if isinstance(response.id, int) else None
                    if slot is not None:
                        slot.response = response
                        slot.latency = now - slot.t0
                        slot.event.set()
                    elif not response.ok:  # e.g. "overloaded" (id null) before a close
                        self._notice = f" ({response.error_code}: {response.error_message})"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"receiving failed: {exc!r}")
        except ProtocolError as exc:
            self._fail(f"not a valid answer: {exc}")

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            await self._read()
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _connected(host: str, port: int) -> AsyncIterator[_Client]:
    """A pipelined client on a new plain TCP connection to ``host:port``, for the block.

    (The cluster's tests and benchmark talk to nodes through it.)
    """
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        client = _Client(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()


async def _hello(client: _Client, token: str | None) -> Response:
    """Say hello (with ``token`` if any); the answer.

    Raises:
        ConnectionLost: the connection ended first.
        click.ClickException: hello was refused.
    """
    hello, _ = await client.request(op="hello", token=token)
    if not hello.ok:
        raise click.ClickException(f"hello refused: {hello.error_code}: {hello.error_message}")
    return hello


# -- the CLI -------------------------------------------------------------------------------------


@click.group(context_settings=_CONTEXT)
@click.version_option(package_name="trio-aggregates")
def cli() -> None:
    """Serve event-sourced aggregates over TCP (NDJSON), and talk to such a server."""


def main(argv: Sequence[str] | None = None, *, prog_name: str = "trio-aggregates") -> None:
    """The ``trio-aggregates`` console script."""
    cli.main(args=argv, prog_name=prog_name)


# -- serve ---------------------------------------------------------------------------------------


@cli.command(context_settings=_CONTEXT)
@click.argument("target")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="event store URL")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="address to listen on")
@click.option(
    "--port", type=int, default=DEFAULT_PORT, show_default=True, help="0 picks a free port"
)
@click.option(
    "--token", envvar="TRIO_AGGREGATES_TOKEN", help="shared secret (env TRIO_AGGREGATES_TOKEN)"
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="TLS private key")
@click.option(
    "--grace-period",
    type=float,
    default=5.0,
    show_default=True,
    help="seconds in-flight requests get at shutdown",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="log level (logs go to stderr)",
)
@click.option(
    "--gc-threshold",
    type=click.IntRange(0),
    default=SERVE_GC_THRESHOLD,
    show_default=True,
    help="the garbage collector's young-generation threshold once serving (0: Python's own, "
    "and no gc.freeze)",
)
@click.option(
    "--cluster",
    is_flag=True,
    help="serve as a node of the cluster of servers sharing the PostgreSQL --store",
)
@click.option(
    "--advertise",
    metavar="HOST:PORT",
    help="with --cluster: where the other nodes reach this one (default: --host and the port)",
)
@click.option("--node-id", help="with --cluster: this node's id (default: a random one)")
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="with --cluster: seconds a shard lease lasts without renewal",
)
@click.option(
    "--shards",
    type=click.IntRange(1, 65536),
    default=256,
    show_default=True,
    help="with --cluster: the number of shards (the same on every node)",
)
def serve(
    target: str,
    store: str,
    host: str,
    port: int,
    token: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    grace_period: float,
    log_level: str,
    gc_threshold: int,
    cluster: bool,
    advertise: str | None,
    node_id: str | None,
    lease_ttl: float,
    shards: int,
) -> None:
    """Serve TARGET (module:attr or path/to/file.py:attr, an app) until SIGINT or SIGTERM.

    The first line on stdout is exactly `listening on tcp://HOST:PORT`. A signal stops it
    gracefully: no new connections, in-flight requests finish within the grace period, the rest
    are answered `shutting_down`, the store is closed, exit 0.

    Once listening, the process freezes what it loaded (gc.freeze) and raises the garbage
    collector's young-generation threshold (--gc-threshold): with thousands of requests in
    flight, Python's default collects so often that it takes a fifth to a third of the CPU.

    With --cluster (the store must be PostgreSQL) the server is one node of a cluster: the nodes
    sharing the store split the keys by shard leases; a request for a key another node owns is
    forwarded to it (see the docs' "Scale-out" page).
    """
    options = None
    if cluster:
        if not store.startswith(("postgresql://", "postgres://")):
            raise click.UsageError(
                f"--cluster needs a PostgreSQL --store (postgresql://...), not {store!r}"
            )
        if tls_cert is not None:
            raise click.UsageError("--cluster does not support --tls-cert yet")
        options = ClusterOptions(
            advertise=advertise, node_id=node_id, shards=shards, lease_ttl=lease_ttl
        )
    elif advertise is not None or node_id is not None:
        raise click.UsageError("--advertise and --node-id go with --cluster")
    app = load_app(target)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    ssl_context = None
    if tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise click.ClickException(f"cannot load --tls-cert/--tls-key: {exc}") from None
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trio.run(
            _serve, app, store, host, port, token, ssl_context, grace_period, gc_threshold, options
        )
    except (InvalidArgument, StoreError, OSError) as exc:  # a bad store URL, a port in use...
        raise click.ClickException(f"cannot serve: {exc}") from None


async def _serve(
    app: Any,
    store: str,
    host: str,
    port: int,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    grace_period: float,
    gc_threshold: int = 0,
    cluster: ClusterOptions | None = None,
) -> None:
    log = logging.getLogger("trio_aggregates.cli")
    # The receiver is in place before the address is printed: a signal right after it is ours.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_aggregate_server(
            app,
            store,
            host=host,
            port=port,
            token=token,
            ssl_context=ssl_context,
            grace_period=grace_period,
            cluster=cluster,
        ) as server:
            tune_gc(gc_threshold)
            sys.stdout.write(f"listening on {server.address}\n")
            sys.stdout.flush()
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
        log.info("stopped")


def tune_gc(threshold: int) -> None:
    """What ``serve`` does to the garbage collector once the server is up.

    Moves everything loaded so far (modules, classes, the server) out of the
    collector's sight (:func:`gc.freeze`), and sets the young generation's
    threshold to ``threshold`` allocations (Python's default is 700). Requests
    in flight live a few milliseconds: with the default, each young
    collection finds thousands of them alive, promotes them, and full
    collections over every live aggregate follow often. ``0`` changes
    nothing. ``benchmarks/bench_server.py`` applies the same to the server it
    measures.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)


# -- call ----------------------------------------------------------------------------------------


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=what) from None
    if not isinstance(value, dict):
        raise click.BadParameter("not a JSON object", param_hint=what)
    return value


@cli.command(context_settings=_CONTEXT)
@click.argument("request", required=False)
@_connect_options
@click.option("--op", help="the request's op (default execute)")
@click.option("--type", "type_", help="wire type name")
@click.option("--key", help="the aggregate's key")
@click.option("--command", help="command class name")
@click.option("--data", help="the command's fields, a JSON object")
@click.option("--command-id", help="idempotency id")
@click.option("--expected-version", type=int)
@click.option("--create", is_flag=True, default=None, help="create the stream if missing")
@click.option("--dry-run", is_flag=True, default=None, help="decide, do not store")
@click.option("--metadata", help="extra metadata, a JSON object")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="seconds")
def call(
    request: str | None,
    connect: str | None,
    host: str,
    port: int,
    token: str | None,
    tls: bool,
    tls_ca: str | None,
    op: str | None,
    type_: str | None,
    key: str | None,
    command: str | None,
    data: str | None,
    command_id: str | None,
    expected_version: int | None,
    create: bool | None,
    dry_run: bool | None,
    metadata: str | None,
    timeout: float,
) -> None:
    """Send one request and print the answer line.

    REQUEST is a JSON object (an id is added if it has none), or the request is built from the
    options. Exit 0 when the answer is ok, 1 when it is an error answer, 2 when no answer came
    (cannot connect, connection lost, timeout).

    \b
      trio-aggregates call '{"op": "ping"}'
      trio-aggregates call --type Account --key acc-1 --command Deposit --data '{"amount": 5}'
    """
    fields: dict[str, Any] = {
        "op": op,
        "type": type_,
        "key": key,
        "command": command,
        "data": None if data is None else _json_object(data, "--data"),
        "command_id": command_id,
        "expected_version": expected_version,
        "create": create,
        "dry_run": dry_run,
        "metadata": None if metadata is None else _json_object(metadata, "--metadata"),
    }
    given = {name: value for name, value in fields.items() if value is not None}
    if request is not None:
        if given:
            raise click.UsageError("give REQUEST or the request's options, not both")
        body = _json_object(request, "REQUEST")
    else:
        body = given
    body.setdefault("id", 1)
    line = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    address = _target(connect, host, port)
    code, answer, _ = trio.run(_call, address, line, token, _client_ssl(tls, tls_ca), timeout)
    if answer is not None:
        click.echo(answer.decode("utf-8", "replace").rstrip("\r\n"))
    sys.exit(code)


async def _read_line(stream: trio.abc.Stream, buffer: bytearray) -> bytes:
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            return line
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionLost("the server closed the connection")
        buffer += data


async def _exchange(
    address: tuple[str, int],
    lines: Sequence[bytes],
    ssl_context: ssl.SSLContext | None,
    timeout: float,
) -> tuple[bytes, Response]:
    """Send ``lines`` one at a time on one connection, each after the previous one's answer;
    the last answer (line and parsed), or the first error answer.

    Raises:
        OSError: cannot connect.
        ConnectionLost, trio.BrokenResourceError: the connection ended before an answer.
        trio.TooSlowError: no answer within ``timeout`` seconds (the whole exchange).
        ProtocolError: an answer that is not a valid response line.
    """
    codec = ClientCodec()
    with trio.fail_after(timeout):
        stream = await _open_stream(*address, ssl_context)
        async with stream:
            buffer = bytearray()
            for line in lines:
                await stream.send_all(line)
                answer = await _read_line(stream, buffer)
                (response,) = codec.receive_data(answer)
                if not response.ok:
                    break
    return answer, response


async def _call(
    address: tuple[str, int],
    line: bytes,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
) -> tuple[int, bytes | None, Response | None]:
    """``(exit code, answer line, answer)`` of one exchange, with hello first given a token."""
    lines = [line]
    if token is not None:
        hello = {"id": "hello", "op": "hello", "token": token}
        lines.insert(0, json.dumps(hello).encode() + b"\n")
    where = f"tcp://{address[0]}:{address[1]}"
    try:
        answer, response = await _exchange(address, lines, ssl_context, timeout)
    except OSError as exc:
        click.echo(f"cannot connect to {where}: {exc}", err=True)
        return 2, None, None
    except (ConnectionLost, trio.BrokenResourceError) as exc:
        click.echo(f"no answer from {where}: {exc}", err=True)
        return 2, None, None
    except trio.TooSlowError:
        click.echo(f"no answer from {where} within {timeout} s", err=True)
        return 2, None, None
    except ProtocolError as exc:
        click.echo(f"not a valid answer from {where}: {exc}", err=True)
        return 2, None, None
    return (0 if response.ok else 1), answer, response


# -- stats ---------------------------------------------------------------------------------------


@cli.command(context_settings=_CONTEXT)
@_connect_options
@click.option("--json", "as_json", is_flag=True, help="print the answer line as is")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="seconds")
def stats(
    connect: str | None,
    host: str,
    port: int,
    token: str | None,
    tls: bool,
    tls_ca: str | None,
    as_json: bool,
    timeout: float,
) -> None:
    """Print a running server's statistics: connections and requests, live aggregates per type,
    the store, and for a cluster node the cluster (nodes, shards per node, moves, forwards).
    Exit codes as for `call`."""
    line = b'{"id":1,"op":"stats"}\n'
    address = _target(connect, host, port)
    code, answer, response = trio.run(
        _call, address, line, token, _client_ssl(tls, tls_ca), timeout
    )
    if answer is None or response is None:
        sys.exit(code)
    if as_json or not response.ok or not isinstance(response.result, dict):
        click.echo(answer.decode("utf-8", "replace").rstrip("\r\n"))
        sys.exit(code)
    console = Console()
    for section, value in response.result.items():
        console.print(_table(str(section), value))


def _cell(value: Any) -> Text:
    """A table cell, as is (no rich markup: a JSON list has brackets)."""
    if isinstance(value, float):
        return Text(f"{value:.4g}")
    if isinstance(value, dict | list):
        return Text(json.dumps(value, separators=(", ", ": ")))
    return Text(str(value))


def _table(title: str, value: Any) -> Table:
    """A key/value table, or for a mapping of mappings (per type) one column per entry."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        rows: list[str] = []
        for column in value.values():
            rows.extend(r for r in column if r not in rows)
        table = Table(title=title, title_justify="left")
        table.add_column("")
        for name in value:
            table.add_column(Text(str(name)), justify="right")
        for row in rows:
            table.add_row(Text(row), *(_cell(column.get(row, "")) for column in value.values()))
        return table
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    items = value.items() if isinstance(value, dict) else [("value", value)]
    for name, cell in items:
        table.add_row(Text(str(name)), _cell(cell))
    return table


# -- load ----------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Recorder:
    """Answers and latencies of one phase."""

    latencies: list[float] = attrs.Factory(list)
    errors: Counter[str] = attrs.Factory(Counter)
    lost: int = 0

    def record(self, response: Response, latency: float) -> None:
        self.latencies.append(latency)
        if not response.ok:
            self.errors[response.error_code or "?"] += 1

    @property
    def count(self) -> int:
        return len(self.latencies)


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of sorted ``ordered`` (0.0 when it is empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@attrs.define(eq=False)
class _Load:
    """Settings and shared state of one load run."""

    clients: list[_Client]
    depth: int
    requests: int | None
    duration: float | None
    recorder: _Recorder = attrs.Factory(_Recorder)
    issued: int = 0
    deadline: float = math.inf

    def more(self) -> bool:
        """Whether to start one more unit of work (a ping, a transfer)."""
        if self.requests is not None and self.issued >= self.requests:
            return False
        return time.perf_counter() < self.deadline


async def _run_workers(
    load: _Load,
    work: Callable[[_Client, int], Awaitable[None]],
    progress: Progress,
    description: str,
    total: float | None,
    completed: Callable[[], float],
    answered: Callable[[], int],
) -> float:
    """Run ``work(client, worker number)`` ``depth`` times per connection; the seconds it took.

    The progress bar shows ``completed()`` of ``total`` and the rate of ``answered()``.
    """
    task = progress.add_task(description, total=total, rate="")
    started = time.perf_counter()

    def show() -> None:
        elapsed = time.perf_counter() - started
        rate = answered() / elapsed if elapsed > 0 else 0.0
        progress.update(task, completed=completed(), rate=f"{rate:,.0f} requests/s")
        progress.refresh()

    async def tick() -> None:
        while True:
            show()
            await trio.sleep(0.2)

    failures: list[Exception] = []

    async def worker(client: _Client, number: int) -> None:
        try:
            await work(client, number)
        except ConnectionLost:
            load.recorder.lost += 1
        except Exception as exc:  # one error ends the phase, raised alone (not in a group)
            failures.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as outer:
        outer.start_soon(tick)
        async with trio.open_nursery() as nursery:
            number = 0
            for client in load.clients:
                for _ in range(load.depth):
                    nursery.start_soon(worker, client, number)
                    number += 1
        outer.cancel_scope.cancel()
    if failures:
        raise failures[0]
    show()
    return time.perf_counter() - started


async def _request(load: _Load, client: _Client, **fields: Any) -> Response:
    """One request, recorded; retried (same command_id) on a transient error code."""
    for attempt in range(_RETRIES):
        load.issued += 1
        response, latency = await client.request(**fields)
        load.recorder.record(response, latency)
        if response.ok or response.error_code not in _RETRY_CODES or "command_id" not in fields:
            return response
        await trio.sleep(0.01 * 2**attempt)
    return response


@attrs.frozen
class LoadResult:
    """What ``load`` measured and checked."""

    requests: int
    seconds: float
    latencies: list[float]
    errors: dict[str, int]
    lost: int
    total: int | None = None  # bank: the sum of the balances
    expected: int | None = None  # bank: what it should be
    transfers: int = 0


async def run_load(
    address: tuple[str, int],
    *,
    scenario: str = "bank",
    connections: int = 100,
    depth: int = 1,
    requests: int | None = 20_000,
    duration: float | None = None,
    accounts: int = 100,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    console: Console | None = None,
) -> LoadResult:
    """Drive the server at ``address``; see ``trio-aggregates load --help``.

    Raises:
        OSError: cannot connect.
        click.ClickException: the server does not serve the bank scenario's types, or refused hello.
    """
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
        console=console or Console(stderr=True),
        auto_refresh=False,
    )
    streams: list[trio.abc.Stream] = []
    try:
        for _ in range(connections):
            streams.append(await _open_stream(*address, ssl_context))
        clients = [_Client(stream) for stream in streams]
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client._run)
            # The body's outcome is carried out of the nursery: an error comes out alone.
            done = await outcome.acapture(
                _drive,
                _Load(clients, depth, requests, duration),
                progress,
                scenario,
                accounts,
                token,
            )
            nursery.cancel_scope.cancel()
        return done.unwrap()
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()


async def _drive(
    load: _Load, progress: Progress, scenario: str, accounts: int, token: str | None
) -> LoadResult:
    hello = None
    if token is not None or scenario == "bank":
        for client in load.clients if token is not None else load.clients[:1]:
            hello = await _hello(client, token)
    with progress:
        if scenario == "ping":
            return await _ping(load, progress)
        assert hello is not None
        _check_bank_app(hello)
        return await _bank(load, progress, accounts)


def _main_phase(load: _Load) -> tuple[str, float | None, Callable[[], float]]:
    if load.duration is not None:
        started = time.perf_counter()
        load.deadline = started + load.duration
        return (
            "seconds",
            load.duration,
            lambda: min(time.perf_counter() - started, load.duration or 0),
        )
    return "requests", load.requests, lambda: float(min(load.recorder.count, load.requests or 0))


async def _ping(load: _Load, progress: Progress) -> LoadResult:
    async def work(client: _Client, number: int) -> None:
        while load.more():
            await _request(load, client, op="ping")

    unit, total, completed = _main_phase(load)
    seconds = await _run_workers(
        load, work, progress, f"ping ({unit})", total, completed, lambda: load.recorder.count
    )
    r = load.recorder
    return LoadResult(r.count, seconds, sorted(r.latencies), dict(r.errors), r.lost)


_BANK_COMMANDS = {"OpenAccount", "Deposit", "Withdraw"}


def _check_bank_app(hello: Response) -> None:
    types = hello.result.get("types", {}) if hello.ok and isinstance(hello.result, dict) else {}
    commands = types.get("Account")
    if not isinstance(commands, list) or not set(commands) >= _BANK_COMMANDS:
        raise click.ClickException(
            "the bank scenario needs a server with type Account and commands "
            f"{sorted(_BANK_COMMANDS)} (examples/bank.py:app); it serves {sorted(types)}; "
            "try --scenario ping"
        )


async def _bank(load: _Load, progress: Progress, accounts: int) -> LoadResult:
    run = uuid.uuid4().hex[:8]  # keys unique per run: a rerun on the same store starts afresh
    keys = [f"{run}-{i}" for i in range(accounts)]
    setup = _Recorder()
    pending = list(range(accounts))

    async def open_accounts(client: _Client, number: int) -> None:
        while pending:
            i = pending.pop()
            common = {"type": "Account", "key": keys[i]}
            for op, command, data, cid in (
                ("create", "OpenAccount", {"owner": f"owner {i}"}, "open"),
                ("execute", "Deposit", {"amount": 1000, "reference": "initial"}, "initial"),
            ):
                response, latency = await client.request(
                    op=op, command=command, data=data, command_id=f"{keys[i]}-{cid}", **common
                )
                setup.record(response, latency)
                if not response.ok:
                    raise click.ClickException(
                        f"opening account {keys[i]} failed: {response.error_code}: "
                        f"{response.error_message}"
                    )

    await _run_workers(
        load, open_accounts, progress, "opening accounts", accounts,
        lambda: setup.count / 2, lambda: setup.count,
    )  # fmt: skip

    rng = random.Random(run)
    transfers = 0
    counter = 0

    async def transfer(client: _Client, number: int) -> None:
        nonlocal transfers, counter
        while load.more():
            counter += 1
            n = counter
            source, target = rng.sample(keys, 2)
            amount = 1 + n % 100
            reference = f"{run}-t{n}"

            async def account(key: str, command: str, data: dict[str, Any], cid: str) -> Response:
                return await _request(
                    load,
                    client,
                    type="Account",
                    key=key,
                    command=command,
                    data=data,
                    command_id=cid,
                )

            data = {"amount": amount, "reference": reference}
            if not (await account(source, "Withdraw", data, f"{reference}-w")).ok:
                continue  # refused (or failed): no money moved
            given = await account(target, "Deposit", data, f"{reference}-d")
            if given.ok:
                transfers += 1
            elif given.error_code == "rejected":  # give it back
                refund = {"amount": amount, "reference": f"refund:{reference}"}
                await account(source, "Deposit", refund, f"{reference}-r")

    unit, total, completed = _main_phase(load)
    seconds = await _run_workers(
        load, transfer, progress, f"transfers ({unit})", total, completed,
        lambda: load.recorder.count,
    )  # fmt: skip

    balances: dict[str, int] = {}
    check = _Recorder()
    to_check = list(keys)

    async def load_accounts(client: _Client, number: int) -> None:
        while to_check:
            key = to_check.pop()
            response, latency = await client.request(op="load", type="Account", key=key)
            check.record(response, latency)
            if response.ok and isinstance(response.result, dict):
                balances[key] = int(response.result["balance"])

    await _run_workers(
        load, load_accounts, progress, "checking balances", accounts,
        lambda: check.count, lambda: check.count,
    )  # fmt: skip
    if len(balances) != accounts:
        raise click.ClickException(
            f"loading the accounts failed: {len(balances)} of {accounts} loaded "
            f"(errors: {dict(check.errors)})"
        )
    r = load.recorder
    return LoadResult(
        r.count,
        seconds,
        sorted(r.latencies),
        dict(r.errors),
        r.lost + setup.lost + check.lost,
        total=sum(balances.values()),
        expected=1000 * accounts,
        transfers=transfers,
    )


def _result_table(result: LoadResult) -> Table:
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    lat = result.latencies
    table.add_row("requests", f"{result.requests}")
    table.add_row("seconds", f"{result.seconds:.2f}")
    rate = result.requests / result.seconds if result.seconds > 0 else 0.0
    table.add_row("throughput", f"{rate:,.0f} requests/s")
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
        table.add_row(f"latency {name}", f"{percentile(lat, p) * 1000:.2f} ms")
    if result.transfers:
        table.add_row("transfers", f"{result.transfers}")
    if result.errors:
        for code, count in sorted(result.errors.items()):
            table.add_row(f"errors: {code}", f"{count}")
    else:
        table.add_row("errors", "0")
    if result.lost:
        table.add_row("connections lost", f"{result.lost}")
    return table


@cli.command(context_settings=_CONTEXT)
@_connect_options
@click.option(
    "--serve",
    "serve_target",
    metavar="TARGET",
    help="start `serve TARGET --port 0` as a child process, load it, stop it",
)
@click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    help="the child server's store URL (with --serve)",
)
@click.option("--connections", type=click.IntRange(1), default=100, show_default=True)
@click.option(
    "--depth",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="requests in flight per connection",
)
@click.option("--requests", type=click.IntRange(1), help="how many requests  [default: 20000]")
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), help="seconds, instead of --requests"
)
@click.option("--scenario", type=click.Choice(["bank", "ping"]), default="bank", show_default=True)
@click.option(
    "--accounts", type=click.IntRange(2), default=100, show_default=True, help="bank accounts"
)
def load(
    connect: str | None,
    host: str,
    port: int,
    token: str | None,
    tls: bool,
    tls_ca: str | None,
    serve_target: str | None,
    store: str,
    connections: int,
    depth: int,
    requests: int | None,
    duration: float | None,
    scenario: str,
    accounts: int,
) -> None:
    """Drive a server with many connections, with a progress bar; end with a table (throughput,
    latency p50/p90/p99/max, errors by code).

    The bank scenario (examples/bank.py:app) opens --accounts accounts with 1000 each, runs
    transfers (Withdraw then Deposit, each with a command_id, a refund when the deposit is
    refused), then loads every account and checks that the balances add up (exit 1 if not).

    \b
      trio-aggregates load --serve examples/bank.py:app      # starts and stops its own server
      trio-aggregates load --connect tcp://127.0.0.1:7411 --depth 16 --duration 10
    """
    if requests is not None and duration is not None:
        raise click.UsageError("give --requests or --duration, not both")
    if requests is None and duration is None:
        requests = 20_000
    if serve_target is not None and connect is not None:
        raise click.UsageError("give --serve or --connect, not both")
    source = click.get_current_context().get_parameter_source("store")
    if serve_target is None and source is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--store is the store of the server --serve starts")
    if serve_target is not None:
        load_app(serve_target)  # a bad target fails here, before a child is started
    ssl_context = _client_ssl(tls, tls_ca)
    code = trio.run(
        _load_command,
        serve_target,
        store,
        _target(connect, host, port),
        dict(
            scenario=scenario,
            connections=connections,
            depth=depth,
            requests=requests,
            duration=duration,
            accounts=accounts,
            token=token,
            ssl_context=ssl_context,
        ),
    )
    sys.exit(code)


async def _load_command(
    serve_target: str | None, store: str, address: tuple[str, int], options: dict[str, Any]
) -> int:
    console = Console(soft_wrap=True)
    if serve_target is None:
        return await _load_and_report(address, options, console)
    async with _child_server(serve_target, store, options["token"]) as (child, child_address):
        where = f"tcp://{child_address[0]}:{child_address[1]}"
        _say(console, f"started: trio-aggregates serve {serve_target} on {where} ({store})")
        code = await _load_and_report(child_address, options, console)
        child.send_signal(signal.SIGTERM)
        with trio.move_on_after(_STOP_TIMEOUT):
            await child.wait()
        if child.returncode is None:
            _say(
                console, f"the server did not stop within {_STOP_TIMEOUT} s of SIGTERM", error=True
            )
            return 1
        if child.returncode != 0:
            _say(console, f"the server exited with {child.returncode} after SIGTERM", error=True)
            return 1
        console.print("server stopped on SIGTERM (exit 0)")
        return code


def _say(console: Console, text: str, *, error: bool = False) -> None:
    """One line, as is (no rich markup: paths and messages may hold brackets)."""
    console.print(text, markup=False, style="red" if error else None)


async def _load_and_report(
    address: tuple[str, int], options: dict[str, Any], console: Console
) -> int:
    try:
        result = await run_load(address, **options)
    except OSError as exc:
        _say(console, f"cannot connect to tcp://{address[0]}:{address[1]}: {exc}", error=True)
        return 2
    except ConnectionLost as exc:
        _say(console, f"connection lost: {exc}", error=True)
        return 1
    except click.ClickException as exc:
        _say(console, f"{exc.message}", error=True)
        return 1
    title = (
        f"{options['scenario']}: {options['connections']} connections x depth {options['depth']}"
        f" on tcp://{address[0]}:{address[1]}"
    )
    _say(console, title)
    console.print(_result_table(result))
    code = 0
    if result.lost:
        _say(console, f"{result.lost} requests lost with their connection", error=True)
        code = 1
    if result.errors.get("internal"):
        _say(console, "the server answered internal errors (see its log)", error=True)
        code = 1
    if result.expected is not None:
        if result.total == result.expected:
            console.print(f"balances add up: {result.total} == {result.expected}")
        else:
            _say(
                console, f"balances do not add up: {result.total} != {result.expected}", error=True
            )
            code = 1
    return code


@contextlib.asynccontextmanager
async def _child_server(
    target: str, store: str, token: str | None
) -> AsyncIterator[tuple[trio.Process, tuple[str, int]]]:
    """Start ``python -m trio_aggregates serve target --port 0`` and read its address.

    On the way out (the caller stops it with SIGTERM first), a child still running gets SIGTERM
    and at most ``_STOP_TIMEOUT`` seconds to exit, then is killed.

    Raises:
        click.ClickException: the child did not print its address within the bound.
    """
    command = [
        sys.executable, "-m", "trio_aggregates", "serve", target,
        "--host", DEFAULT_HOST, "--port", "0", "--store", store, "--log-level", "WARNING",
    ]  # fmt: skip
    env = dict(os.environ)
    if token is not None:
        env["TRIO_AGGREGATES_TOKEN"] = token
    child = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        buffer = bytearray()
        with trio.move_on_after(_START_TIMEOUT):
            while b"\n" not in buffer:
                data = await child.stdout.receive_some(4096)
                if not data:
                    break
                buffer += data
        first = buffer.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        match = _LISTENING.match(first)
        if match is None:
            raise click.ClickException(
                f"the server did not start (its first line: {first!r}; exit {child.poll()})"
            )
        yield child, (match["host"].strip("[]"), int(match["port"]))
    finally:
        with trio.CancelScope(shield=True):
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
                with trio.move_on_after(_STOP_TIMEOUT):
                    await child.wait()
            if child.returncode is None:
                child.kill()
                await child.wait()
            assert child.stdout is not None
            await child.stdout.aclose()
