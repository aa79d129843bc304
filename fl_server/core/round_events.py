"""The round core's vocabulary: what it is told (events) and what it asks (effects).

Values only, so that a sequence of them is a test case (see ``fl_server.core.round``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.wire import TaskState
from fl_server.core.early import EarlyRound, Member


@dataclass(frozen=True)
class TaskInfo:
    """A task of the round as the core sees it; ``weight`` once it is committed."""

    task_id: str
    client: str
    state: TaskState
    last_progress: float
    weight: float | None = None
    folded: bool = False


# events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskAssigned:
    task_id: str
    client: str
    at: float


@dataclass(frozen=True)
class Progress:
    task_id: str
    at: float


@dataclass(frozen=True)
class SegmentHeld:
    task_id: str
    index: int


@dataclass(frozen=True)
class WeightDeclared:
    task_id: str
    weight: float


@dataclass(frozen=True)
class UpdateCommitted:
    task_id: str
    weight: float


@dataclass(frozen=True)
class UpdateRejected:
    task_id: str


@dataclass(frozen=True)
class TaskExpired:
    task_id: str


@dataclass(frozen=True)
class Folded:
    task_id: str


@dataclass(frozen=True)
class EarlyWritten:
    tensors: tuple[int, ...]
    digests: Mapping[int, str]
    unsynced: int


@dataclass(frozen=True)
class EarlyLost:
    """A spool the early aggregate reads is gone (its site reported failure)."""


@dataclass(frozen=True)
class ClosingBegun:
    """The round is closing on record: just now, or before the server restarted (then
    the early aggregate is gone with the process). The tasks caught up are final."""


@dataclass(frozen=True)
class Finalized:
    """The next global model is on disk (``early``: tensors written while updates arrived)."""

    early: int | None


@dataclass(frozen=True)
class Tick:
    now: float
    alive: tuple[str, ...] = ()  # sites heard from lately


Event = (
    TaskAssigned
    | Progress
    | SegmentHeld
    | WeightDeclared
    | UpdateCommitted
    | UpdateRejected
    | TaskExpired
    | Folded
    | EarlyWritten
    | EarlyLost
    | ClosingBegun
    | Finalized
    | Tick
)


# effects --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spool:
    """A committed update's file, scaled by its weight."""

    task_id: str
    weight: float


@dataclass(frozen=True)
class Accumulator:
    """The float64 sum of the first ``count`` folded updates, already weighted."""

    count: int


Input = Spool | Accumulator


@dataclass(frozen=True)
class ExpireTasks:
    task_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Fold:
    """Fold ``task``'s update: write ``inputs`` summed as accumulator ``count`` (no
    file when ``inputs`` is empty: a round's first spool is its sum), then record it."""

    task_id: str
    client: str
    weight: float
    inputs: tuple[Input, ...]
    count: int


@dataclass(frozen=True)
class RestartEarly:
    """Remove any early aggregate file: a new one, counting ``members``, starts."""

    members: tuple[Member, ...]
    replaced: bool  # an earlier one counted other updates


@dataclass(frozen=True)
class DropEarly:
    """Remove the early aggregate file: it counts updates that may not be the round's."""


@dataclass(frozen=True)
class EarlyStep:
    tensors: tuple[int, ...]
    early: EarlyRound  # a copy: what the file holds before this step


@dataclass(frozen=True)
class BeginClosing:
    pass


@dataclass(frozen=True)
class FinishEarly:
    """Write the tensors the early aggregate lacks, then make it the next global model."""

    rest: tuple[int, ...]
    early: EarlyRound


@dataclass(frozen=True)
class Aggregate:
    """Write the next global model as sum(inputs) / total_weight."""

    inputs: tuple[Input, ...]
    total_weight: float


@dataclass(frozen=True)
class CloseRound:
    updates: int
    total_weight: float
    how: str


@dataclass(frozen=True)
class WakeAt:
    at: float


Effect = (
    ExpireTasks
    | Fail
    | Fold
    | RestartEarly
    | DropEarly
    | EarlyStep
    | BeginClosing
    | FinishEarly
    | Aggregate
    | CloseRound
    | WakeAt
)
# effects after which the executor looks again at once, without waiting
WORK = (Fold, EarlyStep, BeginClosing, FinishEarly, Aggregate)
