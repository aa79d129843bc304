"""Bounds on what callers hold open at once: uploads and long-polls (pure bookkeeping).

A misbehaving but authenticated site must not starve the others: each kind of request
that holds server resources for long gets a per-caller bound (answered 429
``too_many_requests``: that caller should send fewer) and, where one caller's bound
times the number of callers is no bound at all, a total (503 ``server_busy``: everyone
must wait). The connection limit lives in ``fl_server.listener``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from common.config import ServerLimits
from common.errors import ServerBusy, TooManyRequests


@dataclass(frozen=True)
class SlotStatistics:
    held: int
    by_caller: dict[str, int]
    refused: int


class Slots:
    """Counts requests of one kind per caller, refusing beyond ``per_caller``/``total``."""

    def __init__(
        self,
        what: str,
        *,
        per_caller: int,
        per_caller_setting: str,
        total: int | None = None,
        total_setting: str | None = None,
    ) -> None:
        self.what = what
        self.per_caller = per_caller
        self.per_caller_setting = per_caller_setting
        self.total = total
        self.total_setting = total_setting
        self._held: Counter[str] = Counter()
        self._refused = 0

    def check(self, caller: str) -> None:
        """Raise the error a new request of ``caller`` would get; nothing if it fits."""
        if self._held[caller] >= self.per_caller:
            self._refused += 1
            raise TooManyRequests(
                f"{caller} already has {self._held[caller]} {self.what} open; "
                f"limits.{self.per_caller_setting} is {self.per_caller}: send fewer at once"
            )
        if self.total is not None and self._held.total() >= self.total:
            self._refused += 1
            raise ServerBusy(
                f"the server has {self._held.total()} {self.what} open from all sites, its "
                f"limit (limits.{self.total_setting}); retry later"
            )

    def acquire(self, caller: str) -> None:
        """Take a slot for ``caller`` or raise; every acquire needs one ``release``."""
        self.check(caller)
        self._held[caller] += 1

    def release(self, caller: str) -> None:
        self._held[caller] -= 1
        if self._held[caller] <= 0:
            del self._held[caller]

    @contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        self.acquire(caller)
        try:
            yield
        finally:
            self.release(caller)

    def statistics(self) -> SlotStatistics:
        return SlotStatistics(self._held.total(), dict(self._held), self._refused)


@dataclass(frozen=True)
class Limits:
    uploads: Slots
    long_polls: Slots

    @classmethod
    def from_config(cls, cfg: ServerLimits) -> Limits:
        return cls(
            uploads=Slots(
                "segment uploads",
                per_caller=cfg.max_uploads_per_client,
                per_caller_setting="max_uploads_per_client",
            ),
            long_polls=Slots(
                "get_task long-polls",
                per_caller=cfg.max_long_polls_per_client,
                per_caller_setting="max_long_polls_per_client",
                total=cfg.max_long_polls,
                total_setting="max_long_polls",
            ),
        )
