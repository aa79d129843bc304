"""Unit tests for common.timeouts: the progress timer (real time, generous margins)."""

from __future__ import annotations

import asyncio

import pytest

from common.errors import TransferError, TransferTimeout
from common.timeouts import KEEP, ProgressTimer, Stage

PEER = "http://10.0.0.7:8470"
WHAT = "PUT /segments/3"


def _now() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.parametrize("stage", list(Stage))
async def test_every_stage_is_named_in_its_timeout(stage: Stage) -> None:
    with pytest.raises(TransferTimeout) as exc:
        async with ProgressTimer(0.05, stage=stage, peer=PEER, what=WHAT):
            await asyncio.sleep(10)
    assert f"no progress for 0.05 s while {stage.value} after 0 bytes" in str(exc.value)


async def test_steady_progress_never_times_out() -> None:
    start = _now()
    async with ProgressTimer(0.2, stage=Stage.RECEIVING, peer=PEER, what=WHAT) as timer:
        for _ in range(12):  # 0.6 s in total, three times the period
            await asyncio.sleep(0.05)
            timer.progress(1000)
    assert timer.bytes_moved == 12_000
    assert _now() - start >= 0.55


async def test_stall_times_out_naming_stage_peer_and_bytes() -> None:
    start = _now()
    with pytest.raises(TransferTimeout) as exc:
        async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
            timer.progress(4096)
            timer.progress(100)
            await asyncio.sleep(10)
    elapsed = _now() - start
    assert 0.2 <= elapsed < 1.5
    msg = str(exc.value)
    assert Stage.SENDING.value in msg
    assert PEER in msg
    assert WHAT in msg
    assert "after 4196 bytes" in msg
    assert "no progress for 0.2 s" in msg
    assert isinstance(exc.value, TransferError)
    assert exc.value.code == "transfer_timeout"
    assert isinstance(exc.value.__cause__, TimeoutError)


async def test_stall_after_progress_counts_from_last_progress() -> None:
    start = _now()
    with pytest.raises(TransferTimeout) as exc:
        async with ProgressTimer(0.2, stage=Stage.RECEIVING, peer=PEER, what=WHAT) as timer:
            for _ in range(6):  # 0.3 s of progress, longer than one period
                await asyncio.sleep(0.05)
                timer.progress(10)
            last = _now()
            await asyncio.sleep(10)
    fired = _now()
    assert fired - start >= 0.5
    assert 0.2 <= fired - last < 1.5
    assert "receiving after 60 bytes" in str(exc.value)


async def test_progress_without_bytes_still_resets_clock() -> None:
    async with ProgressTimer(0.2, stage=Stage.RECEIVING, peer=PEER, what=WHAT) as timer:
        for _ in range(8):
            await asyncio.sleep(0.05)
            timer.progress()
    assert timer.bytes_moved == 0


async def test_enter_overrides_period_and_names_new_stage() -> None:
    start = _now()
    with pytest.raises(TransferTimeout) as exc:
        async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
            timer.progress(7)
            timer.enter(Stage.WAITING, 0.6)
            await asyncio.sleep(0.4)  # longer than 0.2 s, shorter than 0.6 s: no timeout
            reached = _now()
            await asyncio.sleep(10)
    fired = _now()
    assert reached - start >= 0.35
    assert 0.55 <= fired - start < 2.0
    msg = str(exc.value)
    assert Stage.WAITING.value in msg
    assert "no progress for 0.6 s" in msg
    assert "after 7 bytes" in msg


async def test_enter_without_period_keeps_period_and_restarts_clock() -> None:
    # 0.3 s of margin on each side of the 0.8 s period: a stall of the loop cannot make
    # a sleep outlast the period, and without the restart the timer fires at 0.8 s,
    # before the second sleep ends at 1.0 s
    reached = False
    with pytest.raises(TransferTimeout) as exc:
        async with ProgressTimer(0.8, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
            await asyncio.sleep(0.5)
            timer.enter(Stage.RECEIVING)
            await asyncio.sleep(0.5)  # 1.0 s since the start, 0.5 s in this stage
            reached = True
            assert timer.stage is Stage.RECEIVING
            await asyncio.sleep(10)
    assert reached, "entering a stage must restart the clock"
    assert "no progress for 0.8 s while receiving" in str(exc.value)


async def test_period_none_never_fires() -> None:
    start = _now()
    async with ProgressTimer(None, stage=Stage.WAITING, peer=PEER, what=WHAT) as timer:
        await asyncio.sleep(0.3)
        timer.enter(Stage.RECEIVING)
        await asyncio.sleep(0.1)
    assert timer.stage is Stage.RECEIVING
    assert _now() - start >= 0.35


async def test_enter_can_set_period_on_unlimited_timer() -> None:
    with pytest.raises(TransferTimeout, match=r"no progress for 0\.2 s while sending"):
        async with ProgressTimer(None, stage=Stage.WAITING, peer=PEER, what=WHAT) as timer:
            timer.enter(Stage.SENDING, 0.2)
            await asyncio.sleep(10)


async def test_body_exception_passes_through_unchanged() -> None:
    with pytest.raises(ValueError, match="from the body"):
        async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT):
            raise ValueError("from the body")


async def test_body_timeout_error_is_not_renamed() -> None:
    """A TimeoutError raised by the body itself is not mistaken for the timer's."""
    with pytest.raises(TimeoutError) as exc:
        async with ProgressTimer(5, stage=Stage.SENDING, peer=PEER, what=WHAT):
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
    assert not isinstance(exc.value, TransferTimeout)


async def test_nothing_fires_after_exit() -> None:
    async with ProgressTimer(0.1, stage=Stage.SENDING, peer=PEER, what=WHAT):
        await asyncio.sleep(0.01)
    # The task must not be cancelled later by a leftover timer handle.
    await asyncio.sleep(0.3)


async def test_timers_nest_and_only_the_stalled_one_fires() -> None:
    with pytest.raises(TransferTimeout, match="inner"):
        async with ProgressTimer(5, stage=Stage.SENDING, peer=PEER, what="outer") as outer:
            outer.progress(1)
            async with ProgressTimer(0.15, stage=Stage.RECEIVING, peer=PEER, what="inner"):
                await asyncio.sleep(10)


async def test_enter_with_none_period_means_no_limit() -> None:
    async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
        timer.enter(Stage.WAITING, None)  # e.g. Timeouts(streaming_ack_wait=None)
        await asyncio.sleep(0.35)
    assert timer.stage is Stage.WAITING


async def test_enter_with_keep_keeps_period() -> None:
    with pytest.raises(TransferTimeout, match=r"no progress for 0\.2 s while receiving"):
        async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
            timer.enter(Stage.RECEIVING, KEEP)
            await asyncio.sleep(10)


async def test_enter_none_then_a_period_limits_again() -> None:
    """'No limit' for one stage does not stick: the next stage can set a period again."""
    with pytest.raises(TransferTimeout, match=r"no progress for 0\.2 s while receiving"):
        async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
            timer.enter(Stage.WAITING, None)
            await asyncio.sleep(0.3)
            timer.enter(Stage.RECEIVING, 0.2)
            await asyncio.sleep(10)


async def test_enter_keep_after_none_stays_unlimited() -> None:
    async with ProgressTimer(0.2, stage=Stage.SENDING, peer=PEER, what=WHAT) as timer:
        timer.enter(Stage.WAITING, None)
        timer.enter(Stage.RECEIVING)
        await asyncio.sleep(0.35)
    assert timer.stage is Stage.RECEIVING
