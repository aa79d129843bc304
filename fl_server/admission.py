"""Which connections the server keeps: deadlines for new ones, and whom a newcomer replaces.

Theory of operation (invariant 9: nobody unauthenticated can take capacity from those who
are). Every open connection is in one ``Phase``: ``HANDSHAKE`` (TLS under way), ``HEAD``
(connected, its first request head not complete yet) or ``AUTHENTICATED`` (a whole
request head arrived, and with TLS only after a handshake that checked the client's
certificate). The first two are *pending*; anyone who can reach the port can hold a
pending connection, only a site or an admin an authenticated one.

- Deadlines (``Deadlines``). A pending connection must be through its TLS handshake
  within ``handshake_s`` of its accept and have sent a whole request head within
  ``head_s``; past either it is closed. Connections that never start TLS, that send
  nothing, or that trickle their headers a byte at a time thus hold a slot for
  ``head_s`` at most.
- Admission (``Book.admit``). Below ``max_connections`` a newcomer is taken. At it, the
  oldest pending connection is closed to make room (``EVICT``): a real caller is
  authenticated within milliseconds of its accept, so the longer a connection has been
  pending, the surer it is that it never will be; and because an attacker's connections
  stay pending, however many there are they can only push out each other, never the
  authenticated connections of sites and admins. Only when every open connection is
  authenticated is the newcomer answered 503 ``server_busy`` (``BUSY``); it is pending
  like any other until that answer is sent, so the next newcomer may replace it, and the
  count of open connections never exceeds ``max_connections`` + 1.
- Idle. Between requests aiohttp closes an authenticated connection after ``idle_s``
  (its ``keepalive_timeout``, which never fires while a request is in progress).

Nothing here touches a socket, and only ``CloseLog`` the clock (callers pass ``now``
to the rest). ``LogBudget`` bounds the log lines a flood of closes may cause: a few per
reason and window, the rest summed up in one line when the window ends; the metric
counts every one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Generic, TypeVar

from common.config import ServerLimits

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("fl_server.listener")  # where the gate's own lines are
LOG_BURST = 3  # lines per reason and window before the rest are summed up
LOG_WINDOW_S = 10.0


class Phase(Enum):
    HANDSHAKE = "handshake"
    HEAD = "head"
    AUTHENTICATED = "authenticated"


class Reason(StrEnum):
    """Why the server closed a connection (the ``reason`` label of the metric)."""

    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HEAD_TIMEOUT = "head_timeout"
    IDLE = "idle"
    EVICTED = "evicted"
    BUSY = "busy"


@dataclass(frozen=True)
class Entry:
    accepted_at: float
    phase: Phase


@dataclass(frozen=True)
class Deadlines:
    """How long a connection may stay in each phase, in seconds (``handshake_s`` <= ``head_s``)."""

    handshake_s: float
    head_s: float
    idle_s: float

    @classmethod
    def from_limits(cls, limits: ServerLimits) -> Deadlines:
        head = limits.request_head_timeout_s
        return cls(min(limits.tls_handshake_timeout_s, head), head, limits.idle_timeout_s)

    def due(self, entry: Entry) -> float | None:
        """When ``entry`` must have left its phase; None once authenticated."""
        if entry.phase is Phase.HANDSHAKE:
            return entry.accepted_at + self.handshake_s
        if entry.phase is Phase.HEAD:
            return entry.accepted_at + self.head_s
        return None

    def overdue(self, entry: Entry, now: float) -> Reason | None:
        """Why ``entry`` must be closed at ``now``, or None while it is in time."""
        due = self.due(entry)
        if due is None or now < due:
            return None
        return Reason.HANDSHAKE_TIMEOUT if entry.phase is Phase.HANDSHAKE else Reason.HEAD_TIMEOUT

    def closed_when_idle(self, *, in_requests: int, since_last_request_s: float) -> bool:
        """Whether a close the server made itself on an authenticated connection was the
        idle bound: none of its requests was in progress and ``idle_s`` had passed."""
        return in_requests == 0 and since_last_request_s >= self.idle_s


def close_line(
    reason: Reason, peer: str, entry: Entry | None, now: float, open_connections: int
) -> str:
    """The log line on closing ``peer``'s connection (``entry``, None for a newcomer) for
    ``reason``: what it did not do in time, and the setting that decided it."""
    age = 0.0 if entry is None else now - entry.accepted_at
    if reason is Reason.EVICTED:
        phase = "" if entry is None else f" ({entry.phase.value})"
        what = (
            f"to make room for a new one: {open_connections} connections open "
            f"(limits.max_connections) and this one not authenticated after {age:.1f} s"
            f"{phase}"
        )
    elif reason is Reason.HANDSHAKE_TIMEOUT:
        what = (
            f"TLS handshake not done {age:.1f} s after connecting "
            "(limits.tls_handshake_timeout_s, request_head_timeout_s)"
        )
    elif reason is Reason.HEAD_TIMEOUT:
        what = f"no whole request head {age:.1f} s after connecting (limits.request_head_timeout_s)"
    elif reason is Reason.BUSY:
        return (
            f"connection from {peer} answered 503: {open_connections} connections open "
            "(limits.max_connections), all of them authenticated"
        )
    else:
        what = f"idle {age:.1f} s after connecting"
    return f"closed connection from {peer}: {what}"


class Decision(Enum):
    TAKE = "take"  # room left
    EVICT = "evict"  # full: close the victim, then take the newcomer
    BUSY = "busy"  # full of authenticated connections: answer 503


@dataclass(frozen=True)
class Verdict(Generic[K]):
    decision: Decision
    victim: K | None = None


@dataclass(frozen=True)
class BookStatistics:
    pending: int
    authenticated: int


class Book(Generic[K]):
    """The open connections, each with its accept time and phase; pending ones in accept
    order, so that the oldest is found at once however many there are."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._pending: dict[K, Entry] = {}  # insertion order is accept order
        self._authenticated: dict[K, Entry] = {}

    def __len__(self) -> int:
        return len(self._pending) + len(self._authenticated)

    def admit(self) -> Verdict[K]:
        """What to do with a newcomer, given who is open now."""
        if len(self) < self.max_connections:
            return Verdict(Decision.TAKE)
        if self._pending:
            return Verdict(Decision.EVICT, next(iter(self._pending)))
        return Verdict(Decision.BUSY)

    def add(self, key: K, now: float, phase: Phase) -> None:
        if key in self._pending or key in self._authenticated:
            raise ValueError(f"connection {key!r} is already in the book")
        if phase is Phase.AUTHENTICATED:
            raise ValueError("a new connection cannot be authenticated yet")
        self._pending[key] = Entry(now, phase)

    def advance(self, key: K, phase: Phase) -> Entry | None:
        """Move a pending ``key`` on to ``phase``; its entry, or None if it is not pending."""
        entry = self._pending.get(key)
        if entry is None:
            return None
        moved = Entry(entry.accepted_at, phase)
        if phase is Phase.AUTHENTICATED:
            del self._pending[key]
            self._authenticated[key] = moved
        else:
            self._pending[key] = moved  # keeps its place in accept order
        return moved

    def entry(self, key: K) -> Entry | None:
        return self._pending.get(key) or self._authenticated.get(key)

    def remove(self, key: K) -> Entry | None:
        """Forget ``key``; its entry, or None if it was gone already (removal is idempotent)."""
        return self._pending.pop(key, None) or self._authenticated.pop(key, None)

    def statistics(self) -> BookStatistics:
        return BookStatistics(len(self._pending), len(self._authenticated))


class LogBudget(Generic[K]):
    """At most ``burst`` log lines per kind in each window of ``window_s`` seconds; the
    rest are counted, for one summary line per window (a flood must not flood the log)."""

    def __init__(self, *, burst: int, window_s: float) -> None:
        self.burst = burst
        self.window_s = window_s
        self._window_start: dict[K, float] = {}
        self._lines: Counter[K] = Counter()
        self._held_back: Counter[K] = Counter()

    def allow(self, kind: K, now: float) -> bool:
        """Whether this event of ``kind`` gets its own line; if not, it is counted."""
        start = self._window_start.get(kind)
        if start is None or now - start >= self.window_s:
            self._window_start[kind] = now
            self._lines[kind] = 0
        if self._lines[kind] < self.burst:
            self._lines[kind] += 1
            return True
        self._held_back[kind] += 1
        return False

    def take_held_back(self, kind: K) -> int:
        """Events of ``kind`` without a line of their own since the last call."""
        return self._held_back.pop(kind, 0)


@dataclass
class CloseLog:
    """Closes the gate makes: counted in the metrics, logged within a budget."""

    count: Callable[[Reason], None]
    budget: LogBudget[Reason] = field(
        default_factory=lambda: LogBudget(burst=LOG_BURST, window_s=LOG_WINDOW_S)
    )
    summaries: dict[Reason, asyncio.TimerHandle] = field(default_factory=dict)

    def note(self, reason: Reason, line: str) -> None:
        self.count(reason)
        if reason is Reason.IDLE:  # routine: counted, not logged
            log.debug("%s", line)
            return
        loop = asyncio.get_running_loop()
        if self.budget.allow(reason, loop.time()):
            log.warning("%s", line)
        elif reason not in self.summaries:  # the first held back: sum up when the window ends
            self.summaries[reason] = loop.call_later(LOG_WINDOW_S, self._summarise, reason)

    def _summarise(self, reason: Reason) -> None:
        del self.summaries[reason]
        held = self.budget.take_held_back(reason)
        if held:
            log.warning(
                "%d more connections closed (%s) in the last %.0f s, not logged one by one; "
                "fl_server_connections_closed in /metrics counts them all",
                held,
                reason.value,
                LOG_WINDOW_S,
            )

    def close(self) -> None:
        """Drop the summaries still to come (shutdown)."""
        for handle in self.summaries.values():
            handle.cancel()
        self.summaries.clear()
