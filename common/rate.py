"""Throughput and time left of a transfer, from successive ``(time, bytes done)`` samples.

Theory of operation. Progress arrives in steps: a client reports its bytes with every
heartbeat, the server with every acknowledged segment, so an observer that polls every
second sees the same value several times and then a jump. The estimator keeps only
*change points* (the first time each new value was seen) from a sliding window and
divides the bytes between the oldest and the newest of them by the time between them.
For steady steps that is exact, whatever the polling rate; sampling the same value
again costs nothing.

When nothing has changed for ``stall_factor`` times the usual interval between steps,
the transfer counts as stalled: the rate is 0 and there is no ETA, rather than a stale
figure. A value that goes down (a new phase or task started) restarts the estimate.

Pure: the caller passes ``now`` (any monotonic clock, in seconds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_WINDOW_S = 30.0
DEFAULT_STALL_FACTOR = 3.0


@dataclass(frozen=True)
class Sample:
    t: float
    done: int


class RateEstimator:
    """Bytes per second over the last ``window_s`` seconds of change points."""

    def __init__(
        self, window_s: float = DEFAULT_WINDOW_S, stall_factor: float = DEFAULT_STALL_FACTOR
    ) -> None:
        if window_s <= 0 or stall_factor <= 0:
            raise ValueError("window_s and stall_factor must be positive")
        self.window_s = window_s
        self.stall_factor = stall_factor
        self._points: deque[Sample] = deque()

    def update(self, now: float, done: int) -> None:
        """Record that ``done`` bytes were done at ``now``."""
        points = self._points
        if points and done < points[-1].done:
            points.clear()  # a restart, not negative progress
        if points and done == points[-1].done:
            return  # no step: only the first sighting of a value is a change point
        points.append(Sample(now, done))
        # keep one point at or before the window's start, so the span covers the window
        while len(points) > 2 and points[1].t <= now - self.window_s:
            points.popleft()

    def rate(self, now: float) -> float | None:
        """Bytes per second; None until two change points were seen; 0.0 when stalled."""
        points = self._points
        if len(points) < 2:
            return None
        first, last = points[0], points[-1]
        span = last.t - first.t
        if span <= 0:
            return None
        step_s = span / (len(points) - 1)
        if now - last.t > self.stall_factor * step_s:
            return 0.0
        return (last.done - first.done) / span

    def eta(self, now: float, total: int) -> float | None:
        """Seconds until ``total`` at the current rate; None when unknown or stalled."""
        if not self._points:
            return None
        left = total - self._points[-1].done
        if left <= 0:
            return 0.0
        rate = self.rate(now)
        if not rate:
            return None
        return left / rate
