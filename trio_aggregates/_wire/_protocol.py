"""The wire protocol, sans I/O: NDJSON framing, request validation, reply encoding.

This module owns every rule of the protocol the aggregate server speaks (in the
style of `h11 <https://h11.readthedocs.io>`_: pure state, no sockets, no Trio),
so the rules below are both its documentation and a specification that a client
in any language can implement. ``nc 127.0.0.1 7411`` is enough for a first try::

    {"id": 1, "op": "ping"}
    {"id":1,"ok":true,"result":"pong"}

**Framing.** A connection carries UTF-8 text in both directions, one JSON object
per line, each line ended by ``\\n`` (a ``\\r`` just before it is dropped, so
``\\r\\n`` works too). Empty lines, and lines of only spaces, tabs and ``\\r``,
are ignored. A request line longer than ``max_line_bytes`` (default
:data:`DEFAULT_MAX_LINE_BYTES`, 1 MiB, counting the bytes before the ``\\n``, a
trailing ``\\r`` included) is answered with one ``too_large`` error
(``"id": null``) and the rest of that line is skipped up to its ``\\n``: the
connection stays usable. Bytes that are not UTF-8, text that is not JSON (``NaN`` and
``Infinity`` are not JSON), and JSON that is not an object are each answered
with a ``bad_request`` error with ``"id": null``. A connection closed in the
middle of a line gets a ``bad_request`` for that fragment. Many requests may be
in flight on one connection: replies come as requests finish, not in order, and
are matched to requests by ``id``.

**Requests.** A JSON object with these members (every one optional unless the
op needs it; a member that is ``null`` counts as absent; members not listed are
ignored, for forward compatibility; a listed member is type-checked whatever
the op, and ignored by the ops that do not use it):

=====================  ================================================================
``id``                 a string or an integer (not a boolean, not a float), echoed in
                       the reply; absent: the reply carries ``"id": null``.
``op``                 one of :data:`OPS`: ``execute`` (the default), ``create``,
                       ``load``, ``version``, ``history``, ``stats``, ``ping``,
                       ``hello``.
``type``               the aggregate type's wire name, a string. Required by
                       execute, create, load, version and history.
``key``                the aggregate's key: a string or an integer (not a boolean).
                       Required by execute, create, load, version and history.
``command``            the command's wire name (its class name), a string. Required
                       by execute and create.
``data``               an object: the command's fields (execute, create); default
                       ``{}``.
``expected_version``   an integer >= 0 (execute): the command runs only if the
                       aggregate is at this version.
``dry_run``            a boolean (execute, create): decide, but write nothing; the
                       result lists the events that would be written.
``command_id``         a non-empty string of at most 200 characters (execute,
                       create): makes the command idempotent; a retry with the same
                       id gets the first answer.
``metadata``           an object (execute, create) stored with each event. The keys
                       ``command_id``, ``command`` and ``at`` are reserved;
                       ``correlation_id`` and ``causation_id`` must be strings and
                       are stored as the events' correlation and causation ids.
``create``             a boolean (execute): create the aggregate if it does not
                       exist (one request, no execute / create / execute dance).
``token``              a string (hello): the shared secret, when the server has one.
``forwarded``          a boolean (execute, create, load, version, history): the request
                       was forwarded by another node of a cluster. A node that does
                       not own the key's shard answers it ``not_owner`` instead of
                       forwarding it again (one hop at most). Clients leave it out.
=====================  ================================================================

**Replies.** One line per request. Success::

    {"id": <id>, "ok": true, "version": <int>, "result": <any JSON>}

where ``version`` is the aggregate's version (absent for ``stats``, ``ping`` and
``hello``) and ``result`` the op's answer (the handler's reply for execute and
create, the state for load, the events for history, ...). Failure::

    {"id": <id or null>, "ok": false, "error": {"code": <code>, "message": <text>}}

with a ``"reason"`` member in ``error`` for ``rejected`` (the name of the domain
error, e.g. ``"InsufficientFunds"``). ``code`` is one of :class:`ErrorCode`'s
values, which are stable; ``message`` is for humans and may change.

**This module.** :class:`ServerCodec` turns received bytes into :class:`Request`
and :class:`BadLine` values and encodes replies; :class:`ClientCodec` encodes
requests and turns received bytes into :class:`Response` values;
:func:`error_code_for` maps the library's exceptions to error codes, in one
place. Neither codec does any I/O; feed them what the socket gave, send what
they return.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any, Final, final

import attrs
import msgspec

from .._core._exceptions import (
    AggregateNotFound,
    AlreadyExists,
    CallTimeout,
    CommandRejected,
    ConcurrencyConflict,
    EventDecodeError,
    InvalidArgument,
    InvalidKey,
    NotOwner,
    RegistryClosed,
    StoreError,
    TrioAggregatesError,
    UnknownCommand,
    WrongExpectedVersion,
)

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_COMMAND_ID_LENGTH",
    "OPS",
    "PROTOCOL_VERSION",
    "BadLine",
    "ClientCodec",
    "ErrorCode",
    "ProtocolError",
    "Request",
    "Response",
    "ServerCodec",
    "error_code_for",
    "error_details",
]

#: The protocol's version, sent in the ``hello`` reply.
PROTOCOL_VERSION: Final = 1

#: The longest request line a server accepts by default (1 MiB).
DEFAULT_MAX_LINE_BYTES: Final = 1 << 20

#: The longest reply line a client accepts by default (64 MiB: a ``history``
#: or ``load`` reply can be much larger than any request).
DEFAULT_MAX_RESPONSE_BYTES: Final = 64 << 20

#: Every op, in the order the docs list them. ``execute`` is the default.
OPS: Final = ("execute", "create", "load", "version", "history", "stats", "ping", "hello")

#: The longest ``command_id`` accepted, in characters.
MAX_COMMAND_ID_LENGTH: Final = 200

_OP_SET: Final = frozenset(OPS)
_OP_LIST: Final = ", ".join(OPS)
#: Ops that name an aggregate: they need ``type`` and ``key``.
_TARGETED: Final = frozenset({"execute", "create", "load", "version", "history"})
#: Ops that run a command: they need ``command`` too.
_COMMANDS: Final = frozenset({"execute", "create"})
#: Metadata keys a request may not set (the runtime writes them).
_RESERVED_METADATA: Final = ("command_id", "command", "at")
#: Metadata keys a request may set to a string: passed on as the events' ids.
_ID_METADATA: Final = ("correlation_id", "causation_id")


class ErrorCode(str, enum.Enum):
    """The stable error codes of failure replies (``"error": {"code": ...}``).

    A ``str`` too: ``ErrorCode.BAD_REQUEST == "bad_request"``.
    """

    #: The line is not a valid request (bad UTF-8 or JSON, a missing or wrongly typed
    #: field, command data that does not fit the command class, ...).
    BAD_REQUEST = "bad_request"
    #: The line is longer than the server's maximum line length.
    TOO_LARGE = "too_large"
    #: No aggregate type is served under this ``type``.
    UNKNOWN_TYPE = "unknown_type"
    #: The aggregate type has no command of this name (or no handler for it).
    UNKNOWN_COMMAND = "unknown_command"
    #: The aggregate does not exist (execute without ``create``, load, version, history).
    NOT_FOUND = "not_found"
    #: ``create`` of an aggregate that exists.
    ALREADY_EXISTS = "already_exists"
    #: The handler refused the command; ``reason`` names the domain error.
    REJECTED = "rejected"
    #: ``expected_version`` did not match the aggregate's version.
    WRONG_EXPECTED_VERSION = "wrong_expected_version"
    #: Other writers kept appending first; retrying may succeed.
    CONFLICT = "conflict"
    #: No answer within the server's request timeout (the command may still apply).
    TIMEOUT = "timeout"
    #: The event store failed.
    STORE_UNAVAILABLE = "store_unavailable"
    #: The server wants a ``hello`` with the right token first.
    UNAUTHORIZED = "unauthorized"
    #: Too many connections (or requests); try again later.
    OVERLOADED = "overloaded"
    #: The server is shutting down and did not run the request.
    SHUTTING_DOWN = "shutting_down"
    #: A cluster node does not own the key's shard (a forwarded request, or a
    #: shard moving): send it again, with the same ``command_id``, to the owner.
    NOT_OWNER = "not_owner"
    #: A bug or an unexpected failure in the server (its log has the details).
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value


class ProtocolError(TrioAggregatesError):
    """Raised by :meth:`ClientCodec.receive_data` on bytes that are not a valid reply.

    The peer does not speak this protocol (or a reply was cut short): the
    connection cannot be trusted any more, so close it.
    """


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A valid request line, as :meth:`ServerCodec.receive_data` returns it.

    Every field has been type-checked (see the module's docs for the rules); the
    ops that need ``type``, ``key`` and ``command`` have them.

    Immutable, compared by value. A :class:`msgspec.Struct` (not an attrs
    class): a request line is decoded straight into it, its members' JSON
    types checked in the same pass, in C (see :func:`_fast_request`).
    :func:`msgspec.structs.replace` makes a changed copy. Its repr leaves the
    ``token`` out.

    Attributes:
        id: the request's id (``str`` or ``int``), or ``None``: echo it in the reply.
        op: one of :data:`OPS`.
        type: the aggregate type's wire name (``None`` for ops that need none).
        key: the aggregate's key (``str`` or ``int``), or ``None``.
        command: the command's wire name, or ``None``.
        data: the command's fields, a JSON object (``{}`` by default).
        expected_version: an ``int >= 0``, or ``None``.
        dry_run: decide but do not write.
        command_id: the idempotency id (1 to 200 characters), or ``None``.
        metadata: the JSON object given as ``metadata``, or ``None``. It may hold
            ``correlation_id`` and ``causation_id`` (strings, checked); see
            :attr:`correlation_id`, :attr:`causation_id` and :attr:`extra_metadata`.
        create: create the aggregate if it does not exist (execute).
        token: the shared secret given with ``hello``, or ``None``.
        forwarded: the request comes from another cluster node (answer
            ``not_owner`` rather than forward it again).
    """

    id: str | int | None = None
    op: str = "execute"
    type: str | None = None
    key: str | int | None = None
    command: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    expected_version: int | None = None
    dry_run: bool = False
    command_id: str | None = None
    metadata: dict[str, Any] | None = None
    create: bool = False
    token: str | None = None
    forwarded: bool = False

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__struct_fields__ if name != "token"
        )
        return f"Request({fields})"

    @property
    def correlation_id(self) -> str | None:
        """``metadata["correlation_id"]``, or ``None``."""
        return None if self.metadata is None else self.metadata.get("correlation_id")

    @property
    def causation_id(self) -> str | None:
        """``metadata["causation_id"]``, or ``None``."""
        return None if self.metadata is None else self.metadata.get("causation_id")

    @property
    def extra_metadata(self) -> dict[str, Any] | None:
        """``metadata`` without ``correlation_id`` and ``causation_id``; ``None`` if empty.

        This is what goes to the repository's ``metadata=`` argument, and the
        two ids to its ``correlation_id=`` and ``causation_id=``.
        """
        metadata = self.metadata
        if not metadata:
            return None
        if "correlation_id" not in metadata and "causation_id" not in metadata:
            return metadata
        extra = {k: v for k, v in metadata.items() if k not in _ID_METADATA}
        return extra or None


@attrs.frozen
class BadLine:
    """A received line that did not become a :class:`Request`: answer it with an error.

    Attributes:
        id: the line's ``id`` when it parsed as an object with a valid ``id``;
            else ``None``.
        code: :attr:`ErrorCode.BAD_REQUEST` or :attr:`ErrorCode.TOO_LARGE`.
        message: what is wrong, for humans.
    """

    id: str | int | None
    code: ErrorCode
    message: str


@attrs.frozen(kw_only=True)
class Response:
    """A reply line, as :meth:`ClientCodec.receive_data` returns it.

    Attributes:
        id: the id of the request answered (``None`` for a line the server
            could not parse).
        ok: whether the request succeeded.
        version: the aggregate's version when the reply carries one, else ``None``.
        result: the op's answer (``None`` on failure).
        error_code: the error's code on failure (a value of :class:`ErrorCode`,
            kept as a ``str`` so that a newer server's codes still parse), else ``None``.
        error_message: the error's message on failure, else ``None``.
        error_reason: the domain error's name for ``rejected``, else ``None``.
    """

    id: str | int | None
    ok: bool
    version: int | None = None
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None
    error_reason: str | None = None


# -- framing -----------------------------------------------------------------


#: A line of only these is blank, and ignored (JSON's whitespace; "\n" ends lines).
_BLANK: Final = " \t\r"
_BLANK_BYTES: Final = b" \t\r"


@final
class _Marker(enum.Enum):
    TOO_LARGE = "too_large"
    FRAGMENT = "fragment"


_TOO_LARGE: Final = _Marker.TOO_LARGE
_FRAGMENT: Final = _Marker.FRAGMENT


@final
class _Framer:
    """Splits received bytes into lines; holds at most ``max_line_bytes`` of a partial line.

    ``feed`` returns, in order, each complete non-empty line (``\\r`` stripped),
    :data:`_TOO_LARGE` once for each line over the limit (whose remaining bytes
    are then skipped up to its newline), and :data:`_FRAGMENT` at EOF (``b""``)
    when a partial line was pending.
    """

    __slots__ = ("_discarding", "_eof", "_max", "_partial")

    def __init__(self, max_line_bytes: int) -> None:
        if type(max_line_bytes) is not int or max_line_bytes < 1:
            raise InvalidArgument(f"max_line_bytes must be an int >= 1, not {max_line_bytes!r}")
        self._max = max_line_bytes
        self._partial = bytearray()
        self._discarding = False
        self._eof = False

    @property
    def buffered(self) -> int:
        return len(self._partial)

    @property
    def limit(self) -> int:
        return self._max

    def feed(self, data: bytes | bytearray) -> list[bytes | _Marker]:
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray's slices would be bytearrays
        if self._eof:
            raise RuntimeError("receive_data() called again after EOF (b'')")
        out: list[bytes | _Marker] = []
        limit = self._max
        if not data:
            self._eof = True
            partial = self._partial
            if partial.strip(_BLANK_BYTES):
                out.append(_FRAGMENT)
            partial.clear()
            return out
        start = 0
        find = data.find
        if self._discarding:
            nl = find(b"\n")
            if nl < 0:
                return out
            self._discarding = False
            start = nl + 1
        elif self._partial:
            partial = self._partial
            nl = find(b"\n")
            if nl < 0:
                if len(partial) + len(data) > limit:
                    partial.clear()
                    self._discarding = True
                    out.append(_TOO_LARGE)
                else:
                    partial += data
                return out
            if len(partial) + nl > limit:
                out.append(_TOO_LARGE)
            else:
                line = bytes(partial) + data[:nl]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if line:
                    out.append(line)
            partial.clear()
            start = nl + 1
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            if nl - start > limit:
                out.append(_TOO_LARGE)
            elif nl > start:
                end = nl - 1 if data[nl - 1] == 13 else nl  # 13: "\r"
                if end > start:
                    out.append(data[start:end])
            start = nl + 1
        rest = len(data) - start
        if rest > limit:
            self._discarding = True
            out.append(_TOO_LARGE)
        elif rest:
            self._partial += data[start:]
        return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder: Final = json.JSONDecoder(parse_constant=_reject_constant)
_decode: Final = _decoder.decode


def _parse_object(line: bytes) -> dict[str, Any] | str | None:
    """A line's JSON object, or why it is not one (``str``), or ``None`` for a blank line.

    The careful path (see :func:`_fast_request`): the standard library's
    decoder, whose errors say where the JSON is wrong.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the line is not valid UTF-8 (byte {exc.start})"
    try:
        obj = _decode(text)
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError as exc:  # JSONDecodeError, NaN, too many digits
        if not text.strip(_BLANK):
            return None
        return f"invalid JSON: {exc}"
    if type(obj) is not dict:
        return f"a line must be a JSON object, not {_json_type(obj)}"
    return obj


_JSON_TYPES: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# -- server side -------------------------------------------------------------


def _request_from(obj: dict[str, Any]) -> Request | BadLine:
    """Validate a request object (see the module's docs for the rules)."""
    get = obj.get
    id_ = get("id")
    if id_ is not None and type(id_) is not str and type(id_) is not int:
        return BadLine(None, ErrorCode.BAD_REQUEST, _wrong("id", id_, "a string or an integer"))
    op = get("op")
    if op is None:
        op = "execute"
    elif type(op) is not str or op not in _OP_SET:
        return BadLine(
            id_, ErrorCode.BAD_REQUEST, f"unknown op {op!r}: use one of {', '.join(OPS)}"
        )
    type_ = get("type")
    if type_ is not None and type(type_) is not str:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("type", type_, "a string"))
    key = get("key")
    if key is not None and type(key) is not str and type(key) is not int:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("key", key, "a string or an integer"))
    command = get("command")
    if command is not None and type(command) is not str:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("command", command, "a string"))
    if op in _TARGETED:
        if type_ is None:
            return BadLine(id_, ErrorCode.BAD_REQUEST, f"op {op!r} needs 'type'")
        if key is None:
            return BadLine(id_, ErrorCode.BAD_REQUEST, f"op {op!r} needs 'key'")
        if command is None and op in _COMMANDS:
            return BadLine(id_, ErrorCode.BAD_REQUEST, f"op {op!r} needs 'command'")
    data = get("data")
    if data is None:
        data = {}
    elif type(data) is not dict:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("data", data, "an object"))
    expected_version = get("expected_version")
    if expected_version is not None and (type(expected_version) is not int or expected_version < 0):
        return BadLine(
            id_,
            ErrorCode.BAD_REQUEST,
            _wrong("expected_version", expected_version, "an integer >= 0"),
        )
    dry_run = get("dry_run")
    if dry_run is None:
        dry_run = False
    elif type(dry_run) is not bool:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("dry_run", dry_run, "a boolean"))
    command_id = get("command_id")
    if command_id is not None and (
        type(command_id) is not str or not 0 < len(command_id) <= MAX_COMMAND_ID_LENGTH
    ):
        return BadLine(
            id_,
            ErrorCode.BAD_REQUEST,
            _wrong(
                "command_id",
                command_id,
                f"a non-empty string of at most {MAX_COMMAND_ID_LENGTH} characters",
            ),
        )
    metadata = get("metadata")
    if metadata is not None:
        if type(metadata) is not dict:
            return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("metadata", metadata, "an object"))
        if metadata:
            problem = _metadata_problem(metadata)
            if problem is not None:
                return BadLine(id_, ErrorCode.BAD_REQUEST, problem)
    create = get("create")
    if create is None:
        create = False
    elif type(create) is not bool:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("create", create, "a boolean"))
    token = get("token")
    if token is not None and type(token) is not str:
        return BadLine(id_, ErrorCode.BAD_REQUEST, "'token' must be a string")
    forwarded = get("forwarded")
    if forwarded is None:
        forwarded = False
    elif type(forwarded) is not bool:
        return BadLine(id_, ErrorCode.BAD_REQUEST, _wrong("forwarded", forwarded, "a boolean"))
    return Request(  # positional: faster than keywords
        id_,
        op,
        type_,
        key,
        command,
        data,
        expected_version,
        dry_run,
        command_id,
        metadata,
        create,
        token,
        forwarded,
    )


_decode_request: Final = msgspec.json.Decoder(Request).decode


def _fast_request(line: bytes) -> Request | None:
    """A valid request line's :class:`Request`; ``None`` for anything else.

    The fast path of :meth:`ServerCodec.receive_data`: msgspec parses the
    line straight into a :class:`Request`, checking the members' JSON types
    in the same pass (in C), and the rules on their values are checked here.
    Anything it does not accept (bad JSON, a wrong type, a ``null`` where the
    careful path reads the default, a bad value, a blank line, even a valid
    line msgspec reads differently, such as a lone surrogate) takes the careful path
    (:func:`_parse_object`, :func:`_request_from`), which says what is wrong
    or accepts it. What this accepts, the careful path accepts with the same
    values (a property test holds them to it).
    """
    try:
        request = _decode_request(line)
    except Exception:  # DecodeError, ValidationError, RecursionError
        return None
    op = request.op
    if op not in _OP_SET:
        return None
    if op in _TARGETED and (
        request.type is None or request.key is None or (request.command is None and op in _COMMANDS)
    ):
        return None
    expected_version = request.expected_version
    if expected_version is not None and expected_version < 0:
        return None
    command_id = request.command_id
    if command_id is not None and not 0 < len(command_id) <= MAX_COMMAND_ID_LENGTH:
        return None
    metadata = request.metadata
    if metadata and _metadata_problem(metadata) is not None:
        return None
    return request


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    for name in _RESERVED_METADATA:
        if name in metadata:
            return f"metadata key {name!r} is reserved (the server writes it)"
    for name in _ID_METADATA:
        if name in metadata and type(metadata[name]) is not str:
            return _wrong(f"metadata.{name}", metadata[name], "a string")
    return None


def _wrong(field: str, value: object, expected: str) -> str:
    return f"{field!r} must be {expected}, not {_json_type(value)}"


_encode: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
# Lone surrogates ("\ud800", which json.loads accepts) cannot be UTF-8: escape them.
_encode_ascii: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


#: What ``_encode`` makes of a str alone.
_encode_str: Final[Callable[[str], str]] = json.encoder.encode_basestring


def _line(obj: dict[str, Any]) -> bytes:
    """``obj`` as one JSON line; :class:`TypeError` if it is not JSON-ready."""
    try:
        text = _encode(obj)
    except (ValueError, RecursionError) as exc:  # NaN or infinity, a cycle, too deep
        raise TypeError(f"not JSON-encodable: {exc}") from exc
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (_encode_ascii(obj) + "\n").encode("ascii")


@final
class ServerCodec:
    """The server's end of one connection: bytes in, requests out; replies in, bytes out.

    One per connection (it keeps the partial line between reads). No I/O and
    no checkpoints: feed it what the stream gave, send what it returns.

    Args:
        max_line_bytes: the longest request line accepted (see the module's docs).

    Raises:
        InvalidArgument: ``max_line_bytes`` is not an int >= 1.
    """

    __slots__ = ("_framer",)

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._framer = _Framer(max_line_bytes)

    @property
    def buffered(self) -> int:
        """Bytes of a partial line held until its newline comes (never more than the limit)."""
        return self._framer.buffered

    def receive_data(self, data: bytes | bytearray) -> list[Request | BadLine]:
        """The requests (and bad lines) completed by ``data``, in order.

        ``b""`` means end of file: a pending partial line becomes a
        ``bad_request`` :class:`BadLine`. Never raises for anything the peer
        sent; each bad line gives one :class:`BadLine` to answer.

        A line is first parsed and type-checked in one pass by msgspec (in C);
        one it declines (a bad line, or a member it does not know) goes through
        the standard library's decoder and the field checks one by one, which
        say what is wrong. Both paths give the same request for the same line.

        Raises:
            RuntimeError: called again after ``b""``.
        """
        out: list[Request | BadLine] = []
        for line in self._framer.feed(data):
            if isinstance(line, bytes):
                request = _fast_request(line)
                if request is not None:
                    out.append(request)
                    continue
                obj = _parse_object(line)
                if isinstance(obj, dict):
                    out.append(_request_from(obj))
                elif obj is not None:
                    out.append(BadLine(None, ErrorCode.BAD_REQUEST, obj))
            elif line is _TOO_LARGE:
                message = f"line longer than {self._framer.limit} bytes (skipped)"
                out.append(BadLine(None, ErrorCode.TOO_LARGE, message))
            else:
                message = "connection closed in the middle of a line"
                out.append(BadLine(None, ErrorCode.BAD_REQUEST, message))
        return out

    def encode_ok(self, id: str | int | None, result: Any, version: int | None = None) -> bytes:
        """A success reply line (``\\n`` included); without ``"version"`` when it is ``None``.

        Raises:
            TypeError: ``result`` is not JSON-ready (only dict with str keys,
                list, tuple, str, int, float, bool and None are; NaN and
                infinities are not). Answer with an ``internal`` error instead.
        """
        if version is None:
            return _line({"id": id, "ok": True, "result": result})
        if result is None and type(version) is int:
            # The commonest answer (a command that replies nothing), the same
            # bytes as through the encoder, at a fraction of its cost.
            if type(id) is int:
                return b'{"id":%d,"ok":true,"version":%d,"result":null}\n' % (id, version)
            if type(id) is str:
                text = f'{{"id":{_encode_str(id)},"ok":true,"version":{version},"result":null}}\n'
                try:
                    return text.encode("utf-8")
                except UnicodeEncodeError:
                    pass  # a lone surrogate: the encoder's way
        return _line({"id": id, "ok": True, "version": version, "result": result})

    def encode_error(
        self,
        id: str | int | None,
        code: ErrorCode | str,
        message: str,
        reason: str | None = None,
    ) -> bytes:
        """A failure reply line (``\\n`` included); ``"reason"`` only when given."""
        error = {"code": code, "message": message}
        if reason is not None:
            error["reason"] = reason
        return _line({"id": id, "ok": False, "error": error})

    def encode_exception(self, id: str | int | None, exc: BaseException) -> bytes:
        """The failure reply line for ``exc``, by :func:`error_details`."""
        return self.encode_error(id, *error_details(exc))


# -- error codes -------------------------------------------------------------

#: Exception class -> code; the first match wins, so subclasses come first.
_CODES: Final[tuple[tuple[type[BaseException], ErrorCode], ...]] = (
    (InvalidArgument, ErrorCode.BAD_REQUEST),
    (InvalidKey, ErrorCode.BAD_REQUEST),
    (UnknownCommand, ErrorCode.UNKNOWN_COMMAND),
    (AggregateNotFound, ErrorCode.NOT_FOUND),
    (AlreadyExists, ErrorCode.ALREADY_EXISTS),
    (CommandRejected, ErrorCode.REJECTED),
    (WrongExpectedVersion, ErrorCode.WRONG_EXPECTED_VERSION),
    (ConcurrencyConflict, ErrorCode.CONFLICT),
    (CallTimeout, ErrorCode.TIMEOUT),
    (RegistryClosed, ErrorCode.SHUTTING_DOWN),
    (EventDecodeError, ErrorCode.INTERNAL),
    (NotOwner, ErrorCode.NOT_OWNER),
    (StoreError, ErrorCode.STORE_UNAVAILABLE),
)


def error_code_for(exc: BaseException) -> ErrorCode:
    """The error code that answers a request which failed with ``exc``.

    ``InvalidArgument``, ``InvalidKey``: ``bad_request``; ``UnknownCommand``:
    ``unknown_command``; ``AggregateNotFound``: ``not_found``;
    ``AlreadyExists``: ``already_exists``; ``CommandRejected`` (and its
    subclasses): ``rejected``; ``WrongExpectedVersion``:
    ``wrong_expected_version``; ``ConcurrencyConflict``: ``conflict``;
    ``CallTimeout``: ``timeout``; ``RegistryClosed``: ``shutting_down``;
    ``EventDecodeError``: ``internal``; ``NotOwner``: ``not_owner``; any other ``StoreError``:
    ``store_unavailable``; anything else: ``internal``.
    """
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def error_details(exc: BaseException) -> tuple[ErrorCode, str, str | None]:
    """``(code, message, reason)`` for a failure reply answering ``exc``.

    The code is :func:`error_code_for`'s. The message is ``str(exc)`` (the
    class name if that is empty), except for ``internal`` errors: then it is
    only ``"internal error (ClassName)"``, so that nothing of the server's
    insides (paths, SQL, a traceback) goes on the wire; log the exception on the
    server. The reason is the exception's class name for ``rejected`` (the
    domain error, e.g. ``"InsufficientFunds"``), else ``None``.
    """
    code = error_code_for(exc)
    name = type(exc).__name__
    if code is ErrorCode.INTERNAL:
        return code, f"internal error ({name})", None
    return code, str(exc) or name, name if code is ErrorCode.REJECTED else None


# -- client side -------------------------------------------------------------


def _response_from(obj: dict[str, Any]) -> Response | str:
    get = obj.get
    id_ = get("id")
    if id_ is not None and type(id_) is not str and type(id_) is not int:
        return _wrong("id", id_, "a string, an integer or null")
    ok = get("ok")
    if ok is True:
        version = get("version")
        if version is not None and type(version) is not int:
            return _wrong("version", version, "an integer")
        return Response(id=id_, ok=True, version=version, result=get("result"))
    if ok is not False:
        return _wrong("ok", ok, "a boolean")
    error = get("error")
    if type(error) is not dict:
        return _wrong("error", error, "an object")
    code = error.get("code")
    if type(code) is not str:
        return _wrong("error.code", code, "a string")
    message = error.get("message")
    if type(message) is not str:
        return _wrong("error.message", message, "a string")
    reason = error.get("reason")
    if reason is not None and type(reason) is not str:
        return _wrong("error.reason", reason, "a string")
    version = get("version")
    if version is not None and type(version) is not int:
        return _wrong("version", version, "an integer")
    return Response(
        id=id_,
        ok=False,
        version=version,
        error_code=code,
        error_message=message,
        error_reason=reason,
    )


class _TypedError(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    message: str
    reason: str | None = None


class _TypedResponse(msgspec.Struct, forbid_unknown_fields=True):
    """A reply line's members with their JSON types checked (see :func:`_fast_response`)."""

    ok: bool
    id: str | int | None = None
    version: int | None = None
    result: Any = None
    error: _TypedError | None = None


_decode_typed_response: Final = msgspec.json.Decoder(_TypedResponse).decode


def _fast_response(line: bytes) -> Response | None:
    """A valid reply line's :class:`Response`; ``None`` for anything else (then
    the careful path, :func:`_parse_object` and :func:`_response_from`, says
    what is wrong, or accepts what this declines: a member it does not know).
    The client's twin of :func:`_fast_request`."""
    try:
        typed = _decode_typed_response(line)
    except Exception:  # DecodeError, ValidationError, RecursionError
        return None
    if typed.ok:
        return Response(id=typed.id, ok=True, version=typed.version, result=typed.result)
    error = typed.error
    if error is None:
        return None
    return Response(
        id=typed.id,
        ok=False,
        version=typed.version,
        error_code=error.code,
        error_message=error.message,
        error_reason=error.reason,
    )


def _excerpt(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")


@final
class ClientCodec:
    """The client's end of one connection: requests in, bytes out; bytes in, responses out.

    One per connection. No I/O and no checkpoints.

    Args:
        max_line_bytes: the longest reply line accepted (default 64 MiB).

    Raises:
        InvalidArgument: ``max_line_bytes`` is not an int >= 1.
    """

    __slots__ = ("_framer",)

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self._framer = _Framer(max_line_bytes)

    def encode_request(self, **fields: Any) -> bytes:
        """One request line (``\\n`` included) with ``fields``, leaving out those that are ``None``.

        Nothing is validated here (the server does that), so a test can send
        anything JSON can carry.

        Raises:
            TypeError: a value is not JSON-ready.
        """
        return _line({name: value for name, value in fields.items() if value is not None})

    def receive_data(self, data: bytes | bytearray) -> list[Response]:
        """The replies completed by ``data``, in order. ``b""`` means end of file.

        A line is parsed and type-checked by msgspec first, as on the server
        side; one it declines goes through the careful path, which accepts
        members it does not know and says what is wrong with a bad line.

        Raises:
            ProtocolError: a line is not a valid reply (not UTF-8, not JSON, not
                an object, a member of the wrong type, over ``max_line_bytes``),
                or the connection ended in the middle of a line. Replies in the
                same ``data`` before the bad line are lost with it: close the
                connection.
            RuntimeError: called again after ``b""``.
        """
        out: list[Response] = []
        for line in self._framer.feed(data):
            if isinstance(line, bytes):
                fast = _fast_response(line)
                if fast is not None:
                    out.append(fast)
                    continue
                obj = _parse_object(line)
                if obj is None:
                    continue
                if isinstance(obj, str):
                    raise ProtocolError(f"bad reply line {_excerpt(line)}: {obj}")
                response = _response_from(obj)
                if isinstance(response, str):
                    raise ProtocolError(f"bad reply line {_excerpt(line)}: {response}")
                out.append(response)
            elif line is _TOO_LARGE:
                raise ProtocolError(f"reply line longer than {self._framer.limit} bytes")
            else:
                raise ProtocolError("connection closed in the middle of a reply line")
        return out
