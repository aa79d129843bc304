"""Running a transfer's segments: a window of them at a time, each tried again at once
when the outcome table says its failure may pass (``common.outcomes``); and the
``TransferContext`` that downloads and uploads share."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.config import TransferSettings
from common.errors import FLError
from common.http_client import Api
from common.outcomes import Outcome, decided, outcome
from common.recycle import FilePool
from common.timeouts import ProgressTimer, Stage
from fl_client.site.metrics import ClientMetrics, Direction

log = logging.getLogger("fl_client.transfer")
RETRY_PAUSE_S = 0.5
Progress = Callable[[int], None]


@decided(Outcome.STOP)
class Interrupted(FLError):
    """The daemon is stopping: segments in flight were finished, the rest is left to resume."""

    code = "interrupted"


async def with_retries(
    what: str,
    attempts: int,
    op: Callable[[], Awaitable[None]],
    on_retry: Callable[[], None] | None = None,
) -> None:
    """``op()``, again after a short pause while it fails in a way worth another try.

    Once ``attempts`` are spent the last error leaves as its own class (the daemon
    decides by class what to do with the task), its message saying how many tries it
    took.
    """
    for attempt in range(1, attempts + 1):
        try:
            await op()
            return
        except FLError as err:
            if outcome(err, in_transfer=True) is not Outcome.RETRY_SEGMENT or attempt == attempts:
                if attempt > 1:
                    raise type(err)(
                        f"{what}: gave up after {attempt} attempts: {err.message}", field=err.field
                    ) from err
                raise
            log.warning("%s: attempt %d failed (%s); retrying", what, attempt, err.message)
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(RETRY_PAUSE_S * attempt)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure in a (possibly nested) group: what the window's caller reacts to."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def run_window(
    indices: list[int],
    window: int,
    fn: Callable[[int], Awaitable[None]],
    stopping: asyncio.Event,
) -> None:
    """Run ``fn`` over ``indices``, ``window`` at a time; stop taking new ones on ``stopping``.

    The first segment that fails for good cancels the others and its error leaves as
    itself, not wrapped in an ``ExceptionGroup``: callers handle transfer errors by class
    (resume later, give up, report), and one failed segment fails the transfer.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty() and not stopping.is_set():
            await fn(queue.get_nowait())

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(window, len(indices))):
                tg.create_task(worker())
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    if not queue.empty():
        raise Interrupted(f"{queue.qsize()} segments left for the next start")


@dataclass(frozen=True)
class TransferContext:
    """What every transfer of one daemon shares: the server, the settings, where progress
    and metrics go, the stop signal and the spare files a download may write over."""

    api: Api
    settings: TransferSettings
    progress: Progress
    stopping: asyncio.Event
    metrics: ClientMetrics | None = None
    pool: FilePool | None = None

    def timer(self, stage: Stage, what: str) -> ProgressTimer:
        """The progress timer of one segment's request, starting in ``stage``."""
        timeout = self.api.timeouts.communication_timeout
        return ProgressTimer(timeout, stage=stage, peer=self.api.base_url, what=what)

    def moved(self, direction: Direction, nbytes: int, started: float) -> None:
        """One segment moved and checked: count it."""
        if self.metrics is not None:
            self.metrics.segment_moved(direction, nbytes, time.monotonic() - started)
        self.progress(nbytes)

    async def run(
        self,
        todo: list[int],
        name: Callable[[int], str],
        direction: Direction,
        move: Callable[[int], Awaitable[None]],
    ) -> None:
        """``move`` the segments ``todo``, a window at a time, each tried again while its
        failure may pass; ``name(i)`` names segment ``i`` in the log."""
        on_retry = None
        if self.metrics is not None:
            on_retry = functools.partial(self.metrics.segment_retried, direction)
        attempts = self.settings.max_segment_attempts
        await run_window(
            todo,
            self.settings.window,
            lambda i: with_retries(name(i), attempts, lambda: move(i), on_retry),
            self.stopping,
        )
