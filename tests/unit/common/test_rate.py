"""The rate estimator and the human-readable units, with plain values and a fake clock."""

from __future__ import annotations

import pytest

from common import humanize
from common.rate import RateEstimator

MIB = 1024 * 1024


def test_no_rate_before_two_change_points() -> None:
    r = RateEstimator()
    assert r.rate(0.0) is None
    r.update(0.0, 0)
    assert r.rate(1.0) is None
    r.update(1.0, 0)  # the same value again is not a step
    assert r.rate(1.5) is None
    assert r.eta(1.5, 100) is None


def test_steady_steps_give_exact_rate_whatever_the_polling() -> None:
    # a heartbeat every 10 s reporting 100 MiB more each time, polled every second
    r = RateEstimator(window_s=30.0)
    for second in range(0, 41):
        r.update(float(second), (second // 10) * 100 * MIB)
        if second >= 10:
            assert r.rate(float(second)) == pytest.approx(10 * MIB)
    # 400 MiB done at t=40, 1000 MiB in all: 60 s left at 10 MiB/s
    assert r.eta(40.0, 1000 * MIB) == pytest.approx(60.0)


def test_window_forgets_old_speed() -> None:
    r = RateEstimator(window_s=10.0)
    done = 0
    for t in range(0, 20):  # 1 MiB/s for 20 s
        done += MIB
        r.update(float(t), done)
    for t in range(20, 40):  # then 5 MiB/s
        done += 5 * MIB
        r.update(float(t), done)
    assert r.rate(39.0) == pytest.approx(5 * MIB)


def test_stall_reports_zero_rate_and_no_eta() -> None:
    r = RateEstimator(stall_factor=3.0)
    r.update(0.0, 0)
    r.update(1.0, MIB)
    r.update(2.0, 2 * MIB)
    assert r.rate(4.9) == pytest.approx(MIB)  # 2.9 s since the last step: not yet
    assert r.rate(5.1) == 0.0  # more than 3 steps of 1 s without change
    assert r.eta(5.1, 10 * MIB) is None
    r.update(6.0, 3 * MIB)  # moving again
    assert r.rate(6.0) == pytest.approx(0.5 * MIB)


def test_going_down_restarts_the_estimate() -> None:
    r = RateEstimator()
    r.update(0.0, 0)
    r.update(1.0, 50 * MIB)
    r.update(2.0, 0)  # a new phase started from zero
    assert r.rate(2.0) is None
    r.update(4.0, 4 * MIB)
    assert r.rate(4.0) == pytest.approx(2 * MIB)


def test_eta_is_zero_when_done() -> None:
    r = RateEstimator()
    r.update(0.0, 10)
    assert r.eta(0.0, 10) == 0.0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        RateEstimator(window_s=0)
    with pytest.raises(ValueError):
        RateEstimator(stall_factor=-1)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (64 * MIB, "64.0 MiB"), (2**41, "2.0 TiB")],
)
def test_size(n: int, text: str) -> None:
    assert humanize.size(n) == text


@pytest.mark.parametrize(
    ("s", "text"),
    [(None, "-"), (0.25, "0.2 s"), (9.4, "9.4 s"), (42.4, "42 s"), (75, "1:15"), (3725, "1:02:05")],
)
def test_duration(s: float | None, text: str) -> None:
    assert humanize.duration(s) == text


def test_rate_and_progress() -> None:
    assert humanize.rate(None) == "-"
    assert humanize.rate(3 * MIB) == "3.0 MiB/s"
    assert humanize.progress(16 * MIB, 64 * MIB) == "16.0 MiB / 64.0 MiB (25%)"
    assert humanize.progress(1, 0) == "-"
