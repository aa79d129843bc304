"""The ids a log line is about (job, round, client, task), carried as structured fields.

Theory of operation. One ``ContextVar`` holds the ids of the work at hand. asyncio copies
the context into every task it creates, and ``asyncio.to_thread`` into its worker
thread, so binding the ids once where a request or a task is taken up labels every line
logged below it, including lines of code that knows nothing of jobs (segment retries,
trainer plugins). aiohttp runs each request in a task of its own, so ids bound by a
handler end with the request. A log call can also name ids for one line with
``extra=ids(...)``; those win over the bound ones.

``IdsFilter`` copies the merged ids onto each record as ``record.fl_ids``; the
formatters in ``common.logs`` print them (JSON: separate keys; text: a prefix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass

RECORD_ATTR = "fl_ids"


@dataclass(frozen=True)
class LogIds:
    job: str | None = None
    round: int | None = None
    client: str | None = None
    task: str | None = None

    def merged(self, other: LogIds) -> LogIds:
        """These ids, with every id that ``other`` sets taking precedence."""
        changes = {k: v for k, v in dataclasses.asdict(other).items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def fields(self) -> dict[str, str | int]:
        """The ids that are set, in a fixed order: job, round, client, task."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def text(self) -> str:
        """``[job=... round=... client=... task=...]`` for text logs; empty if none is set."""
        f = self.fields()
        return "[" + " ".join(f"{k}={v}" for k, v in f.items()) + "] " if f else ""


NO_IDS = LogIds()  # frozen: safe to share as the default
_IDS: ContextVar[LogIds] = ContextVar("fl_log_ids", default=NO_IDS)


def current() -> LogIds:
    return _IDS.get()


def bind(
    *,
    job: str | None = None,
    round: int | None = None,
    client: str | None = None,
    task: str | None = None,
) -> Token[LogIds]:
    """Add ids to the current context (None leaves an id as it is); ``reset`` undoes it."""
    return _IDS.set(_IDS.get().merged(LogIds(job, round, client, task)))


def reset(token: Token[LogIds]) -> None:
    _IDS.reset(token)


@contextlib.contextmanager
def bound(
    *,
    job: str | None = None,
    round: int | None = None,
    client: str | None = None,
    task: str | None = None,
) -> Iterator[None]:
    token = bind(job=job, round=round, client=client, task=task)
    try:
        yield
    finally:
        _IDS.reset(token)


def ids(
    *,
    job: str | None = None,
    round: int | None = None,
    client: str | None = None,
    task: str | None = None,
) -> dict[str, LogIds]:
    """``extra=`` for one log call: ``log.info("...", extra=ids(task=t))``."""
    return {RECORD_ATTR: LogIds(job, round, client, task)}


class IdsFilter(logging.Filter):
    """Puts the context's ids, merged with the record's own, on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = getattr(record, RECORD_ATTR, None)
        merged = _IDS.get()
        if isinstance(own, LogIds):
            merged = merged.merged(own)
        setattr(record, RECORD_ATTR, merged)
        return True


def record_ids(record: logging.LogRecord) -> LogIds:
    value = getattr(record, RECORD_ATTR, None)
    return value if isinstance(value, LogIds) else NO_IDS
