"""Progress lines in the client's log for long downloads, training and uploads.

A 128 GB transfer runs for hours; an operator reading the log wants to see that it
moves and when it will end. Every ``progress_log_s`` seconds of a phase the log gets one
line: bytes done of the total, the rate over the last half minute and the time left
(``common.rate``); when a phase ends, one line with its bytes and duration. Nothing is
logged per segment or per chunk: the data path only bumps a counter, and a ticker
samples it about once a second.

``ProgressReport`` decides what to say from plain values and a clock passed in;
``ProgressLogger`` is the thin adapter that samples and logs, labelling its lines with
the ids of the task the phase belongs to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from common import humanize, logctx
from common.logctx import LogIds
from common.rate import RateEstimator
from common.wire import Phase

log = logging.getLogger("fl_client.progress")
TICK_S = 1.0

# the phases that move or process bytes, and how a log line names them
NAMES = {Phase.DOWNLOADING: "download", Phase.TRAINING: "training", Phase.UPLOADING: "upload"}


class ProgressReport:
    """What to log about the current phase, given samples of its bytes done."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._phase = Phase.IDLE
        self._total = 0
        self._started = 0.0
        self._last_line = 0.0
        self._rate = RateEstimator()

    def phase(self, now: float, phase: Phase, done_before: int, total: int) -> str | None:
        """A phase begins; ``done_before`` is the final count of the phase that ends.

        Returns the closing line of the phase that ended, if it was one worth reporting.
        """
        line = None
        name = NAMES.get(self._phase)
        if name is not None and phase is not self._phase:
            elapsed = now - self._started
            mean = done_before / elapsed if elapsed > 0 else None
            # the next phase follows a phase that finished; idle follows one that stopped
            verb = "stopped" if phase is Phase.IDLE else "finished"
            line = (
                f"{name} {verb}: {humanize.progress(done_before, self._total)} "
                f"in {humanize.duration(elapsed)}, mean {humanize.rate(mean)}"
            )
        self._phase, self._total = phase, total
        self._started = self._last_line = now
        self._rate = RateEstimator()
        self._rate.update(now, 0)
        return line

    def tick(self, now: float, done: int) -> str | None:
        """A sample of the bytes done; returns a progress line once per interval."""
        name = NAMES.get(self._phase)
        if name is None:
            return None
        self._rate.update(now, done)
        if now - self._last_line < self.interval_s:
            return None
        self._last_line = now
        return (
            f"{name}: {humanize.progress(done, self._total)}, "
            f"{humanize.rate(self._rate.rate(now))}, "
            f"ETA {humanize.duration(self._rate.eta(now, self._total))}"
        )


class Source(Protocol):
    """Where the ticker reads the bytes done (the daemon's ``Progress``)."""

    @property
    def done(self) -> int: ...


class ProgressLogger:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._report = ProgressReport(interval_s)
        self._clock = clock
        self._ids: LogIds = logctx.NO_IDS

    def phase(self, phase: Phase, done_before: int, total: int) -> None:
        """Called where the task's work changes phase, in that task's log context."""
        line = self._report.phase(self._clock(), phase, done_before, total)
        if line:
            log.info("%s", line, extra={logctx.RECORD_ATTR: self._ids})
        self._ids = logctx.current()

    async def run(self, source: Source) -> None:
        """Sample ``source`` about once a second, forever (the owner cancels it)."""
        while True:
            await asyncio.sleep(min(TICK_S, self._report.interval_s))
            line = self._report.tick(self._clock(), source.done)
            if line:
                log.info("%s", line, extra={logctx.RECORD_ATTR: self._ids})
