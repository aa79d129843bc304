"""The round core as tables: event sequences in, effects out; no server, no clock.

The last test carries the effects out on real files with the same functions the server
uses, to show that the early path and the plain path give the same model byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from common.digest import segment_count
from common.errors import IllegalTransition
from common.modelio import ModelWriter, compute_manifest
from common.tensorfile import Layout, plan_layout
from common.wire import TaskState
from fl_server import aggregate, eager
from fl_server.aggregate import Source
from fl_server.core.early import EarlyRound, Member
from fl_server.core.round import RoundCore, RoundRules
from fl_server.core.round_events import (
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
from fl_server.core.transitions import RoundState

SEGMENT = 4096
TENSORS = [("w", "F32", (3000,)), ("b", "F32", (30,)), ("h", "F16", (7, 5))]
LAYOUT, _ = plan_layout(TENSORS)
SEGMENTS = segment_count(LAYOUT.file_size, SEGMENT)
TIMEOUT = 100.0


def core(min_clients: int = 2, wait_for_clients_s: float | None = None) -> RoundCore:
    policy = RoundRules(min_clients, TIMEOUT, wait_for_clients_s)
    return RoundCore(rnd=1, layout=LAYOUT, segment_bytes=SEGMENT, policy=policy, opened_at=0.0)


def feed(c: RoundCore, *events: Event) -> list[Effect]:
    """Every event in order; the effects of the last one."""
    effects: list[Effect] = []
    for ev in events:
        effects = c.handle(ev)
    return effects


def every_segment(task_id: str) -> list[Event]:
    return [SegmentHeld(task_id, i) for i in range(SEGMENTS)]


def assigned(*names: str) -> list[Event]:
    return [TaskAssigned(f"t-{n}", n, 0.0) for n in names]


def test_a_round_waits_for_its_tasks_then_closes_from_the_spools_without_weights() -> None:
    c = core()
    assert feed(c, *assigned("a", "b"), Tick(10.0)) == [WakeAt(15.0)]  # a look every 5 s
    # a commits without having declared a weight: no early aggregate, a's spool is the sum
    effects = feed(c, UpdateCommitted("t-a", 3.0), Tick(20.0))
    assert effects == [Fold("t-a", "a", 3.0, inputs=(), count=1)]
    assert feed(c, Folded("t-a"), Tick(21.0)) == [WakeAt(26.0)]
    # b commits: the quorum is in
    assert feed(c, UpdateCommitted("t-b", 5.0), Tick(30.0)) == [BeginClosing()]
    assert c.state is RoundState.OPEN  # until the record says it is closing
    assert feed(c, ClosingBegun(), Tick(31.0)) == [
        Aggregate((Spool("t-a", 3.0), Spool("t-b", 5.0)), 8.0)
    ]
    assert feed(c, Finalized(None)) == [CloseRound(2, 8.0, "from the spools")]
    assert RoundState(c.state) is RoundState.CLOSED  # the core moved it
    assert feed(c, Tick(32.0)) == []  # a closed round does nothing more


def test_three_updates_fold_into_an_accumulator_while_others_upload() -> None:
    c = core(min_clients=3)
    feed(c, *assigned("a", "b", "c", "d"))
    fold_a = feed(c, UpdateCommitted("t-a", 1.0), Tick(1.0))
    assert fold_a == [Fold("t-a", "a", 1.0, (), 1)]
    fold_b = feed(c, Folded("t-a"), UpdateCommitted("t-b", 2.0), Tick(2.0))
    assert fold_b == [Fold("t-b", "b", 2.0, (Spool("t-a", 1.0), Spool("t-b", 2.0)), 2)]
    fold_c = feed(c, Folded("t-b"), UpdateCommitted("t-c", 4.0), Tick(3.0))
    assert fold_c == [Fold("t-c", "c", 4.0, (Accumulator(2), Spool("t-c", 4.0)), 3)]
    assert c.kept_files() == (Accumulator(2), Spool("t-c", 4.0), Spool("t-d", 0.0))
    # d never sends anything: it expires at train_timeout and the round closes without it
    assert feed(c, Folded("t-c"), Tick(50.0)) == [WakeAt(55.0)]
    assert feed(c, Tick(TIMEOUT)) == [
        ExpireTasks(("t-d",), "no result within train_timeout"),
        BeginClosing(),
    ]
    closing = feed(c, TaskExpired("t-d"), ClosingBegun(), Tick(TIMEOUT + 1))
    assert closing == [Aggregate((Accumulator(3),), 7.0)]


def test_updates_are_averaged_early_once_every_site_holds_a_tensor() -> None:
    c = core()
    feed(c, *assigned("a", "b"), WeightDeclared("t-a", 3.0))
    # b has declared nothing yet: who the round counts is not known
    assert feed(c, *every_segment("t-a"), Tick(1.0)) == [WakeAt(6.0)]
    members = (Member("t-a", 3.0), Member("t-b", 5.0))
    effects = feed(c, WeightDeclared("t-b", 5.0), SegmentHeld("t-b", 0), Tick(2.0))
    assert effects == [RestartEarly(members, replaced=False), WakeAt(7.0)]  # nothing ready
    step = feed(c, *every_segment("t-b"), Tick(3.0))
    assert step == [EarlyStep((0, 1, 2), EarlyRound(members))]
    feed(c, EarlyWritten((0, 1, 2), {0: "d0"}, 1234))
    assert c.early is not None and c.early.done == {0, 1, 2} and c.early.unsynced == 1234
    assert feed(c, Tick(4.0)) == [WakeAt(9.0)]  # all written: wait for the commits
    feed(c, UpdateCommitted("t-a", 3.0), UpdateCommitted("t-b", 5.0))
    assert feed(c, Tick(5.0), ClosingBegun(), Tick(6.0)) == [
        FinishEarly((), EarlyRound(members, {0, 1, 2}, {0: "d0"}, 1234))
    ]
    assert feed(c, Finalized(3)) == [CloseRound(2, 8.0, "3 of 3 tensors while updates arrived")]


def test_a_commit_with_another_weight_than_declared_drops_the_early_aggregate() -> None:
    c = core()
    feed(c, *assigned("a", "b"), WeightDeclared("t-a", 3.0), WeightDeclared("t-b", 5.0))
    feed(c, *every_segment("t-a"), *every_segment("t-b"), Tick(1.0))
    feed(c, EarlyWritten((0, 1, 2), {}, 0))
    feed(c, UpdateCommitted("t-b", 6.0))  # not the 5 declared
    # while open: the members changed, the early work starts over (and is written again)
    restart = feed(c, Tick(2.0))
    members = (Member("t-a", 3.0), Member("t-b", 6.0))
    assert restart == [
        RestartEarly(members, replaced=True),
        EarlyStep((0, 1, 2), EarlyRound(members)),
    ]
    # closing with an early aggregate of other weights: dropped, plain path
    c2 = core()
    feed(c2, *assigned("a", "b"), WeightDeclared("t-a", 3.0), WeightDeclared("t-b", 5.0))
    feed(c2, *every_segment("t-a"), *every_segment("t-b"), Tick(1.0))
    feed(c2, EarlyWritten((0, 1, 2), {}, 0))
    feed(c2, UpdateCommitted("t-a", 3.0), UpdateCommitted("t-b", 6.0), ClosingBegun())
    assert feed(c2, Tick(3.0)) == [
        DropEarly(),
        Aggregate((Spool("t-a", 3.0), Spool("t-b", 6.0)), 9.0),
    ]


def test_a_site_dropping_out_restarts_the_early_aggregate_without_it() -> None:
    c = core(min_clients=1)
    feed(c, *assigned("a", "b"), WeightDeclared("t-a", 3.0), WeightDeclared("t-b", 5.0))
    feed(c, *every_segment("t-a"), SegmentHeld("t-b", 0), Tick(1.0))
    feed(c, EarlyWritten((1, 2), {}, 0))  # some tensors written counting b
    effects = feed(c, UpdateRejected("t-b"), Tick(2.0))
    assert effects == [
        RestartEarly((Member("t-a", 3.0),), replaced=True),
        EarlyStep((0, 1, 2), EarlyRound((Member("t-a", 3.0),))),
    ]
    # the spool of a member vanished under a step: the early work is dropped
    assert feed(c, EarlyLost()) == [] and c.early is None
    assert feed(c, UpdateCommitted("t-a", 3.0), Tick(3.0)) == [BeginClosing()]


def test_a_round_short_of_updates_fails_naming_who_is_missing() -> None:
    c = core()
    feed(c, *assigned("a", "b"), UpdateCommitted("t-a", 1.0), Folded("t-a"))
    effects = feed(c, UpdateRejected("t-b"), Tick(10.0, alive=("a", "b")))
    assert effects == [
        Fail("round 1: round needs 2 updates but only 1 arrived (from: a); rejected: b")
    ]
    # with a site still able to join, the round waits for it instead (and meanwhile
    # starts the early aggregate of the one update it has)
    waiting = feed(c, Tick(10.0, alive=("a", "b", "c")))
    assert [type(e) for e in waiting] == [RestartEarly, EarlyStep]


def test_expiry_at_train_timeout_fails_a_round_that_cannot_reach_its_quorum() -> None:
    c = core()
    feed(c, *assigned("a", "b"), UpdateCommitted("t-a", 1.0), Folded("t-a"))
    assert feed(c, Tick(TIMEOUT - 1)) == [WakeAt(TIMEOUT)]
    effects = feed(c, Tick(TIMEOUT))
    assert effects == [
        ExpireTasks(("t-b",), "no result within train_timeout"),
        Fail(
            "round 1: round needs 2 updates but only 1 arrived (from: a); "
            "no result within train_timeout=100 s from: b"
        ),
    ]


def test_a_round_without_enough_sites_fails_after_wait_for_clients_s() -> None:
    c = core(wait_for_clients_s=30.0)
    feed(c, *assigned("a"), UpdateCommitted("t-a", 1.0), Folded("t-a"), Tick(1.0))
    feed(c, EarlyWritten((0, 1, 2), {}, 0))
    assert feed(c, Tick(20.0)) == [WakeAt(25.0)]
    assert feed(c, Tick(28.0)) == [WakeAt(30.0)]
    assert feed(c, Tick(31.0)) == [
        Fail("round 1: only 1 of min_clients=2 clients took part within wait_for_clients_s=30 s")
    ]


def test_a_restart_mid_close_aggregates_again_from_the_record() -> None:
    c = core()
    record = [
        TaskInfo("t-a", "a", TaskState.COMMITTED, 5.0, 3.0, folded=True),
        TaskInfo("t-b", "b", TaskState.COMMITTED, 6.0, 5.0),
        TaskInfo("t-c", "c", TaskState.EXPIRED, 1.0),
    ]
    events = c.catch_up(record, {}, {"t-b": 5.0})
    assert events[:3] == [TaskAssigned("t-a", "a", 5.0), UpdateCommitted("t-a", 3.0), Folded("t-a")]
    feed(c, *events)
    assert c.catch_up(record, {}, {"t-b": 5.0}) == []  # nothing new on record
    assert c.kept_files() == (Spool("t-a", 3.0), Spool("t-b", 5.0))
    assert feed(c, ClosingBegun(), Tick(100.0)) == [
        Aggregate((Spool("t-a", 3.0), Spool("t-b", 5.0)), 8.0)
    ]


def test_catch_up_reports_only_what_changed() -> None:
    c = core()
    feed(c, *assigned("a"))
    row = TaskInfo("t-a", "a", TaskState.ASSIGNED, 7.0)
    assert c.catch_up([row], {"t-a": [0, 2]}, {"t-a": 4.0}) == [
        *[ev for ev in c.catch_up([row], {}, {}) if not isinstance(ev, SegmentHeld)],
        SegmentHeld("t-a", 0),
        SegmentHeld("t-a", 2),
        WeightDeclared("t-a", 4.0),
    ]
    feed(c, *c.catch_up([row], {"t-a": [0, 2]}, {"t-a": 4.0}))
    assert c.catch_up([row], {"t-a": [0, 2]}, {"t-a": 4.0}) == []
    assert c.tasks["t-a"].last_progress == 7.0


@pytest.mark.parametrize(
    "events",
    [
        [*assigned("a"), TaskExpired("t-a"), UpdateCommitted("t-a", 1.0)],
        [*assigned("a"), UpdateCommitted("t-a", 1.0), UpdateRejected("t-a")],
        [Finalized(None)],  # a round still open cannot close
        [ClosingBegun(), ClosingBegun()],
    ],
)
def test_an_illegal_event_raises_naming_the_state_and_the_event(events: list[Event]) -> None:
    with pytest.raises(IllegalTransition, match=r"is \w+ and cannot"):
        feed(core(), *events)


# the effects carried out on files


def _update(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    dtypes = {"F32": np.float32, "F16": np.float16}
    with ModelWriter(path, TENSORS, segment_bytes=SEGMENT) as w:
        for _, dt, shape in TENSORS:
            w.write((rng.standard_normal(shape) * 100).astype(dtypes[dt]))
        w.finish()
    return path


class Files:
    """Carries out file effects the way ``RoundFiles`` does, synchronously."""

    def __init__(self, root: Path, layout: Layout, base: Path) -> None:
        self.root, self.layout, self.base = root, layout, base
        self.early_path = root / "early.part"

    def path(self, item: Input) -> Path:
        if isinstance(item, Spool):
            return self.root / f"{item.task_id}.st"
        return self.root / f"acc-{item.count}.f64"

    def sources(self, inputs: Sequence[Input]) -> list[Source]:
        return [Source(self.path(i), i.weight if isinstance(i, Spool) else None) for i in inputs]

    def run(self, c: RoundCore, effects: list[Effect], out: Path) -> list[Effect]:
        later: list[Effect] = []
        for effect in effects:
            match effect:
                case Fold(task_id, _, _, inputs, count):
                    if inputs:
                        aggregate.fold(
                            self.sources(inputs), self.layout, self.path(Accumulator(count)), 512
                        )
                    later += c.handle(Folded(task_id))
                case EarlyStep(tensors, early) | FinishEarly(tensors, early):
                    sources = self.sources([Spool(m.task_id, m.weight) for m in early.members])
                    digests, unsynced = eager.write_step(
                        self.early_path,
                        self.layout,
                        sources,
                        early.total_weight,
                        tensors,
                        early,
                        SEGMENT,
                        512,
                        base=self.base,
                    )
                    later += c.handle(EarlyWritten(tensors, digests, unsynced))
                    if isinstance(effect, FinishEarly):
                        assert c.early is not None
                        eager.finish(self.early_path, self.layout, SEGMENT, c.early.digests, out)
                        later += c.handle(Finalized(len(early.done)))
                case Aggregate(inputs, total):
                    aggregate.finalize(
                        self.sources(inputs), self.layout, total, out, SEGMENT, 512, base=self.base
                    )
                    later += c.handle(Finalized(None))
        return later


@pytest.mark.parametrize("declare", [True, False])
def test_early_and_plain_aggregation_give_the_same_model(tmp_path: Path, declare: bool) -> None:
    paths = [_update(tmp_path / f"t-{n}.st", seed) for n, seed in (("a", 1), ("b", 2), ("c", 3))]
    layout = compute_manifest(paths[0], SEGMENT).layout
    weights = {"t-a": 2.0, "t-b": 7.0, "t-c": 3.0}
    c = RoundCore(1, layout, SEGMENT, RoundRules(min_clients=3, train_timeout=None), 0.0)
    files = Files(tmp_path, layout, paths[0])
    out = tmp_path / ("early.st" if declare else "plain.st")
    feed(c, *assigned("a", "b", "c"))
    if declare:
        feed(c, *(WeightDeclared(t, w) for t, w in weights.items()))
    # segments arrive in a different order per site; an update is committed when complete
    for k in range(SEGMENTS):
        for t in weights:
            feed(c, SegmentHeld(t, (k + len(t) * 7) % SEGMENTS))
        files.run(c, c.handle(Tick(float(k))), out)
    for t, w in weights.items():
        files.run(c, feed(c, UpdateCommitted(t, w), Tick(100.0)), out)
    assert c.state is RoundState.OPEN
    feed(c, ClosingBegun())
    closing = c.handle(Tick(101.0))
    assert isinstance(closing[0], FinishEarly if declare else Aggregate)
    assert files.run(c, closing, out) == [CloseRound(3, 12.0, closing_how(declare))]
    plain = tmp_path / "numpy.st"
    sources = [Source(p, weights[p.stem]) for p in paths]
    aggregate.finalize(sources, layout, 12.0, plain, SEGMENT, 4096, base=paths[0])
    assert out.read_bytes() == plain.read_bytes()


def closing_how(declare: bool) -> str:
    return "3 of 3 tensors while updates arrived" if declare else "from the spools"
