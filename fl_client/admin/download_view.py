"""Showing a model download on stderr: a live bar in a terminal, two plain lines otherwise.

stdout carries only the paths written (scripts read it); the progress goes to stderr.
In a pipe or a log file a bar redrawn a thousand times is noise, so there the download
says what it starts (and how much an earlier run left verified on disk) and what it
did, and nothing in between.
"""

from __future__ import annotations

import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from common import humanize

REFRESH_S = 0.1  # a redraw per segment would cost more than the segment at GB/s


class DownloadView(Protocol):
    def start(self, what: str, total_bytes: int) -> None:
        """The download of ``what`` (``total_bytes`` long) begins."""

    def add(self, nbytes: int) -> None:
        """Bytes held and verified; the first call after ``start`` counts what an earlier
        run left on disk (``fl_client.site.download`` reports that before fetching)."""

    def close(self) -> None: ...


class PlainView:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._what = ""
        self._total = 0
        self._first: int | None = None
        self._done = 0
        self._started = 0.0

    def start(self, what: str, total_bytes: int) -> None:
        self._what, self._total, self._started = what, total_bytes, time.monotonic()

    def add(self, nbytes: int) -> None:
        if self._first is None:
            self._first = nbytes
            head = f"downloading {self._what}: {humanize.size(self._total)}"
            if nbytes:
                head += f", {humanize.size(nbytes)} already on disk (verified), resuming"
            print(head, file=self.out, flush=True)
        self._done += nbytes

    def close(self) -> None:
        if self._first is None or self._done < self._total:
            return  # failed or interrupted: the error says why
        fetched = self._done - self._first
        took = time.monotonic() - self._started
        print(
            f"downloaded {self._what}: {humanize.size(fetched)} fetched in "
            f"{humanize.duration(took)}",
            file=self.out,
            flush=True,
        )


class RichView:
    def __init__(self, out: TextIO) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=out),
            auto_refresh=False,
        )
        self._task: TaskID | None = None
        self._resumed = False
        self._drawn = 0.0

    def start(self, what: str, total_bytes: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(what, total=total_bytes)

    def add(self, nbytes: int) -> None:
        if self._task is None:
            return
        if not self._resumed:  # bytes from disk: the bar starts there, the rate does not
            self._resumed = True
            self._bar.reset(self._task, completed=nbytes)
            return
        now = time.monotonic()
        redraw = now - self._drawn >= REFRESH_S
        self._bar.update(self._task, advance=nbytes, refresh=redraw)
        if redraw:
            self._drawn = now

    def close(self) -> None:
        if self._task is not None:
            self._bar.refresh()
            self._bar.stop()


def make_view(out: TextIO) -> DownloadView:
    return RichView(out) if out.isatty() else PlainView(out)
