"""A client daemon's Prometheus metrics, served on ``metrics_port`` when it is set.

The transfers count once per segment (bytes, duration, retries); the phase and the
bytes of the task at hand are read from the daemon's progress when scraped, so the
data path pays nothing for them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import THROUGHPUT_BUCKETS_BPS, new_registry
from common.wire import Phase


class Direction(enum.StrEnum):
    DOWNLOAD = "download"  # the task's model, from the server
    UPLOAD = "upload"  # the update, to the server


class ProgressView(Protocol):
    """What the scrape reads of the daemon's current task."""

    @property
    def phase(self) -> Phase: ...
    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...


class ClientMetrics:
    def __init__(self, progress: ProgressView) -> None:
        self.registry: CollectorRegistry = new_registry()
        r = self.registry
        self._bytes = {
            Direction.DOWNLOAD: Counter(
                "fl_client_received_bytes",
                "Bytes of model segments downloaded and verified (what=model).",
                ["what"],
                registry=r,
            ).labels("model"),
            Direction.UPLOAD: Counter(
                "fl_client_sent_bytes",
                "Bytes of update segments uploaded and acknowledged (what=update).",
                ["what"],
                registry=r,
            ).labels("update"),
        }
        retried = Counter(
            "fl_client_segments_retried",
            "Segment transfers tried again after a dropped connection or a digest error.",
            ["direction"],
            registry=r,
        )
        throughput = Histogram(
            "fl_client_segment_throughput_bytes_per_second",
            "Throughput of one segment, from its request to its last byte or acknowledgement.",
            ["direction"],
            buckets=THROUGHPUT_BUCKETS_BPS,
            registry=r,
        )
        self._retried = {d: retried.labels(d.value) for d in Direction}
        self._throughput = {d: throughput.labels(d.value) for d in Direction}
        self._committed = Counter(
            "fl_client_updates_committed", "Updates the server accepted.", registry=r
        )
        r.register(TaskCollector(progress))

    def segment_moved(self, direction: Direction, nbytes: int, seconds: float) -> None:
        self._bytes[direction].inc(nbytes)
        if seconds > 0:
            self._throughput[direction].observe(nbytes / seconds)

    def segment_retried(self, direction: Direction) -> None:
        self._retried[direction].inc()

    def update_committed(self) -> None:
        self._committed.inc()


class TaskCollector(Collector):
    def __init__(self, progress: ProgressView) -> None:
        self.progress = progress

    def collect(self) -> Iterator[Metric]:
        p = self.progress
        phase = GaugeMetricFamily(
            "fl_client_phase",
            "1 for the phase the daemon is in, 0 for the others.",
            labels=["phase"],
        )
        for each in Phase:
            phase.add_metric([each.value], float(each is p.phase))
        yield phase
        yield GaugeMetricFamily(
            "fl_client_task_bytes_done", "Bytes done in the current phase.", value=p.done
        )
        yield GaugeMetricFamily(
            "fl_client_task_bytes_total", "Bytes the current phase moves in all.", value=p.total
        )
