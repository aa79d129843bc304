"""A job's progress as an operator reads it: per site, what it does, how fast, how long.

The server's job status already says, per task, the phase and the bytes done of the
total (fed by the sites' heartbeats and by the segments it receives). ``JobTracker``
turns successive statuses into ``JobProgress`` values, adding a throughput and an ETA
per site from one ``RateEstimator`` per task and phase. Pure: the caller passes the
status and ``now``; rendering is elsewhere (``fl_client.admin.render``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from common import wire
from common.rate import RateEstimator
from common.wire import JobState, Phase, TaskState

TERMINAL = frozenset({JobState.FINISHED, JobState.FAILED, JobState.ABORTED})
TRANSFERS = frozenset({"downloading", "training", "uploading"})


def activity(task: wire.TaskInfo) -> str:
    """What the site is doing about this task, in one word."""
    if task.state is TaskState.COMMITTED:
        return "done"
    if task.state is TaskState.REJECTED:
        return "rejected"
    if task.state is TaskState.EXPIRED:
        return "expired"
    if task.phase is Phase.IDLE:
        return "waiting"  # issued, not started yet
    if task.phase is Phase.DONE:
        return "committing"
    return task.phase.value


@dataclass(frozen=True)
class SiteProgress:
    client: str
    round: int
    task_id: str
    state: TaskState
    activity: str
    bytes_done: int
    bytes_total: int
    bytes_per_s: float | None
    eta_s: float | None
    reason: str | None

    @property
    def moving(self) -> bool:
        return self.activity in TRANSFERS


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    name: str
    state: JobState
    rounds_done: int
    num_rounds: int
    reason: str | None
    sites: tuple[SiteProgress, ...]
    problems: tuple[SiteProgress, ...]  # rejected or expired tasks of earlier rounds

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL

    @property
    def round(self) -> int:
        """The round being worked on (the last one once the job ended)."""
        if self.state is JobState.RUNNING and self.rounds_done < self.num_rounds:
            return self.rounds_done + 1
        return max(self.rounds_done, 1)

    def to_json(self, now: float) -> dict[str, Any]:
        """One line of ``fl-admin watch --json``."""
        return {
            "ts": round(now, 3),
            "job_id": self.job_id,
            "name": self.name,
            "state": self.state.value,
            "round": self.round,
            "rounds_done": self.rounds_done,
            "num_rounds": self.num_rounds,
            "reason": self.reason,
            "sites": [_site_json(s) for s in self.sites],
        }


def _site_json(site: SiteProgress) -> dict[str, Any]:
    out = asdict(site)
    out["state"] = site.state.value
    for key in ("bytes_per_s", "eta_s"):
        if out[key] is not None:
            out[key] = round(out[key], 1)
    return out


def latest_per_site(tasks: list[wire.TaskInfo]) -> list[wire.TaskInfo]:
    """Each site's task of the latest round it took part in, sites in name order."""
    latest: dict[str, wire.TaskInfo] = {}
    for t in tasks:
        if t.client not in latest or t.round >= latest[t.client].round:
            latest[t.client] = t
    return [latest[name] for name in sorted(latest)]


class JobTracker:
    """Successive job statuses in, progress with rates out."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._rates: dict[tuple[str, str], RateEstimator] = {}

    def _site(self, task: wire.TaskInfo, now: float) -> SiteProgress:
        what = activity(task)
        done, total = task.bytes_done, task.bytes_total
        if what == "done":
            done = total
        rate = eta = None
        if what in TRANSFERS:
            est = self._rates.setdefault((task.task_id, what), RateEstimator(self.window_s))
            est.update(now, done)
            rate, eta = est.rate(now), est.eta(now, total)
        return SiteProgress(
            task.client,
            task.round,
            task.task_id,
            task.state,
            what,
            done,
            total,
            rate,
            eta,
            task.reason,
        )

    def update(self, status: wire.JobStatus, now: float) -> JobProgress:
        job = status.job
        current = latest_per_site(status.tasks)
        sites = tuple(self._site(t, now) for t in current)
        shown = {t.task_id for t in current}
        problems = tuple(
            self._site(t, now)
            for t in status.tasks
            if t.task_id not in shown and t.state in (TaskState.REJECTED, TaskState.EXPIRED)
        )
        live = {(s.task_id, s.activity) for s in sites}
        for key in [k for k in self._rates if k not in live]:
            del self._rates[key]  # forget finished phases
        return JobProgress(
            job.job_id,
            job.name,
            job.state,
            job.round,
            job.num_rounds,
            job.reason,
            sites,
            problems,
        )
