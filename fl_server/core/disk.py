"""What a job keeps on the server's disk, and the most it needs at once.

Retention. A round's global model is needed until the next round closes (its sites
download it); after that only the job's ``keep`` setting decides: the initial model,
the ``last`` rounds before the newest, every ``every``-th round, and the newest (the
final model once the job is done). ``dropped`` names the models a job can delete once
round ``done`` has closed.

The peak. While round ``r`` closes, the server holds at once: the models kept so far,
the newest one (round ``r - 1``, which the round started from), the model being written
(round ``r``), one update spool per site that takes part, and, when three or more
updates are folded while others still arrive, two float64 accumulators (the one being
written and the one it replaces: 8 bytes per element each). ``peak_bytes`` is that sum
for the job's worst round; a job whose peak fits the free disk is never refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.config import KeepRounds

ACC_ITEM_BYTES = 8  # an accumulator holds every element as float64


def kept(keep: KeepRounds, done: int) -> frozenset[int]:
    """The rounds whose models the job keeps once round ``done`` has closed."""
    rounds = {done, *range(max(1, done - keep.last), done)}
    if keep.initial:
        rounds.add(0)
    if keep.every is not None:
        rounds.update(range(keep.every, done + 1, keep.every))
    return frozenset(r for r in rounds if 0 <= r <= done)


def dropped(keep: KeepRounds, done: int, existing: Iterable[int]) -> list[int]:
    """Of the rounds whose models exist, those to delete once round ``done`` closed."""
    keep_now = kept(keep, done)
    return sorted(r for r in existing if r not in keep_now)


def models_held(keep: KeepRounds, num_rounds: int) -> int:
    """The most global models on disk at once: those kept when a round starts (the
    newest among them), and the one that round writes."""
    return max(len(kept(keep, r - 1)) for r in range(1, num_rounds + 1)) + 1


def peak_bytes(
    *, model_bytes: int, elements: int, keep: KeepRounds, num_rounds: int, sites: int
) -> int:
    """The most disk the job needs at once (see the module's docstring)."""
    accumulators = 2 * elements * ACC_ITEM_BYTES if sites >= 3 else 0
    return model_bytes * (models_held(keep, num_rounds) + sites) + accumulators
