"""Given/when/then tests of an aggregate's decisions: pure, no Trio, no store.

A scenario replays past events into a fresh state, runs one command's handler
on it, and compares what the handler decided with what the test expects,
checking on the way the rules of ``_aggregate.py`` that a hand-written test
tends to forget: the handler leaves the state alone, and the appliers accept
every event the handler produced.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, Final, Generic, TypeVar, final, overload

import attrs

from .._core._exceptions import CommandRejected, InvalidArgument
from .._runtime._aggregate import Aggregate, Decision

__all__ = ["Expectation", "Scenario", "scenario"]

A = TypeVar("A", bound=Aggregate)
E = TypeVar("E", bound=BaseException)

#: How many given events a failure message lists before it abbreviates.
_SHOWN: Final = 12


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


_UNCHECKED: Final[Any] = _Unchecked()


def scenario(aggregate_type: type[A]) -> Scenario[A]:
    """Start a given/when/then test of ``aggregate_type``'s decisions.

    ::

        scenario(Account).given(Opened("ann"), Deposited(100)).when(Withdraw(30)).then(
            Withdrawn(30)
        )
        scenario(Account).given(Opened("ann")).when(Withdraw(1)).then_rejects(
            InsufficientFunds, match="balance 0"
        )

    Nothing runs until :meth:`Expectation.then` or
    :meth:`Expectation.then_rejects`: a scenario is an immutable value, so a
    shared beginning (``opened = scenario(Account).given(Opened("ann"))``)
    can be reused by many tests. No Trio, no store, no registry: the handler
    and the appliers are called directly, as the runtime calls them.

    Raises:
        InvalidArgument: ``aggregate_type`` is not an :class:`Aggregate` subclass.
    """
    if not (isinstance(aggregate_type, type) and issubclass(aggregate_type, Aggregate)):
        raise InvalidArgument(f"{aggregate_type!r} is not an Aggregate subclass")
    return Scenario(aggregate_type)


@final
@attrs.frozen
class Scenario(Generic[A]):
    """The *given* part: an aggregate type and the events of its past (made by :func:`scenario`).

    Attributes:
        aggregate_type: the :class:`Aggregate` subclass under test.
        history: the given events, oldest first (versions 1, 2, ...).
    """

    aggregate_type: type[A]
    history: tuple[object, ...] = ()

    def given(self, *events: object) -> Scenario[A]:
        """A scenario whose past also holds ``events`` (after those already given).

        Raises:
            InvalidArgument: the events were given as one list or tuple.
        """
        _check_unpacked("given", events)
        return Scenario(self.aggregate_type, (*self.history, *events))

    def when(self, command: object) -> Expectation[A]:
        """The *when* part: the command whose handler the test runs."""
        return Expectation(self, command)

    def state(self) -> A:
        """The state the given events build (a fresh one at each call).

        Raises:
            AssertionError: an applier raised on a given event (the message
                says which).
        """
        __tracebackhide__ = True
        state = self.aggregate_type()
        for number, event in enumerate(self.history, 1):
            try:
                state.apply(event)
            except Exception as exc:
                raise AssertionError(
                    f"{self.aggregate_type.__name__}: applying given event {number} "
                    f"({event!r}) raised {exc!r}"
                ) from exc
        return state


@final
@attrs.frozen
class Expectation(Generic[A]):
    """A scenario with its command: end it with :meth:`then` or :meth:`then_rejects`.

    Attributes:
        scenario: the given part.
        command: the command under test.
    """

    scenario: Scenario[A]
    command: object

    def then(self, *events: object, reply: Any = _UNCHECKED) -> A:
        """Assert that the command is accepted and decides exactly ``events``, in order.

        ``then()`` with no events asserts that the command stores nothing.
        The decided events are then applied to the state, as the runtime
        does: an applier that raises on them fails the assertion too.

        Args:
            events: the expected events (compared with ``==``).
            reply: if given, what :meth:`AggregateRepository.execute` would
                return: the handler's own reply (see :class:`Decision`), or,
                if it chose none, the version after the command (the number
                of given events plus the decided ones).

        Returns:
            The state after the command's events: assert on it further.

        Raises:
            InvalidArgument: the events were given as one list or tuple.
            AssertionError: the handler raised (a rejection included), decided
                other events or another reply, changed the state it decided
                on, or an applier raised. The message shows the expected and
                the actual events; the handler's exception is the
                ``__cause__``.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not this helper's
        _check_unpacked("then", events)
        state, decision = self._decide()
        if not isinstance(decision, Decision):
            raise AssertionError(
                f"{self._header()}\n{_listing('expected', events)}\n"
                f"but the handler raised {decision!r}"
            ) from decision
        actual = decision.events
        if actual != events:
            raise AssertionError(
                f"{self._header()}\n{_listing('expected', events)}\n"
                f"{_listing('but it decided', actual, _first_difference(events, actual))}"
            )
        version = len(self.scenario.history)
        for event in actual:
            version += 1
            try:
                state.apply(event)
            except Exception as exc:
                raise AssertionError(
                    f"{self._header()}\napplying decided event {version} ({event!r}) raised "
                    f"{exc!r}: an applier must accept every event its handlers produce"
                ) from exc
        if reply is not _UNCHECKED:
            actual_reply = decision.reply if decision.has_reply else version
            if actual_reply != reply:
                what = "replied" if decision.has_reply else "chose no reply, so execute returns"
                raise AssertionError(
                    f"{self._header()}\nexpected the reply {reply!r}, "
                    f"but the handler {what} {actual_reply!r}"
                )
        return state

    @overload
    def then_rejects(self, *, match: str | re.Pattern[str] | None = None) -> CommandRejected: ...
    @overload
    def then_rejects(self, error: type[E], *, match: str | re.Pattern[str] | None = None) -> E: ...

    def then_rejects(
        self,
        error: type[BaseException] = CommandRejected,
        *,
        match: str | re.Pattern[str] | None = None,
    ) -> BaseException:
        """Assert that the handler refuses the command with ``error`` (or a subclass).

        Args:
            error: the expected exception class, by default any
                :class:`CommandRejected`.
            match: a regular expression that must match (``re.search``) the
                exception's ``str``, as in ``pytest.raises``.

        Returns:
            The exception raised, for further checks.

        Raises:
            AssertionError: the command was accepted (the message lists the
                decided events), the handler raised another exception (the
                ``__cause__``), the message does not match, or the handler
                changed the state while refusing.
        """
        __tracebackhide__ = True
        if not (isinstance(error, type) and issubclass(error, BaseException)):
            raise InvalidArgument(f"then_rejects takes an exception class, not {error!r}")
        _, outcome = self._decide()
        if isinstance(outcome, Decision):
            raise AssertionError(
                f"{self._header()}\nexpected a rejection with {error.__name__}, "
                f"but the command was accepted\n{_listing('it decided', outcome.events)}"
                + (f"\nand replied {outcome.reply!r}" if outcome.has_reply else "")
            )
        if not isinstance(outcome, error):
            raise AssertionError(
                f"{self._header()}\nexpected a rejection with {error.__name__}, "
                f"but the handler raised {outcome!r}"
            ) from outcome
        if match is not None and not re.search(match, str(outcome)):
            pattern = match.pattern if isinstance(match, re.Pattern) else match
            raise AssertionError(
                f"{self._header()}\nrejected with {type(outcome).__name__} as expected, but its "
                f"message {str(outcome)!r} does not match {pattern!r}"
            ) from outcome
        return outcome

    def _decide(self) -> tuple[A, Decision | Exception]:
        """Run the handler on the given state: (state, decision or the exception raised)."""
        __tracebackhide__ = True
        state = self.scenario.state()
        before = _copy_for_comparison(state)
        try:
            outcome: Decision | Exception = state.decide(self.command)
        except Exception as exc:
            outcome = exc
        if before is not None and state != before:
            raise AssertionError(
                f"{self._header()}\nthe handler changed the state it decided on:\n"
                f"  before: {before!r}\n  after:  {state!r}\n"
                f"a handler must not change self (the runtime applies the events itself)"
            )
        return state, outcome

    def _header(self) -> str:
        history = self.scenario.history
        name = self.scenario.aggregate_type.__name__
        if not history:
            given = "given no events"
        else:
            shown = history[-_SHOWN:]
            skipped = len(history) - len(shown)
            lines = [f"given {_count(len(history))}:"]
            if skipped:
                lines.append(f"  ... ({skipped} earlier)")
            lines += [f"  {n}. {e!r}" for n, e in enumerate(shown, skipped + 1)]
            given = "\n".join(lines)
        return f"{name} {given}\nwhen {self.command!r}:"


def _check_unpacked(method: str, events: tuple[object, ...]) -> None:
    """Refuse ``given([e1, e2])`` and ``then([e1])``: events are separate arguments."""
    if len(events) == 1 and isinstance(events[0], list | tuple):
        raise InvalidArgument(
            f"{method}() takes the events as separate arguments: {method}(*events), "
            f"not {method}({events[0]!r})"
        )


def _count(n: int) -> str:
    return f"{n} event" if n == 1 else f"{n} events"


def _listing(what: str, events: Sequence[object], mark: int | None = None) -> str:
    if not events:
        return f"{what} no events"
    lines = [f"{what} {_count(len(events))}:"]
    for index, event in enumerate(events):
        flag = "   <-- first difference" if index == mark else ""
        lines.append(f"  {index + 1}. {event!r}{flag}")
    return "\n".join(lines)


def _first_difference(expected: Sequence[object], actual: Sequence[object]) -> int | None:
    for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if want != got:
            return index
    return min(len(expected), len(actual)) if len(actual) > len(expected) else None


def _copy_for_comparison(state: Aggregate) -> Aggregate | None:
    """A deep copy to compare the state with after deciding, or ``None`` if that
    cannot tell anything (the class compares by identity, or cannot be copied)."""
    if type(state).__eq__ is object.__eq__:
        return None
    try:
        return copy.deepcopy(state)
    except Exception:
        return None
