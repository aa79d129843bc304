"""How long the daemon waits before taking up a task again after it failed.

Pure: values in, seconds out. The pause doubles with each failure of the same task, up
to ``retry_backoff_max_s``, so that a fault that persists (a server refusing every
segment, a full disk) costs a request now and then rather than two a second; a task
that succeeds, is given up or is replaced by another starts over from ``first_s``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_RETRY_S = 0.5
JITTER = 0.2  # each pause is drawn from +-20 % around its nominal length


@dataclass
class TaskBackoff:
    max_s: float
    first_s: float = FIRST_RETRY_S
    _task_id: str | None = None
    _next_s: float = 0.0

    def failed(self, task_id: str) -> float:
        """The nominal pause after this failure of ``task_id``."""
        if task_id != self._task_id:
            self._task_id, self._next_s = task_id, min(self.first_s, self.max_s)
        pause = self._next_s
        self._next_s = min(self.max_s, pause * 2)
        return pause

    def reset(self) -> None:
        """The task is over (done, given up, expired): the next failure starts afresh."""
        self._task_id = None


def jittered(pause_s: float, rng: random.Random | None = None) -> float:
    """``pause_s`` spread a little, so that sites failing together do not retry together."""
    return pause_s * (rng or random).uniform(1 - JITTER, 1 + JITTER)
