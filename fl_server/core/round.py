"""The round core: one round of a job as a value fed events that returns effects.

Theory of operation. ``RoundCore`` knows the round's tasks (their states, weights,
the segments they hold, the weights their sites declared), the early aggregate it has
asked for, and the round's own state (``ROUNDS`` table). The executor
(``fl_server.runner``) reads what is on record, turns it into events with
``catch_up``, feeds them to ``handle``, and then ``handle(Tick(now, alive))`` answers
with what to do next:

- ``ExpireTasks``: tasks whose ``train_timeout`` ran out;
- ``Fail``: the job fails, with the reason (``rules.decide_round``);
- ``Fold``: fold a committed update into the running sum while others still upload
  (only when the early aggregate cannot be made);
- ``RestartEarly`` / ``DropEarly`` / ``EarlyStep``: average the tensors every update
  already holds into the early aggregate (``core.early``);
- ``BeginClosing``: the quorum is in; the round takes no more tasks, commits or
  rejections;
- ``FinishEarly`` or ``Aggregate``: write the next global model from the early
  aggregate, if it counts exactly the committed updates, else from the spools;
- ``CloseRound``: the model is on disk; close the round and advance the job;
- ``WakeAt``: nothing to do until then, or until something happens.

Each effect that does work is answered with an event when done (``Folded``,
``EarlyWritten`` or ``EarlyLost``, ``ClosingBegun``, ``Finalized``). Nothing here
reads a clock, a file or the database, so every sequence can be tested with values.
A restarted server builds the core from the record: a round found ``CLOSING`` is
closed again from the spools (the early aggregate lived in memory only).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from common.digest import segment_count
from common.tensorfile import Layout
from common.wire import TaskState
from fl_server.core import rules
from fl_server.core.early import (
    EarlyRound,
    committed_members,
    members_of,
    next_step,
    ready_tensors,
)
from fl_server.core.round_events import (
    WORK,
    Accumulator,
    Aggregate,
    BeginClosing,
    CloseRound,
    ClosingBegun,
    DropEarly,
    EarlyLost,
    EarlyStep,
    EarlyWritten,
    Effect,
    Event,
    ExpireTasks,
    Fail,
    Finalized,
    FinishEarly,
    Fold,
    Folded,
    Input,
    Progress,
    RestartEarly,
    SegmentHeld,
    Spool,
    TaskAssigned,
    TaskExpired,
    TaskInfo,
    Tick,
    UpdateCommitted,
    UpdateRejected,
    WakeAt,
    WeightDeclared,
)
from fl_server.core.transitions import ROUNDS, TASKS, RoundEvent, RoundState, TaskEvent

# how long the round waits with nothing to do before it looks again anyway
IDLE_RECHECK_S = 5.0
EXPIRED_REASON = "no result within train_timeout"


@dataclass(frozen=True)
class RoundRules:
    """What the job file says about a round."""

    min_clients: int
    train_timeout: float | None
    wait_for_clients_s: float | None = None
    clients: tuple[str, ...] | None = None  # the sites the job admits (None: any)


def _copy(early: EarlyRound) -> EarlyRound:
    return EarlyRound(early.members, set(early.done), dict(early.digests), early.unsynced)


@dataclass
class RoundCore:
    """One round's decisions; see the module's docstring."""

    rnd: int
    layout: Layout  # of the global model the round starts from
    segment_bytes: int  # of the updates' segments
    policy: RoundRules
    opened_at: float
    state: RoundState = RoundState.OPEN
    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    held: dict[str, set[int]] = field(default_factory=dict)
    declared: dict[str, float] = field(default_factory=dict)
    early: EarlyRound | None = None
    early_tensors: int | None = None  # set when the round closed from the early file

    # feeding the record -------------------------------------------------------------

    def catch_up(
        self,
        tasks: Iterable[TaskInfo],
        held: Mapping[str, Collection[int]],
        declared: Mapping[str, float],
    ) -> list[Event]:
        """The events that bring the core from what it knows to what is on record."""
        events: list[Event] = []
        for t in tasks:
            known = self.tasks.get(t.task_id)
            if known is None:
                events.append(TaskAssigned(t.task_id, t.client, t.last_progress))
                known = TaskInfo(t.task_id, t.client, TaskState.ASSIGNED, t.last_progress)
            if t.last_progress > known.last_progress:
                events.append(Progress(t.task_id, t.last_progress))
            have = self.held.get(t.task_id, set())
            events.extend(
                SegmentHeld(t.task_id, i) for i in sorted(held.get(t.task_id, ())) if i not in have
            )
            weight = declared.get(t.task_id)
            if weight is not None and self.declared.get(t.task_id) != weight:
                events.append(WeightDeclared(t.task_id, weight))
            if known.state is not t.state:
                if t.state is TaskState.COMMITTED:
                    assert t.weight is not None
                    events.append(UpdateCommitted(t.task_id, t.weight))
                elif t.state is TaskState.REJECTED:
                    events.append(UpdateRejected(t.task_id))
                elif t.state is TaskState.EXPIRED:
                    events.append(TaskExpired(t.task_id))
            if t.folded and not known.folded:
                events.append(Folded(t.task_id))
        return events

    def handle(self, event: Event) -> list[Effect]:
        """Take ``event`` in; effects only come from ``Tick`` and ``Finalized``."""
        match event:
            case TaskAssigned(task_id, client, at):
                self.tasks[task_id] = TaskInfo(task_id, client, TaskState.ASSIGNED, at)
            case Progress(task_id, at):
                self.tasks[task_id] = replace(self.tasks[task_id], last_progress=at)
            case SegmentHeld(task_id, index):
                self.held.setdefault(task_id, set()).add(index)
            case WeightDeclared(task_id, weight):
                self.declared[task_id] = weight
            case UpdateCommitted(task_id, weight):
                self._move(task_id, TaskEvent.COMMIT, weight=weight)
            case UpdateRejected(task_id):
                self._move(task_id, TaskEvent.REJECT)
            case TaskExpired(task_id):
                self._move(task_id, TaskEvent.EXPIRE)
            case Folded(task_id):
                self.tasks[task_id] = replace(self.tasks[task_id], folded=True)
                self.held.pop(task_id, None)
            case EarlyWritten(tensors, digests, unsynced):
                assert self.early is not None
                self.early.done.update(tensors)
                self.early.digests.update(digests)
                self.early.unsynced = unsynced
            case EarlyLost():
                self.early = None
            case ClosingBegun():
                self.state = ROUNDS.next(f"{self.rnd}", self.state, RoundEvent.BEGIN_CLOSING)
            case Finalized(early):
                self.state = ROUNDS.next(f"{self.rnd}", self.state, RoundEvent.CLOSE)
                self.early, self.early_tensors = None, early
                return [self._close_round()]
            case Tick(now, alive):
                if self.state is RoundState.OPEN:
                    return self._decide_open(now, alive)
                if self.state is RoundState.CLOSING:
                    return self._decide_closing()
        return []

    def _move(self, task_id: str, event: TaskEvent, weight: float | None = None) -> None:
        t = self.tasks[task_id]
        state = TASKS.next(task_id, t.state, event)
        self.tasks[task_id] = replace(t, state=state, weight=weight)
        if state is not TaskState.COMMITTED:
            self.held.pop(task_id, None)
            self.declared.pop(task_id, None)

    # deciding -----------------------------------------------------------------------

    def _views(self) -> list[rules.TaskView]:
        return [
            rules.TaskView(t.task_id, t.client, t.state, t.last_progress)
            for t in self.tasks.values()
        ]

    def _decide_open(self, now: float, alive: Iterable[str]) -> list[Effect]:
        views = self._views()
        decision = rules.decide_round(
            views,
            min_clients=self.policy.min_clients,
            train_timeout=self.policy.train_timeout,
            now=now,
            joinable=rules.count_joinable(alive, self.policy.clients, views),
            opened_at=self.opened_at,
            wait_for_clients_s=self.policy.wait_for_clients_s,
        )
        effects: list[Effect] = []
        if decision.expire:
            effects.append(ExpireTasks(decision.expire, EXPIRED_REASON))
        if decision.action is rules.Action.GO:
            return [*effects, BeginClosing()]
        if decision.action is rules.Action.FAIL:
            return [*effects, Fail(f"round {self.rnd}: {decision.reason}")]
        work = self._work_while_open()
        if work and isinstance(work[-1], WORK):
            return [*effects, *work]
        wake = now + IDLE_RECHECK_S
        if decision.wake_at is not None:
            wake = min(wake, decision.wake_at)
        return [*effects, *work, WakeAt(wake)]

    def _work_while_open(self) -> list[Effect]:
        """An early step or a fold to do while updates arrive, if any."""
        members = members_of(self.tasks.values(), self.declared)
        effects: list[Effect] = []
        if members is None:
            # not known for now: what was written early may count updates that go (or
            # whose spools an accumulator replaces); start over when known
            if self.early is not None:
                self.early = None
                effects.append(DropEarly())
            unfolded = self._unfolded()
            if unfolded:
                effects.append(self._fold(unfolded[0]))
            return effects
        if self.early is None or self.early.members != members:
            effects.append(RestartEarly(members, replaced=self.early is not None))
            self.early = EarlyRound(members)
        held = [self._held(m.task_id) for m in members]
        ready = ready_tensors(self.layout, self.segment_bytes, held, self.early.done)
        if ready:
            step = tuple(next_step(self.layout, ready))
            effects.append(EarlyStep(step, _copy(self.early)))
        return effects

    def _held(self, task_id: str) -> Collection[int]:
        if self.tasks[task_id].state is TaskState.COMMITTED:
            return range(segment_count(self.layout.file_size, self.segment_bytes))
        return self.held.get(task_id, set())

    def _unfolded(self) -> list[TaskInfo]:
        return [t for t in self.tasks.values() if t.state is TaskState.COMMITTED and not t.folded]

    def _folded(self) -> list[TaskInfo]:
        return [t for t in self.tasks.values() if t.folded]

    def sum_so_far(self) -> tuple[Input, ...]:
        """The files whose weighted sum is the round's aggregate so far: none, the first
        folded update's spool, or the accumulator of all folded ones."""
        folded = self._folded()
        if not folded:
            return ()
        if len(folded) == 1:
            assert folded[0].weight is not None
            return (Spool(folded[0].task_id, folded[0].weight),)
        return (Accumulator(len(folded)),)

    def _fold(self, t: TaskInfo) -> Fold:
        assert t.weight is not None
        before = self.sum_so_far()
        inputs = (*before, Spool(t.task_id, t.weight)) if before else ()
        return Fold(t.task_id, t.client, t.weight, inputs, len(self._folded()) + 1)

    def kept_files(self) -> tuple[Input, ...]:
        """The round's files worth keeping: the sum so far and the spools of updates
        that are, or may still be, part of the round."""
        spools = tuple(
            Spool(t.task_id, t.weight or 0.0)
            for t in self.tasks.values()
            if not t.folded and t.state in (TaskState.ASSIGNED, TaskState.COMMITTED)
        )
        return (*self.sum_so_far(), *spools)

    def _decide_closing(self) -> list[Effect]:
        tasks = self.tasks.values()
        if self.early is not None:
            if self.early.members == committed_members(tasks):
                rest = tuple(i for i in range(len(self.layout.tensors)) if i not in self.early.done)
                return [FinishEarly(rest, _copy(self.early))]
            self.early = None
            return [DropEarly(), self._aggregate()]
        return [self._aggregate()]

    def _aggregate(self) -> Aggregate:
        unfolded = self._unfolded()
        inputs = (*self.sum_so_far(), *(Spool(t.task_id, t.weight or 0.0) for t in unfolded))
        total = sum(t.weight or 0.0 for t in self._folded()) + sum(
            t.weight or 0.0 for t in unfolded
        )
        return Aggregate(inputs, total)

    def _close_round(self) -> CloseRound:
        committed = [t for t in self.tasks.values() if t.state is TaskState.COMMITTED]
        if self.early_tensors is None:
            how = "from the spools"
        else:
            how = (
                f"{self.early_tensors} of {len(self.layout.tensors)} tensors while updates arrived"
            )
        return CloseRound(len(committed), sum(t.weight or 0.0 for t in committed), how)
