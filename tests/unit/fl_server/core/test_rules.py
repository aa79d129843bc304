"""The scatter-and-gather rules, with plain values: no server."""

from __future__ import annotations

import pytest

from common.wire import TaskState
from fl_server.core.rules import (
    Action,
    Decision,
    TaskView,
    count_joinable,
    decide_round,
    decide_start,
    may_take_part,
)

A, C, R, E = TaskState.ASSIGNED, TaskState.COMMITTED, TaskState.REJECTED, TaskState.EXPIRED


def t(client: str, state: TaskState, last: float = 0.0) -> TaskView:
    return TaskView(task_id=f"t-{client}", client=client, state=state, last_progress=last)


def decide(
    tasks: list[TaskView],
    now: float = 100.0,
    *,
    train_timeout: float | None = 10.0,
    joinable: int = 0,
) -> Decision:
    return decide_round(
        tasks, min_clients=2, train_timeout=train_timeout, now=now, joinable=joinable
    )


def test_round_waits_while_a_task_makes_progress() -> None:
    d = decide([t("a", C, 95), t("b", A, 95)])
    assert d.action is Action.WAIT and d.expire == ()
    assert d.wake_at == 105.0  # when b's train_timeout would run out


def test_round_closes_when_all_answered_and_quorum_met() -> None:
    assert decide([t("a", C), t("b", C)]).action is Action.GO
    d = decide([t("a", C), t("b", C), t("c", R)])
    assert d.action is Action.GO and d.expire == ()


def test_train_timeout_is_measured_from_the_last_progress_not_from_the_start() -> None:
    # issued long ago but moved 9 s ago: still alive at train_timeout 10 s
    d = decide([t("a", C, 0), t("b", A, 91)])
    assert d.action is Action.WAIT
    d = decide([t("a", C, 0), t("b", A, 90)])
    assert d.action is not Action.WAIT


def test_stalled_task_expires_and_round_closes_with_the_others() -> None:
    d = decide([t("a", C), t("b", C), t("c", A, 50)])
    assert d.action is Action.GO and d.expire == ("t-c",)


def test_stalled_task_below_quorum_fails_naming_the_missing_client() -> None:
    d = decide([t("a", C), t("b", A, 50)])
    assert d.action is Action.FAIL and d.expire == ("t-b",)
    assert d.reason is not None
    assert "only 1 arrived (from: a)" in d.reason
    assert "no result within train_timeout=10 s from: b" in d.reason


def test_rejected_update_below_quorum_fails_unless_another_site_can_still_join() -> None:
    tasks = [t("a", C), t("b", R)]
    d = decide(tasks)
    assert d.action is Action.FAIL and d.reason is not None and "rejected: b" in d.reason
    assert decide(tasks, joinable=1).action is Action.WAIT


def test_no_train_timeout_means_wait_forever() -> None:
    d = decide([t("a", C), t("b", A, 0)], now=1e9, train_timeout=None)
    assert d.action is Action.WAIT and d.wake_at is None


def test_empty_round_waits_for_clients() -> None:
    assert decide([]).action is Action.WAIT


def test_one_task_per_client_per_round_and_only_admitted_clients() -> None:
    tasks = [t("a", C)]
    assert not may_take_part("a", None, tasks)
    assert may_take_part("b", None, tasks)
    assert not may_take_part("b", ["a", "c"], tasks)
    assert count_joinable(["a", "b", "c"], None, tasks) == 2
    assert count_joinable(["a", "b", "c"], ["a", "b"], tasks) == 1


@pytest.mark.parametrize(
    ("connected", "waited_s", "limit_s", "action"),
    [
        (2, 0.0, None, Action.GO),
        (3, 99.0, 10.0, Action.GO),
        (1, 5.0, 10.0, Action.WAIT),
        (1, 1e6, None, Action.WAIT),  # no limit: wait for as long as it takes
        (1, 10.5, 10.0, Action.FAIL),
    ],
)
def test_a_round_opens_once_min_clients_sites_are_connected(
    connected: int, waited_s: float, limit_s: float | None, action: Action
) -> None:
    d = decide_start(
        connected=connected, min_clients=2, waited_s=waited_s, wait_for_clients_s=limit_s
    )
    assert d.action is action
    if action is Action.FAIL:
        assert d.reason == (
            "only 1 of min_clients=2 sites connected within wait_for_clients_s=10 s"
        )


def test_an_open_round_without_enough_sites_fails_after_wait_for_clients_s() -> None:
    tasks = [t("a", C)]

    def at(tasks: list[TaskView], now: float) -> Decision:
        return decide_round(
            tasks,
            min_clients=2,
            train_timeout=10.0,
            now=now,
            opened_at=0.0,
            wait_for_clients_s=30.0,
        )

    waiting = at(tasks, 20.0)
    assert waiting.action is Action.WAIT and waiting.wake_at == 30.0
    failed = at(tasks, 31.0)
    assert failed.action is Action.FAIL
    assert failed.reason == (
        "only 1 of min_clients=2 clients took part within wait_for_clients_s=30 s"
    )
    # a task still in flight holds the round open, however long it has been
    busy = at([*tasks, t("b", A, last=25.0)], 31.0)
    assert busy.action is Action.WAIT
