"""Job progress for fl-admin watch/status and fl-poc, from plain job statuses."""

from __future__ import annotations

import io
import json

from rich.console import Console

from common import wire
from common.wire import JobState, Phase, TaskState
from fl_client.admin import render
from fl_client.admin.progress import JobTracker

MIB = 1024 * 1024
TOTAL = 100 * MIB


def status(
    *tasks: wire.TaskInfo, state: JobState = JobState.RUNNING, done: int = 0, reason: str = ""
) -> wire.JobStatus:
    return wire.JobStatus(
        job=wire.JobInfo(
            job_id="j1",
            name="big",
            state=state,
            round=done,
            num_rounds=3,
            reason=reason or None,
            created_at=0.0,
            updated_at=0.0,
            model_bytes=TOTAL,
        ),
        rounds=[
            wire.RoundInfo(round=1, state="closed", started_at=0.0, closed_at=125.0, num_updates=2),
            wire.RoundInfo(round=2, state="open", started_at=125.0),
        ],
        tasks=list(tasks),
    )


def task(
    client: str,
    rnd: int,
    phase: Phase,
    done: int,
    state: TaskState = TaskState.ASSIGNED,
    reason: str | None = None,
) -> wire.TaskInfo:
    return wire.TaskInfo(
        task_id=f"{client}-{rnd}",
        client=client,
        round=rnd,
        state=state,
        phase=phase,
        bytes_done=done,
        bytes_total=TOTAL,
        reason=reason,
    )


def test_rate_and_eta_per_site_from_successive_statuses() -> None:
    tracker = JobTracker()
    old = task("site-1", 1, Phase.UPLOADING, TOTAL, TaskState.COMMITTED)
    p = None
    for t in range(0, 11):  # site-1 downloads 2 MiB/s; site-2 reports every 5 s, 1 MiB/s
        p = tracker.update(
            status(
                old,
                task("site-1", 2, Phase.DOWNLOADING, 2 * MIB * t),
                task("site-2", 2, Phase.UPLOADING, MIB * 5 * (t // 5)),
                done=1,
            ),
            float(t),
        )
    assert p is not None
    assert p.round == 2 and p.rounds_done == 1 and not p.ended
    one, two = p.sites  # the latest task of each site, by name
    assert (one.client, one.round, one.activity) == ("site-1", 2, "downloading")
    assert one.bytes_per_s == 2 * MIB and one.eta_s == (TOTAL - 20 * MIB) / (2 * MIB)
    assert two.activity == "uploading" and two.bytes_per_s == MIB
    assert two.eta_s == 90.0


def test_committed_rejected_and_waiting_sites() -> None:
    p = JobTracker().update(
        status(
            task("site-1", 1, Phase.UPLOADING, 50 * MIB, TaskState.REJECTED, "digest mismatch"),
            task("site-1", 2, Phase.UPLOADING, 3, TaskState.COMMITTED),
            task("site-2", 2, Phase.IDLE, 0),
            task("site-3", 2, Phase.TRAINING, 5, TaskState.EXPIRED, "no result"),
        ),
        0.0,
    )
    by = {s.client: s for s in p.sites}
    assert by["site-1"].activity == "done" and by["site-1"].bytes_done == TOTAL
    assert by["site-2"].activity == "waiting"
    assert by["site-3"].activity == "expired"
    assert [s.task_id for s in p.problems] == ["site-1-1"]  # an earlier round's refusal


def test_json_line_shape() -> None:
    p = JobTracker().update(status(task("site-1", 2, Phase.DOWNLOADING, MIB), done=1), 0.0)
    line = json.loads(json.dumps(p.to_json(now=1234.5)))
    assert line["job_id"] == "j1" and line["state"] == "running"
    assert (line["round"], line["rounds_done"], line["num_rounds"]) == (2, 1, 3)
    (site,) = line["sites"]
    assert site["activity"] == "downloading" and site["state"] == "assigned"
    assert site["bytes_done"] == MIB and site["bytes_total"] == TOTAL
    assert site["bytes_per_s"] is None and site["eta_s"] is None


def test_plain_lines_on_change_and_every_interval_while_moving() -> None:
    display = render.PlainDisplay(io.StringIO(), interval_s=10.0)
    tracker = JobTracker()
    out = []
    for t in range(0, 25):
        p = tracker.update(status(task("site-1", 1, Phase.DOWNLOADING, MIB * t)), float(t))
        out += [(t, line) for line in display.lines(p, float(t))]
    assert out[0] == (0, "job j1 (big): running, round 1 of 3 (0 completed)")
    assert out[1] == (0, "  round 1 site-1 downloading 0 B / 100.0 MiB (0%)")
    assert [t for t, _ in out[2:]] == [10, 20]
    assert (
        out[2][1] == "  round 1 site-1 downloading 10.0 MiB / 100.0 MiB (10%), 1.0 MiB/s, ETA 1:30"
    )
    p = tracker.update(
        status(task("site-1", 1, Phase.UPLOADING, TOTAL, TaskState.COMMITTED), done=1), 30.0
    )
    assert display.lines(p, 30.0) == [
        "job j1 (big): running, round 2 of 3 (1 completed)",
        "  round 1 site-1 done 100.0 MiB",
    ]
    p = tracker.update(status(state=JobState.FAILED, done=1, reason="round 2: quorum lost"), 31.0)
    assert display.lines(p, 31.0) == ["job j1 (big): failed after 1 of 3 rounds"]


def test_status_text_and_terminal_view() -> None:
    st = status(
        task("site-1", 2, Phase.DOWNLOADING, 25 * MIB),
        task("site-2", 2, Phase.UPLOADING, TOTAL, TaskState.COMMITTED),
        done=1,
    )
    p = JobTracker().update(st, 0.0)
    text = render.status_text(st, p, now=185.0)
    assert text.splitlines() == [
        "job j1 (big): running, round 2 of 3 (1 completed)",
        "",
        "ROUND  STATE   UPDATES  DURATION",
        "1      closed  2        2:05",
        "2      open    0        1:00",
        "",
        "SITE    ROUND  PHASE        PROGRESS                                             REASON",
        "site-1  2      downloading  [#####---------------] 25.0 MiB / 100.0 MiB (25%)",
        "site-2  2      done         [####################] 100.0 MiB / 100.0 MiB (100%)",
    ]
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=True).print(render.status_view(st, p, 185.0))
    shown = buf.getvalue()
    assert "25.0 MiB / 100.0 MiB (25%)" in shown and "━" in shown  # a drawn bar
    assert "\x1b[" in shown  # styled for a terminal


def test_choose_mode() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert render.choose_mode(True, Tty()) == "json"
    assert render.choose_mode(False, Tty()) == "rich"
    assert render.choose_mode(False, io.StringIO()) == "plain"
