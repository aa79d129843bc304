"""Showing a job's progress: live bars in a terminal, plain lines in a pipe, JSON lines.

``fl-admin watch`` and ``fl-poc`` pick a display once: ``--json`` gives one JSON object
per poll (for scripts); a terminal gets a live table with a bar per site (rich); anything
else (a log file, CI, ``docker compose logs``) gets plain lines, written when something
changes and every ``interval_s`` while bytes move, never a screen redraw.
``fl-admin status`` prints one snapshot the same two ways.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Literal, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from common import humanize, wire
from fl_client.admin.progress import JobProgress, SiteProgress

Mode = Literal["json", "plain", "rich"]
PLAIN_INTERVAL_S = 10.0
TEXT_BAR_WIDTH = 20


def choose_mode(json_lines: bool, out: TextIO) -> Mode:
    if json_lines:
        return "json"
    return "rich" if out.isatty() else "plain"


# --- words ------------------------------------------------------------------------------


def job_line(p: JobProgress) -> str:
    head = f"job {p.job_id} ({p.name}): {p.state.value}"
    if p.ended:
        return f"{head} after {p.rounds_done} of {p.num_rounds} rounds"
    return f"{head}, round {p.round} of {p.num_rounds} ({p.rounds_done} completed)"


def site_detail(s: SiteProgress) -> str:
    """What follows the site's activity: bytes, rate and time left, or the reason."""
    if s.activity in ("rejected", "expired"):
        return s.reason or ""
    if s.activity == "done":
        return humanize.size(s.bytes_total)
    if s.moving:
        done = humanize.progress(s.bytes_done, s.bytes_total)
        if s.bytes_per_s is None:
            return done  # one sample so far: no rate yet
        return f"{done}, {humanize.rate(s.bytes_per_s)}, ETA {humanize.duration(s.eta_s)}"
    return ""


def site_line(s: SiteProgress) -> str:
    detail = site_detail(s)
    sep = ": " if s.activity in ("rejected", "expired") else " "
    return f"  round {s.round} {s.client} {s.activity}{sep + detail if detail else ''}"


def text_bar(done: int, total: int, width: int = TEXT_BAR_WIDTH) -> str:
    filled = 0 if total <= 0 else min(width, width * done // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


# --- displays ---------------------------------------------------------------------------


class Display(Protocol):
    def update(self, progress: JobProgress, now: float) -> None: ...
    def close(self) -> None: ...


class JsonDisplay:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def update(self, progress: JobProgress, now: float) -> None:
        print(json.dumps(progress.to_json(time.time())), file=self.out, flush=True)

    def close(self) -> None:
        pass


class PlainDisplay:
    """Lines when something changes, and every ``interval_s`` for a site moving bytes."""

    def __init__(self, out: TextIO, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.out = out
        self.interval_s = interval_s
        self._job: tuple[object, ...] | None = None
        self._sites: dict[str, tuple[tuple[object, ...], float]] = {}

    def lines(self, p: JobProgress, now: float) -> list[str]:
        out = []
        key = (p.state, p.rounds_done)
        if key != self._job:
            self._job = key
            out.append(job_line(p))
        for s in p.sites:
            state = (s.round, s.activity)
            seen = self._sites.get(s.client)
            if seen is None or seen[0] != state or (s.moving and now - seen[1] >= self.interval_s):
                self._sites[s.client] = (state, now)
                out.append(site_line(s))
        return out

    def update(self, progress: JobProgress, now: float) -> None:
        for line in self.lines(progress, now):
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        pass


def sites_table(p: JobProgress) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("SITE", "ROUND", "PHASE", "PROGRESS", "BYTES", "RATE", "ETA"):
        table.add_column(col, no_wrap=True)
    for s in p.sites:
        bar = ProgressBar(total=max(s.bytes_total, 1), completed=s.bytes_done, width=30)
        moving = s.moving
        table.add_row(
            s.client,
            str(s.round),
            s.activity,
            bar if s.bytes_total else Text("-"),
            humanize.progress(s.bytes_done, s.bytes_total),
            humanize.rate(s.bytes_per_s) if moving else "",
            humanize.duration(s.eta_s) if moving else "",
        )
    return table


def progress_view(p: JobProgress) -> RenderableType:
    parts: list[RenderableType] = [Text(job_line(p), style="bold")]
    if p.reason:
        parts.append(Text(f"reason: {p.reason}"))
    if p.sites:
        parts.append(sites_table(p))
    for s in [*p.problems, *(s for s in p.sites if s.activity in ("rejected", "expired"))]:
        parts.append(Text(site_line(s), style="red"))
    return Group(*parts)


class RichDisplay:
    """A live table redrawn in place on every poll."""

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, auto_refresh=False, transient=False)
        self._started = False

    def update(self, progress: JobProgress, now: float) -> None:
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(progress_view(progress), refresh=True)

    def close(self) -> None:
        if self._started:
            self._live.stop()


def make_display(mode: Mode, out: TextIO) -> Display:
    if mode == "json":
        return JsonDisplay(out)
    if mode == "rich":
        return RichDisplay(Console(file=out))
    return PlainDisplay(out)


# --- fl-admin status ------------------------------------------------------------------


def _round_rows(rounds: Sequence[wire.RoundInfo], now: float) -> list[list[str]]:
    rows = []
    for r in rounds:
        end = r.closed_at if r.closed_at is not None else now
        took = humanize.duration(end - r.started_at)
        rows.append([str(r.round), r.state, str(r.num_updates), took])
    return rows


def _bytes_cell(s: SiteProgress) -> str:
    if not s.bytes_total:
        return "-"
    return (
        f"{text_bar(s.bytes_done, s.bytes_total)} {humanize.progress(s.bytes_done, s.bytes_total)}"
    )


def _site_rows(p: JobProgress) -> list[list[str]]:
    return [[s.client, str(s.round), s.activity, _bytes_cell(s), s.reason or ""] for s in p.sites]


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    )


def status_text(status: wire.JobStatus, p: JobProgress, now: float) -> str:
    """``fl-admin status`` for a pipe: the job, its rounds, each site's latest task."""
    lines = [job_line(p)]
    if p.reason:
        lines.append(f"reason: {p.reason}")
    if status.rounds:
        heads = ["ROUND", "STATE", "UPDATES", "DURATION"]
        lines += ["", plain_table(heads, _round_rows(status.rounds, now))]
    if p.sites:
        lines += ["", plain_table(["SITE", "ROUND", "PHASE", "PROGRESS", "REASON"], _site_rows(p))]
    if p.problems:
        lines += ["", "earlier tasks not counted:", *(site_line(s) for s in p.problems)]
    return "\n".join(lines)


def status_view(status: wire.JobStatus, p: JobProgress, now: float) -> RenderableType:
    """``fl-admin status`` for a terminal: the same, with bars."""
    parts: list[RenderableType] = [progress_view(p)]
    if status.rounds:
        rounds = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("ROUND", "STATE", "UPDATES", "DURATION"):
            rounds.add_column(col, no_wrap=True)
        for row in _round_rows(status.rounds, now):
            rounds.add_row(*row)
        parts += [Text(""), rounds]
    return Group(*parts)
