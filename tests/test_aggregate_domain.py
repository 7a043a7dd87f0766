"""The pure half: decide / apply / replay, handler registration, and the event codec.

No Trio, no store, no registry: the example domain (``examples/bank.py``) and a few
small aggregates defined here are exercised as plain synchronous objects. The
example domain's rules are tested as users test theirs, with the testing kit's
given/when/then ``scenario`` (``trio_aggregates.testing``); the mechanics of
``decide`` and ``apply`` themselves are tested by hand.
"""

import enum
import json
import typing
import uuid
from typing import Any, ClassVar, Literal

import attrs
import pytest
from _examples import bank

from trio_aggregates import (
    NO_REPLY,
    Aggregate,
    CommandRejected,
    Decision,
    EventCodec,
    EventDecodeError,
    InvalidArgument,
    InvalidKey,
    StoreError,
    TrioAggregatesError,
    UnknownCommand,
    UnknownEventType,
    applies,
    event_type,
    handles,
    type_name_of,
)
from trio_aggregates.testing import scenario

# -- Account: decide, apply, replay ---------------------------------------------


#: An account opened by ann, with no overdraft and nothing on it.
OPENED = scenario(bank.Account).given(bank.AccountOpened("ann", 0))


def opened(balance: int = 0, overdraft: int = 0) -> Any:
    events: list[object] = [bank.AccountOpened("ann", overdraft)]
    if balance:
        events.append(bank.Deposited(balance))
    return bank.Account.replay(events)


def test_account_replay_builds_state_from_events() -> None:
    account = bank.Account.replay(
        [
            bank.AccountOpened("ann", 50),
            bank.Deposited(100, "a"),
            bank.Withdrawn(30, "b"),
            bank.Deposited(5),
        ]
    )
    assert account == bank.Account(owner="ann", balance=75, overdraft_limit=50, closed=False)


def test_account_replay_of_nothing_is_the_initial_state() -> None:
    assert bank.Account.replay([]) == bank.Account()


def test_account_decide_is_pure_and_apply_evolves() -> None:
    account = opened(100)
    before = attrs.evolve(account)
    decision = account.decide(bank.Withdraw(40, "ref"))
    assert decision.events == (bank.Withdrawn(40, "ref"),)
    assert not decision.has_reply
    assert account == before  # deciding changed nothing
    for event in decision.events:
        account.apply(event)
    assert account.balance == 60


def test_account_open_rejects_negative_overdraft() -> None:
    scenario(bank.Account).when(bank.OpenAccount("ann", -1)).then_rejects(bank.InvalidAmount)


@pytest.mark.parametrize("amount", [0, -5, True, 2.5])
def test_account_rejects_invalid_amounts(amount: object) -> None:
    account = OPENED.given(bank.Deposited(100))
    account.when(bank.Deposit(amount)).then_rejects(bank.InvalidAmount)
    account.when(bank.Withdraw(amount)).then_rejects(bank.InvalidAmount)


def test_account_insufficient_funds_respects_overdraft() -> None:
    account = scenario(bank.Account).given(bank.AccountOpened("ann", 50), bank.Deposited(100))
    account.when(bank.Withdraw(150)).then(bank.Withdrawn(150))
    error = account.when(bank.Withdraw(151)).then_rejects(bank.InsufficientFunds)
    assert isinstance(error, CommandRejected)
    assert isinstance(error, TrioAggregatesError)


def test_account_close_rules() -> None:
    OPENED.given(bank.Deposited(10)).when(bank.CloseAccount()).then_rejects(bank.BalanceNotZero)
    account = OPENED.when(bank.CloseAccount()).then(bank.AccountClosed())
    assert account.closed
    closed = OPENED.given(bank.AccountClosed())
    closed.when(bank.CloseAccount()).then_rejects(bank.AccountIsClosed)
    closed.when(bank.Deposit(1)).then_rejects(bank.AccountIsClosed)


def test_account_get_balance_is_a_decision_with_a_reply_and_no_events() -> None:
    # No events, and the handler's own reply: without one, execute would return
    # the version (2), not the balance.
    OPENED.given(bank.Deposited(42)).when(bank.GetBalance()).then(reply=42)


def test_unknown_command_raises_unknown_command() -> None:
    with pytest.raises(UnknownCommand, match="Account has no handler for RegisterUser"):
        opened().decide(bank.RegisterUser("a", "a@b.c"))


def test_apply_of_a_foreign_event_raises_type_error() -> None:
    with pytest.raises(TypeError, match="no applier"):
        opened().apply(bank.UserRegistered("a", "a@b.c"))


# -- User -----------------------------------------------------------------------


def test_user_lifecycle() -> None:
    new = scenario(bank.User)
    new.when(bank.RegisterUser("bob", "not-an-email")).then_rejects(bank.InvalidEmail)
    new.when(bank.ChangeEmail("bob@example.com")).then_rejects(bank.UserInactive)
    user = new.when(bank.RegisterUser("bob", "bob@example.com")).then(
        bank.UserRegistered("bob", "bob@example.com")
    )
    assert user == bank.User("bob", "bob@example.com", True)

    registered = new.given(bank.UserRegistered("bob", "bob@example.com"))
    registered.when(bank.ChangeEmail("robert@example.com")).then(
        bank.EmailChanged("bob@example.com", "robert@example.com")
    )
    # the same address again: a list with no events, so no events and no reply
    # of its own (execute returns the version, 1)
    registered.when(bank.ChangeEmail("bob@example.com")).then(reply=1)
    registered.when(bank.ChangeEmail("robert@nowhere")).then_rejects(bank.InvalidEmail)

    changed = registered.given(bank.EmailChanged("bob@example.com", "robert@example.com"))
    user = changed.when(bank.DeactivateUser("left")).then(bank.UserDeactivated("left"))
    assert user == bank.User("bob", "robert@example.com", False)
    gone = changed.given(bank.UserDeactivated("left"))
    gone.when(bank.DeactivateUser()).then_rejects(bank.UserInactive)


def test_user_replay_equals_stepwise_apply() -> None:
    events = [
        bank.UserRegistered("c", "c@x.io"),
        bank.EmailChanged("c@x.io", "c@y.io"),
        bank.UserDeactivated("gone"),
    ]
    assert bank.User.replay(events) == bank.User("c", "c@y.io", False)


# -- Decision forms and handler registration ------------------------------------


@attrs.frozen
class Ping:
    n: int = 0


@attrs.frozen
class Pong:
    n: int


@attrs.frozen
class Nothing:
    pass


@attrs.frozen
class Many:
    count: int


@attrs.frozen
class Ask:
    pass


@attrs.frozen
class Explode:
    pass


@attrs.frozen
class Noted:
    text: str


@attrs.frozen
class LoudNoted(Noted):
    pass


@attrs.frozen
class Audited:
    """An event with no applier, listed in extra_events."""

    who: str


@attrs.frozen
class BaseCommand:
    label: str


@attrs.frozen
class SubCommand(BaseCommand):
    pass


@attrs.define
class Forms(Aggregate):
    extra_events = (Audited,)

    pongs: list[int] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)

    @handles
    def ping(self, command: Ping) -> Pong:
        return Pong(command.n)

    @handles
    def nothing(self, command: Nothing) -> None:
        return None

    @handles
    def many(self, command: Many) -> list[Pong]:
        return [Pong(i) for i in range(command.count)]

    @handles(Ask)
    def ask(self, command):  # type: ignore[no-untyped-def]  # explicit form
        return Decision(events=[Audited("q")], reply=("answer", len(self.pongs)))

    @handles
    def base(self, command: BaseCommand) -> Noted:
        return Noted(command.label)

    @applies
    def ponged(self, event: Pong) -> None:
        self.pongs.append(event.n)

    @applies(Noted)
    def noted(self, event):  # type: ignore[no-untyped-def]
        self.notes.append(event.text)


def test_handler_returning_none_is_an_empty_decision() -> None:
    assert Forms().decide(Nothing()) == Decision(events=(), reply=NO_REPLY)


def test_handler_returning_one_event() -> None:
    assert Forms().decide(Ping(3)).events == (Pong(3),)


def test_handler_returning_a_list() -> None:
    assert Forms().decide(Many(3)).events == (Pong(0), Pong(1), Pong(2))
    assert Forms().decide(Many(0)) == Decision()


def test_handler_returning_a_decision_with_reply() -> None:
    state = Forms.replay([Pong(1), Pong(2)])
    decision = state.decide(Ask())
    assert decision.events == (Audited("q"),)
    assert decision.reply == ("answer", 2)
    assert decision.has_reply


def test_decision_converts_events_to_a_tuple() -> None:
    decision = Decision(events=[Pong(1)])
    assert decision.events == (Pong(1),)
    assert decision.reply is NO_REPLY
    assert repr(NO_REPLY) == "NO_REPLY"


@attrs.define
class Either(Aggregate):
    seen: list[str] = attrs.Factory(list)

    @handles
    def either(self, command: Explode | Ask) -> Noted:
        return Noted(type(command).__name__)

    @applies
    def noted(self, event: Noted | Pong) -> None:
        self.seen.append(repr(event))


def test_union_annotation_registers_every_member() -> None:
    assert Either().decide(Explode()).events == (Noted("Explode"),)
    assert Either().decide(Ask()).events == (Noted("Ask"),)
    assert Either.replay([Noted("a"), Pong(1)]).seen == [repr(Noted("a")), repr(Pong(1))]
    assert set(Either.codec().types) == {"Noted", "Pong"}


def test_subclass_dispatch_for_commands_and_events() -> None:
    state = Forms()
    assert state.decide(SubCommand("x")).events == (Noted("x"),)
    state.apply(LoudNoted("y"))  # applier for Noted takes its subclass
    assert state.notes == ["y"]


def test_extra_events_are_ignored_by_apply_and_known_to_the_codec() -> None:
    state = Forms()
    state.apply(Audited("me"))
    assert state == Forms()
    assert Forms.codec().types["Audited"] is Audited


def test_aggregate_subclass_inherits_and_overrides_handlers() -> None:
    @attrs.define
    class Louder(Forms):
        @handles(Ping)
        def ping(self, command):  # type: ignore[no-untyped-def]
            return [Pong(command.n), Pong(command.n * 10)]

    assert Louder().decide(Ping(2)).events == (Pong(2), Pong(20))
    assert Louder().decide(Nothing()) == Decision()
    assert Forms().decide(Ping(2)).events == (Pong(2),)  # the base is untouched


def test_the_runtime_gets_a_handlers_events_as_a_plain_tuple() -> None:
    """``_handle`` (the runtime's path) gives a ``Decision`` as it is, and
    events in any of the accepted forms as a plain tuple (a tuple subclass
    too: the runtime tells the two apart by exact type)."""

    class Pair(typing.NamedTuple):
        first: object
        second: object

    @attrs.define
    class Paired(Forms):
        @handles(Ping)
        def ping(self, command):  # type: ignore[no-untyped-def]
            return Pair(Pong(command.n), Pong(command.n + 1))

    cases: list[tuple[Aggregate, object, tuple[object, ...]]] = [
        (Paired(), Ping(1), (Pong(1), Pong(2))),
        (Forms(), Many(2), (Pong(0), Pong(1))),
        (Forms(), Ping(3), (Pong(3),)),
        (Forms(), Nothing(), ()),
    ]
    for state, command, events in cases:
        result = state._handle(command)
        assert type(result) is tuple and result == events
        assert state.decide(command).events == events
    decision = Forms()._handle(Ask())
    assert type(decision) is Decision and decision.reply == ("answer", 0)


def test_handler_without_annotation_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="exactly one annotated parameter"):

        class Bad(Aggregate):
            @handles
            def oops(self, command):  # type: ignore[no-untyped-def]
                return None


def test_handler_with_two_parameters_is_refused() -> None:
    with pytest.raises(TypeError, match="exactly one annotated parameter"):

        class Bad(Aggregate):
            @handles
            def oops(self, command: Ping, other: Ping) -> None:
                return None


def test_handler_annotated_with_a_non_class_is_refused() -> None:
    with pytest.raises(TypeError, match="is not a class"):

        class Bad(Aggregate):
            @applies
            def oops(self, event: Literal[1]) -> None:
                return None


def test_unresolvable_annotation_is_refused_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"name the type explicitly"):

        class Bad(Aggregate):
            @handles
            def oops(self, command: "NoSuchType") -> None:  # type: ignore[name-defined]  # noqa: F821
                return None


@pytest.mark.parametrize("bad", ["Ping", 3, None])
def test_handles_and_applies_with_non_classes_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="takes classes"):
        handles(bad)
    with pytest.raises(TypeError, match="takes classes"):
        applies(Ping, bad)


def test_handles_with_no_arguments_is_refused() -> None:
    with pytest.raises(TypeError, match="takes classes"):
        handles()


def test_stream_name_uses_category_or_class_name() -> None:
    assert bank.Account.stream_name("k1") == "Account-k1"

    @attrs.define
    class Categorised(Forms):
        category = "forms"

    assert Categorised.stream_name(7) == "forms-7"


def test_a_category_with_a_dash_is_refused_when_the_class_is_defined() -> None:
    # "A" + key "b-c" and "A-b" + key "c" would share the stream "A-b-c".
    with pytest.raises(InvalidArgument, match="'-'"):

        class Dashed(Aggregate):
            category = "A-b"

    class Plain(Aggregate):
        category = "A"

    assert Plain.stream_name("b-c") == "A-b-c"  # splits at its first "-": ("A", "b-c")


def test_equal_keys_name_one_stream() -> None:
    ident = uuid.UUID(int=1)
    assert bank.Account.stream_name(1) == bank.Account.stream_name("1") == "Account-1"
    assert bank.Account.stream_name(ident) == bank.Account.stream_name(str(ident))
    assert bank.Account.stream_name(ident) == f"Account-{ident}"

    class Code(str):
        def __str__(self) -> str:
            return "not the value"

    class Level(enum.IntEnum):
        HIGH = 3

    assert bank.Account.stream_name(Code("x")) == "Account-x"
    assert bank.Account.stream_name(Level.HIGH) == "Account-3"
    for bad in [1.5, True, None, b"k", ("t",)]:
        with pytest.raises(InvalidKey):
            bank.Account.stream_name(bad)


# -- the codec ------------------------------------------------------------------

ACCOUNT_EVENTS = [
    bank.AccountOpened("ann", 0),
    bank.AccountOpened("ümlaut ✓", 500),
    bank.Deposited(100),
    bank.Deposited(100, "transfer:abc"),
    bank.Withdrawn(1),
    bank.Withdrawn(7, "ref"),
    bank.AccountClosed(),
]
USER_EVENTS = [
    bank.UserRegistered("bob", "bob@example.com"),
    bank.EmailChanged("bob@example.com", "robert@example.com"),
    bank.UserDeactivated(""),
]


@pytest.mark.parametrize(
    ("aggregate", "event"),
    [("Account", e) for e in ACCOUNT_EVENTS] + [("User", e) for e in USER_EVENTS],
    ids=repr,
)
def test_codec_round_trip_of_every_example_event(aggregate: str, event: object) -> None:
    codec = getattr(bank, aggregate).codec()
    name, data = codec.encode(event)
    assert isinstance(data, bytes)
    assert name == type_name_of(type(event))
    json.loads(data)  # it is plain JSON, never pickle
    assert codec.decode(name, data) == event


def test_event_type_names_of_the_examples() -> None:
    assert bank.Account.codec().types == {
        "account.opened": bank.AccountOpened,
        "account.deposited": bank.Deposited,
        "account.withdrawn": bank.Withdrawn,
        "account.closed": bank.AccountClosed,
    }
    assert set(bank.User.codec().types) == {
        "user.registered",
        "user.email_changed",
        "user.deactivated",
    }
    assert bank.Account.codec().encode(bank.Deposited(5)) == (
        "account.deposited",
        b'{"amount":5,"reference":null}',
    )


def test_type_name_defaults_to_class_name_and_is_not_inherited() -> None:
    assert type_name_of(Ping) == "Ping"

    @attrs.frozen
    class Child(bank.Deposited):
        pass

    assert type_name_of(Child) == "Child"


def test_event_type_refuses_empty_or_non_str_names() -> None:
    with pytest.raises(TypeError):
        event_type("")
    with pytest.raises(TypeError):
        event_type(3)  # type: ignore[arg-type]


def test_codec_refuses_unregistered_types_and_name_clashes() -> None:
    codec = EventCodec()
    with pytest.raises(TypeError, match="not a registered event type"):
        codec.encode(Ping(1))
    assert codec.register(Ping) == "Ping"
    assert codec.register(Ping) == "Ping"  # idempotent
    with pytest.raises(ValueError, match="taken"):
        codec.register(Pong, "Ping")
    codec.add_upcaster("Old", lambda d: ("Ping", d))
    with pytest.raises(ValueError, match="already registered"):
        codec.add_upcaster("Old", lambda d: ("Ping", d))


@attrs.frozen
class CentsDeposited:
    cents: int
    currency: str


def chain_codec() -> EventCodec:
    codec = EventCodec()
    codec.register(CentsDeposited, "deposited.v3")
    # v1 {"amount": euros} -> v2 {"cents"} -> v3 {"cents", "currency"}
    codec.add_upcaster("deposited.v1", lambda d: ("deposited.v2", {"cents": d["amount"] * 100}))
    codec.add_upcaster("deposited.v2", lambda d: ("deposited.v3", {**d, "currency": "EUR"}))
    return codec


def test_upcaster_chain_reads_old_shapes_as_the_current_class() -> None:
    codec = chain_codec()
    assert codec.decode("deposited.v1", b'{"amount": 3}') == CentsDeposited(300, "EUR")
    assert codec.decode("deposited.v2", b'{"cents": 7}') == CentsDeposited(7, "EUR")
    assert codec.decode("deposited.v3", b'{"cents": 1, "currency": "USD"}') == CentsDeposited(
        1, "USD"
    )


def test_aggregate_upcasters_setting_feeds_its_codec() -> None:
    @attrs.define
    class Wallet(Aggregate):
        upcasters: ClassVar[dict[str, Any]] = {
            "legacy.deposit": lambda d: ("account.deposited", {"amount": d["n"]})
        }
        total: int = 0

        @applies(bank.Deposited)
        def deposited(self, event):  # type: ignore[no-untyped-def]
            self.total += event.amount

    event = Wallet.codec().decode("legacy.deposit", b'{"n": 9}')
    assert event == bank.Deposited(9)
    assert Wallet.replay([event]).total == 9


def test_upcaster_loop_is_a_decode_error() -> None:
    codec = chain_codec()
    codec.add_upcaster("a", lambda d: ("b", d))
    codec.add_upcaster("b", lambda d: ("a", d))
    with pytest.raises(EventDecodeError, match="loop"):
        codec.decode("a", b"{}", where="s@1")


def test_failing_upcaster_is_a_decode_error_with_cause() -> None:
    codec = chain_codec()
    with pytest.raises(EventDecodeError, match="upcasting") as info:
        codec.decode("deposited.v1", b'{"wrong": 1}')
    assert isinstance(info.value.__cause__, KeyError)


def test_unknown_event_type_names_the_place() -> None:
    with pytest.raises(UnknownEventType, match=r"'account\.teleported' at Account-k@4"):
        bank.Account.codec().decode("account.teleported", b"{}", where="Account-k@4")


@pytest.mark.parametrize(
    "data",
    [b"not json", b"\xff\xfe", b'{"amount": "lots"}', b"{}", b"[1, 2]"],
)
def test_corrupt_or_ill_fitting_data_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(EventDecodeError) as info:
        bank.Account.codec().decode("account.deposited", data, where="Account-k@2")
    assert not isinstance(info.value, UnknownEventType)
    assert isinstance(info.value, StoreError)
    assert "Account-k@2" in str(info.value)
    assert info.value.__cause__ is not None


def test_type_hints_of_an_aggregate_subclass_resolve() -> None:
    # attrs.resolve_types / cattrs call this on every state they encode.
    hints = typing.get_type_hints(bank.Account)
    assert hints["balance"] is int
    assert hints["snapshot_every"] == ClassVar[int | None]


def test_state_round_trip_for_snapshots() -> None:
    codec = bank.Account.codec()
    state = opened(1234, overdraft=10)
    assert codec.decode_state(codec.encode_state(state), bank.Account) == state
    with pytest.raises(EventDecodeError, match="snapshot does not fit"):
        codec.decode_state(b'{"balance": "x"}', bank.Account)
    with pytest.raises(EventDecodeError):
        codec.decode_state(b"garbage", bank.Account)
