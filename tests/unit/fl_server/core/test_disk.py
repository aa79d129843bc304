"""Which models a job keeps, and the most disk it needs at once, as plain values."""

from __future__ import annotations

import pytest

from common.config import KeepRounds
from fl_server.core import disk

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("keep", "done", "want"),
    [
        (KeepRounds(), 0, {0}),
        (KeepRounds(), 1, {0, 1}),
        (KeepRounds(), 5, {0, 4, 5}),  # the default: initial, one before the newest, newest
        (KeepRounds(initial=False, last=0), 5, {5}),
        (KeepRounds(last=3), 5, {0, 2, 3, 4, 5}),
        (KeepRounds(last=10), 3, {0, 1, 2, 3}),
        (KeepRounds(initial=False, last=0, every=2), 7, {2, 4, 6, 7}),
    ],
)
def test_kept_rounds(keep: KeepRounds, done: int, want: set[int]) -> None:
    assert disk.kept(keep, done) == want


def test_a_model_goes_once_no_rule_keeps_it_and_the_newest_always_stays() -> None:
    keep = KeepRounds()
    assert disk.dropped(keep, 3, range(3)) == [1]
    assert disk.dropped(keep, 4, [0, 2, 3]) == [2]  # round 1 went already
    for done in range(1, 50):
        assert done in disk.kept(keep, done)
        assert len(disk.kept(keep, done)) <= 3  # does not grow with the rounds


def test_the_peak_counts_kept_models_the_one_written_spools_and_accumulators() -> None:
    keep = KeepRounds()
    # round 3 starts with 0, 1, 2 kept and writes 3: four models, plus a spool per site
    assert disk.models_held(keep, 10) == 4
    assert disk.models_held(keep, 1) == 2  # the initial model and round 1's
    two = disk.peak_bytes(
        model_bytes=100 * MIB, elements=25 * MIB, keep=keep, num_rounds=10, sites=2
    )
    assert two == 100 * MIB * (4 + 2)
    three = disk.peak_bytes(
        model_bytes=100 * MIB, elements=25 * MIB, keep=keep, num_rounds=10, sites=3
    )
    assert three == 100 * MIB * (4 + 3) + 2 * 25 * MIB * 8
