"""The pause before a failed task is taken up again: per task, doubling, bounded."""

from __future__ import annotations

import random

from fl_client.site.retry import TaskBackoff, jittered


def test_pause_doubles_with_each_failure_of_the_same_task_up_to_the_bound() -> None:
    b = TaskBackoff(max_s=5.0)
    assert [b.failed("t1") for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_another_task_or_a_reset_starts_over() -> None:
    b = TaskBackoff(max_s=10.0)
    assert [b.failed("t1") for _ in range(3)] == [0.5, 1.0, 2.0]
    assert b.failed("t2") == 0.5
    assert b.failed("t2") == 1.0
    b.reset()
    assert b.failed("t2") == 0.5


def test_bound_below_the_first_pause_wins() -> None:
    b = TaskBackoff(max_s=0.2)
    assert [b.failed("t1") for _ in range(3)] == [0.2, 0.2, 0.2]


def test_jitter_stays_within_a_fifth() -> None:
    rng = random.Random(1)
    pauses = [jittered(10.0, rng) for _ in range(1000)]
    assert 8.0 <= min(pauses) < 8.5 and 11.5 < max(pauses) <= 12.0
