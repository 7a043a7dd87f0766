"""Bank accounts, users and transfers: the example domain of trio_aggregates.

The domain half is pure (no Trio, no store): commands and events are attrs
classes; ``Account``, ``User`` and ``Transfer`` decide and evolve. Then events
flow out of the store: a projection, ``Balances``, keeps a table of every
account's balance, and a process manager, ``TransferSaga``, moves the money of
each transfer. A transfer is two commands on two aggregates (withdraw from one
account, deposit into another), so no single transaction covers it: the
``Transfer`` aggregate records how far it got, and the saga drives it::

    TransferRequested ──withdraw from source──► TransferWithdrawn
        │ (refused: TransferRejected, nothing moved)
        ▼
    TransferWithdrawn ──deposit into target──► TransferDeposited, TransferCompleted
        │ (any failure of the deposit: refused, conflict, store error)
        ▼
    TransferDepositFailed ──deposit back into source──► TransferRefunded

The saga runs from its checkpoint in the store's database. Every command it
sends carries a command id derived from the event it reacts to
(``ctx.command_id(step)``), so an event handled again after a crash applies no
command twice; each reaction first checks that the transfer is still at its
step. After a store error on the deposit the saga cannot know whether the
deposit went in: it *fences* the deposit's command id (an empty append with
that id on the target's stream, which either finds the deposit there or makes
sure it can never be applied later), then records the failure, then refunds.

The run half, :func:`main`, opens accounts on an event store (SQLite by
default, a file ``bank.db`` where you run it), requests transfers from many
concurrent tasks, lets the saga settle them, and checks the books: every
transfer completed, refunded or rejected, no money appeared or vanished, the
``Balances`` table equals the accounts, and every live state equals a replay
of its stream::

    python examples/bank.py                        # SQLite, ./bank.db
    python examples/bank.py --store memory://      # in memory
    python examples/bank.py --store postgresql://user@host/db

Kill it (Ctrl-C, or ``kill -9``) and run it again with the same ``--run``: it
picks up where it stopped, every transfer ends settled, the bank's total is
exact and the projection equals the accounts (exactly once, despite the crash).

The accounts served over TCP, loaded, and checked from outside::

    trio-aggregates load --serve examples/bank.py:app
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import attrs
import trio

from trio_aggregates import (
    Aggregate,
    AggregateRepository,
    CallTimeout,
    CommandRejected,
    ConcurrencyConflict,
    Decision,
    DuplicateCommand,
    EventContext,
    EventStore,
    ProcessManager,
    Projection,
    ProjectionRunner,
    StoreError,
    applies,
    event_type,
    handles,
    open_aggregates,
    open_projections,
    open_store,
    projects,
    reacts,
)

# -- accounts: commands ------------------------------------------------------


@attrs.frozen
class OpenAccount:
    owner: str
    overdraft_limit: int = 0


@attrs.frozen
class Deposit:
    amount: int
    reference: str | None = None


@attrs.frozen
class Withdraw:
    amount: int
    reference: str | None = None


@attrs.frozen
class CloseAccount:
    pass


@attrs.frozen
class GetBalance:
    pass


# -- accounts: events --------------------------------------------------------


@event_type("account.opened")
@attrs.frozen
class AccountOpened:
    owner: str
    overdraft_limit: int


@event_type("account.deposited")
@attrs.frozen
class Deposited:
    amount: int
    reference: str | None = None


@event_type("account.withdrawn")
@attrs.frozen
class Withdrawn:
    amount: int
    reference: str | None = None


@event_type("account.closed")
@attrs.frozen
class AccountClosed:
    pass


# -- accounts: domain errors -------------------------------------------------


class InvalidAmount(CommandRejected):
    """Amounts are positive whole cents."""


class InsufficientFunds(CommandRejected):
    """The withdrawal would take the balance below the overdraft limit."""


class AccountIsClosed(CommandRejected):
    """The account is closed: no more movements."""


class BalanceNotZero(CommandRejected):
    """Only an account with a zero balance can be closed."""


@attrs.define
class Account(Aggregate):
    """A bank account. Amounts are in cents."""

    snapshot_every = 50

    owner: str = ""
    balance: int = 0
    overdraft_limit: int = 0
    closed: bool = False

    @handles
    def open(self, command: OpenAccount) -> AccountOpened:
        if command.overdraft_limit < 0:
            raise InvalidAmount(f"overdraft limit {command.overdraft_limit} < 0")
        return AccountOpened(command.owner, command.overdraft_limit)

    @handles
    def deposit(self, command: Deposit) -> Deposited:
        self._check_movement(command.amount)
        return Deposited(command.amount, command.reference)

    @handles
    def withdraw(self, command: Withdraw) -> Withdrawn:
        self._check_movement(command.amount)
        if self.balance - command.amount < -self.overdraft_limit:
            raise InsufficientFunds(
                f"balance {self.balance}, overdraft {self.overdraft_limit}, asked {command.amount}"
            )
        return Withdrawn(command.amount, command.reference)

    @handles
    def close(self, command: CloseAccount) -> AccountClosed:
        if self.closed:
            raise AccountIsClosed("already closed")
        if self.balance != 0:
            raise BalanceNotZero(f"balance is {self.balance}")
        return AccountClosed()

    @handles
    def get_balance(self, command: GetBalance) -> Decision:
        return Decision(reply=self.balance)

    def _check_movement(self, amount: int) -> None:
        if self.closed:
            raise AccountIsClosed("the account is closed")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise InvalidAmount(f"amount must be a positive int, not {amount!r}")

    @applies
    def opened(self, event: AccountOpened) -> None:
        self.owner = event.owner
        self.overdraft_limit = event.overdraft_limit

    @applies
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount

    @applies
    def withdrawn(self, event: Withdrawn) -> None:
        self.balance -= event.amount

    @applies
    def was_closed(self, event: AccountClosed) -> None:
        self.closed = True


async def transfer(
    accounts: AggregateRepository[Account], source: str, target: str, amount: int
) -> bool:
    """Move ``amount`` from ``source`` to ``target`` directly; return whether it happened.

    The naive transfer, kept for comparison: two commands on two aggregates
    from one task, the withdrawal first, and a compensating deposit if the
    deposit is refused. Both carry the transfer's id, so the streams tell the
    story. It is *not* crash safe: a crash (or Ctrl-C) between the two
    commands loses the money, withdrawn and never deposited. :func:`run_bank`
    uses the saga below instead.
    """
    reference = f"transfer:{uuid.uuid4().hex}"
    try:
        await accounts.execute(source, Withdraw(amount, reference), correlation_id=reference)
    except CommandRejected:
        return False
    try:
        await accounts.execute(target, Deposit(amount, reference), correlation_id=reference)
    except CommandRejected:
        await accounts.execute(source, Deposit(amount, f"refund:{reference}"))
        return False
    return True


# -- users (the original's example app) --------------------------------------


@attrs.frozen
class RegisterUser:
    name: str
    email: str


@attrs.frozen
class ChangeEmail:
    email: str


@attrs.frozen
class DeactivateUser:
    reason: str = ""


@event_type("user.registered")
@attrs.frozen
class UserRegistered:
    name: str
    email: str


@event_type("user.email_changed")
@attrs.frozen
class EmailChanged:
    old: str
    new: str


@event_type("user.deactivated")
@attrs.frozen
class UserDeactivated:
    reason: str


class InvalidEmail(CommandRejected):
    """The e-mail address does not look like one."""


class UserInactive(CommandRejected):
    """The user was deactivated."""


@attrs.define
class User(Aggregate):
    name: str = ""
    email: str = ""
    active: bool = False

    @handles
    def register(self, command: RegisterUser) -> UserRegistered:
        _check_email(command.email)
        return UserRegistered(command.name, command.email)

    @handles
    def change_email(self, command: ChangeEmail) -> list[EmailChanged]:
        if not self.active:
            raise UserInactive(self.name)
        _check_email(command.email)
        if command.email == self.email:
            return []  # nothing to do: no event, the version stays
        return [EmailChanged(self.email, command.email)]

    @handles
    def deactivate(self, command: DeactivateUser) -> UserDeactivated:
        if not self.active:
            raise UserInactive(self.name)
        return UserDeactivated(command.reason)

    @applies
    def registered(self, event: UserRegistered) -> None:
        self.name, self.email, self.active = event.name, event.email, True

    @applies
    def email_changed(self, event: EmailChanged) -> None:
        self.email = event.new

    @applies
    def deactivated(self, event: UserDeactivated) -> None:
        self.active = False


def _check_email(email: str) -> None:
    local, at, domain = email.partition("@")
    if not (local and at and "." in domain):
        raise InvalidEmail(f"{email!r} is not an e-mail address")


# -- the transfer: commands -------------------------------------------------------


@attrs.frozen
class RequestTransfer:
    source: str
    target: str
    amount: int


@attrs.frozen
class RecordWithdrawal:
    pass


@attrs.frozen
class RejectTransfer:
    reason: str


@attrs.frozen
class RecordDeposit:
    pass


@attrs.frozen
class FailDeposit:
    reason: str


@attrs.frozen
class RecordRefund:
    pass


# -- the transfer: events -----------------------------------------------------------


@event_type("transfer.requested")
@attrs.frozen
class TransferRequested:
    source: str
    target: str
    amount: int


@event_type("transfer.withdrawn")
@attrs.frozen
class TransferWithdrawn:
    source: str
    target: str
    amount: int


@event_type("transfer.rejected")
@attrs.frozen
class TransferRejected:
    reason: str


@event_type("transfer.deposited")
@attrs.frozen
class TransferDeposited:
    pass


@event_type("transfer.completed")
@attrs.frozen
class TransferCompleted:
    pass


@event_type("transfer.deposit_failed")
@attrs.frozen
class TransferDepositFailed:
    source: str
    amount: int
    reason: str


@event_type("transfer.refunded")
@attrs.frozen
class TransferRefunded:
    pass


class WrongStep(CommandRejected):
    """The transfer is not at the step this command moves it from."""


#: Where a transfer can end.
SETTLED = frozenset({"completed", "refunded", "rejected"})


@attrs.define
class Transfer(Aggregate):
    """A transfer's progress: ``new``, ``requested``, ``withdrawn``, then ``completed``,
    or ``deposit_failed`` then ``refunded``; or ``rejected`` (nothing moved)."""

    state: str = "new"
    source: str = ""
    target: str = ""
    amount: int = 0
    reason: str = ""

    def _expect(self, state: str) -> None:
        if self.state != state:
            raise WrongStep(f"the transfer is {self.state}, not {state}")

    @handles
    def request(self, command: RequestTransfer) -> TransferRequested:
        self._expect("new")
        if command.amount <= 0 or command.source == command.target:
            raise CommandRejected(f"not a transfer: {command!r}")
        return TransferRequested(command.source, command.target, command.amount)

    @handles
    def withdrawn(self, command: RecordWithdrawal) -> TransferWithdrawn:
        self._expect("requested")
        return TransferWithdrawn(self.source, self.target, self.amount)

    @handles
    def reject(self, command: RejectTransfer) -> TransferRejected:
        self._expect("requested")
        return TransferRejected(command.reason)

    @handles
    def deposited(self, command: RecordDeposit) -> list[object]:
        self._expect("withdrawn")
        return [TransferDeposited(), TransferCompleted()]

    @handles
    def deposit_failed(self, command: FailDeposit) -> TransferDepositFailed:
        self._expect("withdrawn")
        return TransferDepositFailed(self.source, self.amount, command.reason)

    @handles
    def refunded(self, command: RecordRefund) -> TransferRefunded:
        self._expect("deposit_failed")
        return TransferRefunded()

    @applies
    def on_requested(self, event: TransferRequested) -> None:
        self.state = "requested"
        self.source, self.target, self.amount = event.source, event.target, event.amount

    @applies
    def on_withdrawn(self, event: TransferWithdrawn) -> None:
        self.state = "withdrawn"

    @applies
    def on_rejected(self, event: TransferRejected) -> None:
        self.state, self.reason = "rejected", event.reason

    @applies
    def on_deposited(self, event: TransferDeposited) -> None:
        self.state = "deposited"

    @applies
    def on_completed(self, event: TransferCompleted) -> None:
        self.state = "completed"

    @applies
    def on_deposit_failed(self, event: TransferDepositFailed) -> None:
        self.state, self.reason = "deposit_failed", event.reason

    @applies
    def on_refunded(self, event: TransferRefunded) -> None:
        self.state = "refunded"


# -- the saga --------------------------------------------------------------------


class TransferSaga(ProcessManager):
    """Drives every transfer from its request to completion or refund."""

    reads = (Transfer,)
    categories = ("Transfer",)

    def __init__(
        self,
        accounts: AggregateRepository[Account],
        transfers: AggregateRepository[Transfer],
        *,
        timeout: float = 30.0,
    ) -> None:
        self.accounts = accounts
        self.transfers = transfers
        self.timeout = timeout

    async def _at(self, key: str, state: str) -> Transfer | None:
        """The transfer, if it is still at ``state`` (else this step is done: ``None``)."""
        transfer = await self.transfers.load(key, timeout=self.timeout)
        return transfer if transfer.state == state else None

    async def _move(self, key: str, command: object, ctx: EventContext, step: str) -> None:
        await self.transfers.execute(
            key, command, command_id=ctx.command_id(step), timeout=self.timeout
        )

    @reacts
    async def requested(self, event: TransferRequested, ctx: EventContext) -> None:
        if await self._at(ctx.key, "requested") is None:
            return
        reference = f"transfer:{ctx.key}"
        try:
            await self.accounts.execute(
                event.source,
                Withdraw(event.amount, reference),
                command_id=ctx.command_id("withdraw"),
                correlation_id=reference,
                timeout=self.timeout,
            )
        except CommandRejected as exc:
            # A refusal is final (the runtime looks the id up before refusing).
            await self._move(ctx.key, RejectTransfer(str(exc)), ctx, "rejected")
            return
        # A store error or a conflict: the saga runs this again, with the same id.
        await self._move(ctx.key, RecordWithdrawal(), ctx, "withdrawn")

    @reacts
    async def withdrawn(self, event: TransferWithdrawn, ctx: EventContext) -> None:
        if await self._at(ctx.key, "withdrawn") is None:
            return
        reference = f"transfer:{ctx.key}"
        deposit_id = ctx.command_id("deposit")
        stream = Account.stream_name(event.target)
        store = self.accounts.store
        reason = ""
        prior = await store.find_command(stream, deposit_id)
        if prior is not None:  # an earlier run got that far: deposited, or fenced
            deposited = await _applied(store, stream, prior, deposit_id)
            reason = "" if deposited else "the deposit failed (an earlier run fenced it)"
        else:
            try:
                await self.accounts.execute(
                    event.target,
                    Deposit(event.amount, reference),
                    command_id=deposit_id,
                    correlation_id=reference,
                    timeout=self.timeout,
                )
                deposited = True
            except CommandRejected as exc:
                deposited, reason = False, f"refused: {exc}"
            except (ConcurrencyConflict, StoreError, CallTimeout) as exc:
                deposited = await _fence(store, stream, deposit_id)
                reason = "" if deposited else f"failed: {exc!r}"
        if deposited:
            await self._move(ctx.key, RecordDeposit(), ctx, "deposited")
        else:
            await self._move(ctx.key, FailDeposit(reason), ctx, "deposit_failed")

    @reacts
    async def deposit_failed(self, event: TransferDepositFailed, ctx: EventContext) -> None:
        if await self._at(ctx.key, "deposit_failed") is None:
            return
        await self.accounts.execute(
            event.source,
            Deposit(event.amount, f"refund:transfer:{ctx.key}"),
            command_id=ctx.command_id("refund"),
            correlation_id=f"transfer:{ctx.key}",
            timeout=self.timeout,
        )
        await self._move(ctx.key, RecordRefund(), ctx, "refunded")


async def _applied(store: EventStore, stream: str, version: int, command_id: str) -> bool:
    """Whether the append that recorded ``command_id`` at ``version`` stored events
    (a deposit) rather than nothing (a fence): its last event carries the id."""
    if version == 0:
        return False
    events = await store.read(stream, from_version=version, limit=1)
    if not events:
        return False
    return bool(json.loads(events[0].metadata).get("command_id") == command_id)


async def _fence(store: EventStore, stream: str, command_id: str) -> bool:
    """Make sure the command ``command_id`` is never applied to ``stream`` from now on;
    return whether it already was.

    An empty append with the id records it (the store keeps command ids in the
    append's transaction): a deposit still in flight or retried later with
    that id is refused as a duplicate, and applies nothing.
    """
    try:
        await store.append(stream, [], expected_version=None, command_id=command_id)
    except DuplicateCommand as exc:
        return await _applied(store, stream, exc.version, command_id)
    return False


# -- a read model: every account's balance -------------------------------------------


class Balances(Projection):
    """Every account's balance, in a table ``bank_balances`` of the store's own
    database (written in the transaction that stores the projection's
    checkpoint: exactly once, even after a crash); in this object's
    ``memory`` for the in-memory store."""

    reads = (Account,)
    categories = ("Account",)

    def __init__(self) -> None:
        self.memory: dict[str, int] = {}

    def setup(self, db: Any) -> None:
        if db is not None:
            db.execute(
                "CREATE TABLE IF NOT EXISTS bank_balances "
                "(account TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
            )

    def clear(self, db: Any) -> None:
        self.memory.clear()
        if db is not None:
            db.execute("DELETE FROM bank_balances")

    @projects
    def deposited(self, event: Deposited, ctx: EventContext) -> None:
        self._add(ctx, event.amount)

    @projects
    def withdrawn(self, event: Withdrawn, ctx: EventContext) -> None:
        self._add(ctx, -event.amount)

    def _add(self, ctx: EventContext, cents: int) -> None:
        if ctx.db is None:
            self.memory[ctx.key] = self.memory.get(ctx.key, 0) + cents
            return
        mark = "?" if isinstance(ctx.db, sqlite3.Connection) else "%s"  # SQLite, psycopg
        ctx.db.execute(
            f"INSERT INTO bank_balances (account, cents) VALUES ({mark}, {mark}) "
            "ON CONFLICT (account) DO UPDATE SET cents = bank_balances.cents + excluded.cents",
            (ctx.key, cents),
        )

    async def read(self, store: EventStore) -> dict[str, int]:
        """The read model: account key -> balance."""
        path = getattr(store, "path", None)
        conninfo = getattr(store, "conninfo", None)
        query = "SELECT account, cents FROM bank_balances"

        def from_sqlite(path: str) -> list[Any]:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return db.execute(query).fetchall()

        def from_postgres(conninfo: str) -> list[Any]:
            import psycopg

            with psycopg.connect(conninfo) as conn:
                return conn.execute(query).fetchall()

        if isinstance(path, str) and path != ":memory:":
            rows = await trio.to_thread.run_sync(from_sqlite, path)
        elif isinstance(conninfo, str):
            rows = await trio.to_thread.run_sync(from_postgres, conninfo)
        else:
            return dict(self.memory)
        return {key: int(cents) for key, cents in rows}


#: The app: what ``trio-aggregates serve examples/bank.py:app`` serves over TCP (wire type
#: names ``Account`` and ``User``, command names the command classes' names). ``Transfer``
#: is not in it: the server runs no process manager, so a transfer requested over TCP
#: would wait for a ``TransferSaga`` run elsewhere on the same store.
app = [Account, User]


# -- the run --------------------------------------------------------------------------

#: Each account's first deposit, in cents.
INITIAL = 1000
#: Each account's overdraft limit: enough that only the oversized transfers are refused.
CREDIT_LINE = 10_000
#: What an oversized transfer asks for: always refused (insufficient funds).
TOO_MUCH = 10**8


async def run_bank(
    store_url: str | EventStore,
    *,
    run: str = "demo",
    accounts_count: int = 100,
    transfers: int = 2000,
    tasks: int = 50,
    timeout: float = 300.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Open accounts, request transfers, let the saga settle them, check the books.

    Every step is idempotent (command ids derived from ``run``), so running it
    again after a crash with the same ``run`` finishes the same transfers; a
    run that was complete only checks the books again. One transfer in ten
    goes to a closed account (its deposit is refused: refunded), one in
    twenty-five asks for too much (rejected: nothing moved).

    Raises:
        trio.TooSlowError: the saga did not settle every transfer within ``timeout``.
        RuntimeError: the saga or the projection failed (its error as the message).
    """
    keys = [f"{run}-account-{i}" for i in range(accounts_count)]
    closed = f"{run}-closed"  # deposits into it are refused: those transfers are refunded
    transfer_keys = [f"{run}-{i}" for i in range(transfers)]
    step = max(20, transfers // 20)
    started = time.perf_counter()

    def say(line: str) -> None:
        if progress:
            print(line, flush=True)

    async with AsyncExitStack() as stack:
        if isinstance(store_url, str):
            store = await stack.enter_async_context(open_store(store_url))
        else:
            store = store_url
        accounts = await stack.enter_async_context(open_aggregates(Account, store))
        transfer_repo = await stack.enter_async_context(open_aggregates(Transfer, store))
        saga = TransferSaga(accounts, transfer_repo)
        balances_view = Balances()
        async with open_projections(store, [saga, balances_view], poll_interval=0.2) as runner:
            # The accounts (again, after a restart: the command ids make it a no-op).
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(_open_account, accounts, key)
            await accounts.execute(
                closed, OpenAccount("nobody"), create_if_missing=True, command_id=f"{closed}:open"
            )
            await accounts.execute(closed, CloseAccount(), command_id=f"{closed}:close")
            say("accounts ready")

            requested = 0

            async def request(task: int) -> None:
                nonlocal requested
                for i in range(task, transfers, tasks):
                    source = keys[(i * 7) % accounts_count]
                    target = keys[(i * 13 + 1) % accounts_count]
                    if target == source:
                        target = keys[(i * 13 + 2) % accounts_count]
                    if i % 10 == 9:
                        target = closed
                    amount = TOO_MUCH if i % 25 == 24 else 1 + i % 300
                    await transfer_repo.execute(
                        transfer_keys[i],
                        RequestTransfer(source, target, amount),
                        create_if_missing=True,
                        command_id=f"{transfer_keys[i]}:request",
                    )
                    requested += 1
                    if requested % step == 0:
                        say(f"requested {requested}/{transfers}")

            async with trio.open_nursery() as nursery:
                for task in range(tasks):
                    nursery.start_soon(request, task)
            say("transfers requested")

            # Wait until the saga settled every transfer.
            pending = set(transfer_keys)
            states: dict[str, str] = {}
            rounds = 0
            with trio.fail_after(timeout):
                while pending:
                    for key in list(pending):
                        state = (await transfer_repo.load(key, fresh=False)).state
                        if state in SETTLED:
                            pending.discard(key)
                            states[key] = state
                    _check_running(runner)
                    if pending:
                        rounds += 1
                        if rounds % 10 == 0:
                            say(f"settled {len(states)}/{transfers}")
                        await trio.sleep(0.1)
                say(f"settled {len(states)}/{transfers}")
                await runner.wait_caught_up()
            _check_running(runner)
            projected = await balances_view.read(store)

        # The books.
        balances = {key: await accounts.execute(key, GetBalance()) for key in [*keys, closed]}
        for key in [*keys, closed]:
            live = await accounts.load(key)
            replayed, _ = await accounts.replay(key)
            assert live == replayed, f"{key}: live {live} != replay {replayed}"
        statistics = accounts.registry.statistics()
    counts = {state: sum(1 for s in states.values() if s == state) for state in sorted(SETTLED)}
    return {
        "accounts": accounts_count,
        "transfers": transfers,
        "states": counts,
        "total_balance": sum(balances.values()),
        "expected_total": INITIAL * accounts_count,
        "closed_balance": balances[closed],
        "projection_agrees": all(projected.get(k, 0) == v for k, v in balances.items()),
        "activations": statistics.activations,
        "seconds": time.perf_counter() - started,
    }


def _check_running(runner: ProjectionRunner) -> None:
    for name, stats in runner.statistics().items():
        if stats.state == "failed":
            raise RuntimeError(f"{name} stopped: {stats.error!r}")


async def _open_account(accounts: AggregateRepository[Account], key: str) -> None:
    await accounts.execute(
        key,
        OpenAccount(f"owner of {key}", CREDIT_LINE),
        create_if_missing=True,
        command_id=f"{key}:open",
    )
    await accounts.execute(key, Deposit(INITIAL, "initial"), command_id=f"{key}:initial")


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt, or an exception group holding one."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return any(_interrupted(e) for e in getattr(exc, "exceptions", ()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///bank.db", help="event store URL")
    parser.add_argument("--run", default="demo", help="the run's name (same name: same run)")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--transfers", type=int, default=2000)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args()
    try:
        summary = trio.run(
            lambda: run_bank(
                args.store,
                run=args.run,
                accounts_count=args.accounts,
                transfers=args.transfers,
                progress=not args.quiet,
            )
        )
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("interrupted: run again with the same --run to finish", flush=True)
        raise SystemExit(130) from None
    states = summary["states"]
    print(
        f"{summary['accounts']} accounts, {summary['transfers']} transfers in "
        f"{summary['seconds']:.2f} s on {args.store}: {states['completed']} completed, "
        f"{states['refunded']} refunded, {states['rejected']} rejected; total balance "
        f"{summary['total_balance']} (expected {summary['expected_total']})"
    )
    if sum(states.values()) != summary["transfers"]:
        raise SystemExit("some transfers are not settled!")
    if summary["total_balance"] != summary["expected_total"] or summary["closed_balance"]:
        raise SystemExit("the books do not balance!")
    if not summary["projection_agrees"]:
        raise SystemExit("the balances projection does not match the accounts!")
    print("every transfer completed, refunded or rejected; the books balance")
    print("the balances projection equals every account's balance")
    print("every live account equals a replay of its stream")


if __name__ == "__main__":
    main()
