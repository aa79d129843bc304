"""Peak memory of the daemons, sampled from outside with psutil while a job runs."""

from __future__ import annotations

import threading

import psutil

from tests.cluster import Proc

MIB = 1024 * 1024


class RssSampler:
    """Peak RSS (and RSS without shared file pages) per process, every ``interval_s``.

    ``rss - shared`` approximates the anonymous memory a daemon holds: file pages it
    maps or reads are counted in ``shared`` and are reclaimable, heap and buffers are not.
    """

    def __init__(self, procs: dict[str, Proc], interval_s: float = 0.2) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self.peak: dict[str, int] = dict.fromkeys(procs, 0)
        self.peak_anon: dict[str, int] = dict.fromkeys(procs, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        handles = {k: psutil.Process(p.popen.pid) for k, p in self.procs.items()}
        while not self._stop.is_set():
            for k, h in handles.items():
                try:
                    mem = h.memory_full_info()
                except psutil.Error:
                    continue
                self.peak[k] = max(self.peak[k], mem.rss)
                self.peak_anon[k] = max(self.peak_anon[k], mem.rss - mem.shared)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def peak_mib(self) -> dict[str, float]:
        return {k: round(v / MIB, 1) for k, v in self.peak.items()}

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
