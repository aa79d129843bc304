"""The admission book, deadlines and log budget, on plain values."""

from __future__ import annotations

import pytest

from common.config import ServerLimits
from fl_server.admission import (
    Book,
    Deadlines,
    Decision,
    Entry,
    LogBudget,
    Phase,
    Reason,
    Verdict,
    close_line,
)

DEADLINES = Deadlines(handshake_s=2.0, head_s=5.0, idle_s=30.0)


def test_below_the_limit_every_newcomer_is_taken() -> None:
    book: Book[str] = Book(3)
    for i, key in enumerate("abc"):
        assert book.admit() == Verdict(Decision.TAKE)
        book.add(key, float(i), Phase.HEAD)
    assert len(book) == 3


def test_at_the_limit_the_oldest_pending_connection_makes_room() -> None:
    book: Book[str] = Book(4)
    book.add("site", 0.0, Phase.HANDSHAKE)
    book.add("flood-1", 1.0, Phase.HANDSHAKE)
    book.add("flood-2", 2.0, Phase.HEAD)
    book.add("admin", 3.0, Phase.HANDSHAKE)
    book.advance("site", Phase.AUTHENTICATED)
    book.advance("flood-1", Phase.HEAD)  # a finished handshake keeps its place in line
    book.advance("admin", Phase.AUTHENTICATED)
    assert book.admit() == Verdict(Decision.EVICT, "flood-1")
    book.remove("flood-1")
    book.add("flood-3", 4.0, Phase.HANDSHAKE)
    assert book.admit() == Verdict(Decision.EVICT, "flood-2")
    book.remove("flood-2")
    book.add("flood-4", 5.0, Phase.HANDSHAKE)
    assert book.admit() == Verdict(Decision.EVICT, "flood-3")


def test_only_when_all_are_authenticated_is_a_newcomer_busy() -> None:
    book: Book[str] = Book(2)
    for key in ("site", "admin"):
        book.add(key, 0.0, Phase.HEAD)
        book.advance(key, Phase.AUTHENTICATED)
    assert book.admit() == Verdict(Decision.BUSY)
    # the busy newcomer holds a slot until answered, and is the next to make room
    book.add("late", 1.0, Phase.HEAD)
    assert len(book) == 3
    assert book.admit() == Verdict(Decision.EVICT, "late")
    book.remove("site")
    book.remove("late")
    assert book.admit() == Verdict(Decision.TAKE)


def test_removal_is_idempotent_and_advance_ignores_the_gone() -> None:
    book: Book[str] = Book(2)
    book.add("a", 0.0, Phase.HEAD)
    assert book.remove("a") == Entry(0.0, Phase.HEAD)
    assert book.remove("a") is None
    assert book.advance("a", Phase.AUTHENTICATED) is None
    assert book.entry("a") is None and len(book) == 0


def test_an_authenticated_connection_does_not_go_back() -> None:
    book: Book[str] = Book(2)
    book.add("a", 0.0, Phase.HEAD)
    book.advance("a", Phase.AUTHENTICATED)
    assert book.advance("a", Phase.HEAD) is None  # only pending ones advance
    assert book.entry("a") == Entry(0.0, Phase.AUTHENTICATED)
    assert book.statistics().authenticated == 1 and book.statistics().pending == 0


def test_a_connection_is_added_once_and_never_as_authenticated() -> None:
    book: Book[str] = Book(2)
    book.add("a", 0.0, Phase.HEAD)
    with pytest.raises(ValueError, match="already"):
        book.add("a", 1.0, Phase.HEAD)
    with pytest.raises(ValueError, match="authenticated"):
        book.add("b", 1.0, Phase.AUTHENTICATED)


def test_deadlines_by_phase() -> None:
    shake = Entry(10.0, Phase.HANDSHAKE)
    head = Entry(10.0, Phase.HEAD)
    done = Entry(10.0, Phase.AUTHENTICATED)
    assert DEADLINES.due(shake) == 12.0
    assert DEADLINES.due(head) == 15.0
    assert DEADLINES.due(done) is None
    assert DEADLINES.overdue(shake, 11.9) is None
    assert DEADLINES.overdue(shake, 12.0) is Reason.HANDSHAKE_TIMEOUT
    assert DEADLINES.overdue(head, 12.0) is None  # the handshake ended in time
    assert DEADLINES.overdue(head, 15.0) is Reason.HEAD_TIMEOUT
    assert DEADLINES.overdue(done, 1e9) is None


def test_the_handshake_bound_is_the_smaller_of_the_two_settings() -> None:
    old = ServerLimits(tls_handshake_timeout_s=30)  # a config from before the head deadline
    assert Deadlines.from_limits(old) == Deadlines(15.0, 15.0, 75.0)
    tight = ServerLimits(tls_handshake_timeout_s=1, request_head_timeout_s=4, idle_timeout_s=9)
    assert Deadlines.from_limits(tight) == Deadlines(1.0, 4.0, 9.0)


@pytest.mark.parametrize(
    ("in_requests", "since", "idle"),
    [(0, 30.0, True), (0, 29.9, False), (1, 100.0, False)],
)
def test_a_close_counts_as_idle_only_between_requests_and_after_the_bound(
    in_requests: int, since: float, idle: bool
) -> None:
    assert DEADLINES.closed_when_idle(in_requests=in_requests, since_last_request_s=since) is idle


def test_the_log_budget_allows_a_burst_per_kind_and_window_and_counts_the_rest() -> None:
    budget: LogBudget[Reason] = LogBudget(burst=2, window_s=10.0)
    ev, to = Reason.EVICTED, Reason.HEAD_TIMEOUT
    assert [budget.allow(ev, 0.0 + i / 10) for i in range(5)] == [True, True, False, False, False]
    assert budget.allow(to, 1.0)  # another kind has its own budget
    assert budget.take_held_back(ev) == 3
    assert budget.take_held_back(ev) == 0
    assert not budget.allow(ev, 9.9)
    assert budget.allow(ev, 10.0)  # a new window
    assert budget.take_held_back(ev) == 1
    assert budget.take_held_back(to) == 0


def test_close_lines_name_the_peer_the_wait_and_the_setting() -> None:
    entry = Entry(10.0, Phase.HANDSHAKE)
    assert close_line(Reason.EVICTED, "1.2.3.4:5", entry, 10.5, 64) == (
        "closed connection from 1.2.3.4:5: to make room for a new one: 64 connections open "
        "(limits.max_connections) and this one not authenticated after 0.5 s (handshake)"
    )
    assert "TLS handshake not done 2.0 s after connecting (limits.tls_handshake_timeout_s" in (
        close_line(Reason.HANDSHAKE_TIMEOUT, "p", entry, 12.0, 1)
    )
    assert close_line(Reason.HEAD_TIMEOUT, "p", Entry(0.0, Phase.HEAD), 15.0, 1).endswith(
        "no whole request head 15.0 s after connecting (limits.request_head_timeout_s)"
    )
    # the regex operators and test_limits look for
    assert close_line(Reason.BUSY, "p", None, 0.0, 4) == (
        "connection from p answered 503: 4 connections open (limits.max_connections), all of "
        "them authenticated"
    )
