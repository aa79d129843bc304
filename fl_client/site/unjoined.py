"""Run a blocking call in a thread of its own that the process does not wait for at exit.

Training runs a site's plugin, which may go minutes without calling ``ctx.progress``,
the one place where it learns that the daemon is stopping. Cancelling the coroutine
that awaits it does not stop a thread; ``asyncio.to_thread`` threads (and those of any
``ThreadPoolExecutor``) are joined when the loop and the interpreter shut down, so a
busy plugin would keep a stopped daemon alive past ``shutdown_timeout_s``. A daemon
thread is not joined: the process exits on time, and the half-written update it leaves
(``update.safetensors.part``) is overwritten when the task is trained again.

The same holds for the long reads at the start of a task (re-hashing a download's
journaled segments, checking a saved update against its record): they only read, so
abandoning them is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar, cast

T = TypeVar("T")


async def run_unjoined(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread called ``name``; cancelling the await abandons it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # log ids travel with it, as with to_thread

    def deliver(error: BaseException | None, result: T | None) -> None:
        if done.done():  # the awaiting task was cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(T, result))

    def work() -> None:
        error: BaseException | None = None
        result: T | None = None
        try:
            result = context.run(fn)
        except BaseException as exc:
            error = exc
        # the loop is gone if the daemon stopped without waiting for us
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, error, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await done
