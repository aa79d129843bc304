"""Blocking work that stops with the coroutine waiting for it (``fl_server.threads``)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fl_server.threads import Stopped, check_stop, run_stoppable


def _steps(stop: threading.Event, seen: list[str], linger_s: float = 0.0) -> str:
    seen.append("started")
    try:
        for _ in range(1000):  # 10 s of 10 ms steps, unless stopped
            check_stop(stop)
            time.sleep(0.01)
    except Stopped:
        time.sleep(linger_s)  # clean-up after the stop, e.g. removing a partial file
        seen.append("stopped")
        raise
    seen.append("finished")
    return "done"


async def test_result_and_errors_pass_through() -> None:
    assert await run_stoppable(None, lambda stop, x: x * 2, 21) == 42

    def fails(stop: threading.Event) -> None:
        raise ValueError("disk says no")

    with pytest.raises(ValueError, match="disk says no"):
        await run_stoppable(None, fails)


@pytest.mark.parametrize("executor", [None, "own"])
async def test_cancelling_stops_the_work_and_waits_for_the_thread(executor: str | None) -> None:
    seen: list[str] = []
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
    pool = ThreadPoolExecutor(1) if executor else None
    try:
        work = asyncio.create_task(run_stoppable(pool, _steps, seen, 0.3))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        # the cancellation came through only once the thread had cleaned up and returned
        assert seen == ["started", "stopped"]
        assert 0.3 <= time.monotonic() - started < 2.0
        # its Stopped was taken: asyncio had nothing to report when the future went
        del work
        gc.collect()
        await asyncio.sleep(0.1)
        assert reported == []
    finally:
        if pool is not None:
            pool.shutdown()


async def test_a_second_cancellation_does_not_cut_the_wait_short() -> None:
    seen: list[str] = []
    work = asyncio.create_task(run_stoppable(None, _steps, seen, 0.5))
    await asyncio.sleep(0.1)
    work.cancel()
    await asyncio.sleep(0.1)  # now waiting for the thread's clean-up
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert seen == ["started", "stopped"]


async def test_work_still_queued_never_starts() -> None:
    busy: list[str] = []
    queued: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        first = asyncio.create_task(run_stoppable(pool, _steps, busy))
        second = asyncio.create_task(run_stoppable(pool, _steps, queued))
        await asyncio.sleep(0.1)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    assert busy == ["started", "stopped"] and queued == []


async def test_a_timeout_scope_around_it_works_as_usual() -> None:
    seen: list[str] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await run_stoppable(None, _steps, seen)
    assert seen == ["started", "stopped"]
