"""The sans-IO wire codec (``_protocol.py``) keeps the rules its docstring states.

No sockets and no Trio: bytes go into the codecs and values come out. Every
bad input the spec lists gets its precise answer (and the id when the line
parsed with a valid one), the framing survives oversized lines split over many
reads, and two Hypothesis properties hold the server codec to "never raises,
stays bounded, still parses the next good line" and the client/server pair to
"what the client encodes, the server parses back, however the bytes arrive".
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any, Final

import attrs
import pytest
from hypothesis import example, given, settings, strategies as st

from trio_aggregates._core import _exceptions as exc_mod
from trio_aggregates._wire import _protocol
from trio_aggregates._wire._protocol import (
    DEFAULT_MAX_LINE_BYTES,
    OPS,
    PROTOCOL_VERSION,
    BadLine,
    ClientCodec,
    ErrorCode,
    ProtocolError,
    Request,
    Response,
    ServerCodec,
    error_code_for,
    error_details,
)

BAD = ErrorCode.BAD_REQUEST


def one(data: bytes, **kwargs: Any) -> Request | BadLine:
    """The single item a fresh server codec makes of ``data``."""
    items = ServerCodec(**kwargs).receive_data(data)
    assert len(items) == 1, items
    return items[0]


def line(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def bad(data: bytes, id: Any = None, code: ErrorCode = BAD) -> str:
    """Assert ``data`` gives one BadLine with ``id`` and ``code``; return its message."""
    item = one(data)
    assert isinstance(item, BadLine), item
    assert item.id == id
    assert item.code is code
    return item.message


EXEC = {"id": 7, "type": "Account", "key": "a1", "command": "Deposit", "data": {"amount": 5}}


# -- constants -----------------------------------------------------------------


def test_constants() -> None:
    assert PROTOCOL_VERSION == 1
    assert DEFAULT_MAX_LINE_BYTES == 1 << 20
    assert OPS == ("execute", "create", "load", "version", "history", "stats", "ping", "hello")
    assert [c.value for c in ErrorCode] == [
        "bad_request",
        "too_large",
        "unknown_type",
        "unknown_command",
        "not_found",
        "already_exists",
        "rejected",
        "wrong_expected_version",
        "conflict",
        "timeout",
        "store_unavailable",
        "unauthorized",
        "overloaded",
        "shutting_down",
        "not_owner",
        "internal",
    ]
    assert ErrorCode.BAD_REQUEST == "bad_request"  # type: ignore[comparison-overlap]
    assert str(ErrorCode.TOO_LARGE) == "too_large"
    assert issubclass(ProtocolError, exc_mod.TrioAggregatesError)


def test_request_fields_in_spec_order() -> None:
    # Request can be built positionally: the order is part of the contract.
    assert list(Request.__struct_fields__) == [
        "id",
        "op",
        "type",
        "key",
        "command",
        "data",
        "expected_version",
        "dry_run",
        "command_id",
        "metadata",
        "create",
        "token",
        "forwarded",
    ]


# -- valid requests ------------------------------------------------------------


def test_full_execute_request() -> None:
    fields = {
        "id": "r-1",
        "op": "execute",
        "type": "Account",
        "key": 42,
        "command": "Withdraw",
        "data": {"amount": 3, "note": "é"},
        "expected_version": 0,
        "dry_run": True,
        "command_id": "c" * 200,
        "metadata": {"user": "bob", "correlation_id": "corr", "causation_id": "cause"},
        "create": True,
        "unknown_future_field": [1, 2],
    }
    request = one(line(**fields))
    assert request == Request(
        id="r-1",
        op="execute",
        type="Account",
        key=42,
        command="Withdraw",
        data={"amount": 3, "note": "é"},
        expected_version=0,
        dry_run=True,
        command_id="c" * 200,
        metadata={"user": "bob", "correlation_id": "corr", "causation_id": "cause"},
        create=True,
    )
    assert isinstance(request, Request)
    assert request.correlation_id == "corr"
    assert request.causation_id == "cause"
    assert request.extra_metadata == {"user": "bob"}


def test_defaults_and_nulls_count_as_absent() -> None:
    request = one(b'{"type":"A","key":"k","command":"C"}\n')
    assert request == Request(type="A", key="k", command="C")
    assert isinstance(request, Request)
    assert request.op == "execute"
    assert request.id is None
    assert request.data == {}
    assert request.dry_run is False
    assert request.create is False
    assert request.metadata is None
    assert request.correlation_id is None
    assert request.extra_metadata is None
    nulls = {
        "id": None,
        "op": None,
        "data": None,
        "expected_version": None,
        "dry_run": None,
        "command_id": None,
        "metadata": None,
        "create": None,
        "token": None,
    }
    assert one(line(type="A", key="k", command="C", **nulls)) == request


def test_extra_metadata() -> None:
    def extra(metadata: dict[str, Any]) -> Any:
        request = one(line(**EXEC, metadata=metadata))
        assert isinstance(request, Request)
        return request.extra_metadata

    assert extra({}) is None
    assert extra({"a": 1}) == {"a": 1}
    assert extra({"correlation_id": "x"}) is None
    assert extra({"causation_id": "x", "b": [1]}) == {"b": [1]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"op": "create", "type": "A", "key": 1, "command": "Open"}, {"command": "Open"}),
        ({"op": "load", "type": "A", "key": 1}, {}),
        ({"op": "version", "type": "A", "key": ""}, {"key": ""}),
        ({"op": "history", "type": "A", "key": -3}, {"key": -3}),
        ({"op": "stats"}, {"type": None, "key": None}),
        ({"op": "ping", "id": 0}, {"type": None, "key": None, "id": 0}),
        ({"op": "hello", "token": "s3cret"}, {"type": None, "key": None, "token": "s3cret"}),
        ({"op": "hello"}, {"type": None, "key": None}),
    ],
)
def test_each_op(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    request = one(line(**fields))
    assert isinstance(request, Request)
    want = {"type": "A", "key": 1, **fields, **expected}
    assert request == Request(**want)


def test_token_not_in_repr() -> None:
    request = one(line(op="hello", token="s3cret"))
    assert "s3cret" not in repr(request)


def test_int_and_str_ids_echoed() -> None:
    for id_ in (0, -1, 2**70, "", "x" * 1000, "é"):
        request = one(line(op="ping", id=id_))
        assert isinstance(request, Request)
        assert request.id == id_
        assert type(request.id) is type(id_)


# -- bad requests --------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("op", "explode", "unknown op 'explode'"),
        ("op", 3, "unknown op 3"),
        ("op", ["execute"], "unknown op"),
        ("type", 3, "'type' must be a string, not an integer"),
        ("type", ["A"], "'type' must be a string, not an array"),
        ("key", True, "'key' must be a string or an integer, not a boolean"),
        ("key", 1.5, "'key' must be a string or an integer, not a number"),
        ("key", 1.0, "not a number"),
        ("key", {"a": 1}, "not an object"),
        ("key", [1], "not an array"),
        ("command", 5, "'command' must be a string"),
        ("command", False, "'command' must be a string"),
        ("data", [], "'data' must be an object, not an array"),
        ("data", "x", "'data' must be an object, not a string"),
        ("data", 0, "'data' must be an object"),
        ("expected_version", -1, "'expected_version' must be an integer >= 0"),
        ("expected_version", True, "not a boolean"),
        ("expected_version", False, "not a boolean"),
        ("expected_version", 1.0, "not a number"),
        ("expected_version", "3", "not a string"),
        ("dry_run", 1, "'dry_run' must be a boolean, not an integer"),
        ("dry_run", "true", "'dry_run' must be a boolean"),
        ("command_id", "", "'command_id' must be a non-empty string of at most 200"),
        ("command_id", "c" * 201, "at most 200 characters"),
        ("command_id", 17, "not an integer"),
        ("metadata", [], "'metadata' must be an object, not an array"),
        ("metadata", "m", "'metadata' must be an object"),
        ("metadata", {"command_id": "x"}, "metadata key 'command_id' is reserved"),
        ("metadata", {"command": "x"}, "metadata key 'command' is reserved"),
        ("metadata", {"at": "x"}, "metadata key 'at' is reserved"),
        ("metadata", {"correlation_id": 5}, "'metadata.correlation_id' must be a string"),
        ("metadata", {"causation_id": None}, "'metadata.causation_id' must be a string"),
        ("create", "yes", "'create' must be a boolean, not a string"),
        ("create", 1, "'create' must be a boolean"),
        ("token", 123, "'token' must be a string"),
    ],
)
def test_wrong_field(field: str, value: Any, words: str) -> None:
    message = bad(line(**{**EXEC, field: value}), id=7)
    assert words in message


@pytest.mark.parametrize("value", [True, False, 1.5, 1.0, [1], {"a": 1}])
def test_wrong_id_gives_null_id(value: Any) -> None:
    message = bad(line(**{**EXEC, "id": value}))
    assert "'id' must be a string or an integer" in message


@pytest.mark.parametrize(
    ("op", "missing"),
    [
        (op, field)
        for op, fields in [
            ("execute", ("type", "key", "command")),
            ("create", ("type", "key", "command")),
            ("load", ("type", "key")),
            ("version", ("type", "key")),
            ("history", ("type", "key")),
        ]
        for field in fields
    ],
)
def test_missing_field(op: str, missing: str) -> None:
    fields: dict[str, Any] = {"id": "q", "op": op, "type": "A", "key": "k", "command": "C"}
    del fields[missing]
    assert bad(line(**fields), id="q") == f"op {op!r} needs {missing!r}"
    fields[missing] = None  # null is absent
    assert bad(line(**fields), id="q") == f"op {op!r} needs {missing!r}"


def test_execute_is_the_default_op_for_missing_fields() -> None:
    assert bad(b'{"id":1,"type":"A","key":"k"}\n', id=1) == "op 'execute' needs 'command'"
    assert bad(b"{}\n") == "op 'execute' needs 'type'"


def test_bad_utf8() -> None:
    assert "not valid UTF-8" in bad(b'{"id":1,"op":"ping","x":"\xff"}\n')
    assert "not valid UTF-8" in bad(b"\xc3\x28\n")
    # Encoded surrogates are not UTF-8; nor is UTF-16, which json.loads(bytes) would accept.
    assert "not valid UTF-8" in bad('{"op":"ping"}'.encode("utf-16") + b"\n")
    assert bad('{"op":"ping"}'.encode("utf-16-le") + b"\n").startswith("invalid JSON")
    assert "not valid UTF-8" in bad(b'{"op":"ping","x":"\xed\xa0\x80"}\n')


@pytest.mark.parametrize(
    "data",
    [
        b"not json\n",
        b"{\n",
        b'{"id":1,}\n',
        b"{'id':1}\n",
        b'{"id":1} {"id":2}\n',
        b'{"x":NaN}\n',
        b'{"x":Infinity}\n',
        b'{"x":-Infinity}\n',
        b'\xef\xbb\xbf{"op":"ping"}\n',  # a byte-order mark
        b'{"x":' + b"1" * 5000 + b"}\n",  # more digits than Python converts
        b"[" * 100_000 + b"\n",  # nested too deeply for the parser
        b'{"a":' * 100_000 + b"\n",
        b"\x0c\n",  # whitespace to Python, not to JSON: not a blank line
        "\u00a0\u2028".encode() + b"\n",
    ],
)
def test_bad_json(data: bytes) -> None:
    assert bad(data).startswith("invalid JSON")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"[1,2]\n", "an array"),
        (b'"ping"\n', "a string"),
        (b"42\n", "an integer"),
        (b"4.5\n", "a number"),
        (b"null\n", "null"),
        (b"true\n", "a boolean"),
        (b"[]\n", "an array"),
    ],
)
def test_not_an_object(data: bytes, kind: str) -> None:
    assert bad(data) == f"a line must be a JSON object, not {kind}"


def test_bad_lines_do_not_disturb_good_ones() -> None:
    codec = ServerCodec()
    data = b"".join(
        [
            line(op="ping", id=1),
            b"garbage\n",
            line(op="ping", id=True),
            b"\xff\xfe\n",
            line(op="load", id=2),
            line(op="ping", id=3),
        ]
    )
    items = codec.receive_data(data)
    assert [type(i).__name__ for i in items] == [
        "Request",
        "BadLine",
        "BadLine",
        "BadLine",
        "BadLine",
        "Request",
    ]
    assert [i.id for i in items] == [1, None, None, None, 2, 3]


# -- framing -------------------------------------------------------------------


def test_crlf_empty_and_blank_lines() -> None:
    codec = ServerCodec()
    items = codec.receive_data(
        b'\n\r\n  \n\t\r\n{"op":"ping","id":1}\r\n\n\n{"op":"ping","id":2}\n \r\n'
    )
    assert items == [Request(op="ping", id=1), Request(op="ping", id=2)]
    assert codec.buffered == 0


def test_only_one_cr_is_stripped() -> None:
    # "...}\r\r\n": one \r is the line end, the other is JSON whitespace.
    assert one(b'{"op":"ping"}\r\r\n') == Request(op="ping")
    # A bare \r is not a line end.
    assert ServerCodec().receive_data(b'{"op":"ping"}\r{"op":"ping"}\r') == []


def test_partial_line_across_reads() -> None:
    codec = ServerCodec()
    data = line(**EXEC) + line(op="ping", id=8)
    items: list[Request | BadLine] = []
    for i in range(len(data)):
        items += codec.receive_data(data[i : i + 1])
    assert [i.id for i in items] == [7, 8]
    assert all(isinstance(i, Request) for i in items)
    assert codec.buffered == 0


def test_bytearray_input() -> None:
    # trio's receive_some may return a bytearray.
    codec = ServerCodec()
    assert codec.receive_data(bytearray(b'{"op":"ping","id":1}\n{"op":')) == [
        Request(op="ping", id=1)
    ]
    assert codec.receive_data(bytearray(b'"ping"}\n{"op":"ping"}\n')) == [
        Request(op="ping"),
        Request(op="ping"),
    ]
    assert codec.receive_data(bytearray()) == []
    client = ClientCodec()
    assert client.receive_data(bytearray(b'{"id":1,"ok":true,"result":2}\n')) == [
        Response(id=1, ok=True, result=2)
    ]


def test_crlf_split_between_reads() -> None:
    codec = ServerCodec()
    assert codec.receive_data(b'{"op":"ping"}\r') == []
    assert codec.receive_data(b"\n") == [Request(op="ping")]


def test_line_of_exactly_the_limit() -> None:
    body = b'{"op":"ping","pad":"'
    good = body + b"x" * (100 - len(body) - 2) + b'"}'
    assert len(good) == 100
    assert one(good + b"\n", max_line_bytes=100) == Request(op="ping")
    # The limit counts a trailing \r: 100 bytes of JSON + \r is 101.
    assert isinstance(one(good + b"\r\n", max_line_bytes=100), BadLine)
    assert one(good[:-3] + b'"}\r\n', max_line_bytes=100) == Request(op="ping")
    # Byte by byte, the same.
    codec = ServerCodec(max_line_bytes=100)
    items: list[Request | BadLine] = []
    for b in good + b"\n" + good + b"x\n":
        items += codec.receive_data(bytes([b]))
        assert codec.buffered <= 100
    assert items == [
        Request(op="ping"),
        BadLine(None, ErrorCode.TOO_LARGE, "line longer than 100 bytes (skipped)"),
    ]


def test_too_large_in_one_read_then_good_line() -> None:
    codec = ServerCodec(max_line_bytes=64)
    items = codec.receive_data(b"x" * 65 + b"\n" + line(op="ping", id=1))
    assert items == [
        BadLine(None, ErrorCode.TOO_LARGE, "line longer than 64 bytes (skipped)"),
        Request(op="ping", id=1),
    ]


def test_too_large_split_over_many_reads_then_good_line() -> None:
    codec = ServerCodec(max_line_bytes=1000)
    items = codec.receive_data(line(op="ping", id=1)[:-1])  # a request, still partial
    assert items == []
    assert codec.buffered > 0
    # ... that grows far beyond the limit, in many reads.
    for _ in range(500):
        items += codec.receive_data(b'"x":' * 64)
        assert codec.buffered <= 1000
    assert items == [BadLine(None, ErrorCode.TOO_LARGE, "line longer than 1000 bytes (skipped)")]
    assert codec.buffered == 0  # the rest of the line is not kept
    items = codec.receive_data(b"still the same line\r\n" + line(op="ping", id=2)[:5])
    assert items == []  # one too_large for the whole line, nothing for its rest
    items = codec.receive_data(line(op="ping", id=2)[5:] + b'{"op":"pi')
    assert items == [Request(op="ping", id=2)]
    assert codec.receive_data(b'ng"}\n') == [Request(op="ping")]


def test_too_large_tail_in_same_read() -> None:
    codec = ServerCodec(max_line_bytes=10)
    items = codec.receive_data(b'{"op":"ping"}' + b"\n" + b"y" * 11)
    assert items == [
        BadLine(None, ErrorCode.TOO_LARGE, "line longer than 10 bytes (skipped)"),
        BadLine(None, ErrorCode.TOO_LARGE, "line longer than 10 bytes (skipped)"),
    ]
    assert codec.buffered == 0
    assert codec.receive_data(b"yyyy\n{}\n") == [BadLine(None, BAD, "op 'execute' needs 'type'")]


def test_too_large_partial_plus_next_read() -> None:
    codec = ServerCodec(max_line_bytes=10)
    assert codec.receive_data(b"x" * 8) == []
    assert codec.buffered == 8
    # The newline comes, but the line is 12 bytes.
    items = codec.receive_data(b"xxxx\n{}\n")
    assert [i.code for i in items] == [ErrorCode.TOO_LARGE, BAD]  # type: ignore[union-attr]
    assert codec.buffered == 0


def test_eof() -> None:
    codec = ServerCodec()
    assert codec.receive_data(line(op="ping")) == [Request(op="ping")]
    assert codec.receive_data(b"") == []
    with pytest.raises(RuntimeError, match="after EOF"):
        codec.receive_data(b"more")
    with pytest.raises(RuntimeError, match="after EOF"):
        codec.receive_data(b"")


@pytest.mark.parametrize(
    "fragment", [b'{"op":"ping"}', b'{"op":', b"x", b"\xff", b'{"op":"ping"}\r', b"[1]"]
)
def test_eof_with_a_fragment(fragment: bytes) -> None:
    codec = ServerCodec()
    assert codec.receive_data(line(op="ping", id=1) + fragment) == [Request(op="ping", id=1)]
    assert codec.receive_data(b"") == [
        BadLine(None, BAD, "connection closed in the middle of a line")
    ]
    with pytest.raises(RuntimeError):
        codec.receive_data(b"x")


def test_eof_with_blank_fragment_or_while_skipping() -> None:
    codec = ServerCodec()
    codec.receive_data(b"  \r")
    assert codec.receive_data(b"") == []
    codec = ServerCodec(max_line_bytes=4)
    assert [i.code for i in codec.receive_data(b"x" * 9)] == [ErrorCode.TOO_LARGE]  # type: ignore[union-attr]
    assert codec.receive_data(b"") == []  # that line was answered already


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "10"])
def test_bad_limit(limit: Any) -> None:
    with pytest.raises(exc_mod.InvalidArgument):
        ServerCodec(max_line_bytes=limit)
    with pytest.raises(exc_mod.InvalidArgument):
        ClientCodec(max_line_bytes=limit)


# -- encoding ------------------------------------------------------------------


def test_encode_ok() -> None:
    codec = ServerCodec()
    assert codec.encode_ok(1, "pong") == b'{"id":1,"ok":true,"result":"pong"}\n'
    assert codec.encode_ok("a", None, 0) == b'{"id":"a","ok":true,"version":0,"result":null}\n'
    assert (
        codec.encode_ok(None, {"b": [1, 2.5, True, None], "é": "ü"}, 12)
        == '{"id":null,"ok":true,"version":12,"result":{"b":[1,2.5,true,null],"é":"ü"}}\n'.encode()
    )
    assert codec.encode_ok(1, ("t", 1)) == b'{"id":1,"ok":true,"result":["t",1]}\n'
    assert codec.encode_ok(1, "a\nb") == b'{"id":1,"ok":true,"result":"a\\nb"}\n'


@given(
    id=st.one_of(st.integers(), st.text(), st.booleans(), st.none()),
    version=st.one_of(st.integers(min_value=0), st.booleans()),
)
def test_encode_ok_without_a_result_is_the_encoders_line(id: Any, version: int) -> None:
    """The shortcut for a reply with no result writes what the encoder writes."""
    line = ServerCodec().encode_ok(id, None, version)
    assert line == _protocol._line({"id": id, "ok": True, "version": version, "result": None})
    assert json.loads(line) == {"id": id, "ok": True, "version": version, "result": None}


def test_encode_ok_of_a_lone_surrogate_id_escapes_it() -> None:
    line = ServerCodec().encode_ok("\udfff é", None, 3)
    assert line == b'{"id":"\\udfff \\u00e9","ok":true,"version":3,"result":null}\n'


def test_encode_error() -> None:
    codec = ServerCodec()
    assert (
        codec.encode_error(3, ErrorCode.NOT_FOUND, "aggregate 'x' does not exist")
        == b'{"id":3,"ok":false,"error":{"code":"not_found",'
        b'"message":"aggregate \'x\' does not exist"}}\n'
    )
    assert (
        codec.encode_error(None, ErrorCode.REJECTED, "too poor", "InsufficientFunds")
        == b'{"id":null,"ok":false,"error":{"code":"rejected","message":"too poor",'
        b'"reason":"InsufficientFunds"}}\n'
    )
    assert codec.encode_error("i", "future_code", "m") == (
        b'{"id":"i","ok":false,"error":{"code":"future_code","message":"m"}}\n'
    )


def test_encode_exception() -> None:
    codec = ServerCodec()

    class InsufficientFunds(exc_mod.CommandRejected):
        pass

    assert json.loads(codec.encode_exception(1, InsufficientFunds("balance 3 < 5"))) == {
        "id": 1,
        "ok": False,
        "error": {"code": "rejected", "message": "balance 3 < 5", "reason": "InsufficientFunds"},
    }
    assert json.loads(codec.encode_exception(2, KeyError("secret"))) == {
        "id": 2,
        "ok": False,
        "error": {"code": "internal", "message": "internal error (KeyError)"},
    }


@pytest.mark.parametrize(
    "result",
    [float("nan"), float("inf"), -float("inf"), {"x": [float("nan")]}, object(), {1, 2}, b"x"],
)
def test_encode_unencodable_raises_type_error(result: Any) -> None:
    with pytest.raises(TypeError):
        ServerCodec().encode_ok(1, result)


def test_encode_cycle_and_deep_raise_type_error() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(TypeError):
        ServerCodec().encode_ok(1, cycle)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TypeError):
        ServerCodec().encode_ok(1, deep)


def test_lone_surrogate_is_escaped() -> None:
    # json.loads accepts "\ud800"; the reply must still be valid UTF-8 and carry it back.
    request = one(b'{"op":"ping","id":"a\\ud800"}\n')
    assert request.id == "a\ud800"
    data = ServerCodec().encode_ok(request.id, {"k": "\udfff é"})
    data.decode("utf-8")
    assert data.count(b"\n") == 1
    assert ClientCodec().receive_data(data) == [
        Response(id="a\ud800", ok=True, result={"k": "\udfff é"})
    ]


def test_encode_request() -> None:
    codec = ClientCodec()
    assert codec.encode_request(id=1, op="ping", type=None, key=None) == b'{"id":1,"op":"ping"}\n'
    assert codec.encode_request() == b"{}\n"
    assert codec.encode_request(data={"a": None}) == b'{"data":{"a":null}}\n'
    with pytest.raises(TypeError):
        codec.encode_request(data=float("nan"))


# -- the fast path: the same answers as the careful one -----------------------------

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)

#: Each field: values of the right type (valid or not by the value rules) or anything.
_FIELD_VALUES: dict[str, Any] = {
    "id": st.integers() | st.text(max_size=4),
    "op": st.sampled_from([*OPS, "nope", "Execute"]),
    "type": st.just("Account") | st.text(max_size=3),
    "key": st.integers(min_value=-3, max_value=3) | st.text(max_size=3),
    "command": st.just("Deposit"),
    "data": st.dictionaries(st.text(max_size=4), _JSON_VALUES, max_size=3),
    "expected_version": st.integers(min_value=-2, max_value=5),
    "dry_run": st.booleans(),
    "command_id": st.text(max_size=3) | st.just("c" * 200) | st.just("c" * 201),
    "metadata": st.dictionaries(
        st.sampled_from(["user", "correlation_id", "causation_id", "command_id", "at"]),
        _JSON_VALUES,
        max_size=3,
    ),
    "create": st.booleans(),
    "token": st.text(max_size=3),
    "forwarded": st.booleans(),
}


def _mostly(draw: st.DrawFn, right: st.SearchStrategy[Any]) -> Any:
    """A value of the right type, or now and then any JSON value."""
    return draw(_JSON_VALUES if draw(st.integers(0, 15)) == 0 else right)


@st.composite
def _request_lines(draw: st.DrawFn) -> bytes:
    fields = {
        # Mostly of the right type: the value rules are what the test is about.
        name: _mostly(draw, values)
        for name, values in _FIELD_VALUES.items()
        if draw(st.booleans())
    }
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=4))] = draw(_JSON_VALUES)  # unknown (or a known one again)
    text = json.dumps(fields, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = " " + text.replace(":", " : ").replace(",", " ,") + "\t"
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8


def _both_paths(
    line: bytes, validate: Callable[[dict[str, Any]], Any], fast_path: Callable[[bytes], Any]
) -> tuple[Any, Any, Any]:
    """A line's parsed object, the careful path's result for it (an item or why
    not), and the fast path's (an item or ``None``)."""
    parsed = _protocol._parse_object(line)
    careful = validate(parsed) if isinstance(parsed, dict) else parsed
    return parsed, careful, fast_path(line)


@settings(max_examples=1000)
@given(line=_request_lines() | st.binary(max_size=40))
@example(line=b'{"type": "Account", "key": 0, "command": "Deposit", "forwarded": null}')
def test_fast_path_gives_the_careful_paths_request_or_declines(line: bytes) -> None:
    """``_fast_request`` (msgspec) either declines a line, leaving it to the careful
    path's error or request, or gives exactly the careful path's request: the same
    field values with the same types (``repr`` tells 1 from 1.0 and True, -0.0 from 0)."""
    parsed, careful, fast = _both_paths(line, _protocol._request_from, _protocol._fast_request)
    if fast is not None:
        assert isinstance(careful, Request), (careful, fast)
        assert repr(fast) == repr(careful)
        assert fast.token == careful.token
    elif isinstance(careful, Request) and line.isascii() and b"\\u" not in line:
        # Only a member it does not know, or a null where the careful path
        # reads the member's default, makes it decline a line like these.
        assert isinstance(parsed, dict)
        assert set(parsed) - set(_FIELD_VALUES) or any(
            name in parsed and parsed[name] is None for name in _NULL_MEANS_DEFAULT
        ), parsed


#: The members a Request never holds None in: the careful path reads a null
#: as the default, the fast path declines it.
_NULL_MEANS_DEFAULT: Final = ("op", "data", "dry_run", "create", "forwarded")


def test_fast_path_takes_the_common_lines() -> None:
    """The canonical requests go the fast way (else it would be dead code)."""
    lines = [
        b'{"id":1,"op":"execute","type":"Account","key":"a","command":"Deposit","data":{"x":1}}',
        b'{"id":"r","type":"Account","key":7,"command":"Deposit","command_id":"c1",'
        b'"metadata":{"correlation_id":"k"},"expected_version":3,"create":true}',
        b'{"op":"ping"}',
        b'{"op":"hello","token":"t"}',
        b' {"id": 2, "op": "load", "type": "Account", "key": "\\u00e9"} ',
    ]
    for text in lines:
        fast = _protocol._fast_request(text)
        assert fast is not None, text
        assert fast == one(text + b"\n")


@st.composite
def _reply_lines(draw: st.DrawFn) -> bytes:
    error: dict[str, Any] = {}
    error_members: list[tuple[str, st.SearchStrategy[Any]]] = [
        ("code", st.text(max_size=4)),
        ("message", st.text(max_size=4)),
        ("reason", st.text(max_size=4) | st.none()),
    ]
    for name, right in error_members:
        if draw(st.integers(0, 7)):
            error[name] = _mostly(draw, right)
    fields: dict[str, Any] = {}
    members: list[tuple[str, st.SearchStrategy[Any]]] = [
        ("id", st.integers() | st.text(max_size=4) | st.none()),
        ("ok", st.booleans()),
        ("version", st.integers(min_value=0) | st.none()),
        ("result", _JSON_VALUES),
        ("error", st.just(error)),
    ]
    for name, right in members:
        if draw(st.integers(0, 7)):
            fields[name] = _mostly(draw, right)
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=4))] = draw(_JSON_VALUES)  # unknown (or a known one again)
    text = json.dumps(fields, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=1000)
@given(line=_reply_lines() | st.binary(max_size=40))
def test_client_fast_path_gives_the_careful_paths_response_or_declines(line: bytes) -> None:
    """The client's ``_fast_response`` (msgspec) gives exactly the careful path's
    reply, or declines the line and leaves it to the careful path."""
    _, careful, fast = _both_paths(line, _protocol._response_from, _protocol._fast_response)
    if fast is not None:
        assert isinstance(careful, Response), (careful, fast)
        assert repr(fast) == repr(careful)


def test_client_fast_path_takes_the_servers_replies() -> None:
    server = ServerCodec()
    for data in (
        server.encode_ok(1, None, 3),
        server.encode_ok("a", {"balance": 5, "é": [1.5, None]}, 2),
        server.encode_ok(None, "pong"),
        server.encode_error(4, ErrorCode.REJECTED, "no", "InsufficientFunds"),
        server.encode_error(None, ErrorCode.TOO_LARGE, "too long"),
    ):
        fast = _protocol._fast_response(data.rstrip(b"\n"))
        assert fast is not None, data
        assert [fast] == ClientCodec().receive_data(data)


# -- client side ---------------------------------------------------------------


def test_client_parses_replies() -> None:
    server, client = ServerCodec(), ClientCodec()
    data = (
        server.encode_ok(1, "pong")
        + server.encode_ok("b", {"balance": 5}, 3)
        + b"\r\n"
        + server.encode_error(None, ErrorCode.TOO_LARGE, "line too long")
        + server.encode_error(4, ErrorCode.REJECTED, "no", "InsufficientFunds")
        + b'{"id":5,"ok":false,"version":2,"error":{"code":"new_code","message":"m"},"x":1}\n'
    )
    responses: list[Response] = []
    for i in range(0, len(data), 7):
        responses += client.receive_data(data[i : i + 7])
    assert responses == [
        Response(id=1, ok=True, result="pong"),
        Response(id="b", ok=True, version=3, result={"balance": 5}),
        Response(id=None, ok=False, error_code="too_large", error_message="line too long"),
        Response(
            id=4,
            ok=False,
            error_code="rejected",
            error_message="no",
            error_reason="InsufficientFunds",
        ),
        Response(id=5, ok=False, version=2, error_code="new_code", error_message="m"),
    ]
    assert client.receive_data(b"") == []


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"nope\n", "invalid JSON"),
        (b"\xff\n", "not valid UTF-8"),
        (b"[1]\n", "not an array"),
        (b'{"id":1}\n', "'ok' must be a boolean, not null"),
        (b'{"id":1,"ok":1}\n', "'ok' must be a boolean"),
        (b'{"id":true,"ok":true}\n', "'id' must be"),
        (b'{"id":1.5,"ok":true}\n', "'id' must be"),
        (b'{"id":1,"ok":true,"version":"3"}\n', "'version' must be an integer"),
        (b'{"id":1,"ok":true,"version":true}\n', "'version' must be an integer"),
        (b'{"id":1,"ok":false}\n', "'error' must be an object"),
        (b'{"id":1,"ok":false,"error":"x"}\n', "'error' must be an object"),
        (b'{"id":1,"ok":false,"error":{"message":"m"}}\n', "'error.code' must be a string"),
        (b'{"id":1,"ok":false,"error":{"code":"c"}}\n', "'error.message' must be a string"),
        (
            b'{"id":1,"ok":false,"error":{"code":"c","message":"m","reason":1}}\n',
            "'error.reason' must be a string",
        ),
        (
            b'{"id":1,"ok":false,"version":1.0,"error":{"code":"c","message":"m"}}\n',
            "'version' must be an integer",
        ),
    ],
)
def test_client_rejects_bad_replies(data: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match="bad reply line") as info:
        ClientCodec().receive_data(data)
    assert words in str(info.value)


def test_client_too_large_and_eof() -> None:
    client = ClientCodec(max_line_bytes=10)
    assert client.receive_data(b"x" * 10) == []
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        client.receive_data(b"x")
    client = ClientCodec()
    assert client.receive_data(b'{"id":1,"ok":') == []
    with pytest.raises(ProtocolError, match="middle of a reply line"):
        client.receive_data(b"")
    with pytest.raises(RuntimeError, match="after EOF"):
        client.receive_data(b"\n")


def test_client_server_round_trip() -> None:
    server, client = ServerCodec(), ClientCodec()
    wire = client.encode_request(**EXEC, op="execute", command_id="cmd-1", create=True)
    (request,) = server.receive_data(wire)
    assert request == Request(
        id=7,
        type="Account",
        key="a1",
        command="Deposit",
        data={"amount": 5},
        command_id="cmd-1",
        create=True,
    )
    assert client.receive_data(server.encode_ok(request.id, {"reply": 1}, 4)) == [
        Response(id=7, ok=True, version=4, result={"reply": 1})
    ]


# -- error codes ---------------------------------------------------------------


class _Rejected(exc_mod.CommandRejected):
    pass


EXCEPTIONS: list[tuple[BaseException, ErrorCode]] = [
    (exc_mod.InvalidArgument("bad"), ErrorCode.BAD_REQUEST),
    (exc_mod.InvalidKey("unhashable"), ErrorCode.BAD_REQUEST),
    (exc_mod.UnknownCommand("no handler"), ErrorCode.UNKNOWN_COMMAND),
    (exc_mod.AggregateNotFound("k"), ErrorCode.NOT_FOUND),
    (exc_mod.AlreadyExists("k"), ErrorCode.ALREADY_EXISTS),
    (exc_mod.CommandRejected("no"), ErrorCode.REJECTED),
    (_Rejected("no"), ErrorCode.REJECTED),
    (exc_mod.WrongExpectedVersion("k", 1, 2), ErrorCode.WRONG_EXPECTED_VERSION),
    (exc_mod.ConcurrencyConflict("s", 1, 2), ErrorCode.CONFLICT),
    (exc_mod.CallTimeout(), ErrorCode.TIMEOUT),
    (exc_mod.RegistryClosed(), ErrorCode.SHUTTING_DOWN),
    (exc_mod.EventDecodeError("s@3: bad"), ErrorCode.INTERNAL),
    (exc_mod.UnknownEventType("s@3: Gone"), ErrorCode.INTERNAL),
    (exc_mod.NotOwner("s", 3, "n", by_database=True), ErrorCode.NOT_OWNER),
    (exc_mod.StoreError("disk"), ErrorCode.STORE_UNAVAILABLE),
    (exc_mod.StreamDeleted("s"), ErrorCode.STORE_UNAVAILABLE),
    (exc_mod.AggregateCrashed("k", ValueError()), ErrorCode.INTERNAL),
    (exc_mod.AggregateGone("k"), ErrorCode.INTERNAL),
    (exc_mod.AggregateStartError("k"), ErrorCode.INTERNAL),
    (exc_mod.AggregateDeclined("k"), ErrorCode.INTERNAL),
    (exc_mod.DuplicateCommand("s", "c", 1), ErrorCode.INTERNAL),
    (exc_mod.CallAlreadyAnswered(), ErrorCode.INTERNAL),
    (exc_mod.KeyAlreadyRegistered("k", None), ErrorCode.INTERNAL),  # type: ignore[arg-type]
    (exc_mod.TrioAggregatesError("x"), ErrorCode.INTERNAL),
    (ProtocolError("x"), ErrorCode.INTERNAL),
    (ValueError("x"), ErrorCode.INTERNAL),
    (TypeError("x"), ErrorCode.INTERNAL),
    (KeyboardInterrupt(), ErrorCode.INTERNAL),
]


@pytest.mark.parametrize(("exc", "code"), EXCEPTIONS, ids=[type(e).__name__ for e, _ in EXCEPTIONS])
def test_error_code_for(exc: BaseException, code: ErrorCode) -> None:
    assert error_code_for(exc) is code


def test_every_library_exception_is_mapped() -> None:
    classes = {
        obj
        for obj in vars(exc_mod).values()
        if isinstance(obj, type) and issubclass(obj, exc_mod.TrioAggregatesError)
    }
    tested = {type(e) for e, _ in EXCEPTIONS}
    assert classes - tested == set()


def test_error_details() -> None:
    assert error_details(_Rejected("balance 1 < 2")) == (
        ErrorCode.REJECTED,
        "balance 1 < 2",
        "_Rejected",
    )
    assert error_details(_Rejected()) == (ErrorCode.REJECTED, "_Rejected", "_Rejected")
    assert error_details(exc_mod.AggregateNotFound("k")) == (
        ErrorCode.NOT_FOUND,
        "aggregate 'k' does not exist",
        None,
    )
    assert error_details(RuntimeError("/etc/secret path")) == (
        ErrorCode.INTERNAL,
        "internal error (RuntimeError)",
        None,
    )
    assert error_details(exc_mod.EventDecodeError("s@3: bad data")) == (
        ErrorCode.INTERNAL,
        "internal error (EventDecodeError)",
        None,
    )
    assert error_details(exc_mod.AggregateCrashed("k", OSError("/srv/db: denied"))) == (
        ErrorCode.INTERNAL,
        "internal error (AggregateCrashed)",
        None,
    )


# -- properties ----------------------------------------------------------------

_GOOD = b'{"id":"last","op":"ping"}\n'
_TOO_LARGE_LINE = BadLine(None, ErrorCode.TOO_LARGE, "line longer than {} bytes (skipped)")
_FRAGMENT_LINE = BadLine(None, BAD, "connection closed in the middle of a line")

#: Pieces that make random input look like the protocol now and then.
_pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"\n", b"\r\n", b"\r", b" ", b"\t", b"{", b"}", b'"', b"\xff", b"\xc3", b"null"]
    ),
    st.sampled_from(
        [
            b'{"op":"ping","id":1}',
            b'{"id":true,"op":"ping"}',
            b'{"type":"A","key":"k","command":"C","data":{}}',
            b'{"op":"load","id":"x"}',
            b"[1,2]",
            b'{"x":NaN}',
        ]
    ),
    st.integers(min_value=1, max_value=300).map(lambda n: b"x" * n),
)


def _reference(stream: bytes, limit: int) -> list[Request | BadLine]:
    """What the server codec must make of ``stream`` then EOF, however it is split.

    Each complete line alone, through a codec without a (practical) limit; one
    too_large for each line over ``limit``; a fragment error for a short
    unfinished last line that is not blank.
    """
    *lines, last = stream.split(b"\n")
    out: list[Request | BadLine] = []
    too_large = attrs.evolve(_TOO_LARGE_LINE, message=_TOO_LARGE_LINE.message.format(limit))
    for line in lines:
        if len(line) > limit:
            out.append(too_large)
        elif line.strip(b" \t\r"):
            (item,) = ServerCodec(max_line_bytes=1 << 30).receive_data(line + b"\n")
            out.append(item)
    if len(last) > limit:
        out.append(too_large)
    elif last.strip(b" \t\r"):
        out.append(_FRAGMENT_LINE)
    return out


@settings(deadline=None, max_examples=300)
@given(
    pieces=st.lists(_pieces, max_size=30),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    limit=st.integers(min_value=len(_GOOD), max_value=200),
)
def test_random_bytes_never_break_the_server_codec(
    pieces: list[bytes], cuts: list[int], limit: int
) -> None:
    data = b"".join(pieces)
    codec = ServerCodec(max_line_bytes=limit)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    items: list[Request | BadLine] = []
    for start, end in itertools.pairwise(points):
        items += codec.receive_data(data[start:end])
        assert codec.buffered <= limit
    # After a newline, a good request line is parsed whatever came before.
    tail = codec.receive_data(b"\n" + _GOOD)
    assert tail[-1] == Request(id="last", op="ping")
    assert codec.buffered == 0
    assert codec.receive_data(b"") == []
    # And the whole answer is the one each line gets alone, whatever the chunking.
    assert items + tail == _reference(data + b"\n" + _GOOD, limit)


@settings(deadline=None, max_examples=100)
@given(
    pieces=st.lists(_pieces, max_size=30),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    limit=st.integers(min_value=1, max_value=100),
)
def test_random_bytes_then_eof(pieces: list[bytes], cuts: list[int], limit: int) -> None:
    data = b"".join(pieces)
    codec = ServerCodec(max_line_bytes=limit)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    items: list[Request | BadLine] = []
    for start, end in itertools.pairwise(points):
        items += codec.receive_data(data[start:end])
        assert codec.buffered <= limit
    items += codec.receive_data(b"")
    assert items == _reference(data, limit)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_ids = st.none() | st.integers() | st.text()
_keys = st.integers() | st.text()


@st.composite
def _requests(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(OPS))
    fields: dict[str, Any] = {"id": draw(_ids), "op": op}
    if op in ("execute", "create", "load", "version", "history"):
        fields["type"] = draw(st.text())
        fields["key"] = draw(_keys)
    if op in ("execute", "create"):
        fields["command"] = draw(st.text())
        fields["data"] = draw(st.dictionaries(st.text(), _json, max_size=4))
        fields["dry_run"] = draw(st.booleans())
        fields["command_id"] = draw(st.none() | st.text(min_size=1, max_size=200))
        metadata = draw(
            st.none()
            | st.dictionaries(
                st.text().filter(lambda k: k not in ("command_id", "command", "at")),
                _json,
                max_size=3,
            )
        )
        if metadata is not None:
            for name in ("correlation_id", "causation_id"):
                if name in metadata or draw(st.booleans()):
                    metadata[name] = draw(st.text())
        fields["metadata"] = metadata
    if op == "execute":
        fields["expected_version"] = draw(st.none() | st.integers(min_value=0))
        fields["create"] = draw(st.booleans())
    if op == "hello":
        fields["token"] = draw(st.none() | st.text())
    if draw(st.booleans()):
        fields["future_field"] = draw(_json)
    return fields


@settings(deadline=None, max_examples=100)
@given(
    requests=st.lists(_requests(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    crlf=st.booleans(),
)
def test_encoded_requests_parse_back_however_split(
    requests: list[dict[str, Any]], cuts: list[int], crlf: bool
) -> None:
    client, server = ClientCodec(), ServerCodec()
    wire = b"".join(client.encode_request(**r) for r in requests)
    if crlf:
        wire = wire.replace(b"\n", b"\r\n")
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    parsed: list[Request | BadLine] = []
    for start, end in itertools.pairwise(points):
        parsed += server.receive_data(wire[start:end])
    parsed += server.receive_data(b"")
    expected = [
        Request(**{k: v for k, v in r.items() if v is not None and k != "future_field"})
        for r in requests
    ]
    assert parsed == expected


@settings(deadline=None, max_examples=100)
@given(
    replies=st.lists(
        st.tuples(
            _ids,
            st.booleans(),
            st.none() | st.integers(min_value=0),
            _json,
            st.sampled_from(list(ErrorCode)),
            st.text(),
            st.none() | st.text(),
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_encoded_replies_parse_back_however_split(
    replies: list[tuple[Any, bool, int | None, Any, ErrorCode, str, str | None]],
    cuts: list[int],
) -> None:
    server, client = ServerCodec(), ClientCodec()
    wire = b""
    expected = []
    for id_, ok, version, result, code, message, reason in replies:
        if ok:
            wire += server.encode_ok(id_, result, version)
            expected.append(Response(id=id_, ok=True, version=version, result=result))
        else:
            wire += server.encode_error(id_, code, message, reason)
            expected.append(
                Response(
                    id=id_,
                    ok=False,
                    error_code=code.value,
                    error_message=message,
                    error_reason=reason,
                )
            )
    assert wire.count(b"\n") == len(replies)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    received: list[Response] = []
    for start, end in itertools.pairwise(points):
        received += client.receive_data(wire[start:end])
    received += client.receive_data(b"")
    assert received == expected


@settings(deadline=None, max_examples=100)
@given(
    obj=st.dictionaries(
        st.sampled_from(
            [
                "id",
                "op",
                "type",
                "key",
                "command",
                "data",
                "expected_version",
                "dry_run",
                "command_id",
                "metadata",
                "create",
                "token",
                "other",
            ]
        ),
        _json | st.sampled_from(OPS),
    )
)
def test_random_request_objects_get_a_request_or_a_bad_line(obj: dict[str, Any]) -> None:
    item = one(json.dumps(obj).encode() + b"\n")
    if isinstance(item, BadLine):
        assert item.code is BAD
        valid_id = obj.get("id") is None or type(obj["id"]) in (int, str)
        assert item.id == (obj.get("id") if valid_id else None)
    else:
        assert item.op == obj.get("op") or (item.op == "execute" and obj.get("op") is None)
        assert item.id == obj.get("id")
