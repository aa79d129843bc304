"""Blocking work in a worker thread that stops when the coroutine waiting for it is cancelled.

Theory of operation. ``asyncio.to_thread`` cannot stop its thread: a cancelled caller
returns at once while the thread runs on (to the end of a 128 GB aggregation), and at
exit Python waits for it without a limit. ``run_stoppable`` hands the function a
``threading.Event`` that it checks between bounded steps (a chunk, a ``poll``); when the
caller is cancelled the event is set, and the caller waits for the thread to return
before the cancellation goes on, also if it is cancelled again meanwhile, so that
nothing the thread still uses (a socket, a partial file it will remove) is touched
under it. Work still queued in an executor is taken off the queue, or, where it cannot
be, returns as soon as it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Stopped(Exception):
    """Raised in the worker thread by work whose stop event was set.

    Its caller was cancelled and sees the cancellation, never this.
    """


def check_stop(stop: threading.Event | None) -> None:
    """For work to call between steps: raise ``Stopped`` once ``stop`` is set."""
    if stop is not None and stop.is_set():
        raise Stopped("stopped: its caller was cancelled")


async def run_stoppable(
    executor: concurrent.futures.Executor | None,
    fn: Callable[Concatenate[threading.Event, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(stop, *args, **kwargs)`` in ``executor`` (None: the loop's default one).

    On cancellation ``stop`` is set and this returns only once ``fn`` has returned.
    """
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    context = contextvars.copy_context()  # log context, as asyncio.to_thread keeps it

    def work() -> T:
        check_stop(stop)  # cancelled while it waited for a thread
        return context.run(fn, stop, *args, **kwargs)

    queued: concurrent.futures.Future[T] | None = None
    if executor is None:
        done = loop.run_in_executor(None, work)
    else:
        queued = executor.submit(work)
        done = asyncio.wrap_future(queued)
    try:
        return await asyncio.shield(done)
    finally:
        if not done.done():
            stop.set()
            if queued is None or not queued.cancel():  # running: it stops at its next step
                await _wait_through_cancellation(done)


async def _wait_through_cancellation(fut: asyncio.Future[T]) -> None:
    """Wait until ``fut`` is done, however often the caller is cancelled meanwhile; then
    let one cancellation through if there was any."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled = True
    if not fut.cancelled():
        # taken here: a ``Stopped`` is what the stop asked for, not an error to report
        # (else asyncio logs "Future exception was never retrieved")
        fut.exception()
    if cancelled:
        raise asyncio.CancelledError
